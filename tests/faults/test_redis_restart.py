"""Issue 7, item 2: Redis restarted without persistence in the middle of a run.

The broker only carries outbox ids, so losing every queued message loses nothing: the scheduler's sweeper
re-enqueues the rows that are due and were not picked up within the lease. Every pending message is sent after
the restart, none twice. The test runs its own ``redis-server`` (no RDB, no AOF) on a free port; the machine's
shared Redis is not touched.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from tests.faults.conftest import (
    MIXED_CAMPAIGN,
    Proc,
    Stack,
    count,
    free_port,
    scheduler_argv,
    seed_enrollments,
    settled,
    size,
    wait_until,
    worker_argv,
)

pytestmark = pytest.mark.timeout(180)


class RedisServer:
    def __init__(self, log_dir: Path, port: int) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is not installed: this test runs its own Redis to restart it")
        self.port = port
        self.url = f"redis://127.0.0.1:{port}/0"
        argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        self.proc = Proc("redis", argv, {}, log_dir)

    def start(self) -> RedisServer:
        self.proc.start()
        wait_until(self.answers, 20, "redis-server to start", interval=0.05, check=self.proc.check)
        return self

    def answers(self) -> bool:
        client = redis.Redis.from_url(self.url, socket_connect_timeout=0.5)
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False
        finally:
            client.close()

    def keys(self) -> int:
        client = redis.Redis.from_url(self.url)
        try:
            return int(client.dbsize())
        finally:
            client.close()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path, free_port()).start()
    yield server
    server.proc.stop()


def test_redis_restarted_empty_mid_run_loses_nothing_sends_nothing_twice(
    make_stack: Callable[..., Stack], redis_server: RedisServer
) -> None:
    messages = size("redis_messages", 400)
    stack = make_stack(campaign=MIXED_CAMPAIGN, broker_url=redis_server.url, lease_seconds=3.0)
    seed_enrollments(stack.runtime, messages // 2)
    stack.spawn("scheduler", scheduler_argv())
    wait_until(lambda: stack.outbox_rows() >= messages, 90, "the scheduler to write the outbox", check=stack.check)
    queued_before = redis_server.keys()
    # Two worker processes with few threads, so a good share of the run is still queued at the restart.
    stack.spawn("workers", worker_argv(stack.settings.queue_name, processes=1, threads=2))
    wait_until(lambda: len(stack.sandbox.messages()) >= messages // 5, 90, "a fifth of the sends", check=stack.check)

    redis_server.proc.kill()
    pending_at_restart = stack.unfinished()
    time.sleep(1.0)
    redis_server.start()
    keys_after_restart = redis_server.keys()

    wait_until(settled(stack), 120, "every message to be sent after the restart", check=stack.check)
    time.sleep(1.0)  # room for a late second send to show up
    counts = count(
        stack,
        queued_keys_before=queued_before,
        pending_at_restart=pending_at_restart,
        keys_after_restart=keys_after_restart,
    )
    counts.show("redis restarted without persistence")

    assert queued_before > 0 and pending_at_restart > 0, "nothing was queued when Redis went away"
    assert keys_after_restart <= 1, "the restarted Redis kept data: the test needs an empty one"
    assert counts.expected == messages
    assert counts.sent == messages
    assert counts.duplicated == 0
    assert counts.lost == 0
    assert counts.failed == 0
    assert counts.uncertain == 0
