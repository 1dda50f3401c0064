"""The baseline side: bare Dramatiq no-op messages through the same broker and worker settings."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from bench import NOOP_ACTOR
from bench.harness import (
    BenchmarkError,
    Config,
    Measurement,
    clean_environment,
    cpu_per_message,
    dramatiq_workers,
    fresh_queue,
    wait_drained,
    wait_until,
)

#: The baseline actor that records when it ran (declared in ``bench.noop``), for enqueue → run latency.
STAMP_ACTOR = "stamp"

#: Worker settings both sides of every comparison run with (environment variables Dramatiq reads at start-up).
#: Empty: Dramatiq's defaults (prefetch 2 × threads per process; hiredis is used whenever it is installed, and
#: it is a dependency of the service).
WORKER_SETTINGS: dict[str, str] = {}

#: Redis is cheap to ask; a short interval keeps the end of the window sharp.
POLL_INTERVAL = 0.01


def bare_environment(redis_url: str, queue: str) -> dict[str, str]:
    """The bare no-op workers' environment (``bench.noop``): the broker, the run's queue, the worker settings."""
    return clean_environment({"OUTREACH_BROKER_URL": redis_url, "OUTREACH_QUEUE": queue, **WORKER_SETTINGS})


def run_bare(config: Config) -> Measurement:
    with (
        fresh_queue(config.redis_url, config.queue_name("noop")) as queue,
        tempfile.TemporaryDirectory(prefix="outreach-bench-") as logs,
    ):
        env = bare_environment(config.redis_url, queue.name)
        ids = queue.stage(NOOP_ACTOR, ((i,) for i in range(config.warmup + config.messages)))
        warmup, measured = ids[: config.warmup], ids[config.warmup :]
        with dramatiq_workers("noop-workers", "bench.noop", queue.name, config, env, Path(logs)) as workers:
            queue.release(warmup)

            def warmed_up() -> bool:
                waiting, bodies, delayed = queue.counts()
                return waiting == 0 and bodies == len(measured) and delayed == 0

            wait_until(
                warmed_up,
                timeout=120,
                interval=POLL_INTERVAL,
                what="the no-op workers to start",
                check=workers.check,
            )

            cpu_before = workers.cpu_seconds()
            started = time.perf_counter()
            queue.release(measured)
            finished = wait_drained(
                queue,
                timeout=config.timeout,
                interval=POLL_INTERVAL,
                what="the no-op queue to drain",
                check=workers.check,
            )
            cpu = cpu_per_message(cpu_before, workers.cpu_seconds(), config.messages)
            workers.check()
        dead = queue.dead()
        if dead:
            raise BenchmarkError(f"{dead} no-op message(s) were dead-lettered")
    # Every body is deleted from the hash only when its message is acked, and nothing was dead-lettered:
    # all were processed. A no-op cannot report being run twice, so duplicates are not observable here.
    return Measurement(
        "bare",
        config.messages,
        finished - started,
        lost=dead,
        duplicated=None,
        details={"worker_cpu_ms_per_message": cpu},
    )
