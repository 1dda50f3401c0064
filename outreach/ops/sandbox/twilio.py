"""The sandbox's Twilio: what the Messages API accepts or rejects, the Message resource it answers with, the signed
status callbacks posted back, and the Messages list over what it accepted.
"""

from __future__ import annotations

import base64
import binascii
import re
import secrets
from collections.abc import Mapping, Sequence
from datetime import datetime
from email.utils import format_datetime
from typing import Any
from urllib.parse import urlencode, urlsplit

from twilio.request_validator import RequestValidator

from outreach.core.clock import utcnow
from outreach.domain.render import sms_segments as count_segments
from outreach.ops.sandbox.messages import SandboxMessage, to_json
from outreach.ops.sandbox.webhooks import Dispatcher

__all__ = [
    "authenticated",
    "error",
    "message_list",
    "message_resource",
    "post_status_callbacks",
    "problem",
    "sms_segments",
]

_E164 = re.compile(r"^\+[1-9]\d{6,14}$")
_ALPHANUMERIC_SENDER = re.compile(r"^(?=.*[A-Za-z])[A-Za-z0-9 ]{1,11}$")
_SHORT_CODE = re.compile(r"^\d{5,6}$")
_DOCS = "https://www.twilio.com/docs/errors/"
API_VERSION = "2010-04-01"
# Twilio documents 1600 characters as the most one message may carry.
MAX_BODY = 1600


def sms_segments(body: str) -> int:
    """How many SMS segments ``body`` needs, counted the way the service counts them (Twilio's ``num_segments``):
    :func:`outreach.domain.render.sms_segments`, at least one."""
    return max(1, count_segments(body)[1])


def error(code: int, message: str, status: int) -> bytes:
    """Twilio's error answer: its code, message, documentation link and HTTP status."""
    return to_json({"code": code, "message": message, "more_info": f"{_DOCS}{code}", "status": status})


def authenticated(authorization: str, account_sid: str) -> bool:
    """Whether an ``Authorization`` header is HTTP Basic with ``account_sid`` as the user and any password."""
    scheme, _, encoded = authorization.partition(" ")
    if scheme != "Basic":
        return False
    try:
        user, _, password = base64.b64decode(encoded, validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return False
    return user == account_sid and bool(password)


def problem(form: Mapping[str, str]) -> tuple[int, str] | None:
    """Why Twilio would refuse to create this message (its error code and message); ``None`` when it would not."""
    to = form.get("To", "")
    from_ = form.get("From", "")
    service_sid = form.get("MessagingServiceSid", "")
    text = form.get("Body", "")
    callback = form.get("StatusCallback", "")
    refusal: tuple[int, str] | None = None
    if not to:
        refusal = (21604, "A 'To' phone number is required.")
    elif not from_ and not service_sid:
        refusal = (21603, "A 'From' phone number is required.")
    elif not _E164.match(to):
        refusal = (21211, f"The 'To' number {to} is not a valid phone number.")
    elif from_ and not (_E164.match(from_) or _SHORT_CODE.match(from_) or _ALPHANUMERIC_SENDER.match(from_)):
        refusal = (
            21212,
            f"The 'From' number {from_} is not a valid phone number, shortcode, or alphanumeric sender ID.",
        )
    elif not text:
        refusal = (21602, "Message body is required.")
    elif len(text) > MAX_BODY:
        refusal = (21617, "The concatenated message body exceeds the 1600 character limit.")
    elif callback and urlsplit(callback).scheme not in {"http", "https"}:
        refusal = (21609, "Invalid StatusCallback url")
    return refusal


def message_resource(
    sid: str, account_sid: str, to: str, from_: str, service_sid: str, body: str, segments: int, now: datetime
) -> dict[str, Any]:
    """The Message resource Twilio answers a created message with."""
    uri = f"/{API_VERSION}/Accounts/{account_sid}/Messages/{sid}"
    stamp = format_datetime(now)
    return {
        "account_sid": account_sid,
        "api_version": API_VERSION,
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


def message_list(
    records: Sequence[SandboxMessage], account_sid: str, query: Mapping[str, str]
) -> bytes | tuple[int, str]:
    """The Messages list's page for ``query`` (``To``, ``From``, ``PageSize``, ``Page``) over ``records`` (the ones it
    lists by now), newest first, as Twilio pages them; or the error code and message of a query it refuses.
    ``DateSent`` filters are not applied: the service does not send them."""
    try:
        size = int(query.get("PageSize") or "50")
        page = int(query.get("Page") or "0")
    except ValueError:
        return 20001, "PageSize and Page must be numbers"
    if not 1 <= size <= 1000 or page < 0:
        return 20001, "PageSize must be between 1 and 1000"
    to, from_ = query.get("To"), query.get("From")
    found = [
        record
        for record in reversed(records)
        if record.provider == "twilio" and (not to or record.to == to) and (not from_ or record.from_ == from_)
    ]
    chosen = found[page * size : (page + 1) * size]
    messages = []
    for record in chosen:
        service = record.from_ if record.from_.startswith("MG") else ""
        resource = message_resource(
            record.id,
            account_sid,
            record.to,
            "" if service else record.from_,
            service,
            record.body,
            record.segments,
            record.received_at,
        )
        resource.update(status="delivered", date_sent=format_datetime(record.received_at))
        messages.append(resource)
    uri = f"/{API_VERSION}/Accounts/{account_sid}/Messages.json"
    kept = {key: value for key, value in (("To", to), ("From", from_)) if value}
    filters = f"&{urlencode(kept)}" if kept else ""
    more = len(found) > (page + 1) * size
    return to_json(
        {
            "messages": messages,
            "end": page * size + max(len(chosen) - 1, 0),
            "first_page_uri": f"{uri}?PageSize={size}&Page=0{filters}",
            "next_page_uri": f"{uri}?PageSize={size}&Page={page + 1}{filters}" if more else None,
            "page": page,
            "page_size": size,
            "previous_page_uri": f"{uri}?PageSize={size}&Page={page - 1}{filters}" if page else None,
            "start": page * size,
            "uri": f"{uri}?PageSize={size}&Page={page}{filters}",
        }
    )


def post_status_callbacks(
    dispatcher: Dispatcher,
    validator: RequestValidator,
    url: str,
    sid: str,
    account_sid: str,
    to: str,
    from_: str,
    service_sid: str,
    fault: str | None,
) -> None:
    """Post the status callbacks of message ``sid`` to ``url``, signed with ``validator``'s auth token as Twilio signs
    them: ``sent`` → ``delivered``, or what ``fault`` makes of it (``undelivered``, ``failed``)."""
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
            "ApiVersion": API_VERSION,
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
            "X-Twilio-Signature": str(validator.compute_signature(url, params)),
            "I-Twilio-Idempotency-Token": secrets.token_hex(16),
        }
        dispatcher.post(url, urlencode(params).encode(), headers)
