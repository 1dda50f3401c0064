"""Fixtures for the provider tests: a fresh sandbox per test, settings pointing at it, a webhook receiver.

Everything goes over real HTTP on 127.0.0.1 through the real SDKs; nothing is mocked.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, cast

import pytest

from outreach.core.config import Secret, Settings
from outreach.ops.sandbox import SandboxServer
from outreach.providers import Providers, build_providers

TOKEN = "provider-test-token"
ACCOUNT_SID = "AC" + "1" * 32
SMS_FROM = "+15005550006"


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    # A proxy from the environment must never sit between the SDKs and the local sandbox.
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.setenv(name, "127.0.0.1,localhost")


@pytest.fixture
def make_sandbox() -> Iterator[Callable[..., SandboxServer]]:
    started: list[SandboxServer] = []

    def make(**options: Any) -> SandboxServer:
        options.setdefault("twilio_auth_token", TOKEN)
        server = SandboxServer("127.0.0.1", 0, **options).start()
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()


@pytest.fixture
def sandbox(make_sandbox: Callable[..., SandboxServer]) -> SandboxServer:
    return make_sandbox()


@pytest.fixture
def provider_settings() -> Settings:
    """Credentials the sandbox accepts and a short timeout, so 'slow' faults stay fast to test."""
    return Settings().with_overrides(
        sendgrid_api_key=Secret("SG.provider-tests"),
        twilio_account_sid=ACCOUNT_SID,
        twilio_auth_token=Secret(TOKEN),
        sms_from=SMS_FROM,
        email_from="Talent Team <talent@example.com>",
        provider_timeout=0.5,
    )


@pytest.fixture
def providers(provider_settings: Settings, sandbox: SandboxServer) -> Providers:
    return build_providers(provider_settings, sandbox_url=sandbox.url)


@dataclass(frozen=True)
class Received:
    path: str
    headers: dict[str, str]
    body: bytes


class Receiver:
    """A tiny HTTP server that records every POST, standing in for our webhook endpoints."""

    def __init__(self) -> None:
        self.requests: list[Received] = []
        self._changed = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with receiver._changed:
                    receiver.requests.append(Received(self.path, dict(self.headers.items()), body))
                    receiver._changed.notify_all()
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05})
        self._thread.daemon = True
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{cast(tuple[str, int], self._server.server_address)[1]}"

    def wait_for(self, count: int, timeout: float = 5.0) -> list[Received]:
        deadline = time.monotonic() + timeout
        with self._changed:
            while len(self.requests) < count:
                remaining = deadline - time.monotonic()
                assert remaining > 0, f"received {len(self.requests)} webhook(s), expected {count}"
                self._changed.wait(remaining)
            return list(self.requests)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    yield server
    server.close()
