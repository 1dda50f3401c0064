"""Guards in front of every route: rate limits on the public endpoints, request size limits, no stack traces.

**Rate limits.** The routes anyone on the internet can call without an API key — provider webhooks
(``/webhooks/…``, including Inbound Parse), the unsubscribe pages (``/unsubscribe/…``) and tracked links
(``/r/…``) — are limited per client IP with a token bucket (the same GCRA as provider pacing,
:mod:`outreach.policy.pacing`): ``OUTREACH_PUBLIC_RATE_LIMIT`` requests a second on average with bursts of
``OUTREACH_PUBLIC_RATE_BURST``; the webhooks have a bucket of their own, ``OUTREACH_WEBHOOK_RATE_LIMIT`` /
``_BURST`` (500/s, 5000), because providers post a lot from few addresses and Twilio does not retry a status
callback answered 429. Over the limit the answer is ``429`` with ``Retry-After`` (seconds), which SendGrid
honours by retrying. The bucket lives in this process, or in Redis when
``OUTREACH_RATE_LIMIT_REDIS_URL`` is set, so that every API replica shares it. A Redis that cannot be reached
lets requests through (a lost webhook is worse than an unmetered one) and logs a warning.

**The client IP** is the ASGI peer address (``scope["client"]``); we never read ``X-Forwarded-For`` ourselves, so a
client cannot pick its own bucket. Behind a reverse proxy, list it in ``OUTREACH_TRUSTED_PROXIES`` (IPs or CIDR
networks): ``outreach serve`` and ``up`` run uvicorn with :func:`proxy_options`, so uvicorn replaces the peer address
with the nearest address in ``X-Forwarded-For`` that is not itself a trusted proxy (and the scheme with
``X-Forwarded-Proto``) on connections from those proxies only. Empty (the default) turns uvicorn's forwarded-header
handling off altogether: its own default believes any connection from 127.0.0.1, which is every request on a host
where something else on the machine (a sidecar, an SSH tunnel, a misconfigured proxy) relays for anyone.

**Request size.** A body over the limit is refused with ``413`` and a JSON message naming the limit, before the
route reads it: ``OUTREACH_MAX_REQUEST_BYTES`` (1 MiB) for the API and the pages, ``OUTREACH_MAX_WEBHOOK_BYTES``
(5 MiB: a SendGrid batch is up to about 1 MiB) for the webhooks. Inbound Parse posts (a reply with a CV
attached is tens of MB) keep their own streaming limits (:mod:`outreach.web.inbound_parse`).

**Errors.** An unexpected exception becomes ``500`` with ``{"error": "internal", "request_id": …}``; the log line
carries the request id, the exception type and the stack frames (file, line, function), never the exception's
message or local values, which can hold personal data. Every response carries ``X-Request-ID``.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypedDict

from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = [
    "PUBLIC_PREFIXES",
    "BodyLimit",
    "ErrorShield",
    "Limiter",
    "LocalLimiter",
    "RateLimit",
    "RedisLimiter",
    "make_limiter",
    "proxy_options",
]

log = logging.getLogger(__name__)

#: Routes without authentication other than a provider signature or a signed token.
PUBLIC_PREFIXES = ("/webhooks/", "/unsubscribe/", "/r/", "/dashboard/login")
#: Provider webhooks: a budget of their own (``OUTREACH_WEBHOOK_RATE_LIMIT``), larger than the other public routes'.
WEBHOOK_PREFIX = "/webhooks/"
#: Routes that enforce their own (larger, streaming) body limits.
OWN_BODY_LIMIT = ("/webhooks/sendgrid/inbound",)

_LOCAL_MAX_KEYS = 100_000


@dataclass(frozen=True)
class Decision:
    allowed: bool
    retry_after: float = 0.0


class Limiter(Protocol):
    def hit(self, key: str) -> Decision: ...


class LocalLimiter:
    """GCRA per key in this process. Keys whose bucket has refilled are dropped, so many IPs cannot grow it."""

    def __init__(self, per_second: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = 1.0 / per_second
        self.tolerance = self.interval * (burst - 1)
        self._clock = clock
        self._lock = threading.Lock()
        self._tat: dict[str, float] = {}

    def hit(self, key: str) -> Decision:
        with self._lock:
            now = self._clock()
            tat = max(self._tat.get(key, now), now)
            wait = tat - self.tolerance - now
            if wait > 0:
                return Decision(False, wait)
            if len(self._tat) >= _LOCAL_MAX_KEYS:
                self._tat = {k: v for k, v in self._tat.items() if v > now}
            self._tat[key] = tat + self.interval
            return Decision(True)


class RedisLimiter:
    """The same bucket shared by every process through Redis (the provider pacer's GCRA script)."""

    def __init__(self, url: str, per_second: float, burst: int, prefix: str = "outreach:ratelimit:") -> None:
        from outreach.policy.config import RateLimitSpec
        from outreach.policy.pacing import RedisPacer

        self._pacer = RedisPacer(url, prefix=prefix)
        self._spec = RateLimitSpec(per_second=per_second, burst=burst)

    def hit(self, key: str) -> Decision:
        try:
            booking = self._pacer.book(key, self._spec, cost=1.0, max_wait=0.0)
        except Exception as exc:
            log.warning("rate limit store unavailable; request let through", extra={"error": type(exc).__name__})
            return Decision(True)
        return Decision(booking.granted, booking.wait)


def make_limiter(per_second: float, burst: int, redis_url: str = "") -> Limiter | None:
    """The limiter the settings ask for; None when ``per_second`` is 0 (limits off)."""
    if per_second <= 0:
        return None
    burst = max(1, burst)
    if redis_url:
        return RedisLimiter(redis_url, per_second, burst)
    return LocalLimiter(per_second, burst)


class ProxyOptions(TypedDict):
    proxy_headers: bool
    forwarded_allow_ips: list[str]


def proxy_options(trusted_proxies: Sequence[str]) -> ProxyOptions:
    """uvicorn's forwarded-header options for ``OUTREACH_TRUSTED_PROXIES``: on for those addresses only, else off.

    Always explicit: left unset, uvicorn would trust ``$FORWARDED_ALLOW_IPS`` or 127.0.0.1.
    """
    return {"proxy_headers": bool(trusted_proxies), "forwarded_allow_ips": list(trusted_proxies)}


def client_ip(scope: Scope) -> str:
    """The address a request's budget is kept under: the peer, as the server (and only a trusted proxy) set it."""
    client = scope.get("client")
    return str(client[0]) if client else "unknown"


def _is_public(path: str) -> bool:
    return path.startswith(PUBLIC_PREFIXES)


async def _send_json(send: Send, status: int, content: dict[str, Any], headers: list[tuple[bytes, bytes]]) -> None:
    body = json.dumps(content).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class RateLimit:
    """429 with ``Retry-After`` for a client IP over its budget on the public routes."""

    def __init__(self, app: ASGIApp, limiter: Limiter | None, webhook_limiter: Limiter | None = None) -> None:
        self.app = app
        self.limiter = limiter
        self.webhook_limiter = webhook_limiter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        limiter = self.webhook_limiter if path.startswith(WEBHOOK_PREFIX) else self.limiter
        if limiter is None or scope["type"] != "http" or not _is_public(path):
            await self.app(scope, receive, send)
            return
        decision = limiter.hit(client_ip(scope))
        if decision.allowed:
            await self.app(scope, receive, send)
            return
        retry = max(1, math.ceil(decision.retry_after))
        log.warning("public endpoint rate limited", extra={"path_prefix": scope["path"].split("/", 2)[1]})
        await _send_json(
            send,
            429,
            {"error": "rate_limited", "message": f"too many requests; retry after {retry} seconds"},
            [(b"retry-after", str(retry).encode())],
        )


class BodyLimit:
    """413 for a body over the limit: by its ``Content-Length`` at once, or as soon as a streamed body passes it."""

    def __init__(self, app: ASGIApp, max_bytes: int, max_webhook_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.max_webhook_bytes = max_webhook_bytes

    def limit_for(self, path: str) -> int | None:
        if path.startswith(OWN_BODY_LIMIT):
            return None
        return self.max_webhook_bytes if path.startswith("/webhooks/") else self.max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        limit = self.limit_for(scope.get("path", "")) if scope["type"] == "http" else None
        if limit is None or limit <= 0:
            await self.app(scope, receive, send)
            return
        too_large = {"error": "too_large", "message": f"request body over the limit of {limit} bytes"}
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                declared = value.decode("latin-1").strip()
                if declared.isdigit() and int(declared) > limit:
                    await _send_json(send, 413, too_large, [(b"connection", b"close")])
                    return
        received = 0
        started = False
        refused = False

        async def counting_receive() -> Message:
            nonlocal received, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    # Answer now, and tell the route the client went away (routes turn exceptions raised while
                    # reading a body into their own 400); whatever the route answers is dropped.
                    refused = True
                    if not started:
                        await _send_json(send, 413, too_large, [(b"connection", b"close")])
                    return {"type": "http.disconnect"}
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if refused:
                return
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except Exception:
            if not refused:
                raise


def _frames(exc: BaseException) -> str:
    """The stack without messages or values: ``file:line in function`` per frame, innermost last."""
    frames = traceback.extract_tb(exc.__traceback__)
    return " | ".join(f"{frame.filename}:{frame.lineno} in {frame.name}" for frame in frames)


class ErrorShield:
    """Every response gets ``X-Request-ID``; an unhandled exception becomes a generic JSON 500 with that id."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        header = (b"x-request-id", request_id.encode())
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message = {**message, "headers": [*message.get("headers", []), header]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception as exc:
            # The message and the locals may hold personal data; the type and the frames locate the bug.
            log.error(
                "unhandled error",
                extra={
                    "request_id": request_id,
                    "method": scope.get("method"),
                    "route": _route(scope),
                    "error": type(exc).__name__,
                    "stack": _frames(exc),
                },
            )
            if started:
                return  # too late for a clean answer; the connection ends here
            await _send_json(
                send,
                500,
                {"error": "internal", "message": "internal error", "request_id": request_id},
                [header],
            )


def _route(scope: Scope) -> str:
    """The route's template (``/r/{token}``), never the concrete path, which carries tokens and ids."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else "(unmatched)"
