"""Enqueueing outbox ids: pipelined on Redis (one round trip), one by one elsewhere; workers see every message."""

from __future__ import annotations

import threading
import uuid

import dramatiq
import pytest
from dramatiq import Worker
from dramatiq.brokers.redis import RedisBroker
from dramatiq.brokers.stub import StubBroker

from outreach.broker import BATCH_ACTOR, DELIVER_ACTOR, enqueue_batch, enqueue_deliveries
from tests.conftest import REDIS_URL


def _collecting_actors(broker: dramatiq.Broker, queue: str) -> tuple[list[str], list[list[str]], threading.Event]:
    singles: list[str] = []
    batches: list[list[str]] = []
    done = threading.Event()

    def deliver(outbox_id: str) -> None:
        singles.append(outbox_id)
        if len(singles) == 500:
            done.set()

    def deliver_batch(outbox_ids: list[str]) -> None:
        batches.append(outbox_ids)

    dramatiq.Actor(deliver, broker=broker, actor_name=DELIVER_ACTOR, queue_name=queue, priority=0, options={})
    dramatiq.Actor(deliver_batch, broker=broker, actor_name=BATCH_ACTOR, queue_name=queue, priority=0, options={})
    return singles, batches, done


@pytest.mark.parametrize("kind", ["redis", "stub"])
def test_every_enqueued_id_reaches_a_worker_once(kind: str) -> None:
    queue = f"outreach_test_{uuid.uuid4().hex[:8]}"
    broker: dramatiq.Broker = RedisBroker(url=REDIS_URL) if kind == "redis" else StubBroker()  # type: ignore[no-untyped-call]
    singles, batches, done = _collecting_actors(broker, queue)
    ids = [uuid.uuid4().hex for _ in range(500)]
    enqueue_deliveries(ids, broker=broker, queue_name=queue)
    enqueue_batch(ids[:3], broker=broker, queue_name=queue)
    enqueue_batch([], broker=broker, queue_name=queue)  # nothing to wake anyone for
    worker = Worker(broker, worker_threads=2)
    worker.start()
    try:
        assert done.wait(30)
        broker.join(queue, timeout=30_000)
        worker.join()
    finally:
        worker.stop()
        if isinstance(broker, RedisBroker):
            broker.flush_all()
        broker.close()
    assert sorted(singles) == sorted(ids)
    assert batches == [ids[:3]]


def test_pipelined_enqueue_is_one_round_trip() -> None:
    queue = f"outreach_test_{uuid.uuid4().hex[:8]}"
    broker = RedisBroker(url=REDIS_URL)  # type: ignore[no-untyped-call]
    single_commands: list[str] = []
    pipelines: list[int] = []
    make_pipeline = broker.client.pipeline
    send_command = broker.client.execute_command

    def counting_command(*args: object, **kwargs: object) -> object:
        single_commands.append(str(args[0]))
        return send_command(*args, **kwargs)

    def counting_pipeline(*args: object, **kwargs: object) -> object:
        pipe = make_pipeline(*args, **kwargs)  # type: ignore[arg-type]
        execute = pipe.execute

        def counted(*a: object, **k: object) -> object:
            pipelines.append(len(pipe.command_stack))
            return execute(*a, **k)  # type: ignore[arg-type]

        pipe.execute = counted  # type: ignore[method-assign]
        return pipe

    broker.client.execute_command = counting_command  # type: ignore[method-assign]
    broker.client.pipeline = counting_pipeline  # type: ignore[method-assign]
    try:
        enqueue_deliveries([uuid.uuid4().hex for _ in range(1500)], broker=broker, queue_name=queue)
        assert single_commands == []
        assert pipelines == [4]  # one round trip: HSET + RPUSH per 1000 messages
        assert broker.client.llen(f"{broker.namespace}:{queue}") == 1500
        assert broker.client.hlen(f"{broker.namespace}:{queue}.msgs") == 1500
    finally:
        broker.client.execute_command = send_command  # type: ignore[method-assign]
        broker.client.pipeline = make_pipeline  # type: ignore[method-assign]
        broker.flush(queue)
        broker.close()
