"""The simulated world of one shard: the service on its own in-memory database, and the loop that drives it.

The service is the real one (:class:`~outreach.service.runtime.Runtime`: campaigns, policy engine, scheduler,
delivery, rendering) with only the providers replaced by fakes that record each call and answer like a provider that
accepted the message; the policy engine remembers every deferral it decides. :class:`World` creates the jobs and the
cohort's candidates, feeds their story events through the service's own entry points, and moves the virtual clock
from one interesting instant to the next (the next story event, the earliest due enrollment step, the earliest held
message, the next cron firing), running the scheduler's passes and delivering what they queue at each.
"""

from __future__ import annotations

import logging
import random
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from croniter import croniter
from sqlalchemy import Engine, create_engine, func, select
from sqlalchemy import event as sqlalchemy_event
from sqlalchemy.orm import Session
from sqlalchemy.pool import StaticPool

from outreach.core.clock import FixedClock
from outreach.core.config import Settings
from outreach.core.models import Base, Candidate, Enrollment, EnrollmentStatus, MessageStatus, OutboundMessage, Stage
from outreach.domain.campaigns import EventType
from outreach.domain.candidates import CandidateIn, JobIn, upsert_candidate, upsert_job
from outreach.ops.simulate.cohort import JOBS, Happening, Person
from outreach.pipeline.delivery import deliver
from outreach.pipeline.enrollment import EventIn, pause_for_out_of_office, record_event, record_reply
from outreach.pipeline.scheduler import TickResult
from outreach.policy.base import Decision, Subject, Verdict
from outreach.policy.config import PolicySpec
from outreach.policy.engine import PolicyEngine
from outreach.providers.base import EmailMessage, EmailProvider, SendResult, SmsMessage, SmsProvider
from outreach.service.runtime import Runtime

POOL_STAGES = (Stage.DECLINED.value, Stage.REJECTED.value, Stage.TALENT_POOL.value)


class FakeEmail(EmailProvider):
    """Records the outbox id of every call and answers like a provider that accepted the message."""

    name = "simulator"

    def __init__(self, calls: list[str]) -> None:
        self.calls = calls

    def send_email(self, message: EmailMessage) -> SendResult:
        self.calls.append(message.message_id)
        return SendResult(self.name, f"sim-{len(self.calls)}")


class FakeSms(SmsProvider):
    name = "simulator"

    def __init__(self, calls: list[str]) -> None:
        self.calls = calls

    def send_sms(self, message: SmsMessage) -> SendResult:
        self.calls.append(message.message_id)
        return SendResult(self.name, f"sim-{len(self.calls)}")


class RecordingPolicy(PolicyEngine):
    """The real engine, remembering every deferral it decides: (rule, campaign) → message id → longest wait."""

    def __init__(self, spec: PolicySpec, settings: Settings) -> None:
        super().__init__(spec, settings, on_decision=self._observe)
        self.deferrals: dict[tuple[str, str], dict[str, timedelta]] = defaultdict(dict)

    def record(self, rule: str, campaign: str, message_id: str, wait: timedelta) -> None:
        seen = self.deferrals[(rule, campaign)]
        seen[message_id] = max(wait, seen.get(message_id, timedelta(0)))

    def _observe(self, subject: Subject, decision: Decision) -> None:
        if decision.verdict is Verdict.DEFER and decision.until is not None and subject.message_id:
            self.record(decision.rule, subject.campaign, subject.message_id, decision.until - subject.now)


def seeded_ids(rng: random.Random) -> Callable[[], str]:
    """Outbox ids from ``rng``, so a seed gives the same quiet-hours spread each time."""

    def seeded() -> str:
        return f"{rng.getrandbits(128):032x}"

    return seeded


@contextmanager
def quiet_logs() -> Iterator[None]:
    """The scheduler logs every release of held rows; over a simulated year that is noise."""
    logger = logging.getLogger("outreach")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def memory_engine() -> Engine:
    """A fresh in-memory SQLite database with the service's tables, foreign keys enforced."""
    engine = create_engine("sqlite://", poolclass=StaticPool, connect_args={"check_same_thread": False})

    def pragmas(connection: Any, _record: Any) -> None:
        cursor = connection.cursor()
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    sqlalchemy_event.listen(engine, "connect", pragmas)
    Base.metadata.create_all(engine)
    return engine


class World:
    """One shard of the cohort living through the simulated span, on its own database."""

    def __init__(
        self,
        runtime: Runtime,
        policy: RecordingPolicy,
        people: Sequence[Person],
        timeline: Sequence[Happening],
        queue: list[str],
    ) -> None:
        self.runtime = runtime
        self.policy = policy
        self.people = people
        self.timeline = timeline
        self.queue = queue
        self.life_events: Counter[str] = Counter()
        steps = (
            select(func.min(Enrollment.next_run_at))
            .where(Enrollment.status == EnrollmentStatus.ACTIVE.value, Enrollment.next_run_at.is_not(None))
            .scalar_subquery()
        )
        held = (
            select(func.min(OutboundMessage.not_before))
            .where(OutboundMessage.status == MessageStatus.HELD.value)
            .scalar_subquery()
        )
        self._due_query = select(steps, held)

    def create_people(self) -> None:
        settings = self.runtime.settings
        with Session(self.runtime.engine, expire_on_commit=False) as session, session.begin():
            for external_id, title, department, office, tags, low, high in JOBS:
                data = JobIn(
                    external_id=external_id,
                    title=title,
                    department=department,
                    location=office,
                    description=(
                        f"Join the {department} team in {office}.\n\n"
                        "You will design, build and run services our customers rely on every day, "
                        "with a team that values clear writing and careful reviews."
                    ),
                    salary_min=low,
                    salary_max=high,
                    booking_url=f"https://book.example.com/interview/{external_id}",
                    tags=list(tags),
                )
                upsert_job(session, data)
            for person in self.people:
                fields = {k: v for k, v in person.fields.items() if v is not None}
                candidate = upsert_candidate(
                    session, CandidateIn.model_validate(fields, context={"settings": settings}), settings
                )
                if person.pool:
                    candidate.stage = Stage.TALENT_POOL.value
                session.flush()
                person.db_id = candidate.id

    def happen(self, batch: Sequence[Happening]) -> None:
        runtime = self.runtime
        settings = runtime.settings
        with Session(runtime.engine, expire_on_commit=False) as session, session.begin():
            for happening in batch:
                if happening.kind == "job_reopened":
                    self._job_reopened(session, happening)
                    continue
                person = self.people[happening.person]
                if happening.kind in ("reply", "auto_reply"):
                    candidate = session.get(Candidate, person.db_id)
                    assert candidate is not None
                    if happening.kind == "reply":
                        self._reply(session, candidate, happening.at)
                    else:
                        self._auto_reply(session, candidate, happening.at)
                    self.life_events[happening.kind] += 1
                    continue
                event_in = EventIn(
                    type=EventType(happening.kind),
                    job_id=happening.job,
                    reason=happening.reason,
                    occurred_at=happening.at,
                    data=happening.data,
                )
                record_event(
                    session,
                    runtime.campaigns,
                    person.external_id,
                    event_in,
                    company_tz=settings.company_timezone,
                    calendar=self.policy.calendar,
                )
                self.life_events[happening.kind] += 1

    def _reply(self, session: Session, candidate: Candidate, at: datetime) -> None:
        # As the inbound webhooks do: a reply stops the sequences that exit on one, if the policy says so.
        if self.policy.spec.stop_on_reply.enabled:
            record_reply(session, self.runtime.campaigns, candidate, at)
        else:
            candidate.last_reply_at = at

    def _auto_reply(self, session: Session, candidate: Candidate, at: datetime) -> None:
        pause = self.policy.spec.stop_on_reply.out_of_office_pause
        pause_for_out_of_office(session, candidate, at, pause)
        held = session.execute(
            select(OutboundMessage.id, OutboundMessage.campaign).where(
                OutboundMessage.candidate_id == candidate.id,
                OutboundMessage.status == MessageStatus.HELD.value,
                OutboundMessage.rule == "out_of_office",
            )
        )
        for message_id, campaign in held:
            self.policy.record("out_of_office", campaign, message_id, pause)

    def _job_reopened(self, session: Session, happening: Happening) -> None:
        job_tags = set(next(j[4] for j in JOBS if j[0] == happening.job))
        pool = session.scalars(select(Candidate).where(Candidate.stage.in_(POOL_STAGES)).order_by(Candidate.id)).all()
        shortlisted = [c for c in pool if set(c.tags) & job_tags]
        for candidate in shortlisted:
            record_event(
                session,
                self.runtime.campaigns,
                candidate.external_id,
                EventIn(type=EventType.JOB_OPENED, job_id=happening.job, occurred_at=happening.at),
                company_tz=self.runtime.settings.company_timezone,
                calendar=self.policy.calendar,
            )
        self.life_events["job_opened"] += len(shortlisted)

    def due_times(self) -> tuple[datetime | None, datetime | None]:
        """When the service next has work of its own: (the earliest due enrollment step, the earliest held row)."""
        with self.runtime.engine.connect() as connection:
            step, held = connection.execute(self._due_query).one()
        return step, held

    def run(self, clock: FixedClock, start: datetime, end: datetime) -> int:
        """Advance from ``start`` to ``end``, stopping only where something happens; returns the stops made.

        At each stop: the story events of that instant, then the scheduler's own passes in the order
        :meth:`Scheduler.tick <outreach.pipeline.scheduler.Scheduler.tick>` runs them (cron firings, due steps until
        none is left, the sweeper releasing held rows), then delivery of everything they queued. A pass with nothing to
        do is not run: a year has thousands of stops, and an idle pass still costs its transaction.
        """
        runtime = self.runtime
        scheduler = runtime.scheduler
        timeline = self.timeline
        zone = ZoneInfo(runtime.settings.company_timezone)
        firings: list[datetime] = []
        for campaign in runtime.campaigns.scheduled():
            assert campaign.trigger.cron is not None
            schedule = croniter(campaign.trigger.cron, (start - timedelta(seconds=1)).astimezone(zone))
            while (fire_at := schedule.get_next(datetime).astimezone(UTC)) <= end:
                firings.append(fire_at)
        firings.sort()
        # Story events that can start an enrollment; replies and the rest only ever stop or delay one.
        enrolling = {kind.value for kind in EventType if runtime.campaigns.for_event(kind.value)}
        if EventType.JOB_OPENED.value in enrolling:
            enrolling.add("job_reopened")
        next_event = next_firing = 0
        now = start
        stops = 0
        step_at, held_at = self.due_times()
        while True:
            clock.set(now)
            stops += 1
            result = TickResult()
            due = next_event
            while due < len(timeline) and timeline[due].at <= now:
                due += 1
            firing = next_firing < len(firings) and firings[next_firing] <= now
            while next_firing < len(firings) and firings[next_firing] <= now:
                next_firing += 1
            if due > next_event:
                arrived = timeline[next_event:due]
                self.happen(arrived)
                next_event = due
                if any(h.kind in enrolling for h in arrived):
                    step_at = now  # enrollments may have started, due at once
            if firing:
                scheduler.fire_cron(now, result)
                step_at = now
            claimed = 0
            if step_at is not None and step_at <= now:
                claimed = scheduler.run_due(now, result)
            if held_at is not None and held_at <= now:
                scheduler.sweep(now, result)
            while self.queue:
                batch = list(self.queue)
                self.queue.clear()
                for outbox_id in batch:
                    deliver(runtime, outbox_id, now)
            step_at, held_at = self.due_times()
            upcoming = [
                moment
                for moment in (
                    timeline[next_event].at if next_event < len(timeline) else None,
                    firings[next_firing] if next_firing < len(firings) else None,
                    step_at,
                    held_at,
                )
                if moment is not None
            ]
            if not upcoming:
                break
            # Steps still due now (one step right after another, or more than a claim batch) run at the same
            # instant, as the scheduler's next pass would; otherwise the clock moves on.
            following = min(upcoming)
            if following <= now:
                following = now if claimed else now + timedelta(seconds=1)
            if following > end:
                break
            now = following
        return stops
