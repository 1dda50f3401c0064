"""The scheduler: fire cron campaigns, claim due enrollment steps, write outbox rows, wake workers.

One tick is safe to run in several processes at once. On PostgreSQL due enrollments are claimed with
``FOR UPDATE SKIP LOCKED``; on SQLite with a single ``UPDATE … RETURNING`` statement, which takes the write lock
at once. The outbox rows are written in the claiming transaction and their ids are put on the broker only
after it commits. Waits of days or months are ``next_run_at`` values in the database, never broker delays.

The sweeper closes the gaps a broker cannot: outbox rows that are due but were never picked up (a flushed
broker, a process that died between commit and enqueue) are enqueued again, and rows left ``sending`` past
their lease become ``uncertain``: the provider may have accepted them, so they are reconciled from provider
events instead of being sent a second time. Uncertain rows that no event reconciled within
``OUTREACH_UNCERTAIN_ALERT_AFTER`` get one ``message_uncertain`` alert each (:mod:`outreach.uncertain`).
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from croniter import croniter
from sqlalchemy import Engine, and_, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session, object_session

from outreach.calendar import BusinessCalendar
from outreach.campaigns import Campaign, CampaignSet, Category, ExitCondition, Step
from outreach.candidates import candidate_timezone
from outreach.config import Settings
from outreach.conversation import alert_unanswered_replies
from outreach.db import is_sqlite, transaction
from outreach.enrollment import audience_matches, enroll, exit_enrollments
from outreach.models import (
    CLAIMED_RULE,
    Alert,
    Base,
    CampaignRun,
    Candidate,
    Channel,
    Enrollment,
    EnrollmentStatus,
    Job,
    LinkClick,
    MessageStatus,
    OutboundMessage,
    TrackedLink,
    new_id,
    utcnow,
)
from outreach.policy.base import Stage as PolicyStage
from outreach.policy.bulk import PolicyReads
from outreach.policy.config import PolicySpec
from outreach.policy.engine import Outcome, PolicyEngine
from outreach.uncertain import alert_uncertain_messages

log = logging.getLogger(__name__)

MAX_PASSES = 20

#: SendGrid takes at most 1000 personalizations per request.
MAX_BATCH = 1000

OUTBOX = Base.metadata.tables["outbound_messages"]


def step_due(
    step: Step, base: datetime, candidate: Candidate, company_tz: str, calendar: BusinessCalendar | None = None
) -> datetime:
    """When ``step`` is due: ``base`` plus the delay (or business days), then the next ``at`` (candidate's zone)."""
    if step.business_days:
        due = (calendar or default_calendar()).add_business_days(base, step.business_days)
    else:
        due = base + step.delay
    if step.at is None:
        return due
    zone = candidate_timezone(candidate, Settings(company_timezone=company_tz))
    local = due.astimezone(zone)
    hour, minute = (int(part) for part in step.at.split(":"))
    target = local.replace(hour=hour, minute=minute, second=0, microsecond=0)
    if target < local:
        target = (local + timedelta(days=1)).replace(hour=hour, minute=minute, second=0, microsecond=0)
    return target.astimezone(due.tzinfo)


@functools.cache
def default_calendar() -> BusinessCalendar:
    from outreach.policy.config import CalendarSpec

    return BusinessCalendar.from_spec(CalendarSpec())


@dataclass
class TickResult:
    fired: list[str] = field(default_factory=list)
    enrolled: int = 0
    claimed: int = 0
    queued: list[str] = field(default_factory=list)
    skipped: int = 0
    held: int = 0
    exited: int = 0
    completed: int = 0
    alerts: int = 0
    requeued: list[str] = field(default_factory=list)
    uncertain: int = 0

    def summary(self) -> dict[str, Any]:
        return {
            "fired": self.fired,
            "enrolled": self.enrolled,
            "claimed": self.claimed,
            "queued": len(self.queued),
            "skipped": self.skipped,
            "held": self.held,
            "exited": self.exited,
            "completed": self.completed,
            "alerts": self.alerts,
            "requeued": len(self.requeued),
            "uncertain": self.uncertain,
        }


def insert_ignore(session: Session, model: type[Any], values: dict[str, Any]) -> bool:
    """INSERT … ON CONFLICT DO NOTHING on both dialects; True when a row was written."""
    dialect = session.get_bind().dialect.name
    statement: Any
    if dialect == "postgresql":
        statement = postgresql.insert(model).values(**values).on_conflict_do_nothing()
    else:
        statement = sqlite.insert(model).values(**values).on_conflict_do_nothing()
    # RETURNING rather than rowcount: drivers disagree on rowcount after ON CONFLICT DO NOTHING.
    primary_key = model.__table__.primary_key.columns.values()[0]
    return session.execute(statement.returning(primary_key)).first() is not None


class Scheduler:
    def __init__(
        self,
        engine: Engine,
        campaigns: CampaignSet,
        settings: Settings,
        enqueue: Any,
        policy: PolicyEngine | None = None,
        enqueue_batch: Callable[[Sequence[str]], None] | None = None,
        batch_size: int = MAX_BATCH,
    ) -> None:
        self.engine = engine
        self.campaigns = campaigns
        self.settings = settings
        self.enqueue = enqueue
        #: Wakes one batch worker for up to ``batch_size`` nurture email rows of one (campaign, step, template,
        #: locale); without it every row is enqueued on its own.
        self.enqueue_batch = enqueue_batch
        self.batch_size = batch_size
        self.policy = policy or PolicyEngine(PolicySpec(), settings)
        self.sqlite = is_sqlite(engine)

    # -- the whole pass ---------------------------------------------------------------------------------

    def tick(self, now: datetime | None = None) -> TickResult:
        now = now or utcnow()
        result = TickResult()
        self.fire_cron(now, result)
        # Several passes, so steps that fall due together (an email and an SMS a few minutes later, after a
        # long pause) go out in one tick; bounded, so one tick never runs forever.
        for _ in range(MAX_PASSES):
            if self.run_due(now, result) == 0:
                break
        result.alerts += alert_unanswered_replies(self.engine, now, self.settings, self.policy)
        # Leases and enqueue times are wall-clock facts; a simulated ``now`` must not expire them.
        self.sweep(utcnow(), result)
        return result

    def run_enrollments(self, enrollment_ids: Sequence[int], now: datetime | None = None) -> TickResult:
        """Process these enrollments right away if they are due (the fast path after an ATS event)."""
        result = TickResult()
        if enrollment_ids:
            self.run_due(now or utcnow(), result, only=enrollment_ids)
        return result

    # -- cron campaigns ---------------------------------------------------------------------------------

    def fire_cron(self, now: datetime, result: TickResult) -> None:
        zone = ZoneInfo(self.settings.company_timezone)
        for campaign in self.campaigns.scheduled():
            assert campaign.trigger.cron is not None
            start = (now + timedelta(seconds=1)).astimezone(zone)
            fire_at: datetime = croniter(campaign.trigger.cron, start).get_prev(datetime)
            if (now - fire_at).total_seconds() > self.settings.cron_misfire_grace:
                continue
            with transaction(self.engine) as session:
                if not insert_ignore(
                    session, CampaignRun, {"campaign": campaign.name, "fire_at": fire_at, "created_at": now}
                ):
                    continue
                count = self._enroll_audience(session, campaign, fire_at)
                session.execute(
                    update(CampaignRun)
                    .where(CampaignRun.campaign == campaign.name, CampaignRun.fire_at == fire_at)
                    .values(enrolled=count)
                )
            result.fired.append(campaign.name)
            result.enrolled += count
            log.info("cron campaign fired", extra={"campaign": campaign.name, "enrolled": count})

    def _enroll_audience(self, session: Session, campaign: Campaign, fire_at: datetime) -> int:
        audience = campaign.trigger.audience
        query = select(Candidate)
        if audience.stages:
            query = query.where(Candidate.stage.in_([s.value for s in audience.stages]))
        if audience.require_nurture_consent:
            query = query.where(Candidate.nurture_consent.is_(True))
        count = 0
        key = f"cron:{fire_at.isoformat()}"
        for candidate in session.scalars(query.order_by(Candidate.id)).yield_per(1000):
            if not audience_matches(audience, candidate, None):
                continue
            if enroll(
                session,
                campaign,
                candidate,
                anchor=fire_at,
                dedupe_key=key,
                company_tz=self.settings.company_timezone,
                calendar=self.policy.calendar,
            ):
                count += 1
        return count

    # -- due steps --------------------------------------------------------------------------------------

    def _claim(self, session: Session, now: datetime, only: Sequence[int] | None) -> list[int]:
        due = and_(
            Enrollment.status == EnrollmentStatus.ACTIVE.value,
            Enrollment.next_run_at.is_not(None),
            Enrollment.next_run_at <= now,
        )
        if only is not None:
            due = and_(due, Enrollment.id.in_(list(only)))
        batch = self.settings.claim_batch
        if self.sqlite:
            pick = select(Enrollment.id).where(due).order_by(Enrollment.next_run_at).limit(batch)
            rows = session.execute(
                update(Enrollment)
                .where(Enrollment.id.in_(pick.scalar_subquery()))
                .values(updated_at=now)
                .returning(Enrollment.id)
            )
            return [row[0] for row in rows]
        query = (
            select(Enrollment.id)
            .where(due)
            .order_by(Enrollment.next_run_at)
            .limit(batch)
            .with_for_update(skip_locked=True)
        )
        return list(session.scalars(query))

    def run_due(self, now: datetime, result: TickResult, only: Sequence[int] | None = None) -> int:
        queued: list[str] = []
        batches: dict[tuple[str, int, str, str], list[str]] = {}
        with transaction(self.engine) as session:
            ids = self._claim(session, now, only)
            if not ids:
                return 0
            enrollments = session.scalars(
                select(Enrollment).where(Enrollment.id.in_(ids)).order_by(Enrollment.next_run_at)
            ).all()
            jobs = self._jobs(session, enrollments)
            # What the rules read, for every claimed step at once (the rules themselves run per step).
            reads = PolicyReads.load(
                session, self.policy, [e.candidate for e in enrollments], (Channel.EMAIL.value, Channel.SMS.value), now
            )
            rows: list[dict[str, Any]] = []
            wanted: list[tuple[str, tuple[str, int, str, str] | None]] = []
            for enrollment in enrollments:
                key = self._batch_key(enrollment)
                outbox_id = self._advance(session, enrollment, jobs, now, result, reads, rows)
                if outbox_id:
                    wanted.append((outbox_id, key))
            written = self._insert_outbox(session, rows)
            for outbox_id, key in wanted:
                if outbox_id not in written:
                    continue  # the step's row already existed: another scheduler got there first
                if key is None:
                    queued.append(outbox_id)
                else:
                    batches.setdefault(key, []).append(outbox_id)
        result.claimed += len(ids)
        result.queued.extend(queued)
        self.enqueue(queued)
        self._enqueue_batches(batches, result)
        return len(ids)

    @staticmethod
    def _insert_outbox(session: Session, rows: list[dict[str, Any]]) -> set[str]:
        """All the pass's outbox rows in one INSERT … ON CONFLICT DO NOTHING (executemany, which SQLAlchemy sends
        as a few multi-row statements); returns the ids written."""
        if not rows:
            return set()
        table = OUTBOX
        # executemany needs the same keys in every row: a skipped or held row carries rule and reason, a plain one
        # does not (None is what the plain row would get anyway).
        keys = {key for row in rows for key in row}
        rows = [row if len(row) == len(keys) else {key: row.get(key) for key in keys} for row in rows]
        dialect = session.get_bind().dialect.name
        statement: Any = postgresql.insert(table) if dialect == "postgresql" else sqlite.insert(table)
        statement = statement.on_conflict_do_nothing().returning(table.c.id)
        return {row[0] for row in session.connection().execute(statement, rows)}

    def _batch_key(self, enrollment: Enrollment) -> tuple[str, int, str, str] | None:
        """(campaign, step, template, locale) when the enrollment's due step is a nurture email that may go out
        in a SendGrid batch (:mod:`outreach.batch`); None for everything sent one by one."""
        if self.enqueue_batch is None:
            return None
        campaign = self.campaigns.get(enrollment.campaign)
        index = enrollment.current_step
        if campaign is None or campaign.category is not Category.NURTURE or index >= len(campaign.steps):
            return None
        step = campaign.steps[index]
        if step.channel is not Channel.EMAIL:
            return None
        return campaign.name, index, step.template, enrollment.candidate.locale

    def _enqueue_batches(self, batches: dict[tuple[str, int, str, str], list[str]], result: TickResult) -> None:
        if not batches:
            return
        assert self.enqueue_batch is not None
        size = max(1, min(self.batch_size, MAX_BATCH))
        for ids in batches.values():
            result.queued.extend(ids)
            for start in range(0, len(ids), size):
                self.enqueue_batch(ids[start : start + size])

    def _jobs(self, session: Session, enrollments: Iterable[Enrollment]) -> dict[int, Job]:
        job_ids = {e.job_id for e in enrollments if e.job_id is not None}
        if not job_ids:
            return {}
        return {job.id: job for job in session.scalars(select(Job).where(Job.id.in_(job_ids)))}

    def _advance(
        self,
        session: Session,
        enrollment: Enrollment,
        jobs: dict[int, Job],
        now: datetime,
        result: TickResult,
        reads: PolicyReads,
        rows: list[dict[str, Any]],
    ) -> str | None:
        """Turn one due step into an outbox row (appended to ``rows``, written by the caller) and move the
        enrollment on. Returns the id to enqueue once the row is written."""
        campaign = self.campaigns.get(enrollment.campaign)
        candidate = enrollment.candidate
        if campaign is None or not campaign.enabled:
            exit_enrollments(session, [enrollment.id], "campaign removed or disabled")
            result.exited += 1
            return None
        exit_reason = self._exit_reason(campaign, enrollment, candidate)
        if exit_reason:
            exit_enrollments(session, [enrollment.id], exit_reason)
            result.exited += 1
            return None
        index = enrollment.current_step
        if index >= len(campaign.steps):
            enrollment.status = EnrollmentStatus.COMPLETED.value
            enrollment.next_run_at = None
            result.completed += 1
            return None

        step = campaign.steps[index]
        due = enrollment.next_run_at or now
        since = enrollment.last_step_at or enrollment.anchor_at
        skip_rule, skip_reason = self._skip_reason(step, candidate, since, enrollment.id) or (None, None)
        outbox_id = new_id()
        # The wall clock, not ``now``: ``tick --now`` simulates when steps are due, but the row is ready to go
        # the moment it is written, and the sweeper's lease runs on real time.
        wall = utcnow()
        values: dict[str, Any] = {
            "id": outbox_id,
            "enrollment_id": enrollment.id,
            "candidate_id": candidate.id,
            "campaign": campaign.name,
            "step": index,
            "channel": step.channel.value,
            "template": step.template,
            "category": campaign.category.value,
            "status": MessageStatus.PENDING.value,
            "not_before": wall,
            "enqueued_at": wall,
            "attempts": 0,
            "created_at": wall,
            "updated_at": wall,
        }
        queueable = True
        if skip_reason:
            values.update(status=MessageStatus.SKIPPED.value, rule=skip_rule, reason=skip_reason)
            queueable = False
        else:
            subject = self.policy.subject(
                candidate,
                channel=step.channel.value,
                category=campaign.category.value,
                campaign=campaign.name,
                now=now,
                stage=PolicyStage.SCHEDULE,
                message_id=outbox_id,
            )
            if type(self.policy).evaluate is PolicyEngine.evaluate:
                state = (enrollment.status, enrollment.exit_reason)
                verdict = Outcome(reads.evaluate(session, subject, candidate, state))
            else:
                # An engine that wraps evaluate (the simulation records deferrals) is asked itself.
                verdict = self.policy.evaluate(session, subject, enrollment.id)
            if not verdict.decision.allowed:
                queueable = False
                values.update(status=verdict.status.value, rule=verdict.decision.rule, reason=verdict.decision.reason)
                if verdict.decision.until is not None:
                    values.update(not_before=max(verdict.decision.until, wall), enqueued_at=None)
                result.held += 1
        rows.append(values)

        if step.alert and not skip_reason:
            job = jobs.get(enrollment.job_id) if enrollment.job_id else None
            message = f"{campaign.name} step {index + 1}: {step.alert.replace('_', ' ')}"
            if job is not None:
                message += f" (job {job.external_id})"
            if insert_ignore(
                session,
                Alert,
                {
                    "kind": step.alert,
                    "candidate_id": candidate.id,
                    "enrollment_id": enrollment.id,
                    "campaign": campaign.name,
                    "message": message,
                    "created_at": now,
                },
            ):
                result.alerts += 1

        enrollment.current_step = index + 1
        enrollment.last_step_at = due
        enrollment.updated_at = now
        if index + 1 < len(campaign.steps):
            enrollment.next_run_at = step_due(
                campaign.steps[index + 1], due, candidate, self.settings.company_timezone, self.policy.calendar
            )
        else:
            enrollment.status = EnrollmentStatus.COMPLETED.value
            enrollment.next_run_at = None
            result.completed += 1
        if skip_reason:
            result.skipped += 1
            return None
        return outbox_id if queueable else None

    @staticmethod
    def _exit_reason(campaign: Campaign, enrollment: Enrollment, candidate: Candidate) -> str | None:
        if ExitCondition.STAGE_CHANGED in campaign.exit_on and candidate.stage != enrollment.stage_at_start:
            return f"stage changed to {candidate.stage}"
        if (
            ExitCondition.REPLIED in campaign.exit_on
            and candidate.last_reply_at is not None
            and candidate.last_reply_at >= enrollment.anchor_at
        ):
            return "replied"
        return None

    @staticmethod
    def _skip_reason(
        step: Step, candidate: Candidate, since: datetime, enrollment_id: int | None = None
    ) -> tuple[str, str] | None:
        """Why the step is skipped, as (rule, reason), or None when it goes ahead."""
        # The intent condition reads the candidate's level now, when the step is due: a reassessment counts.
        if step.intent and (candidate.intent_level or "unassessed") not in step.intent:
            level = candidate.intent_level or "unassessed"
            return "intent", f"step is for {', '.join(step.intent)} intent; candidate is {level}"
        if step.only_if == "no_reply" and candidate.last_reply_at and candidate.last_reply_at > since:
            return f"only_if:{step.only_if}", "candidate replied since the previous step"
        if step.only_if == "no_click" and candidate.last_click_at and candidate.last_click_at > since:
            return f"only_if:{step.only_if}", "candidate clicked since the previous step"
        session = object_session(candidate)
        if step.unless_clicked and enrollment_id is not None and session is not None:
            # Clicks on links in this enrollment's own messages, whenever they came: a candidate who booked
            # from the first email minutes after it arrived needs no reminder either.
            clicked = session.scalar(
                select(LinkClick.name)
                .join(TrackedLink, TrackedLink.id == LinkClick.link_id)
                .join(OutboundMessage, OutboundMessage.id == TrackedLink.message_id)
                .where(
                    LinkClick.candidate_id == candidate.id,
                    LinkClick.name.in_(step.unless_clicked),
                    OutboundMessage.enrollment_id == enrollment_id,
                )
                .order_by(LinkClick.clicked_at)
                .limit(1)
            )
            if clicked is not None:
                return f"unless_clicked:{clicked}", f"candidate clicked the {clicked} link of this campaign"
        return None

    # -- the sweeper ------------------------------------------------------------------------------------

    def sweep(self, now: datetime, result: TickResult) -> None:
        lease = timedelta(seconds=self.settings.lease_seconds)
        with transaction(self.engine) as session:
            stale = and_(
                OutboundMessage.status == MessageStatus.PENDING.value,
                OutboundMessage.not_before <= now,
                or_(OutboundMessage.enqueued_at.is_(None), OutboundMessage.enqueued_at < now - lease),
            )
            pick = select(OutboundMessage.id).where(stale).limit(self.settings.claim_batch)
            if not self.sqlite:
                pick = pick.with_for_update(skip_locked=True)
            rows = session.execute(
                update(OutboundMessage)
                .where(OutboundMessage.id.in_(pick.scalar_subquery()))
                .values(enqueued_at=now)
                .returning(OutboundMessage.id)
            )
            requeued = [row[0] for row in rows]
            lost_wakeups = list(requeued)
            # Deferred rows (quiet hours, caps) whose time has come: back to pending and onto the queue.
            due_held = (
                select(OutboundMessage.id)
                .where(OutboundMessage.status == MessageStatus.HELD.value, OutboundMessage.not_before <= now)
                .limit(self.settings.claim_batch)
            )
            if not self.sqlite:
                due_held = due_held.with_for_update(skip_locked=True)
            released = session.execute(
                update(OutboundMessage)
                .where(OutboundMessage.id.in_(due_held.scalar_subquery()))
                .values(status=MessageStatus.PENDING.value, enqueued_at=now, updated_at=now)
                .returning(OutboundMessage.id)
            )
            requeued += [row[0] for row in released]
            # Claimed in a group but never handed to a provider (the worker stopped first): safe to send again.
            unsent = session.execute(
                update(OutboundMessage)
                .where(
                    OutboundMessage.status == MessageStatus.SENDING.value,
                    OutboundMessage.lease_until < now,
                    OutboundMessage.rule == CLAIMED_RULE,
                )
                .values(
                    status=MessageStatus.PENDING.value,
                    rule=None,
                    reason=None,
                    lease_until=None,
                    sent_at=None,
                    enqueued_at=now,
                    updated_at=now,
                )
                .returning(OutboundMessage.id)
            )
            reclaimed = [row[0] for row in unsent]
            requeued += reclaimed
            lost_wakeups += reclaimed
            lost = session.execute(
                update(OutboundMessage)
                .where(
                    OutboundMessage.status == MessageStatus.SENDING.value,
                    OutboundMessage.lease_until < now,
                )
                .values(
                    status=MessageStatus.UNCERTAIN.value,
                    rule="lease",
                    reason="the worker stopped during the send; reconcile from provider events, do not resend",
                    updated_at=now,
                )
            )
            result.uncertain += int(getattr(lost, "rowcount", 0) or 0)
        if lost_wakeups:
            # Rows that were due and enqueued long ago but never picked up: the broker lost them.
            log.warning("sweeper re-enqueued outbox rows", extra={"count": len(lost_wakeups)})
        if len(requeued) > len(lost_wakeups):
            log.info("deferred messages released", extra={"count": len(requeued) - len(lost_wakeups)})
        result.requeued.extend(requeued)
        self.enqueue(requeued)
        # Uncertain rows no provider event reconciled in time go to a person; they are never resent.
        result.alerts += alert_uncertain_messages(
            self.engine, now, timedelta(seconds=self.settings.uncertain_alert_after), self.settings.claim_batch
        )


def run_forever(scheduler: Scheduler, interval: float, stop: threading.Event | None = None) -> None:
    """Tick every ``interval`` seconds until ``stop`` is set; a failing tick is logged and retried."""
    stop = stop or threading.Event()
    while not stop.is_set():
        try:
            scheduler.tick()
        except Exception:
            log.exception("scheduler tick failed; retrying next interval")
        stop.wait(interval)
