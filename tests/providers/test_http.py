"""Connection reuse through the real SDKs: the sandbox counts the TCP connections it accepts."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
from python_http_client.exceptions import BadRequestsError, HTTPError

from outreach.providers import Providers
from outreach.providers.base import SmsMessage
from outreach.providers.http import PooledClient, pool_manager
from outreach.sandbox import SandboxServer
from tests.providers.test_sendgrid import email


def test_sendgrid_sends_one_after_another_on_one_connection(providers: Providers, sandbox: SandboxServer) -> None:
    for index in range(10):
        providers.email.send_email(email(message_id=f"{index:032x}"))
    assert len(sandbox.messages()) == 10
    assert sandbox.stats()["connections"] == 1


def test_sendgrid_threads_share_a_pool_of_connections(providers: Providers, sandbox: SandboxServer) -> None:
    with ThreadPoolExecutor(max_workers=4) as pool:
        list(pool.map(lambda i: providers.email.send_email(email(message_id=f"{i:032x}")), range(40)))
    assert len(sandbox.messages()) == 40
    assert sandbox.stats()["connections"] <= 4


def test_twilio_sends_one_after_another_on_one_connection(providers: Providers, sandbox: SandboxServer) -> None:
    for index in range(5):
        providers.sms.send_sms(SmsMessage(message_id=f"{index:032x}", to="+8613800138000", body="Hi"))
    assert len(sandbox.messages()) == 5
    assert sandbox.stats()["connections"] == 1


def test_connection_is_reused_after_a_rejected_request(providers: Providers, sandbox: SandboxServer) -> None:
    from outreach.errors import PermanentProviderError

    with pytest.raises(PermanentProviderError):
        providers.email.send_email(email(subject=""))
    providers.email.send_email(email())
    assert sandbox.stats()["connections"] == 1


def test_error_answers_raise_the_sdk_error_classes_with_status_body_and_headers(sandbox: SandboxServer) -> None:
    client = PooledClient(
        host=sandbox.url,
        request_headers={"Authorization": "Bearer SG.x", "Content-Type": "application/json"},
        version=3,
        timeout=2.0,
        pool=pool_manager(2, 2.0),
    )
    with pytest.raises(BadRequestsError) as caught:
        client.mail.send.post(request_body={"personalizations": []})
    error: HTTPError = caught.value
    assert error.status_code == 400
    assert b"errors" in error.body
    assert error.headers.get("content-type", "").startswith("application/json")
    answer = client.mail.send.post(request_body=email_payload())
    assert answer.status_code == 202
    assert answer.headers.get("X-Message-Id")


def email_payload() -> dict[str, object]:
    return {
        "personalizations": [{"to": [{"email": "ana@example.org"}], "custom_args": {"outreach_id": "1" * 32}}],
        "from": {"email": "talent@example.com"},
        "subject": "Hello",
        "content": [{"type": "text/plain", "value": "Hi"}],
    }
