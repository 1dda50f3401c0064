"""A local stand-in for SendGrid and Twilio that the real SDKs can talk to.

It speaks ``POST /v3/mail/send`` (SendGrid v3) and ``POST /2010-04-01/Accounts/{sid}/Messages.json``
(Twilio Programmable Messaging) closely enough that ``sendgrid.SendGridAPIClient`` and ``twilio.rest.Client``
work unchanged when pointed at it. Every accepted message is kept in memory as a :class:`SandboxMessage`,
shown on an HTML page (like Mailpit) and served as JSON under ``/_sandbox/``. Twilio status callbacks and
SendGrid event webhooks are posted back, signed the way the real services sign them, so webhook handlers can
be tested end to end. Like the real services, the sandbox posts them whether or not the sender is still there
to read the answer, and retries a webhook that failed (a 5xx or 429 answer, no connection) with backoff for up to
:attr:`SandboxServer.webhook_retry_for` seconds.

Faults can be queued (:meth:`SandboxServer.fail` or ``POST /_sandbox/faults``); each one is consumed by the
next request to that provider's send endpoint:

===============  ==============================================================================
kind             effect
===============  ==============================================================================
``429``          rate limited (SendGrid: ``X-RateLimit-*`` headers; Twilio: code 20429)
``500``          internal server error with the provider's error body
``slow``         wait ``delay`` seconds, then answer normally (the message *is* accepted)
``reset``        read the request, then reset the connection without answering (nothing accepted)
``hang``         wait ``delay`` seconds, then reset the connection (nothing accepted): a provider that hangs
``accept_reset`` accept the message (record it, post its webhooks), then reset the connection without answering
``21211``        Twilio only: 400, invalid ``To`` number
``21610``        Twilio only: 400, recipient unsubscribed (replied STOP)
``undelivered``  Twilio only: accepted, then status callbacks ``sent`` → ``undelivered`` (30003)
``failed``       Twilio only: accepted, then status callback ``failed`` (30008)
``bounce``       SendGrid only: accepted, then events ``processed`` → ``bounce``
``dropped``      SendGrid only: accepted, then events ``processed`` → ``dropped``
===============  ==============================================================================

Control and inspection: ``GET /_sandbox/messages`` (JSON records), ``DELETE /_sandbox/messages``,
``GET /_sandbox/stats``, ``GET /_sandbox/sendgrid-public-key``, ``GET /`` (newest first) and
``GET /messages/{index}`` (one message; email HTML inside a sandboxed iframe).

The server is built for throughput benchmarks as well as tests: handlers never sleep unless a fault asks
them to, and the only lock taken per request guards the list of records and its counters.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import heapq
import html
import http.client
import json
import logging
import math
import queue
import re
import secrets
import socket
import struct
import threading
import time
from collections import Counter, deque
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime
from email.utils import format_datetime, formataddr
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Literal, cast, get_args
from urllib.parse import parse_qs, urlencode, urlsplit

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from twilio.request_validator import RequestValidator

from outreach.core.clock import utcnow
from outreach.domain.render import sms_segments as count_segments

__all__ = [
    "FaultKind",
    "Provider",
    "SandboxMessage",
    "SandboxServer",
    "serve",
    "sms_segments",
]

log = logging.getLogger(__name__)

Provider = Literal["sendgrid", "twilio"]
FaultKind = Literal[
    "429",
    "500",
    "slow",
    "reset",
    "hang",
    "accept_reset",
    "21211",
    "21610",
    "undelivered",
    "failed",
    "bounce",
    "dropped",
]

_COMMON_FAULTS = frozenset({"429", "500", "slow", "reset", "hang", "accept_reset"})
_FAULTS: dict[str, frozenset[str]] = {
    "sendgrid": _COMMON_FAULTS | {"bounce", "dropped"},
    "twilio": _COMMON_FAULTS | {"21211", "21610", "undelivered", "failed"},
}

_TWILIO_PATH = re.compile(r"^/2010-04-01/Accounts/([^/]+)/Messages\.json$")
_MESSAGE_PAGE = re.compile(r"^/messages/(\d+)$")
_E164 = re.compile(r"^\+[1-9]\d{6,14}$")
_ALPHANUMERIC_SENDER = re.compile(r"^(?=.*[A-Za-z])[A-Za-z0-9 ]{1,11}$")
_SHORT_CODE = re.compile(r"^\d{5,6}$")
_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
_SENDGRID_HELP = "http://sendgrid.com/docs/API_Reference/Web_API_v3/Mail/errors.html"
_TWILIO_DOCS = "https://www.twilio.com/docs/errors/"
_API_VERSION = "2010-04-01"
# Twilio documents 1600 characters as the most one message may carry.
_TWILIO_MAX_BODY = 1600
# SendGrid accepts up to 1000 personalizations per request.
_SENDGRID_MAX_PERSONALIZATIONS = 1000
# … and at most 10,000 bytes of substitutions, custom args and headers in each of them.
_SENDGRID_MAX_PERSONALIZATION_BYTES = 10_000


def sms_segments(body: str) -> int:
    """How many SMS segments ``body`` needs, counted the way the service counts them (Twilio's ``num_segments``):
    :func:`outreach.domain.render.sms_segments`, at least one."""
    return max(1, count_segments(body)[1])


@dataclass(frozen=True)
class SandboxMessage:
    """One message the sandbox accepted: one per SendGrid personalization, one per Twilio request.

    ``id`` is the id the provider call returned: SendGrid's ``X-Message-Id`` (shared by every personalization
    of one request, told apart by ``personalization_index``) or Twilio's ``SM…`` sid.
    """

    id: str
    provider: Provider
    channel: Literal["email", "sms"]
    to: str
    from_: str
    subject: str = ""
    text: str = ""
    html: str = ""
    body: str = ""
    custom_args: dict[str, str] = field(default_factory=dict)
    categories: list[str] = field(default_factory=list)
    headers: dict[str, str] = field(default_factory=dict)
    status_callback: str | None = None
    validity_period: int | None = None
    received_at: datetime = field(default_factory=utcnow)
    personalization_index: int = 0
    reply_to: str | None = None
    template_id: str | None = None
    segments: int = 0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready copy; ``received_at`` becomes an ISO 8601 string."""
        data = asdict(self)
        data["received_at"] = self.received_at.isoformat()
        return data


@dataclass(frozen=True)
class _Fault:
    kind: str
    reset_after: float
    delay: float


class _Dispatcher:
    """Posts webhooks (status callbacks, event batches) from one background thread.

    One thread keeps each message's callbacks in order (``sent`` before ``delivered``) and reuses a
    keep-alive connection per host, which matters when a benchmark produces thousands of callbacks.
    A webhook that fails (a 5xx or 429 answer, no connection) is tried again with backoff, as SendGrid and Twilio do,
    until ``retry_for`` seconds after its first attempt; the others are not held up meanwhile.
    """

    _STOP = object()

    def __init__(self, retry_for: float = 120.0) -> None:
        self.retry_for = retry_for
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        # (due, sequence, first attempt, backoff, item): webhooks waiting for their next try.
        self._retries: list[tuple[float, int, float, float, tuple[str, bytes, dict[str, str]]]] = []
        self._sequence = 0
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self._connections: dict[tuple[str, str], http.client.HTTPConnection] = {}

    def post(self, url: str, body: bytes, headers: Mapping[str, str]) -> None:
        if self._thread is None:
            with self._start_lock:
                if self._thread is None:
                    self._thread = threading.Thread(target=self._run, name="sandbox-webhooks", daemon=True)
                    self._thread.start()
        self._queue.put((url, body, dict(headers)))

    def close(self) -> None:
        if self._thread is not None:
            self._queue.put(self._STOP)
            self._thread.join(timeout=2.0)
            self._thread = None

    def _run(self) -> None:
        while True:
            now = time.monotonic()
            while self._retries and self._retries[0][0] <= now:
                _, _, first, backoff, due_item = heapq.heappop(self._retries)
                self._attempt(due_item, first, backoff)
            timeout = max(self._retries[0][0] - time.monotonic(), 0.0) if self._retries else None
            try:
                item = self._queue.get(timeout=timeout)
            except queue.Empty:
                continue
            if item is self._STOP:
                break
            self._attempt(cast(tuple[str, bytes, dict[str, str]], item), time.monotonic(), 0.25)
        for connection in self._connections.values():
            connection.close()
        self._connections.clear()

    def _attempt(self, item: tuple[str, bytes, dict[str, str]], first: float, backoff: float) -> None:
        url, body, headers = item
        try:
            status = self._deliver(url, body, headers)
        except Exception as exc:  # the sandbox must outlive any receiver
            log.debug("sandbox webhook to %s failed: %r", url, exc)
            status = None
        if status is not None and status < 500 and status != 429:
            return
        due = time.monotonic() + backoff
        if due - first <= self.retry_for:
            self._sequence += 1
            heapq.heappush(self._retries, (due, self._sequence, first, min(backoff * 2, 5.0), item))

    def _deliver(self, url: str, body: bytes, headers: dict[str, str]) -> int:
        parts = urlsplit(url)
        key = (parts.scheme, parts.netloc)
        target = parts.path or "/"
        if parts.query:
            target += "?" + parts.query
        for attempt in range(2):
            connection = self._connections.get(key)
            reused = connection is not None
            if connection is None:
                factory = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
                connection = factory(parts.netloc, timeout=5.0)
                self._connections[key] = connection
            try:
                connection.request("POST", target, body=body, headers=headers)
                response = connection.getresponse()
                response.read()
                if response.status >= 400:
                    log.debug("sandbox webhook to %s answered %s", url, response.status)
                if response.will_close:
                    connection.close()
                    del self._connections[key]
                return response.status
            except (OSError, http.client.HTTPException):
                connection.close()
                self._connections.pop(key, None)
                # A kept-alive connection the receiver closed in the meantime deserves one fresh try.
                if not reused or attempt:
                    raise
        raise AssertionError("unreachable")


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
    verify them with :attr:`sendgrid_public_key`. A webhook that fails is retried for ``webhook_retry_for``
    seconds.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        twilio_auth_token: str = "sandbox-token",
        sendgrid_event_url: str | None = None,
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
        self._signing_key = ec.generate_private_key(ec.SECP256R1())
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
        self._faults: dict[str, deque[_Fault]] = {"sendgrid": deque(), "twilio": deque()}

        self.stopping = threading.Event()
        self.webhook_retry_for = webhook_retry_for
        self._dispatcher = _Dispatcher(webhook_retry_for)
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
        """Forget every record and every fault still queued, so the next test starts clean."""
        with self._lock:
            self._records.clear()
        for pending in self._faults.values():
            pending.clear()

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
        if provider not in _FAULTS:
            raise ValueError(f"unknown provider {provider!r}; expected one of {sorted(_FAULTS)}")
        if kind not in _FAULTS[provider]:
            raise ValueError(f"unknown fault {kind!r} for {provider}; expected one of {sorted(_FAULTS[provider])}")
        if times < 0 or reset_after < 0 or delay < 0:
            raise ValueError("times, reset_after and delay must not be negative")
        fault = _Fault(kind, float(reset_after), float(delay))
        self._faults[provider].extend([fault] * times)

    def _take_fault(self, provider: str) -> _Fault | None:
        try:
            fault = self._faults[provider].popleft()
        except IndexError:
            return None
        with self._lock:
            self._faults_served[provider][fault.kind] += 1
        return fault

    # -- webhooks ----------------------------------------------------------------------------------

    def _post_status_callbacks(
        self, url: str, sid: str, account_sid: str, to: str, from_: str, service_sid: str, fault: str | None
    ) -> None:
        steps: list[tuple[str, str | None]]
        if fault == "undelivered":
            steps = [("sent", None), ("undelivered", "30003")]
        elif fault == "failed":
            steps = [("failed", "30008")]
        else:
            steps = [("sent", None), ("delivered", None)]
        for status, error_code in steps:
            params = {
                "MessageSid": sid,
                "SmsSid": sid,
                "MessageStatus": status,
                "SmsStatus": status,
                "AccountSid": account_sid,
                "To": to,
                "From": from_,
                "ApiVersion": _API_VERSION,
            }
            if service_sid:
                params["MessagingServiceSid"] = service_sid
            if error_code:
                params["ErrorCode"] = error_code
            if status == "delivered":
                params["RawDlrDoneDate"] = utcnow().strftime("%y%m%d%H%M")
            headers = {
                "Content-Type": "application/x-www-form-urlencoded",
                "User-Agent": "TwilioProxy/1.1",
                "X-Twilio-Signature": str(self._validator.compute_signature(url, params)),
                "I-Twilio-Idempotency-Token": secrets.token_hex(16),
            }
            self._dispatcher.post(url, urlencode(params).encode(), headers)

    def _post_sendgrid_events(self, records: list[SandboxMessage], fault: str | None) -> None:
        url = self.sendgrid_event_url
        if not url:
            return
        now = int(utcnow().timestamp())
        first: list[dict[str, Any]] = []
        then: list[dict[str, Any]] = []
        for record in records:
            filter_id = (
                f"{record.id}.filter0001.{secrets.randbelow(90000) + 10000}"
                f".{secrets.token_hex(4).upper()}.{record.personalization_index}"
            )
            for address in record.to.split(", "):
                common: dict[str, Any] = dict(record.custom_args)
                common.update(
                    {
                        "email": address,
                        "timestamp": now,
                        "smtp-id": f"<{record.id}@ismtpd0001p1mdw1.sendgrid.net>",
                        "sg_message_id": filter_id,
                    }
                )
                if len(record.categories) == 1:
                    common["category"] = record.categories[0]
                elif record.categories:
                    common["category"] = list(record.categories)
                first.append({**common, "event": "processed", "sg_event_id": _event_id()})
                if fault == "bounce":
                    outcome: dict[str, Any] = {
                        "event": "bounce",
                        "type": "bounce",
                        "status": "5.1.1",
                        "reason": "550 5.1.1 The email account that you tried to reach does not exist.",
                        "bounce_classification": "Invalid Address",
                    }
                elif fault == "dropped":
                    outcome = {"event": "dropped", "reason": "Bounced Address", "status": "5.0.0"}
                else:
                    outcome = {"event": "delivered", "response": "250 2.0.0 OK", "tls": 1}
                then.append({**common, **outcome, "sg_event_id": _event_id()})
        payload = json.dumps(first + then)
        timestamp = str(now)
        signature = self._signing_key.sign((timestamp + payload).encode(), ec.ECDSA(hashes.SHA256()))
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "SendGrid Event API",
            "X-Twilio-Email-Event-Webhook-Signature": base64.b64encode(signature).decode("ascii"),
            "X-Twilio-Email-Event-Webhook-Timestamp": timestamp,
        }
        self._dispatcher.post(url, payload.encode(), headers)

    def _track(self, sock: socket.socket, *, add: bool) -> None:
        with self._open_lock:
            if add:
                self._open.add(sock)
                self._connections += 1
            else:
                self._open.discard(sock)


def _event_id() -> str:
    return base64.b64encode(secrets.token_bytes(16)).decode("ascii")


def _json(data: Any) -> bytes:
    return json.dumps(data, separators=(",", ":")).encode()


def _sendgrid_error(message: str, field_name: str | None = None, anchor: str | None = None) -> dict[str, Any]:
    return {
        "message": message,
        "field": field_name,
        "help": f"{_SENDGRID_HELP}#{anchor}" if anchor else None,
    }


def _twilio_error(code: int, message: str, status: int) -> bytes:
    return _json({"code": code, "message": message, "more_info": f"{_TWILIO_DOCS}{code}", "status": status})


def _validate_sendgrid(payload: Any) -> list[dict[str, Any]]:
    """The checks SendGrid makes before it accepts a send; returns its error objects (empty when valid)."""
    if not isinstance(payload, dict):
        return [_sendgrid_error("Bad Request")]
    errors: list[dict[str, Any]] = []
    template_id = payload.get("template_id")

    sender = payload.get("from")
    if not isinstance(sender, dict) or not isinstance(sender.get("email"), str) or not sender["email"]:
        errors.append(
            _sendgrid_error(
                "The from object must be provided for every email send. It is an object that requires the "
                "email parameter, but may also contain a name parameter.",
                "from.email",
                "message.from",
            )
        )
    elif not _EMAIL.match(sender["email"]):
        errors.append(_sendgrid_error("The from email does not contain a valid address.", "from.email", "message.from"))

    reply_to = payload.get("reply_to")
    if reply_to is not None and (not isinstance(reply_to, dict) or not _EMAIL.match(str(reply_to.get("email", "")))):
        errors.append(
            _sendgrid_error(
                "The reply_to email does not contain a valid address.", "reply_to.email", "message.reply_to"
            )
        )

    personalizations = payload.get("personalizations")
    if not isinstance(personalizations, list) or not personalizations:
        errors.append(
            _sendgrid_error(
                "The personalizations field is required and must have at least one personalization.",
                "personalizations",
                "-Personalizations-Errors",
            )
        )
        personalizations = []
    elif len(personalizations) > _SENDGRID_MAX_PERSONALIZATIONS:
        errors.append(
            _sendgrid_error(
                "The personalizations field must have at least one personalization, and no more than 1000.",
                "personalizations",
                "-Personalizations-Errors",
            )
        )
        personalizations = []

    every_subject = bool(personalizations)
    for index, personalization in enumerate(personalizations):
        where = f"personalizations.{index}"
        if not isinstance(personalization, dict):
            errors.append(_sendgrid_error("Invalid type. Expected: object.", where, "message.personalizations"))
            every_subject = False
            continue
        recipients = personalization.get("to")
        if not isinstance(recipients, list) or not recipients:
            errors.append(
                _sendgrid_error(
                    "The to array is required for all personalization objects, and must have at least one "
                    "email object with a valid email address.",
                    f"{where}.to",
                    "message.personalizations.to",
                )
            )
        else:
            for position, recipient in enumerate(recipients):
                address = recipient.get("email") if isinstance(recipient, dict) else None
                if not isinstance(address, str) or not _EMAIL.match(address):
                    errors.append(
                        _sendgrid_error(
                            "Does not contain a valid address.",
                            f"{where}.to.{position}.email",
                            "message.personalizations.to",
                        )
                    )
        subject = personalization.get("subject")
        if not (isinstance(subject, str) and subject):
            every_subject = False
        errors.extend(_string_map_errors(personalization.get("custom_args"), f"{where}.custom_args"))
        errors.extend(_string_map_errors(personalization.get("headers"), f"{where}.headers"))
        errors.extend(_string_map_errors(personalization.get("substitutions"), f"{where}.substitutions"))
        if _personalization_bytes(personalization) > _SENDGRID_MAX_PERSONALIZATION_BYTES:
            errors.append(
                _sendgrid_error(
                    "The total size of substitutions, custom_args and headers of a personalization may not exceed "
                    f"{_SENDGRID_MAX_PERSONALIZATION_BYTES} bytes.",
                    where,
                    "message.personalizations",
                )
            )

    subject = payload.get("subject")
    if not template_id and not every_subject and not (isinstance(subject, str) and subject):
        errors.append(
            _sendgrid_error(
                "The subject is required. You can get around this requirement if you use a template with a "
                "subject defined or if every personalization has a subject defined.",
                "subject",
                "message.subject",
            )
        )

    content = payload.get("content")
    if content is None or content == []:
        if not template_id:
            errors.append(
                _sendgrid_error(
                    "Unless a valid template_id is provided, the content parameter is required. There must "
                    "be at least one defined content block. We typically suggest both text/plain and "
                    "text/html "
                    "blocks are included, but only one block is required.",
                    "content",
                    "message.content",
                )
            )
    elif not isinstance(content, list):
        errors.append(_sendgrid_error("Invalid type. Expected: array.", "content", "message.content"))
    else:
        types: list[str] = []
        for index, block in enumerate(content):
            if not isinstance(block, dict) or not isinstance(block.get("type"), str) or not block["type"]:
                errors.append(
                    _sendgrid_error(
                        "The content type must be a string at least one character in length.",
                        f"content.{index}.type",
                        "message.content.type",
                    )
                )
                continue
            types.append(block["type"])
            value = block.get("value")
            if not isinstance(value, str) or not value:
                errors.append(
                    _sendgrid_error(
                        "The content value must be a string at least one character in length.",
                        f"content.{index}.value",
                        "message.content.value",
                    )
                )
        if "text/plain" in types and types[0] != "text/plain":
            errors.append(
                _sendgrid_error(
                    "If present, text/plain content must be first, followed by text/html, followed by any "
                    "other content.",
                    "content.0.type",
                    "message.content.type",
                )
            )

    categories = payload.get("categories")
    if categories is not None and (
        not isinstance(categories, list)
        or len(categories) > 10
        or not all(isinstance(c, str) and 0 < len(c) <= 255 for c in categories)
    ):
        errors.append(
            _sendgrid_error(
                "The categories parameter must be an array of at most 10 strings, each up to 255 characters.",
                "categories",
                "message.categories",
            )
        )
    errors.extend(_string_map_errors(payload.get("custom_args"), "custom_args"))
    errors.extend(_string_map_errors(payload.get("headers"), "headers"))
    return errors


def _personalization_bytes(personalization: Mapping[str, Any]) -> int:
    """Bytes SendGrid counts against one personalization's limit (its substitutions, custom args and headers)."""
    counted = {key: personalization.get(key) for key in ("substitutions", "custom_args", "headers")}
    return len(json.dumps(counted, ensure_ascii=False).encode("utf-8"))


def _string_map_errors(value: Any, where: str) -> list[dict[str, Any]]:
    if value is None:
        return []
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        return [_sendgrid_error("Invalid type. Expected an object of string values.", where, f"message.{where}")]
    return []


def _substitute(text: str, substitutions: Mapping[str, str]) -> str:
    for key, value in substitutions.items():
        text = text.replace(key, value)
    return text


def _sendgrid_records(payload: dict[str, Any], message_id: str, keep_bodies: bool = True) -> list[SandboxMessage]:
    received = utcnow()
    sender = payload["from"]
    from_ = formataddr((sender.get("name") or "", sender["email"]))
    reply = payload.get("reply_to")
    reply_to = formataddr((reply.get("name") or "", reply["email"])) if isinstance(reply, dict) else None
    text = html_body = ""
    for block in (payload.get("content") or []) if keep_bodies else []:
        if block["type"] == "text/plain" and not text:
            text = block["value"]
        elif block["type"] == "text/html" and not html_body:
            html_body = block["value"]
    categories = list(payload.get("categories") or [])
    records = []
    for index, personalization in enumerate(payload["personalizations"]):
        substitutions = personalization.get("substitutions") or {}
        records.append(
            SandboxMessage(
                id=message_id,
                provider="sendgrid",
                channel="email",
                to=", ".join(r["email"] for r in personalization["to"]),
                from_=from_,
                subject=_substitute(personalization.get("subject") or payload.get("subject") or "", substitutions)
                if keep_bodies
                else "",
                text=_substitute(text, substitutions),
                html=_substitute(html_body, substitutions),
                custom_args={
                    **(payload.get("custom_args") or {}),
                    **(personalization.get("custom_args") or {}),
                },
                categories=categories,
                headers={**(payload.get("headers") or {}), **(personalization.get("headers") or {})},
                received_at=received,
                personalization_index=index,
                reply_to=reply_to,
                template_id=payload.get("template_id"),
            )
        )
    return records


def _twilio_message(
    sid: str, account_sid: str, to: str, from_: str, service_sid: str, body: str, segments: int, now: datetime
) -> dict[str, Any]:
    uri = f"/{_API_VERSION}/Accounts/{account_sid}/Messages/{sid}"
    stamp = format_datetime(now)
    return {
        "account_sid": account_sid,
        "api_version": _API_VERSION,
        "body": body,
        "date_created": stamp,
        "date_sent": None,
        "date_updated": stamp,
        "direction": "outbound-api",
        "error_code": None,
        "error_message": None,
        "from": from_ or None,
        "messaging_service_sid": service_sid or None,
        "num_media": "0",
        "num_segments": str(segments),
        "price": None,
        "price_unit": "USD",
        "sid": sid,
        # A request through a Messaging Service is "accepted" until the service picks a sender.
        "status": "accepted" if service_sid and not from_ else "queued",
        "subresource_uris": {"media": f"{uri}/Media.json", "feedback": f"{uri}/Feedback.json"},
        "to": to,
        "uri": f"{uri}.json",
    }


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
                self._reply(500, _json({"error": "sandbox internal error"}))

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
        self._not_found(path)

    def _get(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/_sandbox/messages":
            self._reply(200, _json([m.to_dict() for m in self.sandbox.messages()]))
        elif path == "/_sandbox/stats":
            self._reply(200, _json(self.sandbox.stats()))
        elif path == "/_sandbox/sendgrid-public-key":
            self._reply(200, _json({"public_key": self.sandbox.sendgrid_public_key}))
        elif path in {"/", "/messages"}:
            self._html(200, _render_index(self.sandbox.messages()), refresh=True)
        elif (match := _MESSAGE_PAGE.match(path)) is not None:
            records = self.sandbox.messages()
            index = int(match.group(1))
            if index >= len(records):
                self._html(404, _page("Not found", "<p>No such message.</p>"))
            else:
                self._html(200, _render_message(index, records[index]))
        else:
            self._not_found(path)

    def _delete(self) -> None:
        path = self.path.split("?", 1)[0]
        self._read_body()
        if path == "/_sandbox/messages":
            query = parse_qs(self.path.partition("?")[2])
            if "to" in query:
                dropped = self.sandbox.forget(query["to"])
                self._reply(200, _json({"dropped": dropped}))
            else:
                self.sandbox.clear()
                self._reply(204)
        else:
            self._not_found(path)

    def _not_found(self, path: str) -> None:
        if path.startswith("/2010-04-01/"):
            self._reply(404, _twilio_error(20404, f"The requested resource {path} was not found", 404))
        elif path.startswith("/v3/"):
            self._reply(404, _json({"errors": [_sendgrid_error("resource not found")]}))
        else:
            self._reply(404, _json({"error": f"no route for {self.command} {path}"}))

    def _html(self, status: int, page: str, *, refresh: bool = False) -> None:
        headers = [
            # Email HTML is shown in a sandboxed iframe; the policy also keeps it from loading remote content.
            ("Content-Security-Policy", "default-src 'none'; style-src 'unsafe-inline'; img-src data:"),
            ("X-Content-Type-Options", "nosniff"),
        ]
        if refresh:
            headers.append(("Refresh", "5"))
        self._reply(status, page.encode(), "text/html; charset=utf-8", headers)

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
            self._reply(400, _json({"error": str(exc)}))
            return
        self._reply(201, _json({"queued": int(request.get("times", 1)), "stats": self.sandbox.stats()}))

    # -- SendGrid ----------------------------------------------------------------------------------

    def _sendgrid_send(self, body: bytes) -> None:
        sandbox = self.sandbox
        if sandbox.latency:
            sandbox.stopping.wait(sandbox.latency)
        fault = sandbox._take_fault("sendgrid")
        if fault is not None:
            if fault.kind in {"reset", "hang"}:
                if fault.kind == "hang":
                    sandbox.stopping.wait(fault.delay)
                sandbox._count_request("sendgrid", rejected=True)
                self._reset()
                return
            if fault.kind == "slow":
                sandbox.stopping.wait(fault.delay)
            elif fault.kind == "429":
                sandbox._count_request("sendgrid", rejected=True)
                reset = math.ceil(utcnow().timestamp() + fault.reset_after)
                self._reply(
                    429,
                    _json({"errors": [_sendgrid_error("too many requests")]}),
                    headers=[
                        ("X-RateLimit-Limit", "600"),
                        ("X-RateLimit-Remaining", "0"),
                        ("X-RateLimit-Reset", str(reset)),
                    ],
                )
                return
            elif fault.kind == "500":
                sandbox._count_request("sendgrid", rejected=True)
                self._reply(500, _json({"errors": [_sendgrid_error("Internal Server Error")]}))
                return

        authorization = self.headers.get("Authorization", "")
        scheme, _, token = authorization.partition(" ")
        if scheme != "Bearer" or not token.strip():
            sandbox._count_request("sendgrid", rejected=True)
            self._reply(401, _json({"errors": [_sendgrid_error("authorization required")]}))
            return
        try:
            payload = json.loads(body)
        except ValueError:
            payload = None
        errors = _validate_sendgrid(payload)
        if errors:
            sandbox._count_request("sendgrid", rejected=True)
            self._reply(400, _json({"errors": errors}))
            return

        message_id = secrets.token_urlsafe(16)
        records = _sendgrid_records(payload, message_id, sandbox.keep_bodies)
        sandbox._record("sendgrid", records)
        try:
            # The message is accepted now: its events follow even if the sender is gone or never gets the answer.
            if fault is not None and fault.kind == "accept_reset":
                self._reset()
            else:
                self._reply(202, headers=[("X-Message-Id", message_id)])
        finally:
            sandbox._post_sendgrid_events(records, fault.kind if fault else None)

    # -- Twilio ------------------------------------------------------------------------------------

    def _twilio_authenticated(self, account_sid: str) -> bool:
        scheme, _, encoded = self.headers.get("Authorization", "").partition(" ")
        if scheme != "Basic":
            return False
        try:
            user, _, password = base64.b64decode(encoded, validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return False
        return user == account_sid and bool(password)

    def _twilio_send(self, account_sid: str, body: bytes) -> None:
        sandbox = self.sandbox
        if sandbox.latency:
            sandbox.stopping.wait(sandbox.latency)
        form = {k: v[-1] for k, v in parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True).items()}
        to = form.get("To", "")
        fault = sandbox._take_fault("twilio")
        if fault is not None:
            rejection: tuple[int, int, str] | None = None
            if fault.kind in {"reset", "hang"}:
                if fault.kind == "hang":
                    sandbox.stopping.wait(fault.delay)
                sandbox._count_request("twilio", rejected=True)
                self._reset()
                return
            if fault.kind == "slow":
                sandbox.stopping.wait(fault.delay)
            elif fault.kind == "429":
                rejection = (429, 20429, "Too Many Requests")
            elif fault.kind == "500":
                rejection = (500, 20500, "An internal server error has occurred")
            elif fault.kind == "21211":
                rejection = (400, 21211, f"The 'To' number {to} is not a valid phone number.")
            elif fault.kind == "21610":
                rejection = (400, 21610, "Attempt to send to unsubscribed recipient")
            if rejection is not None:
                status, code, message = rejection
                sandbox._count_request("twilio", rejected=True)
                self._reply(status, _twilio_error(code, message, status))
                return

        if not self._twilio_authenticated(account_sid):
            sandbox._count_request("twilio", rejected=True)
            self._reply(401, _twilio_error(20003, "Authenticate", 401))
            return
        from_ = form.get("From", "")
        service_sid = form.get("MessagingServiceSid", "")
        text = form.get("Body", "")
        callback = form.get("StatusCallback", "")
        problem: tuple[int, str] | None = None
        if not to:
            problem = (21604, "A 'To' phone number is required.")
        elif not from_ and not service_sid:
            problem = (21603, "A 'From' phone number is required.")
        elif not _E164.match(to):
            problem = (21211, f"The 'To' number {to} is not a valid phone number.")
        elif from_ and not (_E164.match(from_) or _SHORT_CODE.match(from_) or _ALPHANUMERIC_SENDER.match(from_)):
            problem = (
                21212,
                f"The 'From' number {from_} is not a valid phone number, shortcode, or alphanumeric sender ID.",
            )
        elif not text:
            problem = (21602, "Message body is required.")
        elif len(text) > _TWILIO_MAX_BODY:
            problem = (21617, "The concatenated message body exceeds the 1600 character limit.")
        elif callback and urlsplit(callback).scheme not in {"http", "https"}:
            problem = (21609, "Invalid StatusCallback url")
        if problem is not None:
            sandbox._count_request("twilio", rejected=True)
            self._reply(400, _twilio_error(problem[0], problem[1], 400))
            return
        validity = form.get("ValidityPeriod")
        try:
            validity_period = int(validity) if validity else None
        except ValueError:
            validity_period = None

        sid = "SM" + secrets.token_hex(16)
        segments = sms_segments(text)
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
                    _json(_twilio_message(sid, account_sid, to, from_, service_sid, text, segments, now)),
                    "application/json; charset=utf-8",
                    [("Twilio-Request-Id", "RQ" + secrets.token_hex(16))],
                )
        finally:
            if callback:
                sandbox._post_status_callbacks(
                    callback, sid, account_sid, to, from_, service_sid, fault.kind if fault else None
                )


# -- HTML --------------------------------------------------------------------------------------------

_STYLE = """
body{font:14px/1.45 system-ui,sans-serif;margin:0;color:#1f2328;background:#f6f8fa}
header{background:#24292f;color:#fff;padding:10px 20px}header a{color:#fff;text-decoration:none}
main{padding:16px 20px}table{border-collapse:collapse;width:100%;background:#fff}
th,td{border-bottom:1px solid #d0d7de;padding:6px 8px;text-align:left;vertical-align:top}
th{background:#eaeef2}tr:hover td{background:#f3f6fa}td.muted,span.muted{color:#656d76}
pre{white-space:pre-wrap;background:#fff;border:1px solid #d0d7de;padding:10px}
iframe{width:100%;height:520px;border:1px solid #d0d7de;background:#fff}
.tag{display:inline-block;background:#ddf4ff;border-radius:8px;padding:0 6px;margin-right:4px}
"""

# Enough to find recent messages without making the page slow after a benchmark.
_INDEX_LIMIT = 500


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _page(title: str, content: str) -> str:
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        f"<title>{_e(title)} · outreach sandbox</title><style>{_STYLE}</style></head><body>"
        '<header><a href="/">outreach sandbox</a></header>'
        f"<main>{content}</main></body></html>"
    )


def _render_index(records: list[SandboxMessage]) -> str:
    rows = []
    first = max(0, len(records) - _INDEX_LIMIT)
    for index in range(len(records) - 1, first - 1, -1):
        record = records[index]
        summary = record.subject if record.channel == "email" else record.body
        if len(summary) > 120:
            summary = summary[:117] + "…"
        rows.append(
            f'<tr><td><a href="/messages/{index}">{index}</a></td>'
            f'<td class="muted">{_e(record.received_at.strftime("%Y-%m-%d %H:%M:%S"))}</td>'
            f"<td>{_e(record.provider)}</td><td>{_e(record.from_)}</td><td>{_e(record.to)}</td>"
            f'<td><a href="/messages/{index}">{_e(summary)}</a></td></tr>'
        )
    shown = (
        f"<p class=muted>Showing the newest {_INDEX_LIMIT} of {len(records)}.</p>"
        if len(records) > _INDEX_LIMIT
        else ""
    )
    table = (
        "<table><thead><tr><th>#</th><th>Received (UTC)</th><th>Provider</th><th>From</th><th>To</th>"
        f"<th>Subject / body</th></tr></thead><tbody>{''.join(rows)}</tbody></table>"
        if rows
        else "<p>No messages yet.</p>"
    )
    return _page("Messages", f"<h1>Messages ({len(records)})</h1>{shown}{table}")


def _render_message(index: int, record: SandboxMessage) -> str:
    fields: list[tuple[str, object]] = [
        ("Provider", record.provider),
        ("Id", record.id),
        ("Received (UTC)", record.received_at.isoformat()),
        ("From", record.from_),
        ("To", record.to),
    ]
    if record.channel == "email":
        fields += [
            ("Subject", record.subject),
            ("Reply-To", record.reply_to or ""),
            ("Personalization", record.personalization_index),
            ("Template", record.template_id or ""),
        ]
    else:
        fields += [
            ("Segments", record.segments),
            ("Characters", len(record.body)),
            ("Status callback", record.status_callback or ""),
            ("Validity period (s)", "" if record.validity_period is None else record.validity_period),
        ]
    rows = "".join(f"<tr><th>{_e(name)}</th><td>{_e(value)}</td></tr>" for name, value in fields)
    for title, mapping in (("Custom args", record.custom_args), ("Headers", record.headers)):
        if mapping:
            inner = "".join(f"<span class=tag>{_e(k)}: {_e(v)}</span>" for k, v in mapping.items())
            rows += f"<tr><th>{title}</th><td>{inner}</td></tr>"
    if record.categories:
        inner = "".join(f"<span class=tag>{_e(c)}</span>" for c in record.categories)
        rows += f"<tr><th>Categories</th><td>{inner}</td></tr>"
    parts = [f"<h1>Message {index}</h1><table>{rows}</table>"]
    if record.channel == "email":
        if record.html:
            # srcdoc is an attribute, so escaping it is what keeps the email's markup inside the iframe;
            # the empty sandbox attribute disables scripts, forms and navigation within it.
            parts.append(f'<h2>HTML</h2><iframe sandbox srcdoc="{_e(record.html)}"></iframe>')
        if record.text:
            parts.append(f"<h2>Text</h2><pre>{_e(record.text)}</pre>")
    else:
        parts.append(f"<h2>SMS body</h2><pre>{_e(record.body)}</pre>")
    return _page(record.subject or f"Message {index}", "".join(parts))


def serve(
    host: str = "127.0.0.1",
    port: int = 8025,
    twilio_auth_token: str = "sandbox-token",
    sendgrid_event_url: str | None = None,
) -> None:
    """Run the sandbox in the foreground until interrupted (Ctrl-C)."""
    sandbox = SandboxServer(
        host, port, twilio_auth_token=twilio_auth_token, sendgrid_event_url=sendgrid_event_url
    ).start()
    log.info("sandbox listening on %s", sandbox.url)
    log.info("SendGrid event webhook public key: %s", sandbox.sendgrid_public_key)
    try:
        while sandbox._thread is not None and sandbox._thread.is_alive():
            sandbox._thread.join(timeout=0.5)
    except KeyboardInterrupt:
        pass
    finally:
        sandbox.stop()
