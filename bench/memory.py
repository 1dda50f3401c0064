"""Worker resident memory after many sends: each worker process's RSS after half and after all of the sends.

The service's workers (2 processes × 8 threads) send ``memory.sends`` real ``jd_intro`` emails end to end
(claimed outbox rows → rendered → SendGrid SDK → sandbox, as in :mod:`bench.e2e`); the RSS of every worker
process (not the supervising parent) is read from ``/proc`` after the first half and after the rest. The
baseline is the bare Dramatiq no-op workers' RSS after the same number of messages, with the same settings.

Goals: at most 150 MB per process, and no growth between the half and the end (a leak shows as growth that
goes on; a few MB of allocator noise is allowed: ``GROWTH_ALLOWANCE_MB``).
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from sqlalchemy import func, select

from bench import NOOP_ACTOR
from bench.bare import bare_environment
from bench.e2e import _failures, seed, staged_groups, unfinished
from bench.harness import (
    BenchmarkError,
    Config,
    Figure,
    Options,
    Service,
    at_most,
    dramatiq_workers,
    fresh_queue,
    get_json,
    progress,
    scratch_database,
    wait_drained,
    wait_until,
)
from bench.stack import alive, service_settings, start_sandbox, worker_environment
from outreach.core.models import MessageStatus, OutboundMessage
from outreach.service.broker import GROUP_ACTOR
from outreach.service.runtime import Runtime

GOAL_MB = 150.0
GROWTH_ALLOWANCE_MB = 5.0
POLL = 0.1


def worker_rss(service: Service) -> list[float]:
    """Resident memory (MB) of each worker process: the children of the ``dramatiq`` parent process."""
    if service.process is None:
        raise BenchmarkError(f"{service.name} is not running")
    parent = service.process.pid
    sizes = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":", 1) for line in status.read_text().splitlines() if ":" in line)
        except OSError:
            continue  # gone in the meantime
        if int(fields.get("PPid", "0").strip()) == parent and "VmRSS" in fields:
            sizes.append(int(fields["VmRSS"].split()[0]) / 1024)
    if not sizes:
        raise BenchmarkError(f"no worker processes found under {service.name}")
    return sorted(sizes)


def run(options: Options) -> list[Figure]:
    sends = options.size("memory.sends", 100_000, 400)
    half = sends // 2
    config = Config.of(options, sends)
    with tempfile.TemporaryDirectory(prefix="outreach-bench-") as logs:
        progress(f"memory: bare Dramatiq no-op workers, {sends} messages")
        bare_half, bare_full = _bare(config, half, Path(logs))
        progress(f"memory: service workers, {sends} sends end to end")
        e2e_half, e2e_full, checks = _e2e(config, half, Path(logs))
    peak, growth = max(e2e_full), max(f - h for f, h in zip(e2e_full, e2e_half, strict=False))
    bare_growth = max(f - h for f, h in zip(bare_full, bare_half, strict=False))
    details = {
        "sends": sends,
        "rss_mb_after_half": [round(x, 1) for x in e2e_half],
        "rss_mb_after_all": [round(x, 1) for x in e2e_full],
        "bare_rss_mb_after_half": [round(x, 1) for x in bare_half],
        "bare_rss_mb_after_all": [round(x, 1) for x in bare_full],
    }
    return [
        Figure(
            "memory.worker_rss",
            peak,
            "MB",
            baseline_name="bare Dramatiq worker",
            baseline_value=max(bare_full),
            goal=f"≤ {GOAL_MB:.0f} MB per process",
            met=at_most(peak, GOAL_MB, options),
            checks=checks,
            details=details,
        ),
        Figure(
            "memory.growth_half_to_all",
            growth,
            "MB",
            baseline_name="bare Dramatiq worker",
            baseline_value=bare_growth,
            ratio=None,
            goal=f"no growth (≤ {GROWTH_ALLOWANCE_MB:.0f} MB)",
            met=at_most(growth, GROWTH_ALLOWANCE_MB, options),
        ),
    ]


def _bare(config: Config, half: int, logs: Path) -> tuple[list[float], list[float]]:
    with fresh_queue(config.redis_url, config.queue_name("memory-bare")) as queue:
        env = bare_environment(config.redis_url, queue.name)
        ids = queue.stage(NOOP_ACTOR, ((i,) for i in range(config.messages)))
        with dramatiq_workers("memory-bare-workers", "bench.noop", queue.name, config, env, logs) as workers:
            # Both halves are released once the workers are up; each is drained before the reading.
            readings = []
            for part, unreleased in ((ids[:half], len(ids) - half), (ids[half:], 0)):
                queue.release(part)

                def drained(unreleased: int = unreleased) -> bool:
                    # Nothing waiting or delayed, and only the bodies not yet released left in the hash.
                    return queue.counts() == (0, unreleased, 0)

                wait_until(
                    drained,
                    timeout=config.timeout,
                    interval=POLL,
                    what="the no-op queue to drain",
                    check=workers.check,
                )
                readings.append(worker_rss(workers))
            if queue.dead():
                raise BenchmarkError(f"{queue.dead()} no-op message(s) were dead-lettered")
        return readings[0], readings[1]


def _e2e(config: Config, half: int, logs: Path) -> tuple[list[float], list[float], dict[str, int | None]]:
    with contextlib.ExitStack() as stack:
        queue = stack.enter_context(fresh_queue(config.redis_url, config.queue_name("memory-e2e")))
        database_url = stack.enter_context(scratch_database(config.postgres_url))
        sandbox, sandbox_url = start_sandbox(stack, logs)
        settings = service_settings(stack, database_url)
        started = time.perf_counter()
        ids = seed(settings, config.messages)
        progress(f"memory: {len(ids)} pending rows created in {time.perf_counter() - started:.0f} s")
        engine = Runtime(settings).engine
        # Staged as production enqueues them (bench.e2e.staged_groups): each half's ids in group messages.
        halves = [
            queue.stage(GROUP_ACTOR, ((group,) for group in staged_groups(part))) for part in (ids[:half], ids[half:])
        ]
        env = worker_environment(database_url, config.redis_url, queue.name, sandbox_url)
        workers = stack.enter_context(
            dramatiq_workers("memory-e2e-workers", "workers.main", queue.name, config, env, logs)
        )

        check = alive(workers, sandbox)

        def left(target: int) -> Callable[[], bool]:
            def done() -> bool:
                return unfinished(engine) <= target

            return done

        readings = []
        for part, target in ((halves[0], len(ids) - half), (halves[1], 0)):
            queue.release(part)
            wait_until(left(target), timeout=config.timeout, interval=POLL, what="the sends", check=check)
            if failures := _failures(engine):
                raise BenchmarkError(f"outbox rows ended other than sent: {failures}")
            readings.append(worker_rss(workers))
        wait_drained(queue, timeout=60, interval=POLL, check=check)
        with engine.connect() as connection:
            sent, provider_ids = connection.execute(
                select(
                    func.count().filter(OutboundMessage.status == MessageStatus.SENT.value),
                    func.count(OutboundMessage.provider_message_id.distinct()),
                )
            ).one()
        received = int(get_json(f"{sandbox_url}/_sandbox/stats")["messages"])
        checks: dict[str, int | None] = {
            "lost": max(0, len(ids) - int(sent)),
            "duplicated": max(0, received - len(ids), len(ids) - int(provider_ids) if int(sent) == len(ids) else 0),
        }
        return readings[0], readings[1], checks
    raise AssertionError("unreachable")
