"""Provider lookups (what a provider holds of one message we may have sent) through the real SDKs and the sandbox:
Twilio's Messages list and SendGrid's Email Activity API, found, absent and could-not-tell."""

from __future__ import annotations

from datetime import timedelta

import pytest

from outreach.core.clock import utcnow
from outreach.core.config import Settings
from outreach.ops.sandbox import SandboxServer
from outreach.providers import build_providers
from outreach.providers.base import EmailMessage, Lookup, LookupAnswer, Sighting, SmsMessage
from outreach.providers.sendgrid import SendGridProvider
from outreach.providers.twilio import TwilioProvider

OUTBOX_ID = "0d6f4c3b2a1948e7b5c6d7e8f9a0b1c2"
OTHER_ID = "9a8b7c6d5e4f30211203f4e5d6c7b8a9"
NUMBER = "+8613800138000"
ADDRESS = "ana@example.org"
TEXT = "Hi Ana, the role is on its way to your inbox."


def sms(outbox_id: str = OUTBOX_ID, to: str = NUMBER, body: str = TEXT) -> SmsMessage:
    return SmsMessage(
        message_id=outbox_id, to=to, body=body, status_callback=f"http://127.0.0.1:9/s?outreach_id={outbox_id}"
    )


def email(outbox_id: str = OUTBOX_ID) -> EmailMessage:
    return EmailMessage(
        message_id=outbox_id,
        to=ADDRESS,
        subject="The Backend Engineer role",
        text="Hi Ana, have a look at the role.",
        html="",
        from_email="Talent Team <talent@example.com>",
        custom_args={"outreach_id": outbox_id},
    )


def twilio(settings: Settings, sandbox: SandboxServer) -> TwilioProvider:
    return build_providers(settings, sandbox_url=sandbox.url).sms  # type: ignore[return-value]


def sendgrid(settings: Settings, sandbox: SandboxServer, *, activity: bool = True) -> SendGridProvider:
    settings = settings.with_overrides(sendgrid_email_activity=activity)
    return build_providers(settings, sandbox_url=sandbox.url).email  # type: ignore[return-value]


def asked(outbox_id: str = OUTBOX_ID, to: str = NUMBER, body: str | None = TEXT, ago: float = 60.0) -> Lookup:
    return Lookup(message_id=outbox_id, to=to, since=utcnow() - timedelta(seconds=ago), body=body)


# -- Twilio: the Messages list ----------------------------------------------------------------------------


def test_twilio_finds_our_sms_by_its_text(provider_settings: Settings, sandbox: SandboxServer) -> None:
    provider = twilio(provider_settings, sandbox)
    assert provider.can_look_up
    sent = provider.send_sms(sms())
    provider.send_sms(sms(OTHER_ID, to="+8613800138001"))  # someone else's: not listed for this number

    answer = provider.look_up(asked())

    assert answer == LookupAnswer((Sighting(sent.provider_message_id, "body"),))
    assert sandbox.stats()["twilio"]["lookups"] == 1


def test_twilio_marks_other_messages_to_the_number_as_not_ours(
    provider_settings: Settings, sandbox: SandboxServer
) -> None:
    provider = twilio(provider_settings, sandbox)
    other = provider.send_sms(sms(OTHER_ID, body="Your interview is on Tuesday."))
    assert provider.look_up(asked()) == LookupAnswer((Sighting(other.provider_message_id, "none"),))
    # Without our text (a row whose body was never stored) nothing can be recognised as ours.
    mine = provider.send_sms(sms())
    assert {s.match for s in provider.look_up(asked(body=None)).sightings} == {"none"}
    assert Sighting(mine.provider_message_id, "body") in provider.look_up(asked()).sightings


def test_twilio_answers_nothing_for_a_number_without_messages_since_the_hand_off(
    provider_settings: Settings, sandbox: SandboxServer
) -> None:
    provider = twilio(provider_settings, sandbox)
    assert provider.look_up(asked()) == LookupAnswer(())
    provider.send_sms(sms())
    # A window opening well after the message (its hand-off came later): not part of the answer.
    later = Lookup(message_id=OUTBOX_ID, to=NUMBER, since=utcnow() + timedelta(hours=1), body=TEXT)
    assert provider.look_up(later) == LookupAnswer(())


def test_twilio_through_a_messaging_service(provider_settings: Settings, sandbox: SandboxServer) -> None:
    settings = provider_settings.with_overrides(sms_from="", twilio_messaging_service_sid="MG" + "2" * 32)
    provider = twilio(settings, sandbox)
    sent = provider.send_sms(sms())
    assert provider.look_up(asked()) == LookupAnswer((Sighting(sent.provider_message_id, "body"),))


def test_twilio_lists_only_what_it_shows_after_its_delay(provider_settings: Settings, sandbox: SandboxServer) -> None:
    provider = twilio(provider_settings, sandbox)
    provider.send_sms(sms())
    sandbox.set_lookups("twilio", "on", delay=3600)
    assert provider.look_up(asked()) == LookupAnswer(())


@pytest.mark.parametrize(("mode", "status"), [("fail", 500), ("off", 403)])
def test_twilio_lookup_that_fails_cannot_tell(
    provider_settings: Settings, sandbox: SandboxServer, mode: str, status: int
) -> None:
    provider = twilio(provider_settings, sandbox)
    provider.send_sms(sms())
    sandbox.set_lookups("twilio", mode)
    answer = provider.look_up(asked())
    assert answer.sightings == () and answer.problem == f"the Messages list answered HTTP {status}"
    assert NUMBER not in answer.problem and "+86" not in answer.problem


def test_twilio_lookup_against_nothing_listening_cannot_tell(provider_settings: Settings) -> None:
    settings = provider_settings.with_overrides(twilio_base_url="http://127.0.0.1:9")
    answer = TwilioProvider(settings).look_up(asked())
    assert answer.sightings == () and answer.problem is not None and "failed" in answer.problem


# -- SendGrid: Email Activity ------------------------------------------------------------------------------


def test_sendgrid_finds_our_mail_by_its_custom_arg(provider_settings: Settings, sandbox: SandboxServer) -> None:
    provider = sendgrid(provider_settings, sandbox)
    assert provider.can_look_up
    sent = provider.send_email(email())
    provider.send_email(email(OTHER_ID))

    answer = provider.look_up(asked(to=ADDRESS, body=None))

    # Email Activity's msg_id begins with the send's X-Message-Id, which is what a send records.
    assert answer == LookupAnswer((Sighting(sent.provider_message_id, "id"),))
    assert provider.look_up(asked("f" * 32, to=ADDRESS, body=None)) == LookupAnswer(())


def test_sendgrid_lookups_are_off_unless_the_account_has_email_activity(
    provider_settings: Settings, sandbox: SandboxServer
) -> None:
    provider = sendgrid(provider_settings, sandbox, activity=False)
    provider.send_email(email())
    assert not provider.can_look_up
    answer = provider.look_up(asked(to=ADDRESS, body=None))
    assert answer.sightings == () and "OUTREACH_SENDGRID_EMAIL_ACTIVITY" in (answer.problem or "")
    assert sandbox.stats()["sendgrid"]["lookups"] == 0  # not even asked


@pytest.mark.parametrize(("mode", "status"), [("fail", 500), ("off", 403)])
def test_sendgrid_lookup_that_fails_cannot_tell(
    provider_settings: Settings, sandbox: SandboxServer, mode: str, status: int
) -> None:
    provider = sendgrid(provider_settings, sandbox)
    provider.send_email(email())
    sandbox.set_lookups("sendgrid", mode)
    answer = provider.look_up(asked(to=ADDRESS, body=None))
    assert answer == LookupAnswer(problem=f"Email Activity answered HTTP {status}")


def test_sendgrid_lookup_shows_nothing_before_its_delay(provider_settings: Settings, sandbox: SandboxServer) -> None:
    provider = sendgrid(provider_settings, sandbox)
    provider.send_email(email())
    sandbox.set_lookups("sendgrid", "on", delay=3600)
    assert provider.look_up(asked(to=ADDRESS, body=None)) == LookupAnswer(())
    sandbox.set_lookups("sendgrid", "on", delay=0)
    assert len(provider.look_up(asked(to=ADDRESS, body=None)).sightings) == 1


def test_sendgrid_lookup_refuses_what_is_not_an_outbox_id(provider_settings: Settings, sandbox: SandboxServer) -> None:
    provider = sendgrid(provider_settings, sandbox)
    answer = provider.look_up(asked('x") OR (1=1', to=ADDRESS, body=None))
    assert answer.problem == "not an outbox id"
    assert sandbox.stats()["sendgrid"]["lookups"] == 0
