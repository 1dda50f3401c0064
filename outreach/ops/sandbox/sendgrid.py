"""The sandbox's SendGrid: what v3 ``mail/send`` accepts or rejects, the records an accepted request becomes, the
signed event batches posted back, and the Email Activity API's ``GET /v3/messages`` over those records.

The payload's shape (its limits, substitution, the outbox id's custom arg) is the one
:mod:`outreach.providers.sendgrid_payload` describes for the code that builds it.
"""

from __future__ import annotations

import base64
import json
import re
import secrets
from collections.abc import Sequence
from email.utils import formataddr, parseaddr
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from outreach.core.clock import utcnow
from outreach.ops.sandbox.messages import SandboxMessage
from outreach.ops.sandbox.webhooks import Dispatcher
from outreach.providers.sendgrid_payload import (
    MAX_PERSONALIZATION_BYTES,
    MAX_PERSONALIZATIONS,
    personalization_bytes,
    substitute,
)

__all__ = ["activity", "activity_query", "authorized", "error", "post_events", "to_records", "validate"]

_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
_HELP = "http://sendgrid.com/docs/API_Reference/Web_API_v3/Mail/errors.html"


def error(message: str, field_name: str | None = None, anchor: str | None = None) -> dict[str, Any]:
    """One error object of SendGrid's ``{"errors": [...]}`` answer."""
    return {
        "message": message,
        "field": field_name,
        "help": f"{_HELP}#{anchor}" if anchor else None,
    }


def authorized(authorization: str) -> bool:
    """Whether an ``Authorization`` header carries an API key (any non-empty bearer token is one here)."""
    scheme, _, token = authorization.partition(" ")
    return scheme == "Bearer" and bool(token.strip())


def validate(payload: Any) -> list[dict[str, Any]]:
    """The checks SendGrid makes before it accepts a send; returns its error objects (empty when valid)."""
    if not isinstance(payload, dict):
        return [error("Bad Request")]
    errors: list[dict[str, Any]] = []
    template_id = payload.get("template_id")

    sender = payload.get("from")
    if not isinstance(sender, dict) or not isinstance(sender.get("email"), str) or not sender["email"]:
        errors.append(
            error(
                "The from object must be provided for every email send. It is an object that requires the "
                "email parameter, but may also contain a name parameter.",
                "from.email",
                "message.from",
            )
        )
    elif not _EMAIL.match(sender["email"]):
        errors.append(error("The from email does not contain a valid address.", "from.email", "message.from"))

    reply_to = payload.get("reply_to")
    if reply_to is not None and (not isinstance(reply_to, dict) or not _EMAIL.match(str(reply_to.get("email", "")))):
        errors.append(
            error("The reply_to email does not contain a valid address.", "reply_to.email", "message.reply_to")
        )

    personalizations = payload.get("personalizations")
    if not isinstance(personalizations, list) or not personalizations:
        errors.append(
            error(
                "The personalizations field is required and must have at least one personalization.",
                "personalizations",
                "-Personalizations-Errors",
            )
        )
        personalizations = []
    elif len(personalizations) > MAX_PERSONALIZATIONS:
        errors.append(
            error(
                "The personalizations field must have at least one personalization, and no more than "
                f"{MAX_PERSONALIZATIONS}.",
                "personalizations",
                "-Personalizations-Errors",
            )
        )
        personalizations = []

    every_subject = bool(personalizations)
    for index, personalization in enumerate(personalizations):
        where = f"personalizations.{index}"
        if not isinstance(personalization, dict):
            errors.append(error("Invalid type. Expected: object.", where, "message.personalizations"))
            every_subject = False
            continue
        recipients = personalization.get("to")
        if not isinstance(recipients, list) or not recipients:
            errors.append(
                error(
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
                        error(
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
        if personalization_bytes(personalization) > MAX_PERSONALIZATION_BYTES:
            errors.append(
                error(
                    "The total size of substitutions, custom_args and headers of a personalization may not exceed "
                    f"{MAX_PERSONALIZATION_BYTES} bytes.",
                    where,
                    "message.personalizations",
                )
            )

    subject = payload.get("subject")
    if not template_id and not every_subject and not (isinstance(subject, str) and subject):
        errors.append(
            error(
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
                error(
                    "Unless a valid template_id is provided, the content parameter is required. There must "
                    "be at least one defined content block. We typically suggest both text/plain and "
                    "text/html "
                    "blocks are included, but only one block is required.",
                    "content",
                    "message.content",
                )
            )
    elif not isinstance(content, list):
        errors.append(error("Invalid type. Expected: array.", "content", "message.content"))
    else:
        types: list[str] = []
        for index, block in enumerate(content):
            if not isinstance(block, dict) or not isinstance(block.get("type"), str) or not block["type"]:
                errors.append(
                    error(
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
                    error(
                        "The content value must be a string at least one character in length.",
                        f"content.{index}.value",
                        "message.content.value",
                    )
                )
        if "text/plain" in types and types[0] != "text/plain":
            errors.append(
                error(
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
            error(
                "The categories parameter must be an array of at most 10 strings, each up to 255 characters.",
                "categories",
                "message.categories",
            )
        )
    errors.extend(_string_map_errors(payload.get("custom_args"), "custom_args"))
    errors.extend(_string_map_errors(payload.get("headers"), "headers"))
    return errors


def _string_map_errors(value: Any, where: str) -> list[dict[str, Any]]:
    if value is None:
        return []
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        return [error("Invalid type. Expected an object of string values.", where, f"message.{where}")]
    return []


def to_records(payload: dict[str, Any], message_id: str, keep_bodies: bool = True) -> list[SandboxMessage]:
    """What a valid ``payload`` sent: one record per personalization, its substitutions filled in as SendGrid does."""
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
                subject=substitute(personalization.get("subject") or payload.get("subject") or "", substitutions)
                if keep_bodies
                else "",
                text=substitute(text, substitutions),
                html=substitute(html_body, substitutions),
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


def post_events(
    dispatcher: Dispatcher,
    signing_key: ec.EllipticCurvePrivateKey,
    url: str | None,
    records: list[SandboxMessage],
    fault: str | None,
) -> None:
    """Post the events of one accepted request's ``records`` to ``url`` (nothing without one), signed with
    ``signing_key`` as SendGrid's Signed Event Webhook is: ``processed``, then ``delivered`` or what ``fault`` makes
    of it (``bounce``, ``dropped``)."""
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
    signature = signing_key.sign((timestamp + payload).encode(), ec.ECDSA(hashes.SHA256()))
    headers = {
        "Content-Type": "application/json",
        "User-Agent": "SendGrid Event API",
        "X-Twilio-Email-Event-Webhook-Signature": base64.b64encode(signature).decode("ascii"),
        "X-Twilio-Email-Event-Webhook-Timestamp": timestamp,
    }
    dispatcher.post(url, payload.encode(), headers)


def _event_id() -> str:
    return base64.b64encode(secrets.token_bytes(16)).decode("ascii")


#: The one Email Activity query the sandbox answers: ``(unique_args['name']="value")`` (the parentheses optional).
_UNIQUE_ARG_QUERY = re.compile(r"""^\(?\s*unique_args\['([^'"]+)'\]\s*=\s*"([^"]*)"\s*\)?$""")
#: Email Activity's largest page.
MAX_ACTIVITY_LIMIT = 1000


def activity_query(query: str, limit: str) -> tuple[str, str, int] | str:
    """The unique arg's name and value and the limit a ``GET /v3/messages`` asks for, or why it is refused."""
    match = _UNIQUE_ARG_QUERY.match(query.strip())
    if match is None:
        return "the sandbox answers only queries of the form (unique_args['name']=\"value\")"
    try:
        count = int(limit or "10")
    except ValueError:
        return "limit must be a number"
    if not 1 <= count <= MAX_ACTIVITY_LIMIT:
        return f"limit must be between 1 and {MAX_ACTIVITY_LIMIT}"
    return match.group(1), match.group(2), count


def activity(records: Sequence[SandboxMessage], name: str, value: str, limit: int) -> bytes:
    """Email Activity's answer: the messages of ``records`` (the ones it lists by now) whose custom arg ``name`` is
    ``value``, newest first, at most ``limit``."""
    found = [
        record
        for record in reversed(records)
        if record.provider == "sendgrid" and record.custom_args.get(name) == value
    ][:limit]
    messages = [
        {
            "from_email": parseaddr(record.from_)[1],
            # SendGrid's message id: the request's X-Message-Id, then the filter and the personalization.
            "msg_id": f"{record.id}.filter0001.{record.personalization_index}",
            "subject": record.subject,
            "to_email": record.to,
            "status": "delivered",
            "opens_count": 0,
            "clicks_count": 0,
            "last_event_time": record.received_at.strftime("%Y-%m-%dT%H:%M:%SZ"),
        }
        for record in found
    ]
    return json.dumps({"messages": messages}, separators=(",", ":")).encode()
