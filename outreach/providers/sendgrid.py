"""Email through SendGrid's v3 Mail Send API, with the official SDK.

One request per message, one personalization per request. Our outbox id travels as the custom arg
``outreach_id`` so SendGrid's events can be matched back without personal data.

Connections are kept open and reused (:class:`outreach.providers.http.PooledClient` replaces only the SDK's
urllib send with a pool shared by the process's threads; the SDK still builds every request).

Error mapping: the SDK (its ``python_http_client``) raises an ``HTTPError`` subclass for every non-2xx answer
but lets network failures through untouched (``urllib3`` errors from the pool; ``urllib.error.URLError``,
``TimeoutError``, ``ConnectionError``, ``http.client.RemoteDisconnected`` from the SDK's own client). 429, 408,
5xx and connections that never opened are transient; other 4xx are permanent. A failure after the request went
out (a read timeout, a reset while waiting for the answer) is ambiguous
(:class:`~outreach.core.errors.AmbiguousProviderError`): SendGrid may have accepted the mail, so it is not resent.

Lookups (:meth:`SendGridProvider.look_up`) use the Email Activity API, a paid add-on, when
``OUTREACH_SENDGRID_EMAIL_ACTIVITY`` says the account has it: ``GET /v3/messages`` with the query
``(unique_args['outreach_id']="<outbox id>")`` through the SDK's generic client. Every message it lists carries our
id; its ``msg_id`` starts with the send's ``X-Message-Id``.
"""

from __future__ import annotations

import http.client
import json
import re
import urllib.error
from collections.abc import Mapping
from typing import Any

import urllib3
from python_http_client.exceptions import HTTPError
from sendgrid import SendGridAPIClient

from outreach.core.clock import utcnow
from outreach.core.config import Settings
from outreach.core.errors import (
    AmbiguousProviderError,
    ConfigurationError,
    PermanentProviderError,
    ProviderError,
    TransientProviderError,
)
from outreach.providers.base import (
    EmailMessage,
    EmailProvider,
    Lookup,
    LookupAnswer,
    ProviderPipeline,
    SendResult,
    Sighting,
    redact,
)
from outreach.providers.http import PooledClient, nothing_sent, pool_manager
from outreach.providers.sendgrid_payload import MESSAGE_ID_HEADER, OUTBOX_ID_ARG, address_field, content

__all__ = ["SendGridProvider"]

_NAME = "sendgrid"
#: Open connections kept per host: enough for a worker process's threads.
POOL_SIZE = 32
#: The longest wait a rate-limit reset may ask for, in seconds.
MAX_RESET_WAIT = 900.0
#: Messages an Email Activity lookup asks for: one outbox id is one message (a resend after a proven absence, two).
LOOKUP_LIMIT = 10
#: What an outbox id looks like (it goes into the Email Activity query as it is).
_OUTBOX_ID = re.compile(r"^[0-9a-f]{1,64}$")


def _error_detail(body: Any) -> str:
    """``field: message`` for each error in SendGrid's ``{"errors": [...]}`` body, without personal data."""
    try:
        data = json.loads(body.decode("utf-8") if isinstance(body, bytes) else body)
        errors = data.get("errors") if isinstance(data, dict) else None
    except (ValueError, AttributeError, TypeError):
        errors = None
    if not isinstance(errors, list) or not errors:
        return ""
    parts = []
    for error in errors:
        if not isinstance(error, dict):
            continue
        message = str(error.get("message") or "").strip()
        where = error.get("field")
        parts.append(f"{where}: {message}" if where else message)
    return redact("; ".join(p for p in parts if p))


def _retry_after(headers: Mapping[str, str] | None) -> float | None:
    """Seconds until SendGrid's rate-limit window resets (``X-RateLimit-Reset`` is an epoch), at least 1 and at
    most :data:`MAX_RESET_WAIT` (a reset further away means our clock and SendGrid's disagree, e.g. a pass run
    ``tick --now`` in the past)."""
    if headers is None:
        return None
    reset = headers.get("X-RateLimit-Reset")
    if reset:
        try:
            return min(MAX_RESET_WAIT, max(1.0, float(reset) - utcnow().timestamp()))
        except ValueError:
            pass
    retry_after = headers.get("Retry-After")
    if retry_after:
        try:
            return max(1.0, float(retry_after))
        except ValueError:
            pass
    return None


class SendGridProvider(ProviderPipeline[EmailMessage, dict[str, Any], Any], EmailProvider):
    """:class:`EmailProvider` backed by ``sendgrid.SendGridAPIClient``.

    ``settings.sendgrid_host`` is the API root without ``/v3`` (the SDK adds it), which is how tests and the
    sandbox redirect it. ``settings.provider_timeout`` bounds connect and each socket read.
    """

    name = _NAME

    def __init__(self, settings: Settings) -> None:
        api_key = settings.sendgrid_api_key.reveal()
        if not api_key:
            raise ConfigurationError("SENDGRID_API_KEY is not set")
        host = settings.sendgrid_host.rstrip("/").removesuffix("/v3")
        self._client = SendGridAPIClient(api_key=api_key, host=host)
        # The SDK has no timeout argument; its python_http_client copies the root client's timeout into the
        # per-path clients it builds for each call. 0 would mean "no timeout" to it, so keep None explicit.
        timeout = settings.provider_timeout or None
        self._client.client.timeout = timeout
        # Every call shares this headers dict and the SDK adds Content-Type to it on first use; adding it now
        # keeps concurrent first sends from changing the dict while another thread copies it.
        self._client.client.request_headers.setdefault("Content-Type", "application/json")
        # The SDK's client opens a new connection per request ("Connection: close"); this one keeps them open.
        self.pool = pool_manager(POOL_SIZE, timeout)
        self._client.client = PooledClient.replacing(self._client.client, self.pool)
        self._send = self._client.client.mail.send
        self._default_reply_to = settings.email_reply_to or None
        self._email_activity = settings.sendgrid_email_activity

    def send_email(self, message: EmailMessage) -> SendResult:
        return self.run(message)

    @property
    def can_look_up(self) -> bool:
        return self._email_activity

    def look_up(self, lookup: Lookup) -> LookupAnswer:
        """The messages Email Activity lists with our outbox id (a custom arg, which it calls a unique arg)."""
        if not self._email_activity:
            return LookupAnswer(problem="Email Activity lookups are off (OUTREACH_SENDGRID_EMAIL_ACTIVITY)")
        if not _OUTBOX_ID.match(lookup.message_id):
            return LookupAnswer(problem="not an outbox id")
        query = f"(unique_args['{OUTBOX_ID_ARG}']=\"{lookup.message_id}\")"
        try:
            response = self._client.client.messages.get(query_params={"query": query, "limit": LOOKUP_LIMIT})
            listed = json.loads(response.body or b"{}").get("messages")
        except HTTPError as exc:
            return LookupAnswer(problem=f"Email Activity answered HTTP {int(exc.status_code)}")
        except (urllib3.exceptions.HTTPError, OSError, http.client.HTTPException) as exc:
            return LookupAnswer(problem=f"Email Activity lookup failed ({type(exc).__name__})")
        except (ValueError, AttributeError):
            return LookupAnswer(problem="Email Activity answered something that is not its JSON")
        if not isinstance(listed, list):
            return LookupAnswer(problem="Email Activity answered without a message list")
        sightings = []
        for item in listed:
            msg_id = item.get("msg_id") if isinstance(item, dict) else None
            if not isinstance(msg_id, str) or not msg_id:
                return LookupAnswer(problem="Email Activity listed a message without its id")
            # "<X-Message-Id>.filter…": the send's id (what a send records) is the part before the first dot.
            sightings.append(Sighting(msg_id.split(".", 1)[0], "id"))
        return LookupAnswer(tuple(sightings))

    def build_payload(self, message: EmailMessage) -> dict[str, Any]:
        personalization: dict[str, Any] = {
            "to": [address_field(message.to)],
            "custom_args": {**message.custom_args, OUTBOX_ID_ARG: message.message_id},
        }
        payload: dict[str, Any] = {
            "personalizations": [personalization],
            "from": address_field(message.from_email),
            "subject": message.subject,
            "content": content(message.text, message.html),
        }
        reply_to = message.reply_to or self._default_reply_to
        if reply_to:
            payload["reply_to"] = address_field(reply_to)
        if message.categories:
            # SendGrid rejects duplicate categories; keep the first occurrence's order.
            payload["categories"] = list(dict.fromkeys(message.categories))
        if message.headers:
            payload["headers"] = dict(message.headers)
        return payload

    def post(self, payload: dict[str, Any]) -> Any:
        return self._send.post(request_body=payload)

    def parse_result(self, response: Any) -> str:
        return str(response.headers.get(MESSAGE_ID_HEADER) or "")

    def map_error(self, exc: Exception) -> ProviderError | None:
        if isinstance(exc, HTTPError):
            status = int(exc.status_code)
            detail = _error_detail(exc.body) or f"HTTP {status}"
            if status == 429:
                return TransientProviderError(
                    _NAME,
                    f"rate limited: {detail}",
                    status=status,
                    code=str(status),
                    retry_after=_retry_after(exc.headers),
                )
            if status >= 500 or status == 408:
                return TransientProviderError(_NAME, detail, status=status, code=str(status))
            return PermanentProviderError(_NAME, detail, status=status, code=str(status))
        if not isinstance(exc, (urllib3.exceptions.HTTPError, OSError, http.client.HTTPException)):
            return None
        # MaxRetryError names the failure that used up the (connect-only) retries.
        reason: object = exc.reason if isinstance(exc, urllib3.exceptions.MaxRetryError) else exc
        if isinstance(reason, urllib.error.URLError):
            reason = reason.reason
        if isinstance(reason, urllib3.exceptions.ProtocolError) and isinstance(reason.args[-1], BaseException):
            reason = reason.args[-1]  # ("Connection aborted.", RemoteDisconnected(...))
        kind = type(reason if isinstance(reason, BaseException) else exc).__name__
        if nothing_sent(exc):
            return TransientProviderError(_NAME, f"connection failed ({kind})")
        # The request went out and no answer came back: SendGrid may have accepted the message.
        if isinstance(reason, (urllib3.exceptions.TimeoutError, TimeoutError)):
            return AmbiguousProviderError(_NAME, "timed out waiting for the answer")
        return AmbiguousProviderError(_NAME, f"connection lost before the answer ({kind})")
