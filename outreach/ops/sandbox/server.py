"""The sandbox's HTTP side: :class:`SandboxServer` (start, stop, the records, the faults queued, how the lookups
answer) and the request handler that routes each request to the provider it imitates, the control endpoints or the
pages.

The server is built for throughput benchmarks as well as tests: handlers never sleep unless a fault asks
them to, and the only lock taken per request guards the list of records and its counters.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import re
import secrets
import socket
import struct
import threading
import time
from collections import Counter, deque
from collections.abc import Iterable
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Literal, cast, get_args
from urllib.parse import parse_qs

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from twilio.request_validator import RequestValidator

from outreach.core.clock import utcnow
from outreach.ops.sandbox import faults, pages, sendgrid, twilio
from outreach.ops.sandbox.faults import Fault
from outreach.ops.sandbox.messages import Provider, SandboxMessage, to_json
from outreach.ops.sandbox.webhooks import Dispatcher
from outreach.providers.sendgrid_payload import MESSAGE_ID_HEADER

__all__ = ["SandboxServer", "serve"]

log = logging.getLogger(__name__)

_TWILIO_PATH = re.compile(r"^/2010-04-01/Accounts/([^/]+)/Messages\.json$")
#: What the lookups answer: as the real APIs (``on``), 403 as for an account without them (``off``), or 500.
LookupMode = Literal["on", "off", "fail"]
LOOKUP_MODES: tuple[str, ...] = get_args(LookupMode)
_MESSAGE_PAGE = re.compile(r"^/messages/(\d+)$")


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    # SendGrid's client opens a connection per request; a short backlog would drop SYNs under load.
    request_queue_size = 1024

    def __init__(self, address: tuple[str, int], sandbox: SandboxServer) -> None:
        self.sandbox = sandbox
        super().__init__(address, _Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients that hang up (timeouts, resets) are part of normal operation here.
        log.debug("sandbox connection from %s ended with an error", client_address, exc_info=True)


class SandboxServer:
    """The sandbox: start it, point the SDKs at :attr:`url`, inspect :meth:`messages`.

    ``twilio_auth_token`` signs status callbacks (``X-Twilio-Signature``); any non-empty password is accepted on the
    API itself. When ``sendgrid_event_url`` is given, SendGrid-style signed event batches are posted there;
    verify them with :attr:`sendgrid_public_key`. They are signed with ``signing_key`` (a P-256 private key), a new
    one per server unless one is given (``outreach sandbox`` keeps its own across restarts). A webhook that fails
    is retried for ``webhook_retry_for`` seconds.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        twilio_auth_token: str = "sandbox-token",
        sendgrid_event_url: str | None = None,
        signing_key: ec.EllipticCurvePrivateKey | None = None,
        webhook_retry_for: float = 120.0,
        keep_bodies: bool = True,
        latency: float = 0.0,
    ) -> None:
        if latency < 0:
            raise ValueError("latency must not be negative")
        self.host = host
        #: Seconds every send request takes before it is answered (the real APIs take 100-300 ms); 0 answers at
        #: once. Tests that must catch a send in flight (a worker killed mid-call) set it.
        self.latency = latency
        #: False keeps only who got what (ids, addresses, custom args) of SendGrid mail, not each recipient's
        #: substituted subject and bodies: for runs of a hundred thousand recipients, where those would fill memory.
        self.keep_bodies = keep_bodies
        self.port = port
        self.twilio_auth_token = twilio_auth_token
        self.sendgrid_event_url = sendgrid_event_url
        self._validator = RequestValidator(twilio_auth_token)
        self._signing_key = signing_key or ec.generate_private_key(ec.SECP256R1())
        der = self._signing_key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        self._public_key = base64.b64encode(der).decode("ascii")

        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._records: list[SandboxMessage] = []
        self._requests: Counter[str] = Counter()
        self._accepted: Counter[str] = Counter()
        self._rejected: Counter[str] = Counter()
        self._faults_served: dict[str, Counter[str]] = {"sendgrid": Counter(), "twilio": Counter()}
        # deque.append/popleft are atomic, so taking a fault needs no lock.
        self._faults: dict[str, deque[Fault]] = {"sendgrid": deque(), "twilio": deque()}
        #: How each provider's lookups answer, and how long an accepted message takes to show in them.
        self.lookups: dict[str, LookupMode] = {"sendgrid": "on", "twilio": "on"}
        self.lookup_delay = 0.0
        self._lookups_served: Counter[str] = Counter()

        self.stopping = threading.Event()
        self.webhook_retry_for = webhook_retry_for
        self._dispatcher = Dispatcher(webhook_retry_for)
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._open: set[socket.socket] = set()
        self._open_lock = threading.Lock()
        self._connections = 0  # TCP connections accepted so far: shows whether clients keep theirs open

    # -- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> SandboxServer:
        """Bind and serve in a background daemon thread; returns ``self`` for chaining."""
        if self._httpd is not None:
            return self
        self.stopping.clear()
        self._httpd = _HTTPServer((self.host, self.port), self)
        self.port = int(self._httpd.server_address[1])
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="sandbox", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, drop open keep-alive connections and stop posting webhooks."""
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        self.stopping.set()
        httpd.shutdown()
        httpd.server_close()
        with self._open_lock:
            open_sockets = list(self._open)
        for sock in open_sockets:
            # Handler threads blocked on a kept-alive connection wake up and exit.
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        if self._thread is not None:
            self._thread.join(timeout=2.0)
            self._thread = None
        self._dispatcher.close()

    def wait(self) -> None:
        """Block until the server stops (:meth:`stop` from another thread); Ctrl-C raises as usual."""
        thread = self._thread
        while thread is not None and thread.is_alive():
            thread.join(timeout=0.5)

    def __enter__(self) -> SandboxServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def url(self) -> str:
        """Base URL for both SDKs, e.g. ``http://127.0.0.1:8025``."""
        if self._httpd is None:
            raise RuntimeError("the sandbox is not running; call start() first")
        host = "127.0.0.1" if self.host in {"", "0.0.0.0", "::"} else self.host
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    @property
    def sendgrid_public_key(self) -> str:
        """The event-webhook verification key, in the form SendGrid shows it (base64 DER, one line).

        ``sendgrid.helpers.eventwebhook.EventWebhook(public_key)`` accepts it as is.
        """
        return self._public_key

    # -- records -----------------------------------------------------------------------------------

    def messages(self) -> list[SandboxMessage]:
        """A copy of every record so far, oldest first."""
        with self._lock:
            return list(self._records)

    def clear(self) -> None:
        """Forget every record and every fault still queued, and answer lookups as the real APIs again, so the next
        test starts clean."""
        with self._lock:
            self._records.clear()
        for pending in self._faults.values():
            pending.clear()
        self.lookups = {"sendgrid": "on", "twilio": "on"}
        self.lookup_delay = 0.0

    def forget(self, addresses: Iterable[str]) -> int:
        """Drop every record sent to one of ``addresses`` (erasure of a candidate); how many were dropped."""
        wanted = {a.strip().lower() for a in addresses if a}
        with self._lock:
            kept = [r for r in self._records if r.to.strip().lower() not in wanted]
            dropped = len(self._records) - len(kept)
            self._records[:] = kept
        return dropped

    def wait_for(self, count: int, timeout: float) -> list[SandboxMessage]:
        """Block until at least ``count`` records exist and return them all; ``TimeoutError`` otherwise."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while len(self._records) < count:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"sandbox received {len(self._records)} message(s), expected at least {count}")
                self._changed.wait(remaining)
            return list(self._records)

    def _record(self, provider: str, records: Iterable[SandboxMessage]) -> None:
        """Store the records of one accepted request (and count the request, under the same lock)."""
        with self._changed:
            before = len(self._records)
            self._records.extend(records)
            self._requests[provider] += 1
            self._accepted[provider] += len(self._records) - before
            self._changed.notify_all()

    def _count_request(self, provider: str, *, rejected: bool = False) -> None:
        with self._lock:
            self._requests[provider] += 1
            if rejected:
                self._rejected[provider] += 1

    def stats(self) -> dict[str, Any]:
        """Counts per provider (requests, accepted records, rejections, faults served and still queued) and the
        TCP connections accepted since the start."""
        with self._lock:
            per_provider = {
                provider: {
                    "requests": self._requests[provider],
                    "messages": self._accepted[provider],
                    "rejected": self._rejected[provider],
                    "faults_served": dict(self._faults_served[provider]),
                    "faults_pending": len(self._faults[provider]),
                    "lookups": self._lookups_served[provider],
                }
                for provider in ("sendgrid", "twilio")
            }
        with self._open_lock:
            connections = self._connections
        return {"messages": len(self._records), "connections": connections, **per_provider}

    # -- faults ------------------------------------------------------------------------------------

    def fail(
        self,
        provider: Provider,
        kind: str,
        times: int = 1,
        *,
        reset_after: float = 1.0,
        delay: float = 0.0,
    ) -> None:
        """Queue ``times`` faults of ``kind`` for ``provider``; each request to its send endpoint takes one.

        ``reset_after`` sets SendGrid's ``X-RateLimit-Reset`` for ``429``; ``delay`` is the wait for ``slow``.
        """
        fault = faults.checked(provider, kind, times, reset_after=reset_after, delay=delay)
        self._faults[provider].extend([fault] * times)

    def set_lookups(self, provider: Provider, mode: str, *, delay: float | None = None) -> None:
        """How ``provider``'s lookups answer from now on (``on``, ``off``, ``fail``); ``delay``: seconds an accepted
        message takes to show in every provider's lookups. ``ValueError`` for an unknown provider or mode."""
        if provider not in self.lookups:
            raise ValueError(f"unknown provider {provider!r}; expected one of {sorted(self.lookups)}")
        if mode not in LOOKUP_MODES:
            raise ValueError(f"unknown lookup mode {mode!r}; expected one of {list(LOOKUP_MODES)}")
        if delay is not None and delay < 0:
            raise ValueError("delay must not be negative")
        self.lookups[provider] = cast(LookupMode, mode)
        if delay is not None:
            self.lookup_delay = float(delay)

    def _lookup(self, provider: str) -> tuple[LookupMode, list[SandboxMessage]]:
        """Count one lookup of ``provider``; its mode and the records it may list (those past the visibility delay)."""
        visible_before = utcnow() - timedelta(seconds=self.lookup_delay)
        with self._lock:
            self._lookups_served[provider] += 1
            visible = [record for record in self._records if record.received_at <= visible_before]
        return self.lookups[provider], visible

    def _take_fault(self, provider: str) -> Fault | None:
        try:
            fault = self._faults[provider].popleft()
        except IndexError:
            return None
        with self._lock:
            self._faults_served[provider][fault.kind] += 1
        return fault

    # -- connections -------------------------------------------------------------------------------

    def _track(self, sock: socket.socket, *, add: bool) -> None:
        with self._open_lock:
            if add:
                self._open.add(sock)
                self._connections += 1
            else:
                self._open.discard(sock)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "outreach-sandbox"
    sys_version = ""
    # Headers and body go out in two writes; without this Nagle plus delayed ACKs add ~40 ms per request.
    disable_nagle_algorithm = True

    @property
    def sandbox(self) -> SandboxServer:
        return cast(_HTTPServer, self.server).sandbox

    def setup(self) -> None:
        super().setup()
        self.sandbox._track(self.connection, add=True)

    def finish(self) -> None:
        self.sandbox._track(self.connection, add=False)
        with contextlib.suppress(OSError):
            super().finish()

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        if log.isEnabledFor(logging.DEBUG):
            log.debug("sandbox %s %s -> %s", self.command, self.path, code)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("sandbox: " + format, *args)

    # -- plumbing ----------------------------------------------------------------------------------

    def _read_body(self) -> bytes:
        length = self.headers.get("Content-Length")
        if not length:
            return b""
        return self.rfile.read(int(length))

    def _reply(
        self,
        status: int,
        body: bytes = b"",
        content_type: str = "application/json",
        headers: Iterable[tuple[str, str]] = (),
    ) -> None:
        self.send_response(status)
        if body:
            self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()
        if body and self.command != "HEAD":
            self.wfile.write(body)

    def _reset(self) -> None:
        # Linger 0 makes close() send RST instead of FIN: the client sees "connection reset by peer".
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close_connection = True
        self.sandbox._track(self.connection, add=False)
        self.connection.close()

    def _dispatch(self, route: Any) -> None:
        try:
            route()
        except (ConnectionError, TimeoutError):
            self.close_connection = True
        except Exception:
            log.exception("sandbox handler failed for %s %s", self.command, self.path)
            self.close_connection = True
            with contextlib.suppress(OSError):
                self._reply(500, to_json({"error": "sandbox internal error"}))

    def do_GET(self) -> None:
        self._dispatch(self._get)

    def do_HEAD(self) -> None:
        self._dispatch(self._get)

    def do_POST(self) -> None:
        self._dispatch(self._post)

    def do_DELETE(self) -> None:
        self._dispatch(self._delete)

    def _post(self) -> None:
        path = self.path.split("?", 1)[0]
        body = self._read_body()
        if path == "/v3/mail/send":
            self._sendgrid_send(body)
            return
        match = _TWILIO_PATH.match(path)
        if match:
            self._twilio_send(match.group(1), body)
            return
        if path == "/_sandbox/faults":
            self._queue_fault(body)
            return
        if path == "/_sandbox/lookups":
            self._set_lookups(body)
            return
        self._not_found(path)

    def _get(self) -> None:
        path, _, query = self.path.partition("?")
        if path == "/v3/messages":
            self._sendgrid_activity(query)
            return
        if (twilio_list := _TWILIO_PATH.match(path)) is not None:
            self._twilio_list(twilio_list.group(1), query)
            return
        if path == "/_sandbox/messages":
            self._reply(200, to_json([m.to_dict() for m in self.sandbox.messages()]))
        elif path == "/_sandbox/stats":
            self._reply(200, to_json(self.sandbox.stats()))
        elif path == "/_sandbox/sendgrid-public-key":
            self._reply(200, to_json({"public_key": self.sandbox.sendgrid_public_key}))
        elif path in {"/", "/messages"}:
            self._html(200, pages.render_index(self.sandbox.messages()), refresh=True)
        elif (match := _MESSAGE_PAGE.match(path)) is not None:
            records = self.sandbox.messages()
            index = int(match.group(1))
            if index >= len(records):
                self._html(404, pages.page("Not found", "<p>No such message.</p>"))
            else:
                self._html(200, pages.render_message(index, records[index]))
        else:
            self._not_found(path)

    def _delete(self) -> None:
        path = self.path.split("?", 1)[0]
        self._read_body()
        if path == "/_sandbox/messages":
            query = parse_qs(self.path.partition("?")[2])
            if "to" in query:
                dropped = self.sandbox.forget(query["to"])
                self._reply(200, to_json({"dropped": dropped}))
            else:
                self.sandbox.clear()
                self._reply(204)
        else:
            self._not_found(path)

    def _not_found(self, path: str) -> None:
        if path.startswith("/2010-04-01/"):
            self._reply(404, twilio.error(20404, f"The requested resource {path} was not found", 404))
        elif path.startswith("/v3/"):
            self._reply(404, to_json({"errors": [sendgrid.error("resource not found")]}))
        else:
            self._reply(404, to_json({"error": f"no route for {self.command} {path}"}))

    def _html(self, status: int, page: str, *, refresh: bool = False) -> None:
        self._reply(status, page.encode(), "text/html; charset=utf-8", pages.headers(refresh=refresh))

    # -- control -----------------------------------------------------------------------------------

    def _queue_fault(self, body: bytes) -> None:
        try:
            request = json.loads(body or b"{}")
            if not isinstance(request, dict):
                raise ValueError("expected a JSON object")
            provider = request.get("provider")
            if provider not in get_args(Provider):
                raise ValueError(f"provider must be one of {list(get_args(Provider))}")
            self.sandbox.fail(
                cast(Provider, provider),
                str(request.get("kind")),
                int(request.get("times", 1)),
                reset_after=float(request.get("reset_after", 1.0)),
                delay=float(request.get("delay", 0.0)),
            )
        except (ValueError, TypeError) as exc:
            self._reply(400, to_json({"error": str(exc)}))
            return
        self._reply(201, to_json({"queued": int(request.get("times", 1)), "stats": self.sandbox.stats()}))

    def _set_lookups(self, body: bytes) -> None:
        try:
            request = json.loads(body or b"{}")
            if not isinstance(request, dict):
                raise ValueError("expected a JSON object")
            delay = request.get("delay")
            self.sandbox.set_lookups(
                cast(Provider, request.get("provider")),
                str(request.get("mode", "on")),
                delay=None if delay is None else float(delay),
            )
        except (ValueError, TypeError) as exc:
            self._reply(400, to_json({"error": str(exc)}))
            return
        self._reply(200, to_json({"lookups": self.sandbox.lookups, "delay": self.sandbox.lookup_delay}))

    # -- lookups -----------------------------------------------------------------------------------

    def _sendgrid_activity(self, query: str) -> None:
        """Email Activity's ``GET /v3/messages``: the messages carrying one custom arg's value."""
        if not sendgrid.authorized(self.headers.get("Authorization", "")):
            self._reply(401, to_json({"errors": [sendgrid.error("authorization required")]}))
            return
        mode, records = self.sandbox._lookup("sendgrid")
        if mode == "off":
            self._reply(403, to_json({"errors": [sendgrid.error("access forbidden")]}))
            return
        if mode == "fail":
            self._reply(500, to_json({"errors": [sendgrid.error("Internal Server Error")]}))
            return
        params = {k: v[-1] for k, v in parse_qs(query, keep_blank_values=True).items()}
        asked = sendgrid.activity_query(params.get("query", ""), params.get("limit", ""))
        if isinstance(asked, str):
            self._reply(400, to_json({"errors": [sendgrid.error(asked, "query")]}))
            return
        name, value, limit = asked
        self._reply(200, sendgrid.activity(records, name, value, limit))

    def _twilio_list(self, account_sid: str, query: str) -> None:
        """The Messages list of ``account_sid``, filtered by ``To`` and ``From``."""
        if not twilio.authenticated(self.headers.get("Authorization", ""), account_sid):
            self._reply(401, twilio.error(20003, "Authenticate", 401))
            return
        mode, records = self.sandbox._lookup("twilio")
        if mode == "off":
            self._reply(403, twilio.error(20403, "Forbidden", 403))
            return
        if mode == "fail":
            self._reply(500, twilio.error(20500, "An internal server error has occurred", 500))
            return
        params = {k: v[-1] for k, v in parse_qs(query, keep_blank_values=True).items()}
        page = twilio.message_list(records, account_sid, params)
        if isinstance(page, tuple):
            self._reply(400, twilio.error(page[0], page[1], 400))
            return
        self._reply(200, page, "application/json; charset=utf-8")

    # -- faults ------------------------------------------------------------------------------------

    def _play_fault(self, provider: Provider, fault: Fault, rejection: faults.Rejection | None) -> bool:
        """Play the part of ``fault`` that comes before the request is handled: ``reset`` (``hang``, after its delay)
        drops the connection, ``slow`` waits, and a rejecting one answers ``rejection``. True when that was the
        answer (the request goes no further)."""
        sandbox = self.sandbox
        if fault.kind in {"reset", "hang"}:
            if fault.kind == "hang":
                sandbox.stopping.wait(fault.delay)
            sandbox._count_request(provider, rejected=True)
            self._reset()
            return True
        if fault.kind == "slow":
            sandbox.stopping.wait(fault.delay)
        if rejection is None:
            return False
        status, body, headers = rejection
        sandbox._count_request(provider, rejected=True)
        self._reply(status, body, headers=headers)
        return True

    # -- SendGrid ----------------------------------------------------------------------------------

    def _sendgrid_send(self, body: bytes) -> None:
        sandbox = self.sandbox
        if sandbox.latency:
            sandbox.stopping.wait(sandbox.latency)
        fault = sandbox._take_fault("sendgrid")
        if fault is not None and self._play_fault("sendgrid", fault, faults.sendgrid_rejection(fault)):
            return

        if not sendgrid.authorized(self.headers.get("Authorization", "")):
            sandbox._count_request("sendgrid", rejected=True)
            self._reply(401, to_json({"errors": [sendgrid.error("authorization required")]}))
            return
        try:
            payload = json.loads(body)
        except ValueError:
            payload = None
        errors = sendgrid.validate(payload)
        if errors:
            sandbox._count_request("sendgrid", rejected=True)
            self._reply(400, to_json({"errors": errors}))
            return

        message_id = secrets.token_urlsafe(16)
        records = sendgrid.to_records(payload, message_id, sandbox.keep_bodies)
        sandbox._record("sendgrid", records)
        try:
            # The message is accepted now: its events follow even if the sender is gone or never gets the answer.
            if fault is not None and fault.kind == "accept_reset":
                self._reset()
            else:
                self._reply(202, headers=[(MESSAGE_ID_HEADER, message_id)])
        finally:
            sendgrid.post_events(
                sandbox._dispatcher,
                sandbox._signing_key,
                sandbox.sendgrid_event_url,
                records,
                fault.kind if fault else None,
            )

    # -- Twilio ------------------------------------------------------------------------------------

    def _twilio_send(self, account_sid: str, body: bytes) -> None:
        sandbox = self.sandbox
        if sandbox.latency:
            sandbox.stopping.wait(sandbox.latency)
        form = {k: v[-1] for k, v in parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True).items()}
        to = form.get("To", "")
        fault = sandbox._take_fault("twilio")
        if fault is not None and self._play_fault("twilio", fault, faults.twilio_rejection(fault, to)):
            return

        if not twilio.authenticated(self.headers.get("Authorization", ""), account_sid):
            sandbox._count_request("twilio", rejected=True)
            self._reply(401, twilio.error(20003, "Authenticate", 401))
            return
        problem = twilio.problem(form)
        if problem is not None:
            sandbox._count_request("twilio", rejected=True)
            self._reply(400, twilio.error(problem[0], problem[1], 400))
            return
        from_ = form.get("From", "")
        service_sid = form.get("MessagingServiceSid", "")
        text = form.get("Body", "")
        callback = form.get("StatusCallback", "")
        validity = form.get("ValidityPeriod")
        try:
            validity_period = int(validity) if validity else None
        except ValueError:
            validity_period = None

        sid = "SM" + secrets.token_hex(16)
        segments = twilio.sms_segments(text)
        now = utcnow()
        record = SandboxMessage(
            id=sid,
            provider="twilio",
            channel="sms",
            to=to,
            from_=from_ or service_sid,
            body=text,
            status_callback=callback or None,
            validity_period=validity_period,
            received_at=now,
            segments=segments,
        )
        sandbox._record("twilio", [record])
        try:
            # The message is accepted now: its callbacks follow even if the sender is gone or never gets the answer.
            if fault is not None and fault.kind == "accept_reset":
                self._reset()
            else:
                self._reply(
                    201,
                    to_json(twilio.message_resource(sid, account_sid, to, from_, service_sid, text, segments, now)),
                    "application/json; charset=utf-8",
                    [("Twilio-Request-Id", "RQ" + secrets.token_hex(16))],
                )
        finally:
            if callback:
                twilio.post_status_callbacks(
                    sandbox._dispatcher,
                    sandbox._validator,
                    callback,
                    sid,
                    account_sid,
                    to,
                    from_,
                    service_sid,
                    fault.kind if fault else None,
                )


def serve(
    host: str = "127.0.0.1",
    port: int = 8025,
    twilio_auth_token: str = "sandbox-token",
    sendgrid_event_url: str | None = None,
    signing_key: ec.EllipticCurvePrivateKey | None = None,
) -> None:
    """Run the sandbox in the foreground until interrupted (Ctrl-C)."""
    sandbox = SandboxServer(
        host,
        port,
        twilio_auth_token=twilio_auth_token,
        sendgrid_event_url=sendgrid_event_url,
        signing_key=signing_key,
    ).start()
    log.info("sandbox listening on %s", sandbox.url)
    log.info("SendGrid event webhook public key: %s", sandbox.sendgrid_public_key)
    try:
        sandbox.wait()
    except KeyboardInterrupt:
        pass
    finally:
        sandbox.stop()
