"""Out-of-hours auto-replies: a candidate who writes while the company is closed hears when a person will answer.

A candidate's message that arrives outside the business calendar (evenings, weekends, public holidays, company
closures; see :class:`~outreach.calendar.BusinessCalendar`) is answered once, on the channel it came in on, with
the ``system_out_of_hours`` template in the candidate's language. The template names the next business opening
in the candidate's own timezone (``reply_by``, added to the template context by
:func:`outreach.delivery.build_context` through :func:`reply_by`).

The answer is an ordinary outbox row (no enrollment, campaign and category ``auto_reply``), so the worker sends it
with the usual re-check right before the provider call: suppressions and consent still apply, quiet hours and caps
do not (see :mod:`outreach.policy.engine`). Its category keeps it apart from outreach in every count.

No loops, no noise:

* only a candidate's conversational reply is answered (inbound kind ``reply``): never automatic mail
  (RFC 3834 ``Auto-Submitted``, ``Precedence``, ``X-Autoreply``, list headers; kind ``auto_reply``), never an
  opt-out/opt-in/help keyword, never an unknown sender;
* never a message that comes from one of our own senders (``OUTREACH_EMAIL_FROM``, ``OUTREACH_EMAIL_REPLY_TO``
  and its ``+tag`` variants, ``OUTREACH_SMS_FROM``), nor one whose candidate's address is ours;
* at most one auto-reply per candidate per :data:`WINDOW` (12 hours), on any channel: two auto-responders
  facing each other exchange one message each and stop. On PostgreSQL the candidate's row is locked first, so
  two messages handled at once still plan one answer.

Log lines carry ids and reasons, never addresses or message text.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from email.utils import parseaddr
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from outreach.candidates import candidate_timezone, normalise_phone
from outreach.clock import utcnow
from outreach.models import Candidate, Channel, InboundMessage, MessageStatus, OutboundMessage, new_id
from outreach.runtime import Runtime

__all__ = [
    "AUTO_REPLY",
    "TEMPLATE",
    "WINDOW",
    "format_reply_by",
    "our_addresses",
    "plan_auto_reply",
    "reply_by",
]

log = logging.getLogger(__name__)

#: The outbox ``category`` and ``campaign`` of an auto-reply; metrics count these apart from outreach.
AUTO_REPLY = "auto_reply"
#: ``templates/email/system_out_of_hours.<locale>.*`` and ``templates/sms/system_out_of_hours.<locale>.txt``.
TEMPLATE = "system_out_of_hours"
#: At most one auto-reply per candidate within this long, whatever the channel.
WINDOW = timedelta(hours=12)
#: The only inbound kind that is answered: a candidate's own message (not a keyword, not a machine's).
ANSWERED_KIND = "reply"

_EN_WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
_EN_MONTHS = (
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
)
_ZH_WEEKDAYS = ("星期一", "星期二", "星期三", "星期四", "星期五", "星期六", "星期日")


def plan_auto_reply(
    session: Session, runtime: Runtime, candidate: Candidate, channel: str, inbound: InboundMessage
) -> str | None:
    """Queue the out-of-hours answer to ``inbound`` and return its outbox id, or None when none is due.

    Runs in the caller's transaction and only writes the outbox row; the caller enqueues the id after its commit
    (the row is marked enqueued, so the scheduler's sweeper picks it up should that enqueue be lost).
    """
    if channel not in (Channel.EMAIL.value, Channel.SMS.value):
        raise ValueError(f"unknown channel {channel!r}; use email or sms")
    received_at = inbound.received_at
    if received_at.tzinfo is None:
        raise ValueError("inbound.received_at must be timezone-aware")
    extra: dict[str, Any] = {"candidate_id": candidate.id, "inbound_id": inbound.id, "channel": channel}

    skip = _skip_reason(runtime, candidate, channel, inbound)
    if skip is None:
        _lock_candidate(session, candidate.id)
        if _answered_since(session, candidate.id, received_at - WINDOW):
            skip = "already auto-replied within 12 hours"
    if skip is not None:
        log.info("no auto-reply", extra={**extra, "reason": skip})
        return None

    now = utcnow()
    message = OutboundMessage(
        id=new_id(),
        enrollment_id=None,
        candidate_id=candidate.id,
        campaign=AUTO_REPLY,
        step=0,
        channel=channel,
        template=TEMPLATE,
        category=AUTO_REPLY,
        status=MessageStatus.PENDING.value,
        not_before=now,
        # The caller enqueues after commit; until the lease runs out the sweeper leaves the row to that.
        enqueued_at=now,
        created_at=now,
        updated_at=now,
    )
    session.add(message)
    session.flush()
    log.info("auto-reply planned", extra={**extra, "outbox_id": message.id})
    return message.id


def _skip_reason(runtime: Runtime, candidate: Candidate, channel: str, inbound: InboundMessage) -> str | None:
    """Why ``inbound`` gets no auto-reply (a short phrase without personal data), or None if it should get one."""
    if inbound.kind != ANSWERED_KIND:
        return f"inbound kind {inbound.kind}"
    calendar = runtime.policy.calendar
    if calendar.is_open(inbound.received_at):
        return "business hours"
    ours = our_addresses(runtime, channel)
    region = runtime.settings.default_phone_region
    if _address_key(channel, inbound.from_address, region) in ours:
        return "sent by one of our own senders"
    own = candidate.email if channel == Channel.EMAIL.value else candidate.phone
    if own and _address_key(channel, own, region) in ours:
        return "the candidate's address is one of our own senders"
    try:
        calendar.next_opening(inbound.received_at)
    except ValueError:
        log.error("no auto-reply: the business calendar has no opening ahead; check the policy file")
        return "no business opening ahead"
    return None


def our_addresses(runtime: Runtime, channel: str) -> frozenset[str]:
    """Our own sender addresses on ``channel``, keyed as :func:`_address_key` keys them."""
    settings = runtime.settings
    raw: tuple[str, ...]
    if channel == Channel.EMAIL.value:
        raw = (parseaddr(settings.email_from)[1], parseaddr(settings.email_reply_to)[1])
    else:
        raw = (settings.sms_from,)
    region = settings.default_phone_region
    return frozenset(_address_key(channel, value, region) for value in raw if value and value.strip())


def _address_key(channel: str, address: str, region: str) -> str:
    """Emails lowercased without a ``+tag`` (our reply-to addresses carry one per message); phones in E.164."""
    value = address.strip()
    if channel == Channel.EMAIL.value:
        local, at, domain = parseaddr(value)[1].lower().rpartition("@")
        return f"{local.partition('+')[0]}{at}{domain}" if at else value.lower()
    try:
        return normalise_phone(value, region)
    except ValueError:
        return value


def _lock_candidate(session: Session, candidate_id: int) -> None:
    """Serialise auto-reply planning per candidate (PostgreSQL; SQLite has one writer at a time anyway)."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(select(Candidate.id).where(Candidate.id == candidate_id).with_for_update(key_share=True))


def _answered_since(session: Session, candidate_id: int, since: datetime) -> bool:
    found = session.scalar(
        select(OutboundMessage.id)
        .where(
            OutboundMessage.candidate_id == candidate_id,
            OutboundMessage.category == AUTO_REPLY,
            OutboundMessage.created_at > since,
        )
        .limit(1)
    )
    return found is not None


# --- the template's reply_by -------------------------------------------------------------------------------


def format_reply_by(opening: datetime, zone_name: str, language: str) -> str:
    """``opening`` (already in the candidate's timezone) as the template says it, in ``en`` or ``zh``.

    en: ``Monday 1 December, 09:00 (your time, Europe/Berlin)``; zh: ``12月1日（星期一）09:00（您当地时间）``.
    Written out by hand so the result never depends on the server's C locale.
    """
    clock = f"{opening.hour:02d}:{opening.minute:02d}"
    if language == "zh":
        return f"{opening.month}月{opening.day}日（{_ZH_WEEKDAYS[opening.weekday()]}）{clock}（您当地时间）"
    weekday, month = _EN_WEEKDAYS[opening.weekday()], _EN_MONTHS[opening.month - 1]
    return f"{weekday} {opening.day} {month}, {clock} (your time, {zone_name})"


def reply_by(runtime: Runtime, created_at: datetime, candidate: Candidate) -> dict[str, str] | None:
    """When a person will answer an auto-reply created at ``created_at``: the next business opening after it.

    ``{"iso", "timezone", "en", "zh", "text"}``, all in the candidate's timezone; ``en`` and ``zh`` are the
    two written forms (each template uses its own language's), ``text`` the one in the candidate's language.
    None when the calendar has no opening ahead (templates then say "as soon as we are back").
    """
    try:
        opening = runtime.policy.calendar.next_opening(created_at)
    except ValueError:
        return None
    zone = candidate_timezone(candidate, runtime.settings)
    local = opening.astimezone(zone)
    english = format_reply_by(local, zone.key, "en")
    chinese = format_reply_by(local, zone.key, "zh")
    language = (candidate.locale or "").split("-")[0].lower()
    return {
        "iso": local.isoformat(),
        "timezone": zone.key,
        "en": english,
        "zh": chinese,
        "text": chinese if language == "zh" else english,
    }
