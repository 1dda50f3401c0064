"""The policy engine: runs the rules in a fixed order and turns the first objection into an outbox status.

Order matters: consent first (nothing else is worth computing for a suppressed address), then quiet hours
(a deferral that does not use up a cap), then the caps, which count what has been sent.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from functools import cached_property, lru_cache

import phonenumbers
from sqlalchemy.orm import Session

from outreach.core.config import Settings
from outreach.core.models import Channel, MessageStatus
from outreach.domain.campaigns import Category
from outreach.domain.candidates import zone_for
from outreach.policy.base import Decision, Rule, Stage, Subject, SubjectFacts, Verdict
from outreach.policy.calendar import BusinessCalendar
from outreach.policy.caps import FrequencyCaps
from outreach.policy.config import PolicySpec
from outreach.policy.consent import EnrollmentActiveRule, NurtureConsentRule, SuppressionRule
from outreach.policy.quiet_hours import QuietHoursRule, validity_period, window_for

#: Categories that are outreach (campaign messages); anything else (``auto_reply``) answers the candidate.
OUTREACH_CATEGORIES = frozenset(c.value for c in Category)

_EMAIL = Channel.EMAIL.value

#: Suppressions by these rules end the row with a status of their own rather than ``suppressed``.
STATUS_FOR_RULE = {"exit": MessageStatus.CANCELLED, "address": MessageStatus.SKIPPED}


@dataclass(frozen=True)
class Outcome:
    """What the engine decided, as the outbox row should record it."""

    decision: Decision

    @property
    def status(self) -> MessageStatus:
        if self.decision.verdict is Verdict.DEFER:
            return MessageStatus.HELD
        if self.decision.verdict is Verdict.SUPPRESS:
            return STATUS_FOR_RULE.get(self.decision.rule, MessageStatus.SUPPRESSED)
        return MessageStatus.PENDING


@lru_cache(maxsize=4096)
def _country(phone: str) -> str | None:
    """The phone number's region (``CN``), parsed once per number per process."""
    try:
        return phonenumbers.region_code_for_number(phonenumbers.parse(phone))
    except phonenumbers.NumberParseException:
        return None


#: Sees every decision the engine makes, with its subject (the simulator records deferrals through it).
DecisionHook = Callable[[Subject, Decision], None]


class PolicyEngine:
    def __init__(self, spec: PolicySpec, settings: Settings, on_decision: DecisionHook | None = None) -> None:
        self.spec = spec
        self.settings = settings
        self.on_decision = on_decision

    def decided(self, subject: Subject, decision: Decision) -> Decision:
        """Every decision passes here on its way out, whichever path made it (one row, or a group's shared reads)."""
        if self.on_decision is not None:
            self.on_decision(subject, decision)
        return decision

    @cached_property
    def calendar(self) -> BusinessCalendar:
        return BusinessCalendar.from_spec(self.spec.calendar)

    @cached_property
    def _consent_rules(self) -> list[Rule]:
        """Rules every message obeys, auto-replies included."""
        return [SuppressionRule(self.settings.signing_key), NurtureConsentRule()]

    @cached_property
    def _outreach_rules(self) -> list[Rule]:
        """Rules for campaign messages only: an auto-reply answers the candidate at once, uncapped."""
        return [QuietHoursRule(self.spec.quiet_hours, self.calendar), FrequencyCaps(self.spec.caps)]

    def subject(
        self,
        candidate: SubjectFacts,
        *,
        channel: str,
        category: str,
        campaign: str,
        now: datetime,
        stage: Stage,
        message_id: str | None = None,
        locked: bool = False,
        enrollment_state: tuple[str, str | None] | None = None,
    ) -> Subject:
        """What the rules look at. ``locked``: ``candidate`` was just read under its row lock in the transaction the
        rules will run in, so its consent is current and the consent rule need not read it again; likewise
        ``enrollment_state`` (``(status, exit_reason)`` of the message's enrollment, read in that transaction)."""
        address = candidate.email if channel == _EMAIL else candidate.phone
        country = _country(candidate.phone) if candidate.phone else None
        return Subject(
            candidate_id=candidate.id,
            channel=channel,
            category=category,
            campaign=campaign,
            address=address,
            zone=zone_for(candidate.timezone, candidate.phone, self.settings.company_timezone),
            country=country,
            now=now,
            stage=stage,
            message_id=message_id,
            nurture_consent=bool(candidate.nurture_consent) if locked else None,
            enrollment_state=enrollment_state,
        )

    def sms_validity(self, subject: Subject) -> int | None:
        """Seconds a queued SMS may wait at the provider before its quiet-hours window closes (ValidityPeriod)."""
        if subject.category not in OUTREACH_CATEGORIES:
            return None
        window, _ = window_for(self.spec.quiet_hours, subject.channel, subject.category, subject.country)
        if window is None:
            return None
        return validity_period(subject.now, subject.zone, window)

    def evaluate(self, session: Session, subject: Subject, enrollment_id: int | None = None) -> Outcome:
        rules = [EnrollmentActiveRule(enrollment_id), *self._consent_rules]
        if subject.category in OUTREACH_CATEGORIES:
            rules += self._outreach_rules
        for rule in rules:
            decision = rule.check(session, subject)
            if not decision.allowed:
                return Outcome(self.decided(subject, decision))
        return Outcome(self.decided(subject, Decision.allow()))
