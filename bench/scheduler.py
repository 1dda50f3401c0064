"""The scheduler at scale: one pass claiming 1,000 due steps among 10,000 and 1,000,000 enrollments.

Set-up (not timed): a scratch PostgreSQL database per size, filled with ``generate_series`` (candidates and
``final_thanks`` enrollments, all active; a few thousand due, the rest due in the weeks ahead) and analysed.

Timed, on each size: one scheduler pass (:meth:`outreach.pipeline.scheduler.Scheduler.run_due`): claim 1,000 due
enrollments (``FOR UPDATE SKIP LOCKED`` over the ``(status, next_run_at)`` index) and read them with their
candidates, check every policy rule, write their outbox rows and move the enrollments on, commit, and enqueue the
ids on Redis, pipelined. The median of a few passes is the figure (the JSON details also give this process's CPU
per pass); the goal is at most 100 ms at 1M and at most twice the 10k figure (the cost grows with the due work, not
with the table). The statements of the first (untimed) pass are recorded and EXPLAINed afterwards with their own
parameters: the claim must use the index, and at 1M no statement may scan the enrollments table.

Also timed: waking workers for 10,000 outbox ids on the Redis queue as the scheduler does
(:func:`outreach.service.broker.enqueue_deliveries`: the ids in groups of up to 25 per message, all messages in one
pipelined round trip) against Dramatiq's own ``actor.send()`` loop with a message per id (one round trip each), on
the same broker in the same run; the details also give the send() loop over the same group messages (what
pipelining alone gains).
"""

from __future__ import annotations

import contextlib
import statistics
import time
import uuid
from collections.abc import Callable
from typing import Any

import dramatiq
from dramatiq.brokers.redis import RedisBroker
from sqlalchemy import Engine, create_engine, event, func, select, text

from bench.harness import (
    ROOT,
    BenchmarkError,
    Figure,
    Options,
    at_least,
    at_most,
    progress,
    scratch_database,
)
from outreach.core.clock import utcnow
from outreach.core.config import Settings
from outreach.core.models import MessageStatus, OutboundMessage
from outreach.pipeline.scheduler import Scheduler, TickResult
from outreach.policy.config import load_policies
from outreach.policy.engine import PolicyEngine
from outreach.service.broker import DELIVER_ACTOR, GROUP_ACTOR, enqueue_deliveries, groups
from outreach.service.validation import validate_all

CAMPAIGN = "final_thanks"  # one transactional email step, no exit conditions

#: What each pass figure carries besides its value (the JSON results).
DETAILS = ("timings_ms", "scheduler_cpu_ms", "statements_per_pass", "plan", "pass_plans")


#: Candidates behind the enrollments (a large table of enrollments is what the scheduler must stay flat in; each
#: candidate has many, under distinct keys, which keeps the set-up of a million fast).
CANDIDATES = 10_000


def seed(engine: Engine, enrollments: int, due: int) -> None:
    """``enrollments`` active enrollments; the first ``due`` (one per candidate) are due a minute ago."""
    candidates = min(enrollments, CANDIDATES)
    if due > candidates:
        raise BenchmarkError(f"{due} due steps need at least as many candidates ({candidates})")
    # The service's clock, not the database's: a run under a moved clock (faketime) seeds rows due at its time.
    now = "CAST(:now AS timestamp)"
    at = utcnow().replace(tzinfo=None)
    with engine.begin() as connection:
        # A bulk load: foreign-key triggers off for this transaction, secondary indexes built once afterwards.
        connection.execute(text("SET LOCAL session_replication_role = replica"))
        indexes = connection.execute(
            text(
                "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'enrollments' "
                "AND indexname NOT IN (SELECT conname FROM pg_constraint WHERE conrelid = 'enrollments'::regclass)"
            )
        ).all()
        constraints = connection.execute(
            text(
                "SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint "
                "WHERE conrelid = 'enrollments'::regclass AND contype = 'u'"
            )
        ).all()
        for name, _ in indexes:
            connection.execute(text(f'DROP INDEX "{name}"'))
        for name, _ in constraints:
            connection.execute(text(f'ALTER TABLE enrollments DROP CONSTRAINT "{name}"'))
        connection.execute(
            text(
                f"""
                INSERT INTO candidates (external_id, name, email, locale, timezone, tags, stage, nurture_consent,
                                        data, created_at, updated_at)
                SELECT 'bench-' || g, 'Candidate ' || g, 'bench-' || g || '@example.org', 'en', 'Asia/Shanghai',
                       '[]'::json, 'rejected', false, '{{}}'::json, {now}, {now}
                FROM generate_series(1, :n) AS g
                """
            ),
            {"n": candidates, "now": at},
        )
        connection.execute(
            text(
                f"""
                INSERT INTO enrollments (candidate_id, campaign, dedupe_key, stage_at_start, current_step, status,
                                         next_run_at, anchor_at, context, created_at, updated_at)
                SELECT (g - 1) % :candidates + 1, :campaign, 'bench-' || g, 'rejected', 0, 'active',
                       CASE WHEN g <= :due THEN {now} - interval '1 minute' + g * interval '1 millisecond'
                            ELSE {now} + interval '1 day' + g * interval '1 second' END,
                       {now}, '{{}}'::json, {now}, {now}
                FROM generate_series(1, :n) AS g
                """
            ),
            {"campaign": CAMPAIGN, "due": due, "n": enrollments, "candidates": candidates, "now": at},
        )
        for _, definition in indexes:
            connection.execute(text(definition))
        for name, definition in constraints:
            connection.execute(text(f'ALTER TABLE enrollments ADD CONSTRAINT "{name}" {definition}'))
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        connection.execute(text("VACUUM ANALYZE candidates"))
        connection.execute(text("VACUUM ANALYZE enrollments"))


def capture(engine: Engine) -> tuple[list[tuple[str, Any]], Any]:
    """Start recording the statements ``engine`` runs: (the list they go to, the listener to remove)."""
    seen: list[tuple[str, Any]] = []

    def record(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, executemany: bool) -> None:
        if not executemany:
            seen.append((statement, parameters))

    event.listen(engine, "before_cursor_execute", record)
    return seen, record


def pass_plans(engine: Engine, statements: list[tuple[str, Any]]) -> list[str]:
    """EXPLAIN (without running it) of every statement of a recorded pass but the commit, with its own
    parameters: what PostgreSQL would do with each at this table size."""
    plans = []
    with engine.connect() as connection:
        for statement, parameters in statements:
            if not statement.lstrip().upper().startswith(("SELECT", "INSERT", "UPDATE", "DELETE", "WITH")):
                continue
            rows = connection.exec_driver_sql(f"EXPLAIN {statement}", parameters)
            plans.append("\n".join(row[0] for row in rows))
        connection.rollback()
    return plans


def measure_size(
    options: Options, size: int, batch: int, passes: int, broker: RedisBroker, queue: str
) -> dict[str, Any]:
    with scratch_database(options.postgres_url) as url:
        engine = create_engine(url)
        try:
            began = time.perf_counter()
            seed(engine, size, batch * (passes + 1))
            progress(f"scheduler: {size:,} enrollments loaded in {time.perf_counter() - began:.1f} s")
            settings = Settings(
                database_url=url, campaigns_dir=ROOT / "campaigns", templates_dir=ROOT / "templates"
            ).with_overrides(claim_batch=batch, queue_name=queue)
            campaigns, problems = validate_all(settings.campaigns_dir, settings.templates_dir)
            if campaigns is None or problems:
                raise BenchmarkError(f"campaigns do not validate: {problems[:3]}")
            policy = PolicyEngine(load_policies(settings.campaigns_dir), settings)
            enqueued: list[int] = []

            def enqueue(ids: Any) -> None:
                enqueue_deliveries(ids, broker=broker, queue_name=queue)
                enqueued.append(len(ids))

            scheduler = Scheduler(engine, campaigns, settings, enqueue, policy=policy)
            timings: list[float] = []
            cpu_timings: list[float] = []  # this process's CPU (Python side), less exposed to a busy machine
            # The first pass warms caches and connections, untimed; its statements are recorded, for their plans.
            statements, listener = capture(engine)
            for index in range(passes + 1):
                result = TickResult()
                started, cpu_started = time.perf_counter(), time.process_time()
                claimed = scheduler.run_due(utcnow(), result)
                elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu_started
                if not index:
                    event.remove(engine, "before_cursor_execute", listener)
                if claimed != batch or len(result.queued) != batch:
                    raise BenchmarkError(
                        f"a pass claimed {claimed} and queued {len(result.queued)} of {batch}: {result.summary()}"
                    )
                if index:
                    timings.append(elapsed)
                    cpu_timings.append(cpu)
            plans = pass_plans(engine, statements)
            claim = plans[0] if plans else ""
            if "Seq Scan on enrollments" in claim or "ix_enrollments_due" not in claim:
                raise BenchmarkError(f"the claim does not use the due index:\n{claim}")
            # At 10,000 rows PostgreSQL may rightly prefer reading the table to a thousand index probes.
            scans = [p for p in plans if "Seq Scan on enrollments" in p]
            if scans and size > CANDIDATES:
                raise BenchmarkError(f"a statement of the pass scans the enrollments table:\n{scans[0]}")
            with engine.connect() as connection:
                written = connection.execute(
                    select(func.count()).where(OutboundMessage.status == MessageStatus.PENDING.value)
                ).scalar_one()
            expected = batch * (passes + 1)
            return {
                "median_ms": statistics.median(timings) * 1000,
                "timings_ms": [round(t * 1000, 1) for t in timings],
                "scheduler_cpu_ms": round(statistics.median(cpu_timings) * 1000, 1),
                "lost": max(0, expected - int(written)) + max(0, expected - sum(enqueued)),
                "duplicated": max(0, int(written) - expected) + max(0, sum(enqueued) - expected),
                "plan": claim.splitlines()[:12],
                "statements_per_pass": len(statements),
                "pass_plans": [p.splitlines() for p in plans],
            }
        finally:
            engine.dispose()


def enqueue_rates(broker: RedisBroker, queue: str, count: int) -> tuple[float, float, float]:
    """Ids per second woken on the same Redis for ``count`` outbox ids three ways: ours
    (:func:`outreach.service.broker.enqueue_deliveries`: groups of up to 25 ids per message, every message in one
    pipelined round trip), Dramatiq's own ``actor.send()`` loop with one message per id, and the same loop over our
    groups."""
    broker.declare_queue(queue)
    single: dramatiq.Actor[[str], None] = dramatiq.Actor(
        lambda outbox_id: None, broker=broker, actor_name=DELIVER_ACTOR, queue_name=queue, priority=0, options={}
    )
    grouped: dramatiq.Actor[[list[str]], None] = dramatiq.Actor(
        lambda group: None, broker=broker, actor_name=GROUP_ACTOR, queue_name=queue, priority=0, options={}
    )
    ids = [uuid.uuid4().hex for _ in range(count)]
    messages = groups(ids)

    def timed(send: Callable[[], None]) -> float:
        started = time.perf_counter()
        send()
        elapsed = time.perf_counter() - started
        broker.flush(queue)
        return count / elapsed

    def each_id() -> None:
        for outbox_id in ids:
            single.send(outbox_id)

    def each_group() -> None:
        for group in messages:
            grouped.send(group)

    per_id = timed(each_id)
    per_group = timed(each_group)
    started = time.perf_counter()
    enqueue_deliveries(ids, broker=broker, queue_name=queue)
    ours = count / (time.perf_counter() - started)
    waiting = int(broker.client.llen(f"{broker.namespace}:{queue}"))
    broker.flush(queue)
    if waiting != len(messages):
        raise BenchmarkError(f"pipelined enqueue put {waiting} of {len(messages)} messages on the queue")
    return ours, per_id, per_group


def run(options: Options) -> list[Figure]:
    batch = options.size("scheduler.claim", 1000, 100)
    passes = options.size("scheduler.passes", 5, 2)
    sizes = [options.size("scheduler.small", 10_000, 10_000)]
    if not options.smoke:
        sizes.append(options.size("scheduler.large", 1_000_000, 1_000_000))
    queue = options.queue_name("scheduler")
    broker = RedisBroker(url=options.redis_url)  # type: ignore[no-untyped-call]
    figures: list[Figure] = []
    try:
        results = {}
        for size in sizes:
            progress(f"scheduler: {size:,} enrollments, passes claiming {batch} due steps")
            results[size] = measure_size(options, size, batch, passes, broker, queue)
            broker.flush(queue)
        small = results[sizes[0]]
        figures.append(
            Figure(
                name=f"scheduler pass, {batch:,} due of {sizes[0]:,} enrollments",
                value=small["median_ms"],
                unit="ms",
                goal="(baseline of the next line)",
                checks={"lost": small["lost"], "duplicated": small["duplicated"]},
                details={k: small[k] for k in DETAILS},
            )
        )
        if len(sizes) > 1:
            large = results[sizes[1]]
            ratio = large["median_ms"] / small["median_ms"] if small["median_ms"] else None
            both = at_most(large["median_ms"], 100.0, options)
            flat = at_most(ratio, 2.0, options)
            figures.append(
                Figure(
                    name=f"scheduler pass, {batch:,} due of {sizes[1]:,} enrollments",
                    value=large["median_ms"],
                    unit="ms",
                    baseline_name=f"same pass at {sizes[0]:,}",
                    baseline_value=small["median_ms"],
                    ratio=ratio,
                    goal="≤ 100 ms and ≤ 2× the 10k figure",
                    met=None if both is None or flat is None else both and flat,
                    checks={"lost": large["lost"], "duplicated": large["duplicated"]},
                    details={k: large[k] for k in DETAILS},
                )
            )
        count = options.size("scheduler.enqueue", 10_000, 1_000)
        pipelined, loop, same_messages = enqueue_rates(broker, f"{queue}-enqueue", count)
        figures.append(
            Figure(
                name=f"enqueue {count:,} outbox ids on Redis, pipelined in groups",
                value=pipelined,
                unit="ids/s",
                baseline_name="actor.send() loop, a message per id",
                baseline_value=loop,
                goal="≥ 5× the send() loop",
                met=at_least(pipelined / loop if loop else None, 5.0, options),
                # Pipelining alone: Dramatiq's send() loop over the same group messages.
                details={"send_loop_same_groups_ids_per_s": round(same_messages)},
            )
        )
    finally:
        with contextlib.suppress(Exception):
            broker.flush(queue)
            broker.flush(f"{queue}-enqueue")
        broker.close()
    return figures


if __name__ == "__main__":  # pragma: no cover - a quick look without the runner
    import sys

    for figure in run(Options(smoke="--smoke" in sys.argv)):
        print(figure.to_dict())
