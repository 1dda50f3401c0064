"""SendGridProvider through the real ``sendgrid`` SDK against the sandbox, over real HTTP."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from sendgrid.helpers.eventwebhook import EventWebhook

from outreach.core.clock import utcnow
from outreach.core.config import Secret, Settings
from outreach.core.errors import (
    AmbiguousProviderError,
    ConfigurationError,
    PermanentProviderError,
    TransientProviderError,
)
from outreach.ops.sandbox import SandboxServer
from outreach.providers import Providers, build_providers
from outreach.providers.base import EmailMessage, SmsMessage
from outreach.providers.sendgrid import SendGridProvider

if TYPE_CHECKING:
    from tests.providers.conftest import Receiver

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "sendgrid"
OUTBOX_ID = "5f2b9c0e8d7a4b6c9e1f3a2d4c6b8e0f"


def email(**changes: object) -> EmailMessage:
    fields: dict[str, object] = {
        "message_id": OUTBOX_ID,
        "to": "ana@example.org",
        "subject": "The Backend Engineer role",
        "text": "Hi Ana, have a look at the role.",
        "html": "<p>Hi Ana, have a look at the <b>role</b>.</p>",
        "from_email": "Talent Team <talent@example.com>",
        "categories": ("jd_intro", "jd_intro_en"),
        "custom_args": {"outreach_id": OUTBOX_ID},
        "headers": {"List-Unsubscribe": "<https://outreach.example.com/u/opaque>"},
    }
    fields.update(changes)
    return EmailMessage(**fields)  # type: ignore[arg-type]


def test_email_lands_in_the_sandbox_with_every_field(providers: Providers, sandbox: SandboxServer) -> None:
    result = providers.email.send_email(email(reply_to="Recruiting <recruiting@example.com>"))

    (record,) = sandbox.wait_for(1, timeout=2)
    assert result.provider == "sendgrid"
    assert result.provider_message_id == record.id and len(record.id) == 22
    assert (record.provider, record.channel) == ("sendgrid", "email")
    assert record.to == "ana@example.org"
    assert record.from_ == "Talent Team <talent@example.com>"
    assert record.reply_to == "Recruiting <recruiting@example.com>"
    assert record.subject == "The Backend Engineer role"
    assert record.text == "Hi Ana, have a look at the role."
    assert record.html == "<p>Hi Ana, have a look at the <b>role</b>.</p>"
    assert record.custom_args == {"outreach_id": OUTBOX_ID}
    assert record.categories == ["jd_intro", "jd_intro_en"]
    assert record.headers == {"List-Unsubscribe": "<https://outreach.example.com/u/opaque>"}


def test_outreach_id_is_added_even_without_custom_args(providers: Providers, sandbox: SandboxServer) -> None:
    providers.email.send_email(email(custom_args={}, categories=("jd_intro", "jd_intro"), headers={}))
    (record,) = sandbox.wait_for(1, timeout=2)
    assert record.custom_args == {"outreach_id": OUTBOX_ID}
    assert record.categories == ["jd_intro"]  # SendGrid rejects duplicate categories
    assert record.headers == {}


def test_reply_to_falls_back_to_the_setting(provider_settings: Settings, sandbox: SandboxServer) -> None:
    settings = provider_settings.with_overrides(email_reply_to="recruiting@example.com")
    build_providers(settings, sandbox_url=sandbox.url).email.send_email(email())
    assert sandbox.wait_for(1, timeout=2)[0].reply_to == "recruiting@example.com"


def test_html_only_and_text_only_mails_are_accepted(providers: Providers, sandbox: SandboxServer) -> None:
    providers.email.send_email(email(text=""))
    providers.email.send_email(email(html=""))
    html_only, text_only = sandbox.wait_for(2, timeout=2)
    assert (html_only.text, bool(html_only.html)) == ("", True)
    assert (bool(text_only.text), text_only.html) == (True, "")


def test_rate_limit_is_transient_with_the_reset_time(providers: Providers, sandbox: SandboxServer) -> None:
    sandbox.fail("sendgrid", "429", reset_after=3)
    with pytest.raises(TransientProviderError) as caught:
        providers.email.send_email(email())
    error = caught.value
    assert (error.provider, error.status, error.code) == ("sendgrid", 429, "429")
    assert error.retry_after is not None and 2.0 <= error.retry_after <= 4.0
    assert sandbox.messages() == []


def test_rate_limit_reset_in_the_past_still_waits_a_second(providers: Providers, sandbox: SandboxServer) -> None:
    sandbox.fail("sendgrid", "429", reset_after=0)
    with pytest.raises(TransientProviderError) as caught:
        providers.email.send_email(email())
    assert caught.value.retry_after == pytest.approx(1.0, abs=1.0)
    assert caught.value.retry_after is not None and caught.value.retry_after >= 1.0


def test_server_error_is_transient_and_the_next_send_works(providers: Providers, sandbox: SandboxServer) -> None:
    sandbox.fail("sendgrid", "500")
    with pytest.raises(TransientProviderError) as caught:
        providers.email.send_email(email())
    assert (caught.value.status, caught.value.code, caught.value.retry_after) == (500, "500", None)
    providers.email.send_email(email())
    assert len(sandbox.wait_for(1, timeout=2)) == 1


def test_invalid_address_is_permanent_and_names_the_field_not_the_address(
    providers: Providers, sandbox: SandboxServer
) -> None:
    with pytest.raises(PermanentProviderError) as caught:
        providers.email.send_email(email(to="ana.example.org"))
    error = caught.value
    assert (error.status, error.code, error.suppress) == (400, "400", False)
    assert "personalizations.0.to.0.email" in str(error)
    assert "ana.example.org" not in str(error)
    assert error.__cause__ is None and error.__suppress_context__


def test_missing_subject_is_permanent(providers: Providers) -> None:
    with pytest.raises(PermanentProviderError) as caught:
        providers.email.send_email(email(subject=""))
    assert caught.value.status == 400 and "subject" in str(caught.value)


def test_answer_slower_than_the_timeout_is_ambiguous(providers: Providers, sandbox: SandboxServer) -> None:
    # The request went out; SendGrid may accept it after we stopped waiting.
    sandbox.fail("sendgrid", "slow", delay=2.0)
    started = time.monotonic()
    with pytest.raises(AmbiguousProviderError) as caught:
        providers.email.send_email(email())
    assert time.monotonic() - started < 1.5  # the 0.5 s provider_timeout, not the 2 s delay
    assert "timed out" in str(caught.value)


@pytest.mark.parametrize("fault", ["reset", "accept_reset"])
def test_connection_reset_after_sending_is_ambiguous(providers: Providers, sandbox: SandboxServer, fault: str) -> None:
    # Whether SendGrid accepted it first (accept_reset) or not (reset), the client sees the same thing.
    sandbox.fail("sendgrid", fault)  # type: ignore[arg-type]
    with pytest.raises(AmbiguousProviderError):
        providers.email.send_email(email())
    providers.email.send_email(email())
    assert len(sandbox.wait_for(1 if fault == "reset" else 2, timeout=2)) == (1 if fault == "reset" else 2)


def test_refused_connection_is_transient_not_ambiguous(provider_settings: Settings) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    provider = SendGridProvider(provider_settings.with_overrides(sendgrid_host=f"http://127.0.0.1:{port}"))
    with pytest.raises(TransientProviderError) as caught:
        provider.send_email(email())
    assert "connection failed" in str(caught.value)
    assert not isinstance(caught.value, AmbiguousProviderError)  # nothing was sent: safe to retry


def test_signed_events_verify_with_the_sdk_helper(
    make_sandbox: Callable[..., SandboxServer], receiver: Receiver, provider_settings: Settings
) -> None:
    sandbox = make_sandbox(sendgrid_event_url=f"{receiver.url}/webhooks/sendgrid")
    result = build_providers(provider_settings, sandbox_url=sandbox.url).email.send_email(email())

    (post,) = receiver.wait_for(1)
    assert post.path == "/webhooks/sendgrid"
    payload = post.body.decode()
    signature = post.headers["X-Twilio-Email-Event-Webhook-Signature"]
    timestamp = post.headers["X-Twilio-Email-Event-Webhook-Timestamp"]
    verifier = EventWebhook(sandbox.sendgrid_public_key)
    assert verifier.verify_signature(payload, signature, timestamp) is True
    assert verifier.verify_signature(payload.replace("delivered", "bounce"), signature, timestamp) is False

    processed, delivered = json.loads(payload)
    assert (processed["event"], delivered["event"]) == ("processed", "delivered")
    for event in (processed, delivered):
        assert event["email"] == "ana@example.org"
        assert event["outreach_id"] == OUTBOX_ID  # custom args arrive as top-level keys
        assert event["sg_message_id"].startswith(result.provider_message_id + ".filter0001.")
        assert event["category"] == ["jd_intro", "jd_intro_en"]
        assert abs(event["timestamp"] - utcnow().timestamp()) < 60
    assert processed["sg_event_id"] != delivered["sg_event_id"]


def test_events_have_the_documented_fields(
    make_sandbox: Callable[..., SandboxServer], receiver: Receiver, provider_settings: Settings
) -> None:
    documented = {e["event"]: e for e in json.loads((FIXTURES / "events.json").read_text())}
    sandbox = make_sandbox(sendgrid_event_url=receiver.url)
    providers = build_providers(provider_settings, sandbox_url=sandbox.url)
    providers.email.send_email(email())
    sandbox.fail("sendgrid", "bounce")
    providers.email.send_email(email(to="bo@example.org"))
    sandbox.fail("sendgrid", "dropped")
    providers.email.send_email(email(to="chen@example.cn"))

    # Each send's events come in one batch; batches of different sends may arrive in any order.
    batches = {json.loads(post.body)[0]["email"]: json.loads(post.body) for post in receiver.wait_for(3)}
    assert {email: [e["event"] for e in batch] for email, batch in batches.items()} == {
        "ana@example.org": ["processed", "delivered"],
        "bo@example.org": ["processed", "bounce"],
        "chen@example.cn": ["processed", "dropped"],
    }
    for event in (event for batch in batches.values() for event in batch):
        assert set(documented[event["event"]]) <= set(event), event["event"]


def test_missing_credentials_are_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match="SENDGRID_API_KEY"):
        SendGridProvider(Settings())


def test_sandbox_url_fills_in_placeholder_credentials(sandbox: SandboxServer) -> None:
    providers = build_providers(Settings(provider_timeout=2.0), sandbox_url=sandbox.url)
    providers.email.send_email(email())
    providers.sms.send_sms(SmsMessage(OUTBOX_ID, "+14155550100", "hi"))
    assert {m.provider for m in sandbox.wait_for(2, timeout=2)} == {"sendgrid", "twilio"}


def test_host_with_version_suffix_is_accepted(provider_settings: Settings, sandbox: SandboxServer) -> None:
    settings = provider_settings.with_overrides(sendgrid_host=sandbox.url + "/v3/", sendgrid_api_key=Secret("SG.x"))
    SendGridProvider(settings).send_email(email())
    assert len(sandbox.wait_for(1, timeout=2)) == 1


@pytest.mark.parametrize(
    "value",
    [
        "x@example.org",
        " x@example.org ",
        "Recruiting <jobs@example.com>",
        '"Doe, Jane" <jane@example.org>',
        "jobs@example.com (Jobs)",
        "x@@y",
        "a..b@c",
        "ü@example.org",
        "a@[1.2.3.4]",
        "not an address",
    ],
)
def test_address_field_answers_as_the_parser_does_for_bare_and_named_addresses(value: str) -> None:
    from email.utils import parseaddr

    from outreach.providers.sendgrid_payload import address_field

    name, address = parseaddr(value)
    expected = {"email": address or value.strip(), **({"name": name} if name else {})}
    assert address_field(value) == expected
