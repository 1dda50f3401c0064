"""Out-of-hours auto-replies: a candidate who writes while the company is closed hears when a person will answer.

A candidate's message that arrives outside the business calendar (evenings, weekends, public holidays, company
closures; see :class:`~outreach.policy.calendar.BusinessCalendar`) is answered once, on the channel it came in on, with
the ``system_out_of_hours`` template in the candidate's language. The template names the next business opening
in the candidate's own timezone (``reply_by``, added to the template context by
:func:`outreach.pipeline.context.build_context` through :func:`outreach.pipeline.context.reply_by`).

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

from outreach.core.clock import utcnow
from outreach.core.models import AUTO_REPLY, Candidate, Channel, InboundMessage, MessageStatus, OutboundMessage, new_id
from outreach.domain.candidates import normalise_phone
from outreach.pipeline.services import Services

__all__ = [
    "AUTO_REPLY",
    "TEMPLATE",
    "WINDOW",
    "our_addresses",
    "plan_auto_reply",
]

log = logging.getLogger(__name__)

#: The outbox ``category`` and ``campaign`` of an auto-reply; metrics count these apart from outreach.
#: ``templates/email/system_out_of_hours.<locale>.*`` and ``templates/sms/system_out_of_hours.<locale>.txt``.
TEMPLATE = "system_out_of_hours"
#: At most one auto-reply per candidate within this long, whatever the channel.
WINDOW = timedelta(hours=12)
#: The only inbound kind that is answered: a candidate's own message (not a keyword, not a machine's).
ANSWERED_KIND = "reply"


def plan_auto_reply(
    session: Session, runtime: Services, candidate: Candidate, channel: str, inbound: InboundMessage
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


def _skip_reason(runtime: Services, candidate: Candidate, channel: str, inbound: InboundMessage) -> str | None:
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


def our_addresses(runtime: Services, channel: str) -> frozenset[str]:
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
