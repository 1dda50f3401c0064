"""The policy rules for many messages at once, with what the rules read loaded in a few queries.

The scheduler (a pass of up to 1000 due steps) and the nurture batch sender (up to 1000 recipients) run every
rule of :class:`~outreach.policy.engine.PolicyEngine` for every message, in the engine's order and with the same
decisions; only the reads are shared: enrollment states, suppressed addresses, consent and the recent sends the
caps count are loaded once for the whole set, in the caller's transaction (after it locked what it must). Rules
that read nothing (quiet hours) are the engine's own objects; a rule this module does not know is asked
directly (``rule.check(session, subject)``), so a new rule is never skipped.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import any_, bindparam, select
from sqlalchemy.dialects import postgresql
from sqlalchemy.orm import Session

from outreach.campaigns import Category
from outreach.models import Candidate, EnrollmentStatus, OutboundMessage, Suppression
from outreach.policy.base import Decision, Subject
from outreach.policy.caps import COUNTED, FrequencyCaps, RecentSend
from outreach.policy.consent import NurtureConsentRule, SuppressionRule
from outreach.policy.engine import OUTREACH_CATEGORIES, PolicyEngine

__all__ = ["PolicyReads", "one_of"]


def one_of(session: Session, column: Any, values: Collection[Any]) -> Any:
    """``column IN values``; on PostgreSQL ``column = ANY(:array)``: one parameter instead of a thousand, so the
    statement stays small and cheap to build (the batch and scheduler paths filter on up to 1000 ids)."""
    if session.get_bind().dialect.name == "postgresql":
        return column == any_(bindparam(None, list(values), type_=postgresql.ARRAY(column.type)))
    return column.in_(list(values))


def _lookup_keys(rule: SuppressionRule, channel: str, address: str) -> tuple[str, ...]:
    """The keys the suppression rule looks an address up under (in clear, and hashed where erasure hashes)."""
    return rule.lookup_keys(channel, address)


@dataclass
class PolicyReads:
    """What the rules need to know about a set of candidates, read once; :meth:`evaluate` decides one message."""

    engine: PolicyEngine
    now: datetime
    suppressed: dict[tuple[str, str], str] = field(default_factory=dict)
    sends: dict[int, list[RecentSend]] = field(default_factory=lambda: defaultdict(list))

    @classmethod
    def load(
        cls,
        session: Session,
        engine: PolicyEngine,
        candidates: Iterable[Candidate],
        channels: Collection[str],
        now: datetime,
        exclude: Collection[str] = (),
    ) -> PolicyReads:
        """Read suppressions and recent sends for ``candidates`` on ``channels``; rows in ``exclude`` (the
        caller's own claimed messages) are left out of the counted sends: :meth:`count` adds them as allowed."""
        reads = cls(engine, now)
        people = list(candidates)
        rule = next((r for r in engine._consent_rules if isinstance(r, SuppressionRule)), None)
        if rule is not None:
            wanted: dict[str, set[str]] = defaultdict(set)
            for candidate in people:
                for channel in channels:
                    address = candidate.email if channel == "email" else candidate.phone
                    if address:
                        wanted[channel].update(_lookup_keys(rule, channel, address))
            for channel, keys in wanted.items():
                listed = sorted(keys)
                for start in range(0, len(listed), 1000):
                    for address, reason in session.execute(
                        select(Suppression.address, Suppression.reason).where(
                            Suppression.channel == channel,
                            one_of(session, Suppression.address, listed[start : start + 1000]),
                        )
                    ):
                        reads.suppressed[(channel, address)] = reason
        caps = next((r for r in engine._outreach_rules if isinstance(r, FrequencyCaps)), None)
        if caps is not None and caps.rules and people:
            ids = sorted({c.id for c in people})
            excluded = set(exclude)
            om = OutboundMessage
            for start in range(0, len(ids), 1000):
                for message_id, candidate_id, at, channel, category in session.execute(
                    select(om.id, om.candidate_id, om.sent_at, om.channel, om.category).where(
                        one_of(session, om.candidate_id, ids[start : start + 1000]),
                        om.status.in_(COUNTED),
                        om.sent_at.is_not(None),
                        om.sent_at > now - caps.longest,
                    )
                ):
                    if message_id not in excluded and at is not None:
                        reads.sends[candidate_id].append(RecentSend(at, channel, category))
        return reads

    def count(self, subject: Subject) -> None:
        """``subject`` is going out now: later messages to the same candidate see it in their caps."""
        self.sends[subject.candidate_id].append(RecentSend(subject.now, subject.channel, subject.category))

    def evaluate(
        self,
        session: Session,
        subject: Subject,
        candidate: Candidate,
        enrollment_state: tuple[str, str | None] | None,
    ) -> Decision:
        """The engine's decision for ``subject``; ``enrollment_state`` is (status, exit_reason) or None."""
        if enrollment_state is not None and enrollment_state[0] == EnrollmentStatus.EXITED.value:
            return Decision.suppress("exit", f"enrollment exited: {enrollment_state[1]}")
        rules: list[Any] = list(self.engine._consent_rules)
        if subject.category in OUTREACH_CATEGORIES:
            rules += self.engine._outreach_rules
        for rule in rules:
            decision = self._decide(session, rule, subject, candidate)
            if not decision.allowed:
                return decision
        return Decision.allow()

    def _decide(self, session: Session, rule: Any, subject: Subject, candidate: Candidate) -> Decision:
        if isinstance(rule, SuppressionRule):
            if not subject.address:
                kind = "email" if subject.channel == "email" else "phone"
                return Decision.suppress("address", f"candidate has no {kind}")
            for key in _lookup_keys(rule, subject.channel, subject.address):
                reason = self.suppressed.get((subject.channel, key))
                if reason is not None:
                    return Decision.suppress(rule.name, f"address suppressed: {reason}")
            return Decision.allow()
        if isinstance(rule, NurtureConsentRule):
            if subject.category == Category.NURTURE.value and not candidate.nurture_consent:
                return Decision.suppress(rule.name, "no consent to nurture messages")
            return Decision.allow()
        if isinstance(rule, FrequencyCaps):
            sends = self.sends.get(subject.candidate_id, [])
            for cap in rule.rules:
                if cap.applies(subject):
                    decision = cap.decide(sends, subject)
                    if not decision.allowed:
                        return decision
            return Decision.allow()
        checked: Decision = rule.check(session, subject)
        return checked
