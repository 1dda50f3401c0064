"""SendGrid Inbound Parse: the emails candidates send to our reply address, posted to us as multipart forms.

SendGrid does not sign these posts, so the URL configured in SendGrid carries a secret: either
``https://outreach.example.com/webhooks/sendgrid/inbound?token=…`` or, better (URLs end up in access logs), basic
auth ``https://inbound:…@outreach.example.com/webhooks/sendgrid/inbound`` (any user name; the password is the
token). The token is ``OUTREACH_INBOUND_TOKEN``, compared in constant time.

Answers: 403 for a missing or wrong token (nothing is read or stored), 503 while no token is configured and when
the database is down (SendGrid retries 5xx for three days), 413 over the size limits, 400 for a body that is not
SendGrid's form, 200 once the message is stored (a duplicate post is 200 too, and changes nothing).

Both of SendGrid's formats are read: the default one (``headers``, ``text``, ``html``, ``from``, ``to``, ``cc``,
``subject``, ``envelope``, ``charsets``, ``SPF``, ``dkim``, ``attachments`` and the attachment files) and "POST the
raw, full MIME message" (``email``). Each text field is decoded in the charset ``charsets`` names for it; the raw
header block is parsed with the standard library's email parser. Attachments are counted, never kept: their bytes
are streamed past (a CV attached to a reply must not make the reply bounce), only the text fields count against
the webhook body limit.

Log lines carry kinds and ids, never addresses, subjects or text.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import hashlib
import html
import json
import logging
import re
from dataclasses import dataclass, field
from email import policy
from email.header import decode_header, make_header
from email.message import EmailMessage, Message
from email.parser import BytesParser, HeaderParser
from email.utils import parseaddr
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from outreach.core.clock import utcnow
from outreach.core.inputs import scrub_data, scrub_text
from outreach.inbound.replies import EmailResult, InboundEmail, handle_inbound_email
from outreach.service.runtime import Runtime
from outreach.web.webhooks import Rejected, WebhookSettings, get_webhook_settings

__all__ = ["MAX_REQUEST_BYTES", "PATH", "InboundForm", "Rejected", "router", "to_email"]

log = logging.getLogger(__name__)

router = APIRouter(prefix="/webhooks", tags=["webhooks"])

PATH = "/sendgrid/inbound"
#: SendGrid posts messages of up to 30 MB; a request larger than this is refused before it is read.
MAX_REQUEST_BYTES = 40 * 1024 * 1024
#: What mail clients label GB2312 or GBK is routinely GB18030 (a superset); decoding with it loses nothing.
_CHARSET_ALIASES = {"gb2312": "gb18030", "gbk": "gb18030", "x-gbk": "gb18030", "gb_2312-80": "gb18030"}
_TAGS = re.compile(r"<(script|style)\b.*?</\1\s*>|<[^>]+>", re.IGNORECASE | re.DOTALL)
#: Fields kept in ``inbound_messages.raw`` besides the header block (the bodies are stored once, as ``body``).
_KEPT = ("envelope", "charsets", "SPF", "dkim", "spam_score", "sender_ip")


# -- the form ---------------------------------------------------------------------------------------------


@dataclass
class InboundForm:
    """The text fields of the post as bytes (first occurrence of each name), and how many files came with it."""

    fields: dict[str, bytes] = field(default_factory=dict)
    files: int = 0


class _FormReader:
    """Feeds the body through a streaming multipart parser: keeps text fields (up to ``field_limit`` bytes in all),
    counts file parts and lets their bytes pass."""

    def __init__(self, boundary: bytes, field_limit: int) -> None:
        self.form = InboundForm()
        self.field_limit = field_limit
        self.field_bytes = 0
        self.ended = False
        self._header_name = bytearray()
        self._header_value = bytearray()
        self._headers: dict[str, bytes] = {}
        self._name: str | None = None
        self._is_file = False
        self._data = bytearray()
        self.parser = MultipartParser(
            boundary,
            {
                "on_part_begin": self._part_begin,
                "on_header_field": self._header_field,
                "on_header_value": self._header_val,
                "on_header_end": self._header_end,
                "on_headers_finished": self._headers_finished,
                "on_part_data": self._part_data,
                "on_part_end": self._part_end,
                "on_end": self._end,
            },
        )

    def feed(self, chunk: bytes) -> None:
        try:
            self.parser.write(chunk)
        except FormParserError:
            raise Rejected(400, "invalid", "the body is not a valid multipart form") from None

    def finish(self) -> InboundForm:
        self.parser.finalize()
        if not self.ended:
            raise Rejected(400, "invalid", "the multipart form is incomplete")
        return self.form

    def _part_begin(self) -> None:
        self._headers = {}
        self._name = None
        self._is_file = False
        self._data = bytearray()

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def _header_val(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _header_end(self) -> None:
        self._headers[self._header_name.decode("latin-1").strip().lower()] = bytes(self._header_value).strip()
        self._header_name = bytearray()
        self._header_value = bytearray()

    def _headers_finished(self) -> None:
        disposition, params = parse_options_header(self._headers.get("content-disposition", b""))
        name = params.get(b"name")
        self._name = name.decode("utf-8", "replace") if disposition == b"form-data" and name else None
        self._is_file = b"filename" in params or b"filename*" in params

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._name is None or self._is_file:
            return
        self.field_bytes += end - start
        if self.field_bytes > self.field_limit:
            raise Rejected(413, "too_large", f"form fields over {self.field_limit} bytes")
        self._data += data[start:end]

    def _part_end(self) -> None:
        if self._is_file:
            self.form.files += 1
        elif self._name is not None:
            self.form.fields.setdefault(self._name, bytes(self._data))

    def _end(self) -> None:
        self.ended = True


def _boundary(content_type: str) -> bytes:
    mime, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if mime != b"multipart/form-data" or not boundary:
        raise Rejected(400, "invalid", "expected multipart/form-data")
    return boundary


async def _read_form(request: Request, field_limit: int) -> InboundForm:
    limit = max(MAX_REQUEST_BYTES, field_limit)
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise Rejected(413, "too_large", f"request body over {limit} bytes")
    reader = _FormReader(_boundary(request.headers.get("content-type", "")), field_limit)
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise Rejected(413, "too_large", f"request body over {limit} bytes")
        reader.feed(chunk)
    return reader.finish()


# -- from the form to an InboundEmail --------------------------------------------------------------------


def _codec(charset: str | None) -> str:
    name = (charset or "utf-8").strip().lower()
    name = _CHARSET_ALIASES.get(name, name)
    try:
        return codecs.lookup(name).name
    except LookupError:
        return "utf-8"


def _json_object(form: InboundForm, name: str) -> dict[str, Any]:
    raw = form.fields.get(name)
    if raw is None or not raw.strip():
        return {}
    try:
        value = json.loads(raw)
    except ValueError:
        raise Rejected(400, "invalid", f"{name} is not JSON") from None
    if not isinstance(value, dict):
        raise Rejected(400, "invalid", f"{name} is not a JSON object")
    return value


def _html_to_text(markup: str) -> str:
    text = html.unescape(_TAGS.sub(" ", markup))
    return "\n".join(" ".join(line.split()) for line in text.splitlines() if line.strip())


def _decoded_header(value: str | None) -> str:
    """A header value with its RFC 2047 encoded words decoded (as far as they can be)."""
    if not value:
        return ""
    try:
        return str(make_header(decode_header(value)))
    except (LookupError, UnicodeError, ValueError):
        return value


def _headers(message: Message) -> dict[str, str]:
    """First occurrence of each header, as the sender wrote it."""
    found: dict[str, str] = {}
    for name, value in message.items():
        found.setdefault(name, str(value))
    return found


def _raw_text(message: EmailMessage) -> str:
    try:
        part = message.get_body(preferencelist=("plain", "html"))
        if part is None:
            return ""
        content = part.get_content()
    except (LookupError, UnicodeError, ValueError, KeyError, AttributeError):
        return ""
    if not isinstance(content, str):
        return ""
    return _html_to_text(content) if part.get_content_subtype() == "html" else content


def _provider_message_id(message_id: str, form: InboundForm) -> str:
    """The Message-ID, or (missing or too long for the column) a hash of it or of the whole form."""
    message_id = " ".join(message_id.split())
    if message_id and len(message_id) <= 200:
        return message_id
    digest = hashlib.sha256()
    if message_id:
        digest.update(message_id.encode())
    else:
        for name in sorted(form.fields):
            digest.update(name.encode() + b"\0" + form.fields[name] + b"\0")
    return f"sha256:{digest.hexdigest()}"


def to_email(form: InboundForm) -> InboundEmail:
    """The :class:`InboundEmail` a form describes; raises :class:`Rejected` (400) when it is not SendGrid's."""
    charsets = _json_object(form, "charsets")
    envelope = _json_object(form, "envelope")

    def text(name: str) -> str:
        raw = form.fields.get(name)
        if raw is None:
            return ""
        charset = charsets.get(name)
        return raw.decode(_codec(charset if isinstance(charset, str) else None), errors="replace")

    raw_mime = form.fields.get("email")
    if raw_mime is not None:
        message: Message = BytesParser(policy=policy.default).parsebytes(raw_mime)
        assert isinstance(message, EmailMessage)
        body = _raw_text(message)
    else:
        message = HeaderParser().parsestr(text("headers").replace("\r\n", "\n"))
        body = text("text") or _html_to_text(text("html"))
    headers = _headers(message)

    sender = text("from") or _decoded_header(message.get("From"))
    if not parseaddr(sender)[1]:
        raise Rejected(400, "invalid", "from is missing")
    envelope_to = envelope.get("to", [])
    if isinstance(envelope_to, str):
        envelope_to = [envelope_to]
    if not isinstance(envelope_to, list) or not all(isinstance(a, str) for a in envelope_to):
        raise Rejected(400, "invalid", "envelope.to is not a list of addresses")
    to = text("to") or _decoded_header(message.get("To"))
    cc = text("cc") or _decoded_header(message.get("Cc"))
    raw: dict[str, Any] = {name.lower(): text(name) for name in _KEPT if name in form.fields}
    raw.update(headers=text("headers") if raw_mime is None else "", attachments=form.files)
    # Relayed mail is kept, not refused: a NUL or a lone surrogate (no database text holds either) becomes U+FFFD.
    return InboundEmail(
        provider_message_id=scrub_text(_provider_message_id(str(message.get("Message-ID") or ""), form)),
        from_=scrub_text(sender),
        to=scrub_text(to),
        subject=scrub_text(text("subject") or _decoded_header(message.get("Subject"))),
        text=scrub_text(body),
        received_at=utcnow(),
        headers=scrub_data(headers),
        raw=scrub_data(raw),
        recipients=tuple(scrub_text(address) for address in (cc, *envelope_to)),
    )


# -- the route --------------------------------------------------------------------------------------------


def _presented_tokens(request: Request) -> list[str]:
    presented = [request.query_params.get("token", "")]
    scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "basic" and credentials:
        try:
            decoded = base64.b64decode(credentials.strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            decoded = ""
        presented.append(decoded.partition(":")[2])
    return [token for token in presented if token]


def authenticate(hooks: WebhookSettings, request: Request) -> None:
    if not hooks.inbound_token:
        log.error("sendgrid inbound parse refused: OUTREACH_INBOUND_TOKEN is not set")
        raise Rejected(503, "not_configured", "the SendGrid inbound parse webhook is not configured")
    # Every presented token is compared, so the time taken does not tell which one was close.
    results = [hooks.inbound_token_matches(token) for token in _presented_tokens(request)]
    if not any(results):
        raise Rejected(403, "forbidden", "missing or invalid token")


def _runtime(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


def _handle(runtime: Runtime, email: InboundEmail) -> EmailResult:
    with Session(runtime.engine, expire_on_commit=False) as session, session.begin():
        return handle_inbound_email(session, runtime, email)


@router.post(PATH)
async def sendgrid_inbound(
    request: Request,
    runtime: Annotated[Runtime, Depends(_runtime)],
    hooks: Annotated[WebhookSettings, Depends(get_webhook_settings)],
) -> JSONResponse:
    """SendGrid Inbound Parse: a candidate's email, stored once; a reply stops campaigns and tells HR."""
    try:
        authenticate(hooks, request)
        form = await _read_form(request, hooks.max_body_bytes)
        email = to_email(form)
    except Rejected as rejected:
        if rejected.status == 403:
            log.warning("sendgrid inbound parse rejected", extra={"reason": rejected.message})
        elif rejected.status != 503:
            log.info("sendgrid inbound parse refused", extra={"status": rejected.status, "reason": rejected.message})
        return rejected.response()
    result = await run_in_threadpool(_handle, runtime, email)
    # After commit: a worker must find the auto-reply's outbox row when it picks the id up.
    if result.queue:
        runtime.enqueue(result.queue)
    log.info(
        "sendgrid inbound email",
        extra={"kind": result.kind, "inbound_id": result.inbound_id, "queued": len(result.queue)},
    )
    return JSONResponse({"kind": result.kind, "queued": len(result.queue)})
