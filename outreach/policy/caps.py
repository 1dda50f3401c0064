"""Frequency caps: at most N messages per window to one candidate, per channel and category.

Counted from the outbox itself (rows ``sending``, ``sent``, ``delivered`` or ``uncertain``, by ``sent_at``), so
there is no second ledger to drift. At send time the count runs inside the transaction that claims the row,
after the candidate's row is locked (``FOR NO KEY UPDATE`` on PostgreSQL; SQLite has a single writer): two
workers racing on one candidate queue up behind each other and the second sees the first's ``sending`` row.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from outreach.core.models import MessageStatus, OutboundMessage
from outreach.policy.base import Decision, Subject
from outreach.policy.config import CapSpec

COUNTED = (
    MessageStatus.SENDING.value,
    MessageStatus.SENT.value,
    MessageStatus.DELIVERED.value,
    MessageStatus.UNCERTAIN.value,
)


@dataclass(frozen=True)
class RecentSend:
    sent_at: datetime
    channel: str
    category: str


class FrequencyCapRule:
    """One cap. ``check`` reads what it needs itself; :class:`FrequencyCaps` shares one read among all caps."""

    def __init__(self, cap: CapSpec) -> None:
        self.cap = cap
        self.name = f"cap:{cap.name}"

    def applies(self, subject: Subject) -> bool:
        return subject.category in self.cap.categories and subject.channel in self.cap.channels

    def check(self, session: Session, subject: Subject) -> Decision:
        return self.decide(recent_sends(session, subject, self.cap.per), subject)

    def decide(self, sends: Sequence[RecentSend], subject: Subject) -> Decision:
        if not self.applies(subject):
            return Decision.allow()
        cap = self.cap
        since = subject.now - cap.per
        # No upper bound on sent_at: a racing worker's clock may be a hair behind the one that got there first.
        recent = sorted(
            (
                s.sent_at
                for s in sends
                if s.sent_at > since and s.channel in cap.channels and s.category in cap.categories
            ),
            reverse=True,
        )[: cap.max]
        if len(recent) < cap.max:
            return Decision.allow()
        # The window frees when the oldest of the last ``max`` messages ages out of it.
        frees_at = recent[-1] + cap.per + timedelta(seconds=1)
        described = f"at most {cap.max} per {_human(cap.per)} ({', '.join(cap.categories)}; {', '.join(cap.channels)})"
        if cap.on_hit == "drop":
            return Decision.suppress(self.name, f"{described}: limit reached, dropped")
        return Decision.defer(self.name, f"{described}: limit reached, deferred", frees_at)


class FrequencyCaps:
    """Every cap from one read of the candidate's recent sends (one query instead of one per cap)."""

    name = "cap:*"

    def __init__(self, caps: Sequence[CapSpec]) -> None:
        self.rules = [FrequencyCapRule(cap) for cap in caps]
        self.longest = max((cap.per for cap in caps), default=timedelta(0))
        self._none_zero = all(cap.max > 0 for cap in caps)

    def check(self, session: Session, subject: Subject) -> Decision:
        if not any(rule.applies(subject) for rule in self.rules):
            return Decision.allow()
        return self.decide(recent_sends(session, subject, self.longest), subject)

    def decide(self, sends: Sequence[RecentSend], subject: Subject) -> Decision:
        """Every cap against ``sends`` (the candidate's counted sends within :attr:`longest`); the first hit."""
        if not sends and self._none_zero:
            return Decision.allow()  # nothing sent lately: no cap of at least one message can be reached
        for rule in self.rules:
            if rule.applies(subject):
                decision = rule.decide(sends, subject)
                if not decision.allowed:
                    return decision
        return Decision.allow()


def recent_sends(session: Session, subject: Subject, period: timedelta) -> list[RecentSend]:
    """The candidate's messages counted by caps, sent within ``period`` before ``subject.now`` (or after it)."""
    query = select(OutboundMessage.sent_at, OutboundMessage.channel, OutboundMessage.category).where(
        OutboundMessage.candidate_id == subject.candidate_id,
        OutboundMessage.status.in_(COUNTED),
        OutboundMessage.sent_at.is_not(None),
        OutboundMessage.sent_at > subject.now - period,
    )
    if subject.message_id is not None:
        query = query.where(OutboundMessage.id != subject.message_id)
    return [RecentSend(at, channel, category) for at, channel, category in session.execute(query) if at is not None]


def _human(period: timedelta) -> str:
    seconds = int(period.total_seconds())
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds % size == 0:
            count = seconds // size
            return f"{count} {unit}{'s' if count != 1 else ''}"
    return f"{seconds} seconds"
