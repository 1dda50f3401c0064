"""TwilioProvider through the real ``twilio`` SDK against the sandbox, over real HTTP."""

from __future__ import annotations

import re
import socket
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import parse_qs

import pytest
from twilio.request_validator import RequestValidator

from outreach.core.config import Secret, Settings
from outreach.core.errors import (
    AmbiguousProviderError,
    ConfigurationError,
    PermanentProviderError,
    TransientProviderError,
)
from outreach.ops.sandbox import SandboxServer
from outreach.providers import Providers, build_providers
from outreach.providers.base import SmsMessage
from outreach.providers.twilio import TwilioProvider

if TYPE_CHECKING:
    from tests.providers.conftest import Receiver

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "twilio"
OUTBOX_ID = "0d6f4c3b2a1948e7b5c6d7e8f9a0b1c2"
NUMBER = "+8613800138000"


def sms(**changes: object) -> SmsMessage:
    fields: dict[str, object] = {"message_id": OUTBOX_ID, "to": NUMBER, "body": "Hi Ana, see you Tuesday."}
    fields.update(changes)
    return SmsMessage(**fields)  # type: ignore[arg-type]


def form(body: bytes) -> dict[str, str]:
    return {key: values[-1] for key, values in parse_qs(body.decode()).items()}


def test_sms_lands_in_the_sandbox(providers: Providers, sandbox: SandboxServer, provider_settings: Settings) -> None:
    result = providers.sms.send_sms(sms(validity_period=3600, status_callback="http://127.0.0.1:9/status"))

    (record,) = sandbox.wait_for(1, timeout=2)
    assert result.provider == "twilio"
    assert re.fullmatch(r"SM[0-9a-f]{32}", result.provider_message_id)
    assert record.id == result.provider_message_id
    assert (record.provider, record.channel) == ("twilio", "sms")
    assert (record.to, record.from_, record.body) == (NUMBER, provider_settings.sms_from, "Hi Ana, see you Tuesday.")
    assert record.validity_period == 3600
    assert record.status_callback == "http://127.0.0.1:9/status"
    assert record.segments == 1
    assert record.custom_args == {} and record.subject == ""


def test_messaging_service_is_used_without_a_from_number(provider_settings: Settings, sandbox: SandboxServer) -> None:
    service = "MG" + "2" * 32
    settings = provider_settings.with_overrides(sms_from="", twilio_messaging_service_sid=service)
    build_providers(settings, sandbox_url=sandbox.url).sms.send_sms(sms())
    assert sandbox.wait_for(1, timeout=2)[0].from_ == service


def test_long_unicode_body_counts_ucs2_segments(providers: Providers, sandbox: SandboxServer) -> None:
    providers.sms.send_sms(sms(body="您好，" * 30))  # 90 UCS-2 characters: two 67-character segments
    assert sandbox.wait_for(1, timeout=2)[0].segments == 2


def test_invalid_number_fault_is_permanent_21211_without_the_number(
    providers: Providers, sandbox: SandboxServer
) -> None:
    sandbox.fail("twilio", "21211")
    with pytest.raises(PermanentProviderError) as caught:
        providers.sms.send_sms(sms())
    error = caught.value
    assert (error.provider, error.status, error.code, error.suppress) == ("twilio", 400, "21211", False)
    assert NUMBER not in str(error) and "13800138000" not in str(error)
    assert error.__cause__ is None and error.__suppress_context__


def test_malformed_number_is_rejected_by_validation_as_21211(providers: Providers, sandbox: SandboxServer) -> None:
    with pytest.raises(PermanentProviderError) as caught:
        providers.sms.send_sms(sms(to="138 0013 8000"))
    assert caught.value.code == "21211"
    assert sandbox.messages() == []


def test_unsubscribed_recipient_is_permanent_and_suppressed(providers: Providers, sandbox: SandboxServer) -> None:
    sandbox.fail("twilio", "21610")
    with pytest.raises(PermanentProviderError) as caught:
        providers.sms.send_sms(sms())
    assert (caught.value.code, caught.value.suppress) == ("21610", True)


def test_rate_limit_is_transient(providers: Providers, sandbox: SandboxServer) -> None:
    sandbox.fail("twilio", "429")
    with pytest.raises(TransientProviderError) as caught:
        providers.sms.send_sms(sms())
    assert (caught.value.status, caught.value.code) == (429, "20429")


def test_server_error_is_transient(providers: Providers, sandbox: SandboxServer) -> None:
    sandbox.fail("twilio", "500")
    with pytest.raises(TransientProviderError) as caught:
        providers.sms.send_sms(sms())
    assert caught.value.status == 500
    providers.sms.send_sms(sms())
    assert len(sandbox.wait_for(1, timeout=2)) == 1


def test_answer_slower_than_the_timeout_is_ambiguous(providers: Providers, sandbox: SandboxServer) -> None:
    sandbox.fail("twilio", "slow", delay=2.0)
    started = time.monotonic()
    with pytest.raises(AmbiguousProviderError) as caught:
        providers.sms.send_sms(sms())
    assert time.monotonic() - started < 1.5
    assert "timed out" in str(caught.value)


def test_connection_reset_is_ambiguous_and_the_pool_recovers(providers: Providers, sandbox: SandboxServer) -> None:
    providers.sms.send_sms(sms())  # leaves a kept-alive connection in the pool
    sandbox.fail("twilio", "reset")
    with pytest.raises(AmbiguousProviderError) as caught:
        providers.sms.send_sms(sms())
    assert "connection lost before the answer" in str(caught.value)
    providers.sms.send_sms(sms())
    assert len(sandbox.wait_for(2, timeout=2)) == 2


def test_refused_connection_is_transient_not_ambiguous(provider_settings: Settings) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    provider = TwilioProvider(provider_settings.with_overrides(twilio_base_url=f"http://127.0.0.1:{port}"))
    with pytest.raises(TransientProviderError) as caught:
        provider.send_sms(sms())
    assert "connection failed" in str(caught.value)
    assert not isinstance(caught.value, AmbiguousProviderError)  # nothing was sent: safe to retry


def test_status_callbacks_are_signed_and_in_order(
    providers: Providers, receiver: Receiver, provider_settings: Settings
) -> None:
    callback = f"{receiver.url}/webhooks/twilio/status?outreach_id={OUTBOX_ID}"
    result = providers.sms.send_sms(sms(status_callback=callback))

    sent, delivered = receiver.wait_for(2)
    validator = RequestValidator(provider_settings.twilio_auth_token.reveal())
    for post, status in ((sent, "sent"), (delivered, "delivered")):
        params = form(post.body)
        url = receiver.url + post.path
        assert url == callback
        assert validator.validate(url, params, post.headers["X-Twilio-Signature"])
        assert not RequestValidator("another-token").validate(url, params, post.headers["X-Twilio-Signature"])
        assert params["MessageStatus"] == params["SmsStatus"] == status
        assert params["MessageSid"] == params["SmsSid"] == result.provider_message_id
        sender = (provider_settings.twilio_account_sid, NUMBER, provider_settings.sms_from)
        assert (params["AccountSid"], params["To"], params["From"]) == sender
        assert params["ApiVersion"] == "2010-04-01"
        assert "ErrorCode" not in params


def test_undelivered_callback_carries_the_error_code(
    providers: Providers, sandbox: SandboxServer, receiver: Receiver
) -> None:
    documented = form((FIXTURES / "status_callback_undelivered.form").read_bytes())
    sandbox.fail("twilio", "undelivered")
    providers.sms.send_sms(sms(status_callback=receiver.url + "/status"))
    sent, undelivered = (form(post.body) for post in receiver.wait_for(2))
    assert sent["MessageStatus"] == "sent"
    assert (undelivered["MessageStatus"], undelivered["ErrorCode"]) == ("undelivered", "30003")
    assert set(documented) <= set(undelivered)


def test_callbacks_have_the_documented_fields(providers: Providers, receiver: Receiver) -> None:
    documented = form((FIXTURES / "status_callback_delivered.form").read_bytes())
    providers.sms.send_sms(sms(status_callback=receiver.url + "/status"))
    delivered = form(receiver.wait_for(2)[1].body)
    assert set(documented) <= set(delivered)


def test_twilio_region_and_edge_from_the_environment_are_ignored(
    provider_settings: Settings, sandbox: SandboxServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TWILIO_REGION", "ie1")
    monkeypatch.setenv("TWILIO_EDGE", "dublin")
    build_providers(provider_settings, sandbox_url=sandbox.url).sms.send_sms(sms())
    assert len(sandbox.wait_for(1, timeout=2)) == 1


def test_sends_from_many_threads_share_one_client(providers: Providers, sandbox: SandboxServer) -> None:
    ids: list[str] = []

    def send() -> None:
        for _ in range(10):
            ids.append(providers.sms.send_sms(sms()).provider_message_id)

    threads = [threading.Thread(target=send) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(ids)) == 160
    assert {m.id for m in sandbox.wait_for(160, timeout=5)} == set(ids)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"twilio_account_sid": ""}, "TWILIO_ACCOUNT_SID"),
        ({"sms_from": "", "twilio_messaging_service_sid": ""}, "OUTREACH_SMS_FROM"),
    ],
)
def test_missing_configuration_is_reported(provider_settings: Settings, changes: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        TwilioProvider(provider_settings.with_overrides(**changes))


def test_without_a_sandbox_missing_credentials_fail_fast() -> None:
    with pytest.raises(ConfigurationError):
        build_providers(Settings(sendgrid_api_key=Secret("SG.x")))
