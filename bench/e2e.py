"""The end-to-end side: pending outbox rows → Dramatiq workers → rendered templates → SendGrid SDK → sandbox.

The ids reach the workers the way production enqueues them: a scheduler pass's ids (up to 1,000) cut into group
messages of the ``deliver_messages`` actor by :func:`outreach.service.broker.groups` (up to ``GROUP_SIZE`` ids each),
the messages encoded as :func:`outreach.service.broker.enqueue_deliveries` encodes them. "msg/s" is outbox rows (emails)
sent per second; the bare baseline is Dramatiq messages per second.

Set-up (not timed): a fresh PostgreSQL database, migrated; one job; two exemplar candidates (en, zh-CN) that go
through the real path (candidate upsert, ``applied`` event, one scheduler tick at the moment the ``jd_intro``
email step is due, with the enqueue replaced by a collector); then every other candidate, event, enrollment and
outbox row is a bulk copy of an exemplar's rows with fresh ids, so all of them are real ``pending`` rows of
``jd_intro`` step 0 (email) and the workers render the real template for each. The sandbox runs as its own
process so it does not share the driver's (or a worker's) GIL.

Timed: from releasing the outbox ids to the workers until every row is ``sent``. Then it checks that the sandbox
received each outbox id exactly once and that every row has its own provider message id.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import Table, func, insert, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from bench.bare import WORKER_SETTINGS, run_bare
from bench.harness import (
    BenchmarkError,
    Config,
    Figure,
    Measurement,
    Options,
    RedisQueue,
    at_least,
    cpu_per_message,
    dramatiq_workers,
    fresh_queue,
    get_json,
    progress,
    scratch_database,
    wait_drained,
    wait_until,
)
from bench.stack import (
    alive,
    count_duplicated,
    failing_fast,
    launch_sandbox,
    sandbox_received,
    service_settings,
    wait_for_sandbox,
    worker_environment,
)
from outreach.core.clock import utcnow
from outreach.core.config import Settings
from outreach.core.models import Base, MessageStatus, OutboundMessage, new_id
from outreach.domain.candidates import CandidateIn, JobIn, upsert_candidate, upsert_job
from outreach.pipeline.enrollment import EventIn, record_event
from outreach.service.broker import GROUP_ACTOR, groups
from outreach.service.runtime import Runtime

#: The database is polled for the count of sent rows this often (the brief cost of a count on the outbox).
POLL_INTERVAL = 0.05

JOB: dict[str, Any] = {
    "external_id": "bench-job",
    "title": "Backend Engineer",
    "department": "Platform",
    "location": "Shanghai",
    "description": "Build and run the services our recruiters rely on every day: APIs, queues and databases.",
    "salary_min": 30000,
    "salary_max": 45000,
    "booking_url": "https://book.example.com/backend",
    "tags": ["stack:python"],
}

#: Candidates alternate between these two, so both locales' templates are rendered.
EXEMPLARS: tuple[dict[str, Any], ...] = (
    {"name": "Alex Morgan", "locale": "en", "timezone": "Europe/Berlin"},
    {"name": "张伟", "locale": "zh-CN", "timezone": "Asia/Shanghai"},
)


def _external_id(index: int) -> str:
    return f"bench-{index:07d}"


def _email(index: int) -> str:
    return f"bench-{index:07d}@example.org"


# -- database ----------------------------------------------------------------------------------------------


def _table(name: str) -> Table:
    return Base.metadata.tables[name]


def _rows(session: Session, table: Table, column: str, values: Sequence[Any]) -> dict[Any, dict[str, Any]]:
    result = session.execute(select(table).where(table.c[column].in_(list(values))))
    return {row[column]: dict(row) for row in result.mappings()}


def _insert(session: Session, table: Table, rows: list[dict[str, Any]], *, returning: bool) -> list[Any]:
    if not rows:
        return []
    if not returning:
        session.execute(insert(table), rows)
        return []
    statement = insert(table).returning(table.c.id, sort_by_parameter_order=True)
    return list(session.execute(statement, rows).scalars())


def seed(settings: Settings, count: int) -> list[str]:
    """``count`` pending ``jd_intro`` step-0 email rows; returns their outbox ids, one per candidate, in order."""
    if count < len(EXEMPLARS):
        raise BenchmarkError(f"need at least {len(EXEMPLARS)} messages")
    runtime = Runtime(settings)
    collected: list[str] = []
    runtime.enqueue_override = collected.extend
    engine: Engine = runtime.engine

    # The real path, for the exemplars.
    applied_at = utcnow() - timedelta(seconds=1)
    event = EventIn.model_validate({"type": "applied", "job_id": JOB["external_id"], "occurred_at": applied_at})
    context = {"settings": settings}
    candidate_ids: list[int] = []
    with Session(engine, expire_on_commit=False) as session, session.begin():
        upsert_job(session, JobIn.model_validate(JOB))
        for index, fields in enumerate(EXEMPLARS):
            data = {"external_id": _external_id(index), "email": _email(index), "phone": "+8613800138000", **fields}
            candidate = upsert_candidate(session, CandidateIn.model_validate(data, context=context), settings)
            record_event(session, runtime.campaigns, candidate.external_id, event, company_tz=settings.company_timezone)
            candidate_ids.append(candidate.id)
    tick = runtime.scheduler.tick(utcnow())
    if len(collected) != len(EXEMPLARS):
        raise BenchmarkError(f"the scheduler queued {len(collected)} message(s) for the exemplars: {tick.summary()}")

    candidates, events, enrollments, outbox = (
        _table("candidates"),
        _table("candidate_events"),
        _table("enrollments"),
        _table("outbound_messages"),
    )
    with Session(engine, expire_on_commit=False) as session, session.begin():
        messages = _rows(session, outbox, "candidate_id", candidate_ids)
        if sorted(messages) != sorted(candidate_ids):
            raise BenchmarkError("the exemplars did not get one outbox row each")
        for row in messages.values():
            shape = (row["campaign"], row["step"], row["channel"], row["template"], row["status"])
            if shape != ("jd_intro", 0, "email", "jd_intro", MessageStatus.PENDING.value):
                raise BenchmarkError(f"unexpected exemplar outbox row {shape}; the jd_intro campaign changed?")
        people = _rows(session, candidates, "id", candidate_ids)
        happened = _rows(session, events, "candidate_id", candidate_ids)
        enrolled = _rows(session, enrollments, "candidate_id", candidate_ids)
        ids = [str(messages[cid]["id"]) for cid in candidate_ids]

        chunk = 5000
        for start in range(len(EXEMPLARS), count, chunk):
            indexes = range(start, min(count, start + chunk))
            models = [candidate_ids[i % len(EXEMPLARS)] for i in indexes]
            new_candidates = _insert(
                session,
                candidates,
                [
                    _copy(people[model], external_id=_external_id(i), email=_email(i))
                    for i, model in zip(indexes, models, strict=True)
                ],
                returning=True,
            )
            new_events = _insert(
                session,
                events,
                [_copy(happened[m], candidate_id=c) for m, c in zip(models, new_candidates, strict=True)],
                returning=True,
            )
            new_enrollments = _insert(
                session,
                enrollments,
                [
                    _copy(enrolled[m], candidate_id=c, event_id=e)
                    for m, c, e in zip(models, new_candidates, new_events, strict=True)
                ],
                returning=True,
            )
            rows = [
                _copy(messages[m], id=new_id(), candidate_id=c, enrollment_id=n)
                for m, c, n in zip(models, new_candidates, new_enrollments, strict=True)
            ]
            _insert(session, outbox, rows, returning=False)
            ids.extend(str(row["id"]) for row in rows)
    return ids


def _copy(row: dict[str, Any], **changes: Any) -> dict[str, Any]:
    copy = {key: value for key, value in row.items() if key != "id"}
    copy.update(changes)
    return copy


_UNFINISHED = (MessageStatus.PENDING.value, MessageStatus.SENDING.value)
_FINISHED_OK = (*_UNFINISHED, MessageStatus.SENT.value)


def unfinished(engine: Engine) -> int:
    """Rows still pending or sending. An index scan that shrinks as the run goes: cheap to ask 20 times a second
    (a GROUP BY over the whole outbox would cost a small machine a noticeable share of a core)."""
    with engine.connect() as connection:
        return int(connection.execute(select(func.count()).where(OutboundMessage.status.in_(_UNFINISHED))).scalar_one())


def _failures(engine: Engine) -> str:
    with engine.connect() as connection:
        rows = connection.execute(
            select(OutboundMessage.status, OutboundMessage.error_code, OutboundMessage.error_detail, func.count())
            .where(OutboundMessage.status.not_in(_FINISHED_OK))
            .group_by(OutboundMessage.status, OutboundMessage.error_code, OutboundMessage.error_detail)
            .limit(5)
        )
        return "; ".join(f"{n}× {status} {code or ''} {detail or ''}".strip() for status, code, detail, n in rows)


# -- the run -----------------------------------------------------------------------------------------------


def run(options: Options) -> list[Figure]:
    """Both sides with ``e2e.messages`` messages each (3,000; smoke 200): the ratio e2e / bare is the figure."""
    messages = options.size("e2e.messages", 3_000, 200)
    warmup = options.size(
        "e2e.warmup", options.processes * options.threads * 4, options.processes * options.threads * 2
    )
    config = Config.of(options, messages, warmup)
    progress(f"e2e: bare Dramatiq no-op, {messages} messages")
    bare = run_bare(config)
    progress(f"e2e: end to end, {messages} messages")
    e2e = run_e2e(config)
    ratio = e2e.rate / bare.rate if bare.rate else None
    checks = {"lost": (e2e.lost or 0) + (bare.lost or 0), "duplicated": e2e.duplicated}
    bare_cpu = bare.details.get("worker_cpu_ms_per_message")
    e2e_cpu = e2e.details.get("worker_cpu_ms_per_message")
    return [
        Figure(
            "e2e.single_sends",
            e2e.rate,
            "msg/s",
            baseline_name="bare Dramatiq no-op",
            baseline_value=bare.rate,
            ratio=ratio,
            goal="≥ 0.5× bare",
            met=at_least(ratio, 0.5, options),
            checks=checks,
            details={"bare": bare.to_dict(), "e2e": e2e.to_dict(), "worker_settings": dict(WORKER_SETTINGS)},
        ),
        Figure(
            "e2e.worker_cpu",
            e2e_cpu,
            "ms/msg",
            baseline_name="bare Dramatiq no-op",
            baseline_value=bare_cpu,
            goal="",
            details={"sandbox_cpu_ms_per_message": e2e.details.get("sandbox_cpu_ms_per_message")},
        ),
    ]


def run_e2e(config: Config) -> Measurement:
    with contextlib.ExitStack() as stack:
        queue = stack.enter_context(fresh_queue(config.redis_url, config.queue_name("e2e")))
        measurement = _measure(config, queue, stack)
    return measurement


def _measure(config: Config, queue: RedisQueue, stack: contextlib.ExitStack) -> Measurement:
    total = config.warmup + config.messages
    logs = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="outreach-bench-")))
    database_url = stack.enter_context(scratch_database(config.postgres_url))

    # Started now and waited for after the seeding, so its start-up overlaps the set-up.
    sandbox, sandbox_url = launch_sandbox(stack, logs)

    settings = service_settings(stack, database_url)
    progress(f"creating {total} pending jd_intro rows in a scratch database")
    seeded = time.perf_counter()
    ids = seed(settings, total)
    seed_seconds = time.perf_counter() - seeded
    engine = Runtime(settings).engine

    wait_for_sandbox(sandbox, sandbox_url)

    env = worker_environment(database_url, config.redis_url, queue.name, sandbox_url)
    warmup = queue.stage(GROUP_ACTOR, ((group,) for group in groups(ids[: config.warmup])))
    measured = queue.stage(GROUP_ACTOR, ((group,) for group in staged_groups(ids[config.warmup :])))
    workers = stack.enter_context(dramatiq_workers("e2e-workers", "workers.main", queue.name, config, env, logs))

    check = alive(workers, sandbox)

    def remaining(target: int) -> Callable[[], bool]:
        """Done when only ``target`` rows are left unfinished; every ~2 s also fail fast on rows that failed."""
        return failing_fast(lambda: unfinished(engine) <= target, lambda: _failures(engine), "outbox rows")

    queue.release(warmup)
    wait_until(
        remaining(config.messages), timeout=120, interval=POLL_INTERVAL, what="the workers to start", check=check
    )

    progress("workers warmed up; timing")
    cpu_before = workers.cpu_seconds(), sandbox.cpu_seconds()
    started = time.perf_counter()
    queue.release(measured)
    finished = wait_until(
        remaining(0), timeout=config.timeout, interval=POLL_INTERVAL, what=f"{total} rows to be sent", check=check
    )
    worker_cpu = cpu_per_message(cpu_before[0], workers.cpu_seconds(), config.messages)
    sandbox_cpu = cpu_per_message(cpu_before[1], sandbox.cpu_seconds(), config.messages)
    if failures := _failures(engine):
        raise BenchmarkError(f"outbox rows ended other than sent: {failures}")

    # Every message acked (nothing left that could run twice), then compare with what the provider received.
    wait_drained(queue, timeout=60, interval=POLL_INTERVAL, check=check)
    progress(f"{config.messages} sent in {finished - started:.1f} s; checking the sandbox received each exactly once")
    verified = verify(engine, sandbox_url, ids)
    check()
    lost, duplicated = int(verified.pop("lost")), int(verified.pop("duplicated"))
    details = {
        "warmup": config.warmup,
        "setup_seconds": round(seed_seconds, 2),
        "worker_cpu_ms_per_message": worker_cpu,
        "sandbox_cpu_ms_per_message": sandbox_cpu,
        **verified,
    }
    return Measurement("e2e", config.messages, finished - started, lost=lost, duplicated=duplicated, details=details)


#: Ids per scheduler pass (``OUTREACH_CLAIM_BATCH``'s default): each pass's ids are grouped on their own.
PASS_SIZE = 1000


def staged_groups(ids: Sequence[str]) -> list[list[str]]:
    """The group messages the scheduler's passes over these rows would enqueue, in order."""
    return [group for start in range(0, len(ids), PASS_SIZE) for group in groups(ids[start : start + PASS_SIZE])]


def verify(engine: Engine, sandbox_url: str, ids: Sequence[str]) -> dict[str, Any]:
    """Compare what the database says was sent with what the sandbox received, message by message."""
    expected = set(ids)
    stats = get_json(f"{sandbox_url}/_sandbox/stats")
    received = sandbox_received(sandbox_url)
    lost = len(expected - received.keys())
    duplicated = count_duplicated(received, expected)
    with engine.connect() as connection:
        sent, provider_ids, retried = connection.execute(
            select(
                func.count().filter(OutboundMessage.status == MessageStatus.SENT.value),
                func.count(OutboundMessage.provider_message_id.distinct()),
                func.count().filter(OutboundMessage.attempts > 1),
            )
        ).one()
    lost = max(lost, len(ids) - int(sent))
    if int(provider_ids) != len(ids):
        duplicated = max(duplicated, len(ids) - int(provider_ids))
    return {
        "lost": lost,
        "duplicated": duplicated,
        "sandbox_messages": int(stats["messages"]),
        "sandbox_requests": int(stats["sendgrid"]["requests"]),
        "sandbox_rejected": int(stats["sendgrid"]["rejected"]),
        "retried": int(retried),
    }
