"""What every policy rule shares: the thing it looks at and the decision it returns.

A rule is a small named object with ``check(session, subject) -> Decision``. It answers allow, defer until a
time, or suppress, always with a reason a recruiter can read. The engine runs rules in order and stops at the
first that does not allow; the rule's name and reason are recorded on the outbox row.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Protocol
from zoneinfo import ZoneInfo

from sqlalchemy.orm import Session


class Verdict(StrEnum):
    ALLOW = "allow"
    DEFER = "defer"
    SUPPRESS = "suppress"


@dataclass(frozen=True)
class Decision:
    verdict: Verdict
    rule: str = ""
    reason: str = ""
    until: datetime | None = None

    @classmethod
    def allow(cls) -> Decision:
        return ALLOW

    @classmethod
    def defer(cls, rule: str, reason: str, until: datetime) -> Decision:
        return cls(Verdict.DEFER, rule, reason, until)

    @classmethod
    def suppress(cls, rule: str, reason: str) -> Decision:
        return cls(Verdict.SUPPRESS, rule, reason)

    @property
    def allowed(self) -> bool:
        return self.verdict is Verdict.ALLOW


ALLOW = Decision(Verdict.ALLOW)


class Stage(StrEnum):
    """When the rules run: as the step is scheduled, and again right before the provider call."""

    SCHEDULE = "schedule"
    SEND = "send"


@dataclass(frozen=True)
class Subject:
    """A message about to be scheduled or sent, with what rules need to know about its recipient."""

    candidate_id: int
    channel: str
    category: str
    campaign: str
    address: str | None
    zone: ZoneInfo
    country: str | None
    now: datetime
    stage: Stage
    message_id: str | None = None
    #: Facts the caller has just read under the candidate's row lock, in the transaction the rules run in, so the
    #: rules need not read them again: the candidate's nurture consent, and the message's enrollment as
    #: ``(status, exit_reason)``. None means "not known": the rule reads it itself.
    nurture_consent: bool | None = None
    enrollment_state: tuple[str, str | None] | None = None


class CandidateFacts(Protocol):
    """What the rules read of a candidate: an ORM :class:`~outreach.core.models.Candidate` or a plain row (the bulk
    paths read rows, not objects)."""

    @property
    def id(self) -> int: ...

    @property
    def email(self) -> str | None: ...

    @property
    def phone(self) -> str | None: ...

    @property
    def nurture_consent(self) -> bool: ...


class SubjectFacts(CandidateFacts, Protocol):
    """What :meth:`~outreach.policy.engine.PolicyEngine.subject` reads of a candidate: the rules' facts and the
    timezone the quiet hours are kept in."""

    @property
    def timezone(self) -> str | None: ...


class Rule(Protocol):
    name: str

    def check(self, session: Session, subject: Subject) -> Decision: ...
