"""Provider webhooks: SendGrid's Event Webhook, Twilio's status callbacks and inbound SMS.

Every request is authenticated before anything is parsed or stored:

- SendGrid signs ``timestamp + body`` with ECDSA P-256 (headers ``X-Twilio-Email-Event-Webhook-Signature`` and
  ``-Timestamp``); we verify with the SDK's ``EventWebhook`` and the public key from
  ``OUTREACH_SENDGRID_WEBHOOK_PUBLIC_KEY``, and refuse timestamps more than five minutes off (replays).
- Twilio signs the URL it called plus the form parameters with the account's auth token
  (``X-Twilio-Signature``); we check with the SDK's ``RequestValidator`` against the *public* URL
  (``OUTREACH_PUBLIC_URL`` + path + query), not the one a proxy forwarded to us.

A forged, unsigned or stale request gets 403 and changes nothing; a body over the size limit 413; a signed but
malformed one 400. A signed SendGrid batch is never a 5xx because of its content (SendGrid would post it again for
days): NULs and lone surrogates are stored as U+FFFD, and an event nested too deeply to parse is left out while the
rest of its batch is stored. One batch is one transaction, so a database failure (503, from the app's handler) leaves
nothing half-written and the provider's retry starts clean. Log lines carry counts and ids, never addresses or
message bodies.
"""

from __future__ import annotations

import binascii
import hmac
import json
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any
from urllib.parse import parse_qsl
from xml.sax.saxutils import escape

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec
from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from sendgrid.helpers.eventwebhook import EventWebhook
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData, UploadFile
from twilio.request_validator import RequestValidator

from outreach.core.clock import utcnow
from outreach.core.config import Secret, Settings
from outreach.core.errors import ConfigurationError
from outreach.core.inputs import scrub_data
from outreach.inbound.events import IngestResult, ingest
from outreach.inbound.provider_events import (
    NormalizedEvent,
    UnsupportedEventError,
    parse_sendgrid_batch,
    parse_twilio_status,
)
from outreach.service.runtime import Runtime

__all__ = ["WebhookSettings", "get_webhook_settings", "router"]

log = logging.getLogger(__name__)

router = APIRouter(prefix="/webhooks", tags=["webhooks"])

SENDGRID_SIGNATURE_HEADER = "X-Twilio-Email-Event-Webhook-Signature"
SENDGRID_TIMESTAMP_HEADER = "X-Twilio-Email-Event-Webhook-Timestamp"
TWILIO_SIGNATURE_HEADER = "X-Twilio-Signature"

MAX_BODY_BYTES = 5 * 1024 * 1024
MAX_CLOCK_SKEW = 300.0

_EMPTY_TWIML = '<?xml version="1.0" encoding="UTF-8"?><Response/>'


def _load_sendgrid_key(public_key: str) -> EventWebhook:
    try:
        verifier = EventWebhook(public_key)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise ConfigurationError(
            "OUTREACH_SENDGRID_WEBHOOK_PUBLIC_KEY is not a valid public key (base64 DER, as SendGrid shows it)"
        ) from None
    if not isinstance(verifier.public_key, ec.EllipticCurvePublicKey):
        raise ConfigurationError("OUTREACH_SENDGRID_WEBHOOK_PUBLIC_KEY must be an ECDSA (P-256) public key")
    return verifier


@dataclass(frozen=True)
class WebhookSettings:
    """What the webhook routes need beyond :class:`~outreach.core.config.Settings`; read once per app.

    ``twilio_auth_token`` overrides ``Settings.twilio_auth_token`` (the provider sandbox signs with its own).
    An invalid SendGrid key fails here, at start, not on the first event.
    """

    sendgrid_public_key: str = ""
    inbound_token: Secret = field(default_factory=lambda: Secret(""))
    twilio_auth_token: Secret | None = None
    max_body_bytes: int = MAX_BODY_BYTES
    max_clock_skew: float = MAX_CLOCK_SKEW
    sendgrid_verifier: EventWebhook | None = field(init=False, default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.sendgrid_public_key:
            object.__setattr__(self, "sendgrid_verifier", _load_sendgrid_key(self.sendgrid_public_key))

    @classmethod
    def from_settings(cls, settings: Settings) -> WebhookSettings:
        return cls(sendgrid_public_key=settings.sendgrid_webhook_public_key, inbound_token=settings.inbound_token)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> WebhookSettings:
        env = os.environ if environ is None else environ
        return cls(
            sendgrid_public_key="".join(env.get("OUTREACH_SENDGRID_WEBHOOK_PUBLIC_KEY", "").split()),
            inbound_token=Secret(env.get("OUTREACH_INBOUND_TOKEN", "").strip()),
        )

    def inbound_token_matches(self, presented: str) -> bool:
        """Constant-time check of a token presented by an unsigned inbound hook; False when none is set."""
        expected = self.inbound_token.reveal()
        return bool(expected) and hmac.compare_digest(expected.encode(), presented.encode())


def get_webhook_settings(request: Request) -> WebhookSettings:
    """``app.state.webhook_settings`` when the app set it, else read from the environment once and kept there."""
    hooks: WebhookSettings | None = getattr(request.app.state, "webhook_settings", None)
    if hooks is None:
        hooks = WebhookSettings.from_env()
        request.app.state.webhook_settings = hooks
    return hooks


def _runtime(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


HooksDep = Annotated[WebhookSettings, Depends(get_webhook_settings)]
RuntimeDep = Annotated[Runtime, Depends(_runtime)]


class Rejected(Exception):
    """A webhook request refused with ``status``; the JSON body names the error, never the payload."""

    def __init__(self, status: int, error: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.error = error
        self.message = message

    def response(self) -> JSONResponse:
        return JSONResponse(status_code=self.status, content={"error": self.error, "message": self.message})


def _forbidden(message: str) -> Rejected:
    return Rejected(403, "forbidden", message)


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise Rejected(413, "too_large", f"request body over {limit} bytes")
    size = 0
    chunks: list[bytes] = []
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise Rejected(413, "too_large", f"request body over {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _in_one_transaction(runtime: Runtime, events: list[NormalizedEvent]) -> IngestResult:
    with Session(runtime.engine, expire_on_commit=False) as session, session.begin():
        return ingest(session, events)


# -- SendGrid ---------------------------------------------------------------------------------------------


def verify_sendgrid(hooks: WebhookSettings, body: bytes, headers: Mapping[str, str], now: float) -> None:
    """Raise 403 unless ``body`` carries SendGrid's valid, fresh signature (503 when no key is configured)."""
    verifier = hooks.sendgrid_verifier
    if verifier is None:
        # Not a forgery, a missing setting: 503 makes SendGrid keep the batch and retry once it is set.
        log.error("sendgrid event webhook refused: OUTREACH_SENDGRID_WEBHOOK_PUBLIC_KEY is not set")
        raise Rejected(503, "not_configured", "the SendGrid event webhook is not configured")
    signature = headers.get(SENDGRID_SIGNATURE_HEADER, "")
    timestamp = headers.get(SENDGRID_TIMESTAMP_HEADER, "")
    if not signature or not timestamp:
        raise _forbidden("missing signature")
    if not timestamp.isdigit() or abs(now - int(timestamp)) > hooks.max_clock_skew:
        raise _forbidden("stale or invalid timestamp")
    try:
        valid = verifier.verify_signature(body.decode("utf-8"), signature, timestamp)
    except (UnicodeDecodeError, binascii.Error, ValueError, InvalidSignature):
        valid = False
    if not valid:
        raise _forbidden("invalid signature")


#: A JSON escape no database text can hold once parsed: a UTF-16 surrogate (paired ones decode to one character; a
#: lone one stays a surrogate) or NUL. Scanning the raw body for it is much cheaper than walking every parsed value.
_UNSTORABLE_ESCAPE = re.compile(rb"\\u(?:[dD][89a-fA-F]|0000)")

#: How deeply one event of a batch may nest. SendGrid's events are flat (categories and custom arguments one level
#: down); an event nested deeper than the parser or the encoders can follow is dropped rather than fail its batch.
MAX_EVENT_DEPTH = 64
#: A JSON string, or one of the characters that open, close or separate values.
_JSON_TOKEN = re.compile(rb'"(?:[^"\\]|\\.)*"|[\[\]{},]')


def _sendgrid_events(payload: Any, body: bytes) -> list[NormalizedEvent]:
    """The events of a parsed batch. The batch is signed and genuine, so refusing it for a NUL or a lone surrogate
    would only make SendGrid post it again for days: both are stored as U+FFFD (keys too; the broken text is a
    user agent or a bounce reason)."""
    if _UNSTORABLE_ESCAPE.search(body):
        payload = scrub_data(payload)
    if not isinstance(payload, list):
        raise Rejected(400, "invalid", "expected a JSON array of events")
    try:
        return parse_sendgrid_batch(payload)
    except ValueError as exc:
        raise Rejected(400, "invalid", str(exc)) from None


def shallow_events(body: bytes, limit: int = MAX_EVENT_DEPTH) -> tuple[list[Any], int]:
    """The elements of the JSON array ``body`` that nest at most ``limit`` levels, each parsed on its own, and how
    many deeper ones were left out. Elements are found by a scan of strings and brackets, without recursion."""
    if not body.lstrip().startswith(b"["):
        raise Rejected(400, "invalid", "expected a JSON array of events")
    kept: list[Any] = []
    dropped = depth = deepest = 0
    start = 0
    for match in _JSON_TOKEN.finditer(body):
        token = match.group()
        if token in (b"[", b"{"):
            depth += 1
            deepest = max(deepest, depth)
            if depth == 1:
                start, deepest = match.end(), 1
            continue
        if (token == b"," and depth != 1) or token.startswith(b'"'):
            continue
        if token != b",":  # a closing bracket
            depth -= 1
            if depth != 0:
                continue
        element, element_depth = body[start : match.start()], deepest - 1
        start, deepest = match.end(), 1
        if element.strip():
            if element_depth > limit:
                dropped += 1
            else:
                try:
                    kept.append(json.loads(element))
                except ValueError:
                    raise Rejected(400, "invalid", "body is not JSON") from None
        if depth == 0:
            if body[match.end() :].strip():
                break  # something after the array: not JSON
            return kept, dropped
    raise Rejected(400, "invalid", "body is not JSON")


def _ingest_sendgrid(
    runtime: Runtime, hooks: WebhookSettings, body: bytes, headers: Mapping[str, str], now: float
) -> tuple[IngestResult, int]:
    """Verify, parse and store a batch in one transaction: (what was stored, how many events nested too deeply were
    left out). The signature is checked over the raw body before anything is parsed.

    A body nested deeper than the parser (or, later, an encoder) can follow raises ``RecursionError`` anywhere on
    the way; the transaction is rolled back and the batch read again event by event, keeping those that nest at
    most :data:`MAX_EVENT_DEPTH` levels. Its other events are stored and SendGrid gets its 200: a retry could never
    do better."""
    verify_sendgrid(hooks, body, headers, now)
    try:
        try:
            payload = json.loads(body)
        except ValueError:
            raise Rejected(400, "invalid", "body is not JSON") from None
        return _in_one_transaction(runtime, _sendgrid_events(payload, body)), 0
    except RecursionError:
        pass
    payload, dropped = shallow_events(body)
    result = _in_one_transaction(runtime, _sendgrid_events(payload, body))
    log.warning("sendgrid events nested too deeply were dropped", extra={"count": dropped})
    return result, dropped


@router.post("/sendgrid/events")
async def sendgrid_events(request: Request, runtime: RuntimeDep, hooks: HooksDep) -> JSONResponse:
    """SendGrid Event Webhook: a signed JSON array of events, stored once each and applied to the outbox.

    Everything after reading the body — the signature check, parsing (tens of milliseconds for a 1 MiB batch)
    and the transaction — runs in the thread pool, so the event loop keeps reading the next batch and writing
    the answers of others meanwhile.
    """
    try:
        body = await _read_body(request, hooks.max_body_bytes)
        result, dropped = await run_in_threadpool(
            _ingest_sendgrid, runtime, hooks, body, request.headers, utcnow().timestamp()
        )
    except Rejected as rejected:
        if rejected.status == 403:
            log.warning("sendgrid event webhook rejected", extra={"reason": rejected.message})
        return rejected.response()
    summary: dict[str, int] = {**result.summary(), **({"dropped": dropped} if dropped else {})}
    log.info("sendgrid events ingested", extra=summary)
    return JSONResponse(summary)


# -- Twilio -----------------------------------------------------------------------------------------------


def public_url(runtime: Runtime, request: Request) -> str:
    """The URL Twilio called, as Twilio saw it: our public base URL, the path and the raw query string."""
    url = runtime.settings.public_url.rstrip("/") + request.url.path
    query = request.url.query
    return f"{url}?{query}" if query else url


def _twilio_form(body: bytes) -> list[tuple[str, str]]:
    try:
        return parse_qsl(body.decode("utf-8"), keep_blank_values=True)
    except (UnicodeDecodeError, ValueError):
        # What cannot be decoded cannot have been signed by Twilio.
        raise _forbidden("invalid signature") from None


def verify_twilio(runtime: Runtime, hooks: WebhookSettings, request: Request, params: list[tuple[str, str]]) -> None:
    token = hooks.twilio_auth_token if hooks.twilio_auth_token is not None else runtime.settings.twilio_auth_token
    if not token:
        log.error("twilio webhook refused: TWILIO_AUTH_TOKEN is not set")
        raise Rejected(503, "not_configured", "the Twilio webhooks are not configured")
    signature = request.headers.get(TWILIO_SIGNATURE_HEADER, "")
    if not signature:
        raise _forbidden("missing signature")
    # FormData keeps repeated keys; the validator signs every value of each, as Twilio does.
    items: list[tuple[str, str | UploadFile]] = list(params)
    if not RequestValidator(token.reveal()).validate(public_url(runtime, request), FormData(items), signature):
        raise _forbidden("invalid signature")


#: The longest value Twilio sends in these fields (SIDs are 34 characters, numbers E.164 or a channel address);
#: anything longer is refused before it can overflow a column.
_TWILIO_FIELD_LIMITS = {"MessageSid": 64, "SmsSid": 64, "From": 320, "To": 320, "MessageStatus": 32, "ErrorCode": 16}


async def _signed_twilio_form(request: Request, runtime: Runtime, hooks: WebhookSettings) -> dict[str, str]:
    body = await _read_body(request, hooks.max_body_bytes)
    params = _twilio_form(body)
    verify_twilio(runtime, hooks, request, params)
    if any("\x00" in key or "\x00" in value for key, value in params):
        raise Rejected(400, "invalid", "the form contains NUL characters")
    form = dict(params)
    for name, limit in _TWILIO_FIELD_LIMITS.items():
        if len(form.get(name) or "") > limit:
            raise Rejected(400, "invalid", f"{name} is longer than {limit} characters")
    return form


@router.post("/twilio/status")
async def twilio_status(
    request: Request, runtime: RuntimeDep, hooks: HooksDep, outreach_id: str | None = None
) -> JSONResponse:
    """Twilio status callback for one outbound SMS; ``outreach_id`` is the outbox id we put in the URL."""
    try:
        form = await _signed_twilio_form(request, runtime, hooks)
        try:
            event = parse_twilio_status(form, outreach_id, received_at=utcnow())
        except UnsupportedEventError:
            log.info("twilio status ignored", extra={"outbox_id": outreach_id})
            return JSONResponse({"ignored": 1})
        except ValueError as exc:
            raise Rejected(400, "invalid", str(exc)) from None
    except Rejected as rejected:
        if rejected.status == 403:
            log.warning("twilio status callback rejected", extra={"reason": rejected.message})
        return rejected.response()
    result = await run_in_threadpool(_in_one_transaction, runtime, [event])
    log.info(
        "twilio status ingested",
        extra={
            "outbox_id": outreach_id,
            "provider_message_id": event.provider_message_id,
            "type": event.type.value,
            **result.summary(),
        },
    )
    return JSONResponse(result.summary())


def twiml(reply: str | None) -> str:
    if reply is None:
        return _EMPTY_TWIML
    return f'<?xml version="1.0" encoding="UTF-8"?><Response><Message>{escape(reply)}</Message></Response>'


@router.post("/twilio/inbound")
async def twilio_inbound(request: Request, runtime: RuntimeDep, hooks: HooksDep) -> Response:
    """Twilio incoming-message webhook: keywords, replies; answered with TwiML (an empty one for no answer)."""
    try:
        form = await _signed_twilio_form(request, runtime, hooks)
        sid = (form.get("MessageSid") or form.get("SmsSid") or "").strip()
        sender = (form.get("From") or "").strip()
        if not sid or not sender:
            raise Rejected(400, "invalid", "MessageSid and From are required")
    except Rejected as rejected:
        if rejected.status == 403:
            log.warning("twilio inbound rejected", extra={"reason": rejected.message})
        return rejected.response()

    from outreach.inbound.sms import InboundResult, InboundSms, handle_inbound_sms

    sms = InboundSms(
        provider_message_id=sid,
        from_=sender,
        to=(form.get("To") or "").strip(),
        body=form.get("Body") or "",
        received_at=utcnow(),
        raw=form,
    )

    def handle() -> InboundResult:
        with Session(runtime.engine, expire_on_commit=False) as session, session.begin():
            result = handle_inbound_sms(session, runtime, sms)
        # Committed: now the worker may see the rows the handling wrote (the out-of-hours auto-reply).
        if result.queue:
            try:
                runtime.enqueue(list(result.queue))
            except Exception:
                # The rows are safe in the outbox; the scheduler's sweeper enqueues them once their lease ends.
                log.exception("twilio inbound: enqueue failed", extra={"outbox_ids": list(result.queue)})
        return result

    result = await run_in_threadpool(handle)
    return Response(twiml(result.reply), media_type="text/xml")
