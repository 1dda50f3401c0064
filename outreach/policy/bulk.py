"""The policy rules for many messages at once, with what the rules read loaded in a few queries.

The scheduler (a pass of up to 1000 due steps) and the nurture batch sender (up to 1000 recipients) run every
rule of :class:`~outreach.policy.engine.PolicyEngine` for every message, in the engine's order and with the same
decisions; only the reads are shared: enrollment states, suppressed addresses, consent and the recent sends the
caps count are loaded once for the whole set, in the caller's transaction (after it locked what it must). The
decisions themselves (and their texts) are the rules' own ``decide`` methods, which their single-message
``check`` uses too; quiet hours are worked out once per (time, zone, channel, category) rather than per message.
A rule this module does not know is asked directly (``rule.check(session, subject)``), so a new rule is never
skipped.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from typing import Any

from sqlalchemy import Select, all_, bindparam, select
from sqlalchemy.orm import Session

from outreach.core.models import OutboundMessage, Suppression
from outreach.core.sql import CHUNK, any_of, array_of, is_postgres
from outreach.policy.base import ALLOW, CandidateFacts, Decision, Subject
from outreach.policy.caps import COUNTED, FrequencyCaps, RecentSend
from outreach.policy.consent import EnrollmentActiveRule, NurtureConsentRule, SuppressionRule, applying
from outreach.policy.engine import OUTREACH_CATEGORIES, PolicyEngine
from outreach.policy.quiet_hours import QuietHoursRule

__all__ = ["CandidateFacts", "PolicyReads"]

_Step = Callable[[Session, Subject, CandidateFacts], Decision]


@lru_cache(maxsize=4)
def _suppressions_query(postgres: bool) -> Select[str, str, str]:
    return select(Suppression.address, Suppression.scope, Suppression.reason).where(
        Suppression.channel == bindparam("channel"), any_of(postgres, Suppression.address, "keys")
    )


@lru_cache(maxsize=4)
def _sends_query(postgres: bool) -> Select[str, int, datetime | None, str, str]:
    om = OutboundMessage
    query = select(om.id, om.candidate_id, om.sent_at, om.channel, om.category).where(
        any_of(postgres, om.candidate_id, "candidates"),
        om.status.in_(COUNTED),
        om.sent_at.is_not(None),
        om.sent_at > bindparam("since", type_=om.sent_at.type),
    )
    if postgres:
        # The caller's own rows are left out by the database (a batch claims, and so marks counted, them all).
        query = query.where(om.id != all_(bindparam("exclude", type_=array_of(om.id.type))))
    return query


@dataclass
class PolicyReads:
    """What the rules need to know about a set of candidates, read once; :meth:`evaluate` decides one message."""

    engine: PolicyEngine
    now: datetime
    #: (channel, suppression key) → (scope, reason) of the suppression stored under it.
    suppressed: dict[tuple[str, str], tuple[str, str]] = field(default_factory=dict)
    sends: dict[int, list[RecentSend]] = field(default_factory=lambda: defaultdict(list))
    #: The suppression keys of each (channel, address) met in :meth:`load`, so :meth:`evaluate` hashes nothing.
    keys: dict[tuple[str, str], tuple[str, ...]] = field(default_factory=dict)
    _opens: dict[tuple[object, ...], datetime] = field(default_factory=dict)
    _steps: tuple[tuple[_Step, ...], tuple[_Step, ...]] | None = None

    @classmethod
    def load(
        cls,
        session: Session,
        engine: PolicyEngine,
        candidates: Iterable[CandidateFacts],
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
                        keys = reads.keys.get((channel, address))
                        if keys is None:
                            keys = reads.keys[(channel, address)] = rule.lookup_keys(channel, address)
                        wanted[channel].update(keys)
            postgres = is_postgres(session)
            for channel, found in wanted.items():
                listed = sorted(found)
                for start in range(0, len(listed), CHUNK):
                    keyed = {"channel": channel, "keys": listed[start : start + CHUNK]}
                    for key, scope, reason in session.execute(_suppressions_query(postgres), keyed):
                        reads.suppressed[(channel, key)] = (scope, reason)
        caps = next((r for r in engine._outreach_rules if isinstance(r, FrequencyCaps)), None)
        if caps is not None and caps.rules and people:
            postgres = is_postgres(session)
            ids = sorted({c.id for c in people})
            skip = set(exclude) if not postgres else set()
            for start in range(0, len(ids), CHUNK):
                among: dict[str, Any] = {"candidates": ids[start : start + CHUNK], "since": now - caps.longest}
                if postgres:
                    among["exclude"] = list(exclude)
                for message_id, candidate_id, at, channel, category in session.execute(_sends_query(postgres), among):
                    if message_id not in skip and at is not None:
                        reads.sends[candidate_id].append(RecentSend(at, channel, category))
        return reads

    def count(self, subject: Subject) -> None:
        """``subject`` is going out now: later messages to the same candidate see it in their caps."""
        self.sends[subject.candidate_id].append(RecentSend(subject.now, subject.channel, subject.category))

    def evaluate(
        self,
        session: Session,
        subject: Subject,
        candidate: CandidateFacts,
        enrollment_state: tuple[str, str | None] | None,
    ) -> Decision:
        """The engine's decision for ``subject``; ``enrollment_state`` is (status, exit_reason) or None."""
        return self.engine.decided(subject, self._run_all(session, subject, candidate, enrollment_state))

    def _run_all(
        self,
        session: Session,
        subject: Subject,
        candidate: CandidateFacts,
        enrollment_state: tuple[str, str | None] | None,
    ) -> Decision:
        if enrollment_state is not None:
            decision = EnrollmentActiveRule.decide(enrollment_state)
            if not decision.allowed:
                return decision
        steps = self._steps
        if steps is None:
            rules = self.engine._consent_rules, self.engine._outreach_rules
            steps = self._steps = (self._steps_for(rules[0]), self._steps_for(rules[1]))
        for step in steps[0]:
            decision = step(session, subject, candidate)
            if not decision.allowed:
                return decision
        if subject.category in OUTREACH_CATEGORIES:
            for step in steps[1]:
                decision = step(session, subject, candidate)
                if not decision.allowed:
                    return decision
        return ALLOW

    def _decide(self, session: Session, rule: Any, subject: Subject, candidate: CandidateFacts) -> Decision:
        """One rule's decision from the shared reads (the audience selection asks single rules this way)."""
        return self._step(rule)(session, subject, candidate)

    def _steps_for(self, rules: Iterable[Any]) -> tuple[_Step, ...]:
        """How each rule decides from the shared reads, worked out once rather than per message."""
        return tuple(self._step(rule) for rule in rules)

    def _step(self, rule: Any) -> _Step:
        if isinstance(rule, SuppressionRule):
            suppression = rule

            def suppressed(session: Session, subject: Subject, candidate: CandidateFacts) -> Decision:
                return suppression.decide(subject, self._suppression(suppression, subject))

            return suppressed
        if isinstance(rule, NurtureConsentRule):
            consent = rule

            def consented(session: Session, subject: Subject, candidate: CandidateFacts) -> Decision:
                return consent.decide(subject, bool(candidate.nurture_consent))

            return consented
        if isinstance(rule, QuietHoursRule):
            quiet = rule

            def quiet_hours(session: Session, subject: Subject, candidate: CandidateFacts) -> Decision:
                key = quiet.opens_key(subject)
                opens = self._opens.get(key)
                if opens is None:
                    opens = self._opens[key] = quiet.opens(subject)
                return quiet.decide(subject, opens)

            return quiet_hours
        if isinstance(rule, FrequencyCaps):
            caps = rule

            def capped(session: Session, subject: Subject, candidate: CandidateFacts) -> Decision:
                return caps.decide(self.sends.get(subject.candidate_id, ()), subject)

            return capped
        other = rule

        def asked(session: Session, subject: Subject, candidate: CandidateFacts) -> Decision:
            checked: Decision = other.check(session, subject)
            return checked

        return asked

    def _suppression(self, rule: SuppressionRule, subject: Subject) -> tuple[str, str] | None:
        """The (scope, reason) of the address's suppression that applies to the subject's category, if any."""
        if not subject.address:
            return None
        keys = self.keys.get((subject.channel, subject.address))
        if keys is None:
            keys = rule.lookup_keys(subject.channel, subject.address)
        return applying((self.suppressed.get((subject.channel, key)) for key in keys), subject.category)
