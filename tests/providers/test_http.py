"""Connection reuse through the real SDKs (the sandbox counts the TCP connections it accepts), and which network
failures prove that nothing was sent."""

from __future__ import annotations

import http.client
import socket
import urllib.error
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
import urllib3
from python_http_client.exceptions import BadRequestsError, HTTPError

from outreach.core.config import Settings
from outreach.core.errors import AmbiguousProviderError, TransientProviderError
from outreach.ops.sandbox import SandboxServer
from outreach.providers import Providers
from outreach.providers.base import SmsMessage
from outreach.providers.http import PooledClient, nothing_sent, pool_manager
from outreach.providers.sendgrid import SendGridProvider
from outreach.providers.twilio import TwilioProvider
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
    from outreach.core.errors import PermanentProviderError

    with pytest.raises(PermanentProviderError):
        providers.email.send_email(email(subject=""))
    providers.email.send_email(email())
    assert sandbox.stats()["connections"] == 1


def test_sendgrid_builds_no_urllib_opener_per_send(
    providers: Providers, sandbox: SandboxServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The SDK's request building is kept (URL, headers, JSON body, its Response), but not the urllib opener it
    would build per call (default handlers, proxies read from the environment) and never use with the pool."""
    import urllib.request

    built: list[object] = []
    original = urllib.request.build_opener
    monkeypatch.setattr(urllib.request, "build_opener", lambda *a: built.append(a) or original(*a))
    result = providers.email.send_email(email(message_id="f" * 32))
    assert built == []
    record = sandbox.wait_for(1, timeout=5)[0]
    assert record.id == result.provider_message_id and record.custom_args == {"outreach_id": "f" * 32}


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


# -- which network failures prove nothing was sent (outreach.providers.http.nothing_sent) --------------------------
# The exceptions are built the way urllib3, requests and urllib raise them; the SDK tests above produce the real
# ones over the network (refused, slow, reset).

_URL = "/v3/mail/send"


def _max_retries(reason: Exception) -> urllib3.exceptions.MaxRetryError:
    return urllib3.exceptions.MaxRetryError(None, _URL, reason)  # type: ignore[arg-type]


_REFUSED = urllib3.exceptions.NewConnectionError(None, "refused")  # type: ignore[arg-type]
_DNS = urllib3.exceptions.NameResolutionError("api.example", None, socket.gaierror())  # type: ignore[arg-type]
_CONNECT_TIMEOUT = urllib3.exceptions.ConnectTimeoutError(None, "connect timed out")
_READ_TIMEOUT = urllib3.exceptions.ReadTimeoutError(None, _URL, "read timed out")  # type: ignore[arg-type]
_RESET = urllib3.exceptions.ProtocolError("Connection aborted.", ConnectionResetError(104, "reset"))
_CLOSED = urllib3.exceptions.ProtocolError("Connection aborted.", http.client.RemoteDisconnected("closed"))


@pytest.mark.parametrize(
    "error",
    [
        _REFUSED,
        _DNS,
        _CONNECT_TIMEOUT,
        _max_retries(_REFUSED),
        _max_retries(_DNS),
        _max_retries(_CONNECT_TIMEOUT),
        requests.ConnectTimeout(_max_retries(_CONNECT_TIMEOUT)),
        requests.ConnectionError(_max_retries(_REFUSED)),
        urllib.error.URLError(ConnectionRefusedError(111, "refused")),
    ],
    ids=lambda e: type(e).__name__,
)
def test_a_connection_that_never_opened_sent_nothing(error: Exception) -> None:
    assert nothing_sent(error)


@pytest.mark.parametrize(
    "error",
    [
        _READ_TIMEOUT,
        _RESET,
        _CLOSED,
        _max_retries(urllib3.exceptions.SSLError("bad record mac")),
        requests.ReadTimeout(_READ_TIMEOUT),
        requests.ConnectionError(_RESET),
        requests.exceptions.ChunkedEncodingError(_RESET),
        requests.ConnectionError("no wrapped error"),
        TimeoutError("timed out"),
        ConnectionResetError(104, "reset"),
        http.client.RemoteDisconnected("closed"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_a_failure_after_the_request_went_out_is_ambiguous(error: Exception) -> None:
    assert not nothing_sent(error)


@pytest.mark.parametrize(
    ("error", "ambiguous"),
    [
        (_max_retries(_REFUSED), False),
        (_max_retries(_CONNECT_TIMEOUT), False),
        (urllib.error.URLError(ConnectionRefusedError(111, "refused")), False),
        (_READ_TIMEOUT, True),
        (_RESET, True),
        (_CLOSED, True),
        (TimeoutError("timed out"), True),
    ],
    ids=lambda e: type(e).__name__,
)
def test_sendgrid_maps_them_to_transient_or_ambiguous(
    provider_settings: Settings, error: Exception, ambiguous: bool
) -> None:
    mapped = SendGridProvider(provider_settings).map_error(error)
    assert isinstance(mapped, TransientProviderError)
    assert isinstance(mapped, AmbiguousProviderError) is ambiguous


@pytest.mark.parametrize(
    ("error", "ambiguous"),
    [
        (requests.ConnectTimeout(_max_retries(_CONNECT_TIMEOUT)), False),
        (requests.ConnectionError(_max_retries(_REFUSED)), False),
        (requests.ReadTimeout(_READ_TIMEOUT), True),
        (requests.ConnectionError(_RESET), True),
        (requests.exceptions.ChunkedEncodingError(_RESET), True),
    ],
    ids=lambda e: type(e).__name__,
)
def test_twilio_maps_them_to_transient_or_ambiguous(
    provider_settings: Settings, error: Exception, ambiguous: bool
) -> None:
    mapped = TwilioProvider(provider_settings).map_error(error)
    assert isinstance(mapped, TransientProviderError)
    assert isinstance(mapped, AmbiguousProviderError) is ambiguous
