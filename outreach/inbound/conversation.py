"""The conversation with a candidate as HR sees it: what we sent, what came back, and what still waits for a person.

* :func:`thread` merges the messages that went out (or were tried) with the candidate's inbound messages, in time
  order.
* :func:`notify_reply` raises the HR notification for a real reply on any channel (``candidate_replied``).
* :func:`mark_answered` is HR saying "done": the candidate's waiting replies get ``answered_at`` and the open
  reply alerts for them are resolved.
* :func:`raise_unanswered_alerts` runs on every scheduler tick: a reply that came in during business hours and
  has waited longer than :data:`RESPONSE_TIME` gets one ``reply_unanswered`` alert. Replies out of hours are left
  to the out-of-hours auto-reply. Candidates further along (an offer out, a final round) come first.

Alert texts carry external ids and row ids only, never names, addresses or message text.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine, String, cast, exists, func, literal, select, update
from sqlalchemy.orm import Session

from outreach.core.clock import utcnow
from outreach.core.config import Settings
from outreach.core.db import transaction
from outreach.core.models import AUTO_REPLY, Alert, Candidate, InboundMessage, MessageStatus, OutboundMessage, Stage
from outreach.policy.config import RepliesSpec

if TYPE_CHECKING:
    from outreach.policy.engine import PolicyEngine

__all__ = [
    "ALERT_REPLIED",
    "ALERT_UNANSWERED",
    "RESPONSE_TIME",
    "ConversationItem",
    "alert_unanswered_replies",
    "mark_answered",
    "notify_reply",
    "raise_unanswered_alerts",
    "stored_inbound_id",
    "thread",
]

log = logging.getLogger(__name__)

ALERT_REPLIED = "candidate_replied"
ALERT_UNANSWERED = "reply_unanswered"
#: How long a reply received in business hours may wait for a person before HR is alerted.
RESPONSE_TIME = RepliesSpec().response_time  # the default; policies.yaml `replies.response_time` decides
#: Replies older than this are no longer looked at (they were alerted long ago or predate the feature); it keeps
#: the per-tick scan bounded.
LOOKBACK = RepliesSpec().lookback
#: The outbox category of our own answers to a candidate (as opposed to campaign steps).

#: Outgoing messages that belong in the conversation: sent (or possibly sent), or tried and failed. Rows that never
#: left the outbox (pending, held, sending, skipped, suppressed, cancelled) are not part of what the candidate saw.
SHOWN_STATUSES = (
    MessageStatus.SENT.value,
    MessageStatus.DELIVERED.value,
    MessageStatus.FAILED.value,
    MessageStatus.BOUNCED.value,
    MessageStatus.UNDELIVERED.value,
    MessageStatus.UNCERTAIN.value,
)

#: Unanswered replies are alerted in this stage order: urgent, high-intent candidates first. Other stages follow.
STAGE_PRIORITY = (
    Stage.OFFER,
    Stage.ACCEPTED,
    Stage.FINAL,
    Stage.INTERVIEWING,
    Stage.CONTACTED,
    Stage.APPLIED,
)
_STAGE_RANK = {stage.value: rank for rank, stage in enumerate(STAGE_PRIORITY)}


@dataclass(frozen=True)
class ConversationItem:
    """One message in a conversation. ``direction`` is ``out`` (ours) or ``in`` (the candidate's)."""

    direction: str
    id: str
    at: datetime
    channel: str
    subject: str | None
    body: str | None
    # outgoing
    campaign: str | None = None
    status: str | None = None
    auto_reply: bool = False
    # incoming
    kind: str | None = None
    answered_at: datetime | None = None

    def as_dict(self) -> dict[str, Any]:
        item: dict[str, Any] = {
            "direction": self.direction,
            "id": self.id,
            "at": self.at.isoformat(),
            "channel": self.channel,
            "subject": self.subject,
            "body": self.body,
        }
        if self.direction == "out":
            item.update(campaign=self.campaign, status=self.status, auto_reply=self.auto_reply)
        else:
            item.update(kind=self.kind, answered_at=self.answered_at.isoformat() if self.answered_at else None)
        return item


def thread(session: Session, candidate_id: int, limit: int = 100) -> list[ConversationItem]:
    """The latest ``limit`` messages between us and the candidate, oldest first."""
    if limit < 1:
        return []
    sent_time = func.coalesce(OutboundMessage.sent_at, OutboundMessage.updated_at)
    outgoing = session.scalars(
        select(OutboundMessage)
        .where(OutboundMessage.candidate_id == candidate_id, OutboundMessage.status.in_(SHOWN_STATUSES))
        .order_by(sent_time.desc(), OutboundMessage.id.desc())
        .limit(limit)
    ).all()
    incoming = session.scalars(
        select(InboundMessage)
        .where(InboundMessage.candidate_id == candidate_id)
        .order_by(InboundMessage.received_at.desc(), InboundMessage.id.desc())
        .limit(limit)
    ).all()
    items: list[ConversationItem] = []
    for message in outgoing:
        items.append(
            ConversationItem(
                direction="out",
                id=message.id,
                at=message.sent_at or message.updated_at,
                channel=message.channel,
                subject=message.subject,
                body=message.body,
                campaign=message.campaign,
                status=message.status,
                auto_reply=message.category == AUTO_REPLY,
            )
        )
    for inbound in incoming:
        items.append(
            ConversationItem(
                direction="in",
                id=str(inbound.id),
                at=inbound.received_at,
                channel=inbound.channel,
                subject=inbound.subject,
                body=inbound.body,
                kind=inbound.kind,
                answered_at=inbound.answered_at,
            )
        )
    # Our message and the answer to it can share a second: ours first.
    items.sort(key=lambda item: (item.at, item.direction == "in"))
    return items[-limit:]


def stored_inbound_id(session: Session, provider: str, provider_message_id: str) -> int | None:
    """The id of the inbound message stored for this provider message (for callers that inserted it by value)."""
    return session.scalar(
        select(InboundMessage.id).where(
            InboundMessage.provider == provider, InboundMessage.provider_message_id == provider_message_id
        )
    )


def _replied_campaign(session: Session, outbox_id: str | None) -> str | None:
    if outbox_id is None:
        return None
    return session.scalar(select(OutboundMessage.campaign).where(OutboundMessage.id == outbox_id))


def notify_reply(session: Session, candidate: Candidate, channel: str, inbound_id: int | None) -> Alert:
    """Tell HR the candidate replied: a ``candidate_replied`` alert naming the campaign of the message answered.

    Call it once per real reply (never for keywords or automatic mail), in the transaction that stored the reply.
    """
    in_reply_to = None
    if inbound_id is not None:
        in_reply_to = session.scalar(select(InboundMessage.in_reply_to).where(InboundMessage.id == inbound_id))
    alert = Alert(
        kind=ALERT_REPLIED,
        candidate_id=candidate.id,
        campaign=_replied_campaign(session, in_reply_to),
        message=f"{candidate.external_id} replied by {channel}",
        created_at=utcnow(),
    )
    session.add(alert)
    session.flush()
    log.info("reply notified", extra={"candidate_id": candidate.id, "inbound_id": inbound_id, "channel": channel})
    return alert


def mark_answered(session: Session, candidate_id: int, at: datetime) -> int:
    """HR answered the candidate at ``at``: their replies received until then are answered, and the open
    ``candidate_replied`` / ``reply_unanswered`` alerts about them resolved. Returns how many replies it marked."""
    marked = session.execute(
        update(InboundMessage)
        .where(
            InboundMessage.candidate_id == candidate_id,
            InboundMessage.kind == "reply",
            InboundMessage.answered_at.is_(None),
            InboundMessage.received_at <= at,
        )
        .values(answered_at=at)
        .returning(InboundMessage.id)
        .execution_options(synchronize_session=False)
    ).all()
    session.execute(
        update(Alert)
        .where(
            Alert.candidate_id == candidate_id,
            Alert.kind.in_([ALERT_REPLIED, ALERT_UNANSWERED]),
            Alert.resolved_at.is_(None),
            Alert.created_at <= at,
        )
        .values(resolved_at=at)
        .execution_options(synchronize_session=False)
    )
    return len(marked)


def _inbound_tag(inbound_id: int) -> str:
    return f"(inbound #{inbound_id})"


def raise_unanswered_alerts(session: Session, now: datetime, settings: Settings, policy: PolicyEngine) -> int:
    """One ``reply_unanswered`` alert per reply that came in during business hours and has waited more than
    :data:`RESPONSE_TIME` without ``answered_at``; returns how many were raised. Safe to run on every tick: a reply
    that has its alert never gets another (the alert text carries ``inbound #<id>``).
    """
    calendar = policy.calendar
    # Replies are matched to their alert by the tag at the end of its text: "… (inbound #12)".
    tag = literal("%(inbound #") + cast(InboundMessage.id, String) + literal(")")
    alerted = exists().where(
        Alert.kind == ALERT_UNANSWERED,
        Alert.candidate_id == InboundMessage.candidate_id,
        Alert.message.like(tag),
    )
    query = (
        select(InboundMessage, Candidate.external_id, Candidate.stage, OutboundMessage.campaign)
        .join(Candidate, Candidate.id == InboundMessage.candidate_id)
        .outerjoin(OutboundMessage, OutboundMessage.id == InboundMessage.in_reply_to)
        .where(
            InboundMessage.kind == "reply",
            InboundMessage.answered_at.is_(None),
            InboundMessage.received_at <= now - policy.spec.replies.response_time,
            InboundMessage.received_at > now - policy.spec.replies.lookback,
            ~alerted,
        )
    )
    if session.get_bind().dialect.name == "postgresql":
        # Two schedulers ticking at once: the second skips the replies the first is alerting.
        query = query.with_for_update(of=InboundMessage, skip_locked=True)
    due = [row for row in session.execute(query).all() if calendar.is_open(row[0].received_at)]
    due.sort(key=lambda row: (_STAGE_RANK.get(row[2], len(_STAGE_RANK)), row[0].received_at, row[0].id))
    for inbound, external_id, _stage, campaign in due:
        waited = int((now - inbound.received_at).total_seconds() // 3600)
        session.add(
            Alert(
                kind=ALERT_UNANSWERED,
                candidate_id=inbound.candidate_id,
                campaign=campaign,
                message=f"{external_id}: {inbound.channel} reply unanswered for {waited}h {_inbound_tag(inbound.id)}",
                created_at=now,
            )
        )
        # Flushed one by one so the ids follow the priority order.
        session.flush()
    if due:
        log.info("unanswered replies alerted", extra={"count": len(due)})
    return len(due)


def alert_unanswered_replies(engine: Engine, now: datetime, settings: Settings, policy: PolicyEngine) -> int:
    """:func:`raise_unanswered_alerts` in a transaction of its own (the scheduler tick's entry point)."""
    with transaction(engine) as session:
        return raise_unanswered_alerts(session, now, settings, policy)


def last_sent_to(session: Session, candidate_id: int, channel: str, before: datetime) -> str | None:
    """The message an inbound one most likely answers: the last we sent the candidate on that channel before it."""
    return session.scalar(
        select(OutboundMessage.id)
        .where(
            OutboundMessage.candidate_id == candidate_id,
            OutboundMessage.channel == channel,
            OutboundMessage.sent_at.is_not(None),
            OutboundMessage.sent_at <= before,
        )
        .order_by(OutboundMessage.sent_at.desc())
        .limit(1)
    )
