"""Frequency caps: at most N messages per window to one candidate, per channel and category.

Counted from the outbox itself (rows ``sending``, ``sent``, ``delivered`` or ``uncertain``, by ``sent_at``), so
there is no second ledger to drift. At send time the count runs inside the transaction that claims the row,
after the candidate's row is locked (``FOR NO KEY UPDATE`` on PostgreSQL; SQLite has a single writer): two
workers racing on one candidate queue up behind each other and the second sees the first's ``sending`` row.
"""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from outreach.models import MessageStatus, OutboundMessage
from outreach.policy.base import Decision, Subject
from outreach.policy.config import CapSpec

COUNTED = (
    MessageStatus.SENDING.value,
    MessageStatus.SENT.value,
    MessageStatus.DELIVERED.value,
    MessageStatus.UNCERTAIN.value,
)


class FrequencyCapRule:
    def __init__(self, cap: CapSpec) -> None:
        self.cap = cap
        self.name = f"cap:{cap.name}"

    def applies(self, subject: Subject) -> bool:
        return subject.category in self.cap.categories and subject.channel in self.cap.channels

    def check(self, session: Session, subject: Subject) -> Decision:
        if not self.applies(subject):
            return Decision.allow()
        cap = self.cap
        since = subject.now - cap.per
        query = (
            select(OutboundMessage.sent_at)
            .where(
                OutboundMessage.candidate_id == subject.candidate_id,
                OutboundMessage.status.in_(COUNTED),
                OutboundMessage.channel.in_([c.value for c in cap.channels]),
                OutboundMessage.category.in_([c.value for c in cap.categories]),
                OutboundMessage.sent_at.is_not(None),
                # No upper bound: a racing worker's clock may be a hair behind the one that got there first.
                OutboundMessage.sent_at > since,
            )
            .order_by(OutboundMessage.sent_at.desc())
            .limit(cap.max)
        )
        if subject.message_id is not None:
            query = query.where(OutboundMessage.id != subject.message_id)
        recent = [at for at in session.scalars(query) if at is not None]
        if len(recent) < cap.max:
            return Decision.allow()
        # The window frees when the oldest of the last ``max`` messages ages out of it.
        frees_at = recent[-1] + cap.per + timedelta(seconds=1)
        described = f"at most {cap.max} per {_human(cap.per)} ({', '.join(cap.categories)}; {', '.join(cap.channels)})"
        if cap.on_hit == "drop":
            return Decision.suppress(self.name, f"{described}: limit reached, dropped")
        return Decision.defer(self.name, f"{described}: limit reached, deferred", frees_at)


def _human(period: timedelta) -> str:
    seconds = int(period.total_seconds())
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds % size == 0:
            count = seconds // size
            return f"{count} {unit}{'s' if count != 1 else ''}"
    return f"{seconds} seconds"
