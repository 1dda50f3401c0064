"""The scheduler: fire cron campaigns, claim due enrollment steps, write outbox rows, wake workers.

One tick is safe to run in several processes at once. On PostgreSQL due enrollments are claimed with
``FOR UPDATE SKIP LOCKED``; on SQLite with a single ``UPDATE … RETURNING`` statement, which takes the write lock
at once. The outbox rows are written in the claiming transaction and their ids are put on the broker only
after it commits. Waits of days or months are ``next_run_at`` values in the database, never broker delays.

A pass of up to ``claim_batch`` due steps costs a constant number of statements: the claim joined to the
candidates and jobs, the clicks ``unless_clicked`` steps need, the policy rules' reads
(:class:`~outreach.policy.bulk.PolicyReads`), then one INSERT of every outbox row and one UPDATE of every
enrollment (on PostgreSQL each carries its rows as one JSON document). The step conditions and every rule are
still decided step by step, in the order the steps fell due, exactly as for a single message.

The sweeper closes the gaps a broker cannot: outbox rows that are due but were never picked up (a flushed
broker, a process that died between commit and enqueue) are enqueued again; rows left ``sending`` past their
lease still marked claimed (a single send's group or a batch, never handed to a provider) go back to ``pending``,
and those handed off become ``uncertain``: the provider may have accepted them, so they are reconciled from
provider events instead of being sent a second time (:func:`outreach.pipeline.outbox.sweep_claimed`,
:func:`outreach.pipeline.outbox.sweep_lost`). Uncertain rows are then looked up at the provider
(:mod:`outreach.pipeline.reconcile`: found → sent, proven absent → pending and enqueued again), and those neither an
event nor a lookup settled get one ``message_uncertain`` alert each (:mod:`outreach.pipeline.message_alerts`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import orjson
from croniter import croniter
from sqlalchemy import Engine, Integer, String, and_, bindparam, or_, select, text, update
from sqlalchemy.dialects import sqlite
from sqlalchemy.orm import Session

from outreach.core.clock import travel, utcnow
from outreach.core.config import Settings
from outreach.core.db import is_sqlite, transaction
from outreach.core.models import (
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
    UTCDateTime,
)
from outreach.core.models import new_id as random_id
from outreach.core.sql import insert_ignore, insert_ignore_many, one_of
from outreach.domain.campaigns import Campaign, CampaignSet, Category, ExitCondition, Step
from outreach.pipeline import outbox
from outreach.pipeline.enrollment import audience_matches, enroll, exit_enrollments
from outreach.pipeline.message_alerts import alert_messages
from outreach.pipeline.reconcile import Reconciled, Reconciler
from outreach.pipeline.timing import step_due
from outreach.policy.base import Stage as PolicyStage
from outreach.policy.bulk import PolicyReads
from outreach.policy.config import PolicySpec
from outreach.policy.engine import Outcome, PolicyEngine

log = logging.getLogger(__name__)

MAX_PASSES = 20

#: SendGrid takes at most 1000 personalizations per request.
MAX_BATCH = 1000

OUTBOX = Base.metadata.tables["outbound_messages"]

PENDING = MessageStatus.PENDING.value
SKIPPED = MessageStatus.SKIPPED.value
COMPLETED = EnrollmentStatus.COMPLETED.value

#: (campaign, step, template, locale): the due nurture email rows one batch message carries.
BatchKey = tuple[str, int, str, str]
#: An outbox id to enqueue after the commit, with its batch key (None: enqueued on its own).
Queued = tuple[str, BatchKey | None]

#: What a pass reads of each claimed enrollment (in :class:`_Due`'s order; the last two only to join the candidate
#: and the job).
ENROLLMENT_COLUMNS = (
    Enrollment.id,
    Enrollment.campaign,
    Enrollment.stage_at_start,
    Enrollment.current_step,
    Enrollment.status,
    Enrollment.next_run_at,
    Enrollment.anchor_at,
    Enrollment.last_step_at,
    Enrollment.exit_reason,
    Enrollment.candidate_id,
    Enrollment.job_id,
)

#: What a pass reads of each due step's candidate: the step conditions, the rules' subject, the next step's time.
CANDIDATE_COLUMNS = (
    Candidate.id,
    Candidate.email,
    Candidate.phone,
    Candidate.locale,
    Candidate.timezone,
    Candidate.stage,
    Candidate.nurture_consent,
    Candidate.intent_level,
    Candidate.last_reply_at,
    Candidate.last_click_at,
)


@dataclass(slots=True)
class _Person:
    """What a pass reads of a due step's candidate: the step conditions, the rules' subject, the next step's time."""

    id: int
    email: str | None
    phone: str | None
    locale: str
    timezone: str | None
    stage: str
    nurture_consent: bool
    intent_level: str | None
    last_reply_at: datetime | None
    last_click_at: datetime | None


@dataclass(slots=True)
class _Due:
    """A claimed enrollment as a pass reads it (one row of :meth:`Scheduler._read`)."""

    enrollment_id: int
    campaign: str
    stage_at_start: str
    index: int
    status: str
    next_run_at: datetime | None
    anchor_at: datetime
    last_step_at: datetime | None
    exit_reason: str | None
    #: The job's external id (named in alerts), if the enrollment has a job.
    job: str | None
    candidate: _Person


#: The outbox columns a pass writes (the keys of its row dicts).
OUTBOX_COLUMNS = (
    "id",
    "enrollment_id",
    "candidate_id",
    "campaign",
    "step",
    "channel",
    "template",
    "category",
    "status",
    "not_before",
    "enqueued_at",
    "attempts",
    "created_at",
    "updated_at",
    "rule",
    "reason",
)
#: The enrollment columns a pass moves (the keys of its move dicts, with ``id``).
MOVE_COLUMNS = ("current_step", "status", "next_run_at", "last_step_at", "updated_at")

_ENROLLMENTS = Base.metadata.tables["enrollments"]


def _recordset(table: Any, names: Sequence[str]) -> tuple[str, str]:
    """``json_to_recordset(:rows) AS v(a integer, …)`` over ``names`` of ``table``, and the select list that turns
    its values into the columns' own (times come as ISO texts with their offset and are stored as naive UTC)."""
    definitions, values = [], []
    for name in names:
        kind = table.c[name].type
        if isinstance(kind, UTCDateTime):
            definitions.append(f"{name} timestamptz")
            values.append(f"v.{name} AT TIME ZONE 'UTC'")
        elif isinstance(kind, Integer):
            definitions.append(f"{name} integer")
            values.append(f"v.{name}")
        elif isinstance(kind, String):
            definitions.append(f"{name} text")
            values.append(f"v.{name}")
        else:  # pragma: no cover - a column type the pass does not write
            raise TypeError(f"no JSON type for {table.name}.{name}")
    return f"json_to_recordset(CAST(:rows AS json)) AS v({', '.join(definitions)})", ", ".join(values)


def _pg_insert_outbox() -> Any:
    source, values = _recordset(OUTBOX, OUTBOX_COLUMNS)
    return text(
        f"INSERT INTO outbound_messages ({', '.join(OUTBOX_COLUMNS)}) SELECT {values} FROM {source} "
        "ON CONFLICT DO NOTHING RETURNING id"
    )


def _pg_move() -> Any:
    source, values = _recordset(_ENROLLMENTS, ("id", *MOVE_COLUMNS))
    assignments = ", ".join(
        f"{name} = {value}" for name, value in zip(MOVE_COLUMNS, values.split(", ")[1:], strict=True)
    )
    return text(f"UPDATE enrollments AS e SET {assignments} FROM {source} WHERE e.id = v.id")


#: PostgreSQL: the pass's outbox rows, and its enrollment moves, each as one JSON document in one statement
#: (a few bytes of SQL and one parameter whatever the number of rows: nothing for the driver to re-parse).
_PG_INSERT_OUTBOX = _pg_insert_outbox()
_PG_MOVE = _pg_move()
_SQLITE_MOVE = (
    update(_ENROLLMENTS)
    .where(_ENROLLMENTS.c.id == bindparam("b_id"))
    .values({name: bindparam(f"b_{name}") for name in MOVE_COLUMNS})
)


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
    #: Uncertain rows a provider lookup found (now sent), and those it proved absent (pending again, in ``requeued``).
    found: int = 0
    resent: int = 0
    #: Every outbox row the pass wrote (queued, held, skipped); with ``requeued``, what :func:`outcome_of` reports on.
    written: list[str] = field(default_factory=list)

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
            "found": self.found,
            "resent": self.resent,
        }


def outcome_of(engine: Engine, outbox_ids: Sequence[str]) -> dict[str, Any]:
    """Where these outbox rows stand now, read back from the outbox: how many are in each status, and for the
    ones that did not go out, how many each rule held, skipped or stopped. ``pending`` and ``sending`` rows are
    the ones left for the workers."""
    statuses: dict[str, int] = {}
    rules: dict[str, int] = {}
    ids = list(dict.fromkeys(outbox_ids))
    with Session(engine) as session:
        for start in range(0, len(ids), 1000):
            chunk = ids[start : start + 1000]
            found = session.execute(
                select(OutboundMessage.status, OutboundMessage.rule).where(one_of(session, OutboundMessage.id, chunk))
            )
            for status, rule in found:
                statuses[status] = statuses.get(status, 0) + 1
                if rule and status not in _WENT_OUT:
                    key = f"{status}:{rule}"
                    rules[key] = rules.get(key, 0) + 1
    left = statuses.get(MessageStatus.PENDING.value, 0) + statuses.get(MessageStatus.SENDING.value, 0)
    return {
        "messages": dict(sorted(statuses.items())),
        "rules": dict(sorted(rules.items())),
        "left_for_workers": left,
    }


_WENT_OUT = frozenset(
    {MessageStatus.SENT.value, MessageStatus.DELIVERED.value, MessageStatus.PENDING.value, MessageStatus.SENDING.value}
)


def _move(
    enrollment_id: int,
    current_step: int,
    status: str,
    next_run_at: datetime | None,
    last_step_at: datetime | None,
    updated_at: datetime,
) -> dict[str, Any]:
    """Where a pass leaves one enrollment (a row of the pass's one UPDATE)."""
    return {
        "id": enrollment_id,
        "current_step": current_step,
        "status": status,
        "next_run_at": next_run_at,
        "last_step_at": last_step_at,
        "updated_at": updated_at,
    }


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
        checks: Sequence[Callable[[datetime], int]] = (),
        new_id: Callable[[], str] | None = None,
        reconciler: Reconciler | None = None,
    ) -> None:
        self.engine = engine
        self.campaigns = campaigns
        self.settings = settings
        self.enqueue = enqueue
        #: Wakes one batch worker for up to ``batch_size`` nurture email rows of one (campaign, step, template,
        #: locale); without it every row is enqueued on its own.
        self.enqueue_batch = enqueue_batch
        self.batch_size = batch_size
        #: Run every pass after the due steps, each returning the alerts it raised (the runtime adds the check for
        #: replies nobody answered): the scheduler drives them, it does not need to know what they look at.
        self.checks = tuple(checks)
        self.policy = policy or PolicyEngine(PolicySpec(), settings)
        self.sqlite = is_sqlite(engine)
        #: Where the outbox ids the passes write come from: random by default (the simulator passes a seeded
        #: source, for repeatable runs).
        self.new_id: Callable[[], str] = new_id or random_id
        #: Decide each pass from reads shared by all its steps (:class:`PolicyReads`). False asks the engine one
        #: message at a time: slower, and the reference the shared reads are tested against.
        self.shared_reads = True
        #: Asks the providers about uncertain rows before they are alerted; None: they are only alerted.
        self.reconciler = reconciler

    # -- the whole pass ---------------------------------------------------------------------------------

    def tick(self, now: datetime | None = None) -> TickResult:
        """One pass on the clock, or as if at ``now``: then the pass and every send it makes in this thread
        (inline delivery) read ``now`` as the time, through :func:`outreach.core.clock.travel`."""
        with travel(now):
            now = now or utcnow()
            result = TickResult()
            self.fire_cron(now, result)
            # Several passes, so steps that fall due together (an email and an SMS a few minutes later, after a
            # long pause) go out in one tick; bounded, so one tick never runs forever.
            for _ in range(MAX_PASSES):
                if self.run_due(now, result) == 0:
                    break
            for check in self.checks:
                result.alerts += check(now)
            self.sweep(now, result)
            return result

    def run_enrollments(self, enrollment_ids: Sequence[int], now: datetime | None = None) -> TickResult:
        """Process these enrollments right away if they are due (the fast path after an ATS event)."""
        result = TickResult()
        if enrollment_ids:
            with travel(now):
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

    def _claim(self, session: Session, now: datetime, only: Sequence[int] | None) -> list[_Due]:
        """Claim up to ``claim_batch`` due enrollments, earliest first, and read them (:meth:`_read`).

        PostgreSQL: one statement, the claim (``FOR UPDATE SKIP LOCKED`` over the ``(status, next_run_at)`` index)
        as a CTE the candidates and jobs are joined to. SQLite: one ``UPDATE … RETURNING`` takes the write lock at
        once, then the read."""
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
            ids = [row[0] for row in rows]
            if not ids:
                return []
            return self._read(session, select(*ENROLLMENT_COLUMNS).where(Enrollment.id.in_(ids)).subquery())
        claimed = (
            select(*ENROLLMENT_COLUMNS)
            .where(due)
            .order_by(Enrollment.next_run_at)
            .limit(batch)
            .with_for_update(skip_locked=True)
            .cte("claimed")
            .prefix_with("MATERIALIZED")
        )
        return self._read(session, claimed)

    def run_due(self, now: datetime, result: TickResult, only: Sequence[int] | None = None) -> int:
        """One pass: claim up to ``claim_batch`` due enrollments and turn each due step into an outbox row.

        A constant number of statements whatever the number of steps: the claim with one read of the enrollments,
        their candidates and jobs, one read of the clicks ``unless_clicked`` steps look at, the rules' reads
        (:class:`~outreach.policy.bulk.PolicyReads`), one insert of the outbox rows, one of the alerts, one update of
        the enrollments, and two statements per distinct exit reason. The rows are enqueued after the commit.
        """
        queued: list[str] = []
        batches: dict[BatchKey, list[str]] = {}
        with transaction(self.engine) as session:
            due = self._claim(session, now, only)
            if not due:
                return 0
            wanted = self._advance(session, due, now, result)
            for outbox_id, key in wanted:
                if key is None:
                    queued.append(outbox_id)
                else:
                    batches.setdefault(key, []).append(outbox_id)
        result.claimed += len(due)
        result.queued.extend(queued)
        self.enqueue(queued)
        self._enqueue_batches(batches, result)
        return len(due)

    @staticmethod
    def _read(session: Session, claimed: Any) -> list[_Due]:
        """The claimed enrollments (``claimed``: a subquery or CTE of :data:`ENROLLMENT_COLUMNS`) as plain values,
        each with its candidate (the columns a pass reads) and its job's external id, in the order they fell
        due."""
        c = claimed.c
        query = (
            select(*(c[column.key] for column in ENROLLMENT_COLUMNS[:-2]), Job.external_id, *CANDIDATE_COLUMNS)
            .select_from(claimed)
            .join(Candidate, Candidate.id == c.candidate_id)
            .outerjoin(Job, Job.id == c.job_id)
            .order_by(c.next_run_at, c.id)
        )
        rows: Any = session.connection().execute(query).all()
        return [
            _Due(enrollment, campaign, stage, index, status, next_run, anchor, last, exit_reason, job, _Person(*person))
            for enrollment, campaign, stage, index, status, next_run, anchor, last, exit_reason, job, *person in rows
        ]

    def _advance(self, session: Session, due: Sequence[_Due], now: datetime, result: TickResult) -> list[Queued]:
        """Decide every claimed step, write the pass's rows and move the enrollments on; returns the outbox ids to
        enqueue once the transaction commits (with their batch key), in the order the steps fell due."""
        exits: dict[str, list[int]] = {}
        moves: list[dict[str, Any]] = []
        steps: list[tuple[_Due, Campaign, Step]] = []
        for item in due:
            campaign = self.campaigns.get(item.campaign)
            if campaign is None or not campaign.enabled:
                reason: str | None = "campaign removed or disabled"
            else:
                reason = self._exit_reason(campaign, item.stage_at_start, item.anchor_at, item.candidate)
            if reason:
                exits.setdefault(reason, []).append(item.enrollment_id)
                result.exited += 1
                continue
            assert campaign is not None
            if item.index >= len(campaign.steps):
                moves.append(_move(item.enrollment_id, item.index, COMPLETED, None, item.last_step_at, utcnow()))
                result.completed += 1
                continue
            steps.append((item, campaign, campaign.steps[item.index]))

        clicks = self._clicks(session, [(item, step) for item, _, step in steps if step.unless_clicked])
        skips = [
            self._skip_reason(
                step, item.candidate, item.last_step_at or item.anchor_at, clicks.get(item.enrollment_id, ())
            )
            for item, _, step in steps
        ]
        # What the rules read, for every step they decide, at once (the rules themselves run per step; the
        # engine's decision hook sees each decision, which is how the simulator records deferrals).
        reads: PolicyReads | None = None
        checked = [item.candidate for (item, _, _), skip in zip(steps, skips, strict=True) if skip is None]
        if checked and self.shared_reads:
            channels = {step.channel.value for (_, _, step), skip in zip(steps, skips, strict=True) if not skip}
            reads = PolicyReads.load(session, self.policy, checked, channels, now)

        rows: list[dict[str, Any]] = []
        alerts: list[dict[str, Any]] = []
        wanted: list[Queued] = []
        for (item, campaign, step), skip in zip(steps, skips, strict=True):
            candidate = item.candidate
            index = item.index
            channel, category = step.channel.value, campaign.category.value
            outbox_id = self.new_id()
            status = PENDING
            rule: str | None = None
            reason = None
            # Ready to go at the pass's own instant, so a later pass (or a worker) finds it due.
            not_before = now
            enqueued_at: datetime | None = now
            if skip:
                status = SKIPPED
                rule, reason = skip
                result.skipped += 1
            else:
                subject = self.policy.subject(
                    candidate,
                    channel=channel,
                    category=category,
                    campaign=campaign.name,
                    now=now,
                    stage=PolicyStage.SCHEDULE,
                    message_id=outbox_id,
                )
                if reads is not None:
                    verdict = Outcome(reads.evaluate(session, subject, candidate, (item.status, item.exit_reason)))
                else:
                    verdict = self.policy.evaluate(session, subject, item.enrollment_id)
                decision = verdict.decision
                if decision.allowed:
                    wanted.append((outbox_id, self._batch_key(campaign, index, step, candidate.locale)))
                else:
                    status = verdict.status.value
                    rule, reason = decision.rule, decision.reason
                    if decision.until is not None:
                        not_before = max(decision.until, now)
                        enqueued_at = None
                    result.held += 1
            rows.append(
                {
                    "id": outbox_id,
                    "enrollment_id": item.enrollment_id,
                    "candidate_id": candidate.id,
                    "campaign": campaign.name,
                    "step": index,
                    "channel": channel,
                    "template": step.template,
                    "category": category,
                    "status": status,
                    "not_before": not_before,
                    "enqueued_at": enqueued_at,
                    "attempts": 0,
                    "created_at": now,
                    "updated_at": now,
                    "rule": rule,
                    "reason": reason,
                }
            )
            if step.alert and not skip:
                message = f"{campaign.name} step {index + 1}: {step.alert.replace('_', ' ')}"
                if item.job is not None:
                    message += f" (job {item.job})"
                alerts.append(
                    {
                        "kind": step.alert,
                        "candidate_id": candidate.id,
                        "enrollment_id": item.enrollment_id,
                        "campaign": campaign.name,
                        "message": message,
                        "created_at": now,
                    }
                )
            at = item.next_run_at or now
            if index + 1 < len(campaign.steps):
                following = step_due(
                    campaign.steps[index + 1], at, candidate, self.settings.company_timezone, self.policy.calendar
                )
                moves.append(_move(item.enrollment_id, index + 1, item.status, following, at, now))
            else:
                moves.append(_move(item.enrollment_id, index + 1, COMPLETED, None, at, now))
                result.completed += 1

        for reason_text, exited in exits.items():
            exit_enrollments(session, exited, reason_text)
        written = self._insert_outbox(session, rows)
        result.written.extend(row["id"] for row in rows if row["id"] in written)
        if alerts:
            result.alerts += len(insert_ignore_many(session, Alert, alerts, Alert.id))
        self._move_all(session, moves)
        # A step whose row already existed (another scheduler got there first) is not enqueued again.
        return [(outbox_id, key) for outbox_id, key in wanted if outbox_id in written]

    def _insert_outbox(self, session: Session, rows: list[dict[str, Any]]) -> set[str]:
        """The pass's outbox rows in one INSERT … ON CONFLICT DO NOTHING; returns the ids written. PostgreSQL: one
        statement over one JSON document; elsewhere an executemany (sent as a few multi-row statements)."""
        if not rows:
            return set()
        if self.sqlite:
            statement = sqlite.insert(OUTBOX).on_conflict_do_nothing().returning(OUTBOX.c.id)
            return {row[0] for row in session.connection().execute(statement, rows)}
        found = session.connection().execute(_PG_INSERT_OUTBOX, {"rows": orjson.dumps(rows).decode()})
        return set(found.scalars().all())

    def _move_all(self, session: Session, moves: list[dict[str, Any]]) -> None:
        """Every enrollment's next step, status and times in one UPDATE (PostgreSQL: ``UPDATE … FROM
        json_to_recordset``; elsewhere an executemany)."""
        if not moves:
            return
        if self.sqlite:
            session.connection().execute(_SQLITE_MOVE, [{f"b_{k}": v for k, v in move.items()} for move in moves])
            return
        session.connection().execute(_PG_MOVE, {"rows": orjson.dumps(moves).decode()})

    def _batch_key(self, campaign: Campaign, index: int, step: Step, locale: str) -> BatchKey | None:
        """(campaign, step, template, locale) when the step is a nurture email that may go out in a SendGrid batch
        (:mod:`outreach.pipeline.batch`); None for everything sent one by one."""
        if self.enqueue_batch is None or campaign.category is not Category.NURTURE or step.channel is not Channel.EMAIL:
            return None
        return campaign.name, index, step.template, locale

    def _enqueue_batches(self, batches: dict[BatchKey, list[str]], result: TickResult) -> None:
        if not batches:
            return
        assert self.enqueue_batch is not None
        size = max(1, min(self.batch_size, MAX_BATCH))
        for ids in batches.values():
            result.queued.extend(ids)
            for start in range(0, len(ids), size):
                self.enqueue_batch(ids[start : start + size])

    @staticmethod
    def _clicks(session: Session, due: Sequence[tuple[_Due, Step]]) -> dict[int, list[tuple[int, str]]]:
        """For steps with ``unless_clicked``: the clicks on named links in messages of their own enrollment, as
        (candidate id, link name) per enrollment, earliest first. Two statements for the pass, each on an index
        whatever the tables' sizes: the candidates' clicks on those names (``(candidate_id, name, clicked_at)``),
        then which of the clicked links are in these enrollments' messages (by primary keys)."""
        names = {name for _, step in due for name in step.unless_clicked}
        if not names:
            return {}
        clicked = session.execute(
            select(LinkClick.link_id, LinkClick.candidate_id, LinkClick.name)
            .where(
                one_of(session, LinkClick.candidate_id, {item.candidate.id for item, _ in due}),
                LinkClick.name.in_(sorted(names)),
            )
            .order_by(LinkClick.clicked_at, LinkClick.id)
        ).all()
        if not clicked:
            return {}
        om = OutboundMessage
        links = session.execute(
            select(TrackedLink.id, om.enrollment_id)
            .join(om, om.id == TrackedLink.message_id)
            .where(
                one_of(session, TrackedLink.id, {link_id for link_id, _, _ in clicked}),
                one_of(session, om.enrollment_id, [item.enrollment_id for item, _ in due]),
            )
        )
        enrollment_of = {link_id: enrollment_id for link_id, enrollment_id in links}
        clicks: dict[int, list[tuple[int, str]]] = {}
        for link_id, candidate_id, name in clicked:
            enrollment_id = enrollment_of.get(link_id)
            if enrollment_id is not None and name is not None:
                clicks.setdefault(enrollment_id, []).append((candidate_id, name))
        return clicks

    @staticmethod
    def _exit_reason(campaign: Campaign, stage_at_start: str, anchor_at: datetime, candidate: _Person) -> str | None:
        if ExitCondition.STAGE_CHANGED in campaign.exit_on and candidate.stage != stage_at_start:
            return f"stage changed to {candidate.stage}"
        if (
            ExitCondition.REPLIED in campaign.exit_on
            and candidate.last_reply_at is not None
            and candidate.last_reply_at >= anchor_at
        ):
            return "replied"
        return None

    @staticmethod
    def _skip_reason(
        step: Step, candidate: _Person, since: datetime, clicks: Sequence[tuple[int, str]] = ()
    ) -> tuple[str, str] | None:
        """Why the step is skipped, as (rule, reason), or None when it goes ahead. ``clicks``: (candidate id, link
        name) of the clicks on links in this enrollment's own messages, earliest first (:meth:`_clicks`)."""
        # The intent condition reads the candidate's level now, when the step is due: a reassessment counts.
        if step.intent and (candidate.intent_level or "unassessed") not in step.intent:
            level = candidate.intent_level or "unassessed"
            return "intent", f"step is for {', '.join(step.intent)} intent; candidate is {level}"
        if step.only_if == "no_reply" and candidate.last_reply_at and candidate.last_reply_at > since:
            return f"only_if:{step.only_if}", "candidate replied since the previous step"
        if step.only_if == "no_click" and candidate.last_click_at and candidate.last_click_at > since:
            return f"only_if:{step.only_if}", "candidate clicked since the previous step"
        # Clicks on links in this enrollment's own messages, whenever they came: a candidate who booked from the
        # first email minutes after it arrived needs no reminder either.
        for candidate_id, name in clicks if step.unless_clicked else ():
            if candidate_id == candidate.id and name in step.unless_clicked:
                return f"unless_clicked:{name}", f"candidate clicked the {name} link of this campaign"
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
            # Claimed (by a group or a batch) but never handed to a provider (the worker stopped first): safe to
            # send again. Handed off and the lease ran out: it may have gone out, so uncertain, never resent.
            reclaimed = outbox.sweep_claimed(session, now)
            requeued += reclaimed
            lost_wakeups += reclaimed
            result.uncertain += outbox.sweep_lost(session, now)
        if lost_wakeups:
            # Rows that were due and enqueued long ago but never picked up: the broker lost them.
            log.warning("sweeper re-enqueued outbox rows", extra={"count": len(lost_wakeups)})
        if len(requeued) > len(lost_wakeups):
            log.info("deferred messages released", extra={"count": len(requeued) - len(lost_wakeups)})
        result.requeued.extend(requeued)
        self.enqueue(requeued)
        # Uncertain rows: the provider is asked first (found: sent; proven absent: sent again); what neither an event
        # nor a lookup settled goes to a person.
        looked = self._look_up(now)
        if looked.resent:
            result.requeued.extend(looked.resent)
            self.enqueue(looked.resent)
        result.found += len(looked.found)
        result.resent += len(looked.resent)
        result.alerts += alert_messages(
            self.engine,
            now,
            timedelta(seconds=self.settings.uncertain_alert_after),
            self.settings.claim_batch,
            settling=looked.settling,
            cannot_tell=looked.cannot_tell,
        )

    def _look_up(self, now: datetime) -> Reconciled:
        """The reconciler's pass; when it breaks (the database, a bug), nothing is left to it and the alerts go on."""
        if self.reconciler is None:
            return Reconciled()
        try:
            return self.reconciler.run(now)
        except Exception:
            log.exception("looking up uncertain messages failed; they are alerted as without lookups")
            return Reconciled()


def run_forever(scheduler: Scheduler, interval: float, stop: threading.Event | None = None) -> None:
    """Tick every ``interval`` seconds until ``stop`` is set; a failing tick is logged and retried."""
    stop = stop or threading.Event()
    while not stop.is_set():
        try:
            scheduler.tick()
        except Exception:
            log.exception("scheduler tick failed; retrying next interval")
        stop.wait(interval)
