"""`dramatiq workers.main` as its own process: the broker comes from the environment, actors deliver real rows."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence

from dramatiq.brokers.redis import RedisBroker
from sqlalchemy import select
from sqlalchemy.orm import Session

from outreach.core.models import OutboundMessage
from outreach.ops.sandbox import SandboxServer
from outreach.service.broker import enqueue_deliveries
from outreach.service.runtime import Runtime
from tests.conftest import REDIS_URL, ROOT, make_settings, worker_env
from tests.helpers import add_candidate, add_job, fire


def test_dramatiq_workers_process_delivers_queued_rows(pg_database_url: str, sandbox: SandboxServer) -> None:
    queue = f"outreach_test_{uuid.uuid4().hex[:8]}"
    settings = make_settings(pg_database_url, broker_url=REDIS_URL, queue_name=queue)
    runtime = Runtime(settings, sandbox_url=sandbox.url)
    held: list[str] = []

    def hold(ids: Sequence[str]) -> None:
        held.extend(ids)

    runtime.enqueue_override = hold
    add_job(runtime)
    for n in range(10):
        add_candidate(runtime, f"c-{n}")
        fire(runtime, f"c-{n}", "applied", job="j-1")
    runtime.scheduler.tick()
    assert len(held) == 10

    env = worker_env(pg_database_url, queue, sandbox.url)  # on this test's clock, not the day the suite runs
    process = subprocess.Popen(
        [sys.executable, "-m", "dramatiq", "workers.main", "--processes", "1", "--threads", "4", "--queues", queue],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    broker = RedisBroker(url=REDIS_URL)  # type: ignore[no-untyped-call]
    try:
        enqueue_deliveries(held, broker=broker, queue_name=queue)

        def unfinished() -> int:
            with Session(runtime.engine) as session:
                return len(
                    session.scalars(
                        select(OutboundMessage.id).where(OutboundMessage.status.in_(("pending", "sending")))
                    ).all()
                )

        # Done is when the queue is empty and no row is waiting or in flight, however long a loaded machine
        # takes to start the worker (the limit only guards against a hang).
        deadline = time.monotonic() + 120
        while unfinished() or broker.do_qsize(queue):
            assert process.poll() is None, process.stdout.read() if process.stdout else ""
            assert time.monotonic() < deadline, "the worker did not drain the queue"
            time.sleep(0.1)
        assert len(sandbox.messages()) == 10
        with Session(runtime.engine) as session:
            assert set(session.scalars(select(OutboundMessage.status))) == {"sent"}
    finally:
        process.terminate()
        process.wait(timeout=30)
        broker.flush_all()
        broker.close()


def test_worker_refuses_to_start_without_a_broker_url() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OUTREACH_")}
    result = subprocess.run(
        [sys.executable, "-m", "outreach", "worker"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode != 0
    assert "OUTREACH_BROKER_URL" in result.stderr
