"""Latency on an idle system: an ``applied`` event → the JD email accepted by the sandbox, next to bare Dramatiq.

End to end, per candidate, one at a time: the event is recorded the way the API records it (``record_event`` in
one transaction, then ``Scheduler.run_enrollments`` for the enrollments it started, which enqueues the due
``jd_intro`` email step on Redis); a worker (2 processes × 8 threads, as everywhere) claims, checks, renders and
sends it through the SendGrid SDK to the sandbox. The latency is from just before the event's transaction to the
moment the sandbox received the email (its own clock, the same machine's). Baseline, in the same run and with the
same worker settings: a bare Dramatiq actor that only writes down when it ran (``bench.noop.stamp``), from just
before its enqueue to that moment.

Samples are ``GAP`` seconds apart on both sides, so workers sit idle between them as they would between real
events (their Redis polling backs off while idle, which is part of what is measured).
"""

from __future__ import annotations

import contextlib
import statistics
import tempfile
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import redis
from dramatiq import Message
from dramatiq.brokers.redis import RedisBroker
from sqlalchemy import select
from sqlalchemy.orm import Session

from bench.bare import STAMP_ACTOR, bare_environment
from bench.e2e import EXEMPLARS, JOB, _email, _external_id
from bench.harness import (
    BenchmarkError,
    Config,
    Figure,
    Options,
    at_most,
    dramatiq_workers,
    fresh_queue,
    get_json,
    progress,
    scratch_database,
    wait_until,
)
from bench.stack import alive, service_settings, start_sandbox, worker_environment
from outreach.core.config import Settings
from outreach.core.models import MessageStatus, OutboundMessage
from outreach.domain.candidates import CandidateIn, JobIn, upsert_candidate, upsert_job
from outreach.pipeline.enrollment import EventIn, record_event
from outreach.service.broker import enqueue_deliveries
from outreach.service.runtime import Runtime

#: Seconds between two samples (both sides): long enough for the workers to go idle, short enough for 200.
GAP = 0.25
#: Untimed samples first, so worker start-up and first-use caches are not in the figures.
WARMUP = 5
POLL = 0.002
GOAL_P95_MS = 1000.0


def percentile(values: Sequence[float], fraction: float) -> float:
    """The ``fraction`` quantile (nearest rank) of ``values``."""
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(fraction * len(ordered) + 0.5) - 1))
    return ordered[rank]


def run(options: Options) -> list[Figure]:
    samples = options.size("latency.samples", 100, 10)
    with tempfile.TemporaryDirectory(prefix="outreach-bench-") as logs:
        progress(f"latency: bare Dramatiq enqueue → run, {samples} samples")
        bare = bare_latencies(options, samples, Path(logs))
        progress(f"latency: applied event → email accepted by the sandbox, {samples} samples")
        e2e, checks = e2e_latencies(options, samples, Path(logs))
    figures = []
    for name, fraction in (("p50", 0.5), ("p95", 0.95)):
        value, baseline = percentile(e2e, fraction) * 1000, percentile(bare, fraction) * 1000
        is_p95 = name == "p95"
        figures.append(
            Figure(
                f"latency.{name}",
                value,
                "ms",
                baseline_name=f"bare Dramatiq enqueue → run {name}",
                baseline_value=baseline,
                goal="≤ 1 s" if is_p95 else "",
                met=at_most(value, GOAL_P95_MS, options) if is_p95 else None,
                checks=checks if is_p95 else {},
                details={
                    "samples": samples,
                    "gap_seconds": GAP,
                    "e2e_mean_ms": round(statistics.fmean(e2e) * 1000, 1),
                    "e2e_max_ms": round(max(e2e) * 1000, 1),
                    "bare_mean_ms": round(statistics.fmean(bare) * 1000, 1),
                    "bare_max_ms": round(max(bare) * 1000, 1),
                }
                if is_p95
                else {},
            )
        )
    return figures


def bare_latencies(options: Options, samples: int, logs: Path) -> list[float]:
    with contextlib.ExitStack() as stack:
        queue = stack.enter_context(fresh_queue(options.redis_url, options.queue_name("latency-bare")))
        key = f"{queue.list_key}.stamps"
        broker = RedisBroker(url=options.redis_url)  # type: ignore[no-untyped-call]
        stack.callback(broker.close)
        client: redis.Redis = redis.Redis.from_url(options.redis_url)
        stack.callback(client.close)
        stack.callback(client.delete, key)
        env = bare_environment(options.redis_url, queue.name)
        with dramatiq_workers(
            "latency-bare-workers", "bench.noop", queue.name, Config.of(options), env, logs
        ) as workers:
            latencies: list[float] = []
            for index in range(WARMUP + samples):
                time.sleep(GAP)
                started = time.time()
                broker.enqueue(
                    Message(queue_name=queue.name, actor_name=STAMP_ACTOR, args=(key, index), kwargs={}, options={})
                )

                def ran(index: int = index) -> bool:
                    return bool(client.hexists(key, str(index)))

                wait_until(ran, timeout=60, interval=POLL, what="the stamp actor to run", check=workers.check)
                if index >= WARMUP:
                    latencies.append(float(client.hget(key, str(index)) or 0) - started)
        return latencies
    raise AssertionError("unreachable")


def e2e_latencies(options: Options, samples: int, logs: Path) -> tuple[list[float], dict[str, int | None]]:
    total = WARMUP + samples
    with contextlib.ExitStack() as stack:
        queue = stack.enter_context(fresh_queue(options.redis_url, options.queue_name("latency-e2e")))
        broker = RedisBroker(url=options.redis_url)  # type: ignore[no-untyped-call]
        stack.callback(broker.close)
        database_url = stack.enter_context(scratch_database(options.postgres_url))
        sandbox, sandbox_url = start_sandbox(stack, logs)
        settings = service_settings(stack, database_url)

        def enqueue(outbox_ids: Sequence[str]) -> None:
            # As the service enqueues: the scheduler pass's ids in group messages (outreach.service.broker).
            enqueue_deliveries(outbox_ids, broker=broker, queue_name=queue.name)

        runtime = Runtime(settings, enqueue_override=enqueue)
        external_ids = _candidates(runtime, settings, total)
        env = worker_environment(database_url, options.redis_url, queue.name, sandbox_url)
        workers = stack.enter_context(
            dramatiq_workers("latency-e2e-workers", "workers.main", queue.name, Config.of(options), env, logs)
        )
        check = alive(workers, sandbox)

        started: dict[str, float] = {}
        for index, external_id in enumerate(external_ids):
            time.sleep(GAP if index else 0)
            begun = time.time()
            outbox_id = _apply(runtime, settings, external_id)
            started[outbox_id] = begun
            # The first sample waits for the workers to start; the rest find them idle and ready.
            wait_until(
                _finished(runtime, outbox_id),
                timeout=120 if index == 0 else 60,
                interval=POLL,
                what="the JD email to be sent",
                check=check,
            )
        received: dict[str, list[datetime]] = {}
        for record in get_json(f"{sandbox_url}/_sandbox/messages", timeout=60):
            outbox_id = str(record.get("custom_args", {}).get("outreach_id"))
            received.setdefault(outbox_id, []).append(datetime.fromisoformat(record["received_at"]))
        with Session(runtime.engine) as session:
            rows = session.execute(
                select(OutboundMessage.id, OutboundMessage.status).where(OutboundMessage.id.in_(list(started)))
            )
            statuses = {str(row[0]): str(row[1]) for row in rows}
        lost = sum(1 for outbox_id in started if outbox_id not in received)
        lost += sum(1 for status in statuses.values() if status != MessageStatus.SENT.value)
        duplicated = sum(len(times) - 1 for times in received.values()) + sum(
            len(times) for outbox_id, times in received.items() if outbox_id not in started
        )
        order = sorted(started, key=started.__getitem__)[WARMUP:]
        latencies = [received[o][0].timestamp() - started[o] for o in order if o in received]
        if not latencies:
            raise BenchmarkError("no JD email reached the sandbox")
        return latencies, {"lost": lost, "duplicated": duplicated}
    raise AssertionError("unreachable")


def _candidates(runtime: Runtime, settings: Settings, count: int) -> list[str]:
    """``count`` candidates (alternating the exemplars' locales) and the job, all without events yet."""
    context = {"settings": settings}
    ids = []
    with Session(runtime.engine, expire_on_commit=False) as session, session.begin():
        upsert_job(session, JobIn.model_validate(JOB))
        for index in range(count):
            fields = EXEMPLARS[index % len(EXEMPLARS)]
            data = {"external_id": _external_id(index), "email": _email(index), "phone": "+8613800138000", **fields}
            upsert_candidate(session, CandidateIn.model_validate(data, context=context), settings)
            ids.append(_external_id(index))
    return ids


def _apply(runtime: Runtime, settings: Settings, external_id: str) -> str:
    """What ``POST /api/v1/candidates/{id}/events`` does for an ``applied`` event; returns the email's outbox id."""
    event = EventIn.model_validate({"type": "applied", "job_id": JOB["external_id"]})
    with Session(runtime.engine, expire_on_commit=False) as session, session.begin():
        _, enrollments = record_event(
            session,
            runtime.campaigns,
            external_id,
            event,
            company_tz=settings.company_timezone,
            calendar=runtime.policy.calendar,
        )
    result = runtime.scheduler.run_enrollments([e.id for e in enrollments])
    if len(result.queued) != 1:
        raise BenchmarkError(f"the applied event queued {len(result.queued)} message(s), expected the JD email")
    return str(result.queued[0])


def _finished(runtime: Runtime, outbox_id: str) -> Any:
    def done() -> bool:
        with runtime.engine.connect() as connection:
            status = connection.execute(
                select(OutboundMessage.status).where(OutboundMessage.id == outbox_id)
            ).scalar_one()
        if status in (MessageStatus.PENDING.value, MessageStatus.SENDING.value):
            return False
        if status != MessageStatus.SENT.value:
            raise BenchmarkError(f"the JD email ended {status}")
        return True

    return done
