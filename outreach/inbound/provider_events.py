"""Provider events in one vocabulary: SendGrid's and Twilio's payloads turned into :class:`NormalizedEvent`.

SendGrid's Event Webhook and Twilio's status callbacks say the same things in different words. The parsers
here turn both into :class:`NormalizedEvent`, the contract between the webhooks and
:mod:`outreach.inbound.events`, which stores the events and moves the outbox rows they belong to. Nothing here
touches the database.

Mapping decisions
-----------------

SendGrid ``event`` → :class:`EventType`:

- ``processed`` → ``sent`` (SendGrid has the message and will attempt it; our ``sent`` means "the provider
  accepted it"), ``deferred`` → ``deferred``, ``delivered`` → ``delivered``.
- ``bounce`` with ``type: "bounce"`` → ``bounced``: a hard bounce, the address does not exist; it suppresses
  the address. ``bounce`` with ``type: "blocked"`` → ``failed``: the receiving server refused this message
  (reputation, content, a temporary block); the message did not arrive but the address is not to blame, so
  nothing is suppressed.
- ``dropped`` → ``dropped`` (SendGrid never attempted it). A drop because the address is on one of SendGrid's
  suppression lists ("Bounced Address", "Unsubscribed Address", "Spam Reporting Address") suppresses it here
  as well, with the underlying cause as the reason (``bounced``, ``unsubscribed``, ``complained``).
- ``open`` → ``opened``, ``click`` → ``clicked``, ``unsubscribe`` and ``group_unsubscribe`` → ``unsubscribed``,
  ``spamreport`` → ``complained``. Unsubscribes and spam reports suppress the address.
- Anything else (``group_resubscribe``, event types SendGrid adds later) is ignored, not an error: answering
  an error would only make SendGrid send the batch again.

Twilio ``MessageStatus`` → :class:`EventType`: ``accepted``, ``scheduled`` and ``queued`` → ``queued``;
``sending`` and ``sent`` → ``sent``; ``delivered`` and ``read`` → ``delivered`` (read implies delivered, and we
track no reads); ``undelivered``; ``failed`` and ``canceled`` → ``failed``. ``ErrorCode`` 21610 (the recipient
replied STOP) suppresses the number. Inbound statuses (``receiving``, ``received``) are not outbound events.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from outreach.core.clock import utcnow
from outreach.core.models import Channel
from outreach.providers.base import redact

__all__ = [
    "FAILURE_TYPES",
    "PROVIDER_CHANNEL",
    "SENDGRID_EVENTS",
    "TWILIO_STATUSES",
    "EventType",
    "NormalizedEvent",
    "UnsupportedEventError",
    "parse_sendgrid_batch",
    "parse_twilio_status",
]

SENDGRID = "sendgrid"
TWILIO = "twilio"


class EventType(StrEnum):
    QUEUED = "queued"
    SENT = "sent"
    DELIVERED = "delivered"
    DEFERRED = "deferred"
    BOUNCED = "bounced"
    DROPPED = "dropped"
    FAILED = "failed"
    UNDELIVERED = "undelivered"
    OPENED = "opened"
    CLICKED = "clicked"
    UNSUBSCRIBED = "unsubscribed"
    COMPLAINED = "complained"
    REPLIED = "replied"


#: SendGrid's ``event`` field. ``bounce`` with ``type: "blocked"`` becomes ``failed`` (see the module notes).
SENDGRID_EVENTS: Mapping[str, EventType] = {
    "processed": EventType.SENT,
    "deferred": EventType.DEFERRED,
    "delivered": EventType.DELIVERED,
    "bounce": EventType.BOUNCED,
    "dropped": EventType.DROPPED,
    "open": EventType.OPENED,
    "click": EventType.CLICKED,
    "unsubscribe": EventType.UNSUBSCRIBED,
    "group_unsubscribe": EventType.UNSUBSCRIBED,
    "spamreport": EventType.COMPLAINED,
}

#: Twilio's ``MessageStatus`` for outbound messages.
TWILIO_STATUSES: Mapping[str, EventType] = {
    "accepted": EventType.QUEUED,
    "scheduled": EventType.QUEUED,
    "queued": EventType.QUEUED,
    "sending": EventType.SENT,
    "sent": EventType.SENT,
    "delivered": EventType.DELIVERED,
    "read": EventType.DELIVERED,
    "undelivered": EventType.UNDELIVERED,
    "failed": EventType.FAILED,
    "canceled": EventType.FAILED,
}

#: SendGrid drop reasons that mean "this address is on a suppression list", and our reason for it.
_SENDGRID_DROP_SUPPRESSIONS: Mapping[str, str] = {
    "bounced address": "bounced",
    "unsubscribed address": "unsubscribed",
    "spam reporting address": "complained",
}

#: Twilio error codes in a status callback that suppress the number.
_TWILIO_SUPPRESSING_ERRORS: Mapping[str, str] = {"21610": "unsubscribed"}

#: Each provider's channel.
PROVIDER_CHANNEL: Mapping[str, str] = {SENDGRID: Channel.EMAIL.value, TWILIO: Channel.SMS.value}
_EMAIL = Channel.EMAIL.value

_MAX_EVENT_ID = 200
_MAX_CODE = 32
_MAX_DETAIL = 500


class UnsupportedEventError(ValueError):
    """A well-formed notification that is not an outbound delivery event (acknowledge it, store nothing)."""


@dataclass(slots=True)
class NormalizedEvent:
    """One provider event in our vocabulary. ``raw`` is the provider's payload, kept as received."""

    provider: str
    provider_event_id: str
    type: EventType
    occurred_at: datetime
    outbox_id: str | None
    provider_message_id: str | None
    recipient: str | None
    error_code: str | None
    raw: dict[str, Any]
    #: The provider's own explanation of a failure (bounce or drop reason), with addresses taken out.
    detail: str | None = None
    #: Set when the event means the recipient's address must not be written to again: the reason to record.
    suppress_reason: str | None = None
    categories: tuple[str, ...] = ()

    @property
    def channel(self) -> str:
        return PROVIDER_CHANNEL.get(self.provider, _EMAIL)


_BOUNCED, _FAILED, _DROPPED = EventType.BOUNCED, EventType.FAILED, EventType.DROPPED
#: Events that report a failed message (their outbox status is ``failed``, ``bounced`` or ``undelivered``): they
#: carry an error code and the provider's reason.
FAILURE_TYPES = frozenset({EventType.BOUNCED, EventType.DROPPED, EventType.FAILED, EventType.UNDELIVERED})
#: Events that suppress the address by themselves (a drop does only for some reasons, see the parser).
_SUPPRESSING_TYPES: Mapping[EventType, str] = {
    EventType.BOUNCED: "bounced",
    EventType.UNSUBSCRIBED: EventType.UNSUBSCRIBED.value,
    EventType.COMPLAINED: EventType.COMPLAINED.value,
}

# -- parsing --------------------------------------------------------------------------------------------


def _text(value: Any) -> str | None:
    if isinstance(value, str):
        value = value.strip()
        return value or None
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    return None


def _synthetic_id(event: Mapping[str, Any]) -> str:
    canonical = json.dumps(event, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return "sha256:" + hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _event_id(value: str | None, event: Mapping[str, Any]) -> str:
    if value is None:
        return _synthetic_id(event)
    if len(value) > _MAX_EVENT_ID:
        return "sha256:" + hashlib.sha256(value.encode("utf-8")).hexdigest()
    return value


def _timestamp(value: Any, index: int) -> datetime:
    if isinstance(value, bool):
        raise ValueError(f"event {index}: timestamp must be unix seconds")
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"event {index}: timestamp must be unix seconds") from None
    try:
        return datetime.fromtimestamp(seconds, UTC)
    except (OverflowError, OSError, ValueError):
        raise ValueError(f"event {index}: timestamp out of range") from None


def _categories(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list):
        return tuple([item for item in value if isinstance(item, str)])
    return ()


def parse_sendgrid_batch(payload: list[dict[str, Any]]) -> list[NormalizedEvent]:
    """SendGrid Event Webhook batch → events. Unknown event types are left out; malformed entries raise.

    Raises :class:`ValueError` (naming the entry's position, never its content) when an entry is not an object
    or lacks ``event`` or a unix ``timestamp``.
    """
    if not isinstance(payload, list):
        raise ValueError("expected a JSON array of events")
    events: list[NormalizedEvent] = []
    for index, item in enumerate(payload):
        if not isinstance(item, dict):
            raise ValueError(f"event {index}: expected an object")
        get = item.get
        name = get("event")
        if not isinstance(name, str) or not name:
            raise ValueError(f"event {index}: missing 'event'")
        occurred_at = _timestamp(get("timestamp"), index)
        event_type = SENDGRID_EVENTS.get(name)
        if event_type is None:
            continue
        # Enum members are looked up once, at import (_BOUNCED, …): this loop runs for every event of a batch.
        if event_type is _BOUNCED:
            bounce_type = _text(get("type"))
            if bounce_type is not None and bounce_type.lower() == "blocked":
                event_type = _FAILED
        failure = event_type in FAILURE_TYPES
        reason = _text(get("reason")) if failure or event_type is _DROPPED else None
        suppress = _SUPPRESSING_TYPES.get(event_type)
        if event_type is _DROPPED and reason is not None:
            lowered = reason.lower()
            suppress = next((why for key, why in _SENDGRID_DROP_SUPPRESSIONS.items() if key in lowered), None)
        sg_message_id = _text(get("sg_message_id"))
        error_code = _text(get("status")) if failure else None
        events.append(
            NormalizedEvent(
                provider=SENDGRID,
                provider_event_id=_event_id(_text(get("sg_event_id")), item),
                type=event_type,
                occurred_at=occurred_at,
                outbox_id=_text(get("outreach_id")),
                provider_message_id=sg_message_id.split(".", 1)[0] if sg_message_id else None,
                recipient=_text(get("email")),
                error_code=error_code[:_MAX_CODE] if error_code else None,
                raw=item,  # the parsed payload's own object: a batch is thousands of them
                detail=redact(reason, _MAX_DETAIL) if failure and reason else None,
                suppress_reason=suppress,
                categories=_categories(get("category")),
            )
        )
    return events


def parse_twilio_status(
    form: Mapping[str, str], outbox_id: str | None, *, received_at: datetime | None = None
) -> NormalizedEvent:
    """A Twilio status callback → one event. Identity: ``"{MessageSid}:{MessageStatus}"``.

    Twilio's callbacks carry no event time, so ``occurred_at`` is when we received it. Raises
    :class:`ValueError` when the sid or status is missing and :class:`UnsupportedEventError` for statuses of
    inbound messages or ones this mapping does not know.
    """
    sid = (form.get("MessageSid") or form.get("SmsSid") or "").strip()
    status = (form.get("MessageStatus") or form.get("SmsStatus") or "").strip()
    if not sid or not status:
        raise ValueError("MessageSid and MessageStatus are required")
    event_type = TWILIO_STATUSES.get(status.lower())
    if event_type is None:
        raise UnsupportedEventError(f"MessageStatus {status[:32]!r} is not an outbound delivery status")
    error_code = (form.get("ErrorCode") or "").strip() or None
    failure = event_type in FAILURE_TYPES
    return NormalizedEvent(
        provider=TWILIO,
        provider_event_id=_event_id(f"{sid}:{status}", form),
        type=event_type,
        occurred_at=received_at or utcnow(),
        outbox_id=(outbox_id or "").strip() or None,
        provider_message_id=sid,
        recipient=(form.get("To") or "").strip() or None,
        error_code=error_code[:_MAX_CODE] if error_code else None,
        raw=dict(form),
        detail=None,
        suppress_reason=_TWILIO_SUPPRESSING_ERRORS.get(error_code or "") if failure else None,
    )
