"""Enqueueing outbox ids: in groups, pipelined on Redis (one round trip), one by one elsewhere; workers see every
id exactly once."""

from __future__ import annotations

import threading
import uuid

import dramatiq
import pytest
from dramatiq import Worker
from dramatiq.brokers.redis import RedisBroker
from dramatiq.brokers.stub import StubBroker

from outreach.service.broker import (
    BATCH_ACTOR,
    DELIVER_ACTOR,
    GROUP_ACTOR,
    GROUP_SIZE,
    SPREAD,
    enqueue_batch,
    enqueue_calls,
    enqueue_deliveries,
    groups,
)
from tests.conftest import REDIS_URL


def _collecting_actors(
    broker: dramatiq.Broker, queue: str
) -> tuple[list[str], list[list[str]], list[list[str]], threading.Event]:
    singles: list[str] = []
    grouped: list[list[str]] = []
    batches: list[list[str]] = []
    done = threading.Event()
    lock = threading.Lock()

    def deliver(outbox_id: str) -> None:
        singles.append(outbox_id)

    def deliver_group(outbox_ids: list[str]) -> None:
        with lock:
            grouped.append(outbox_ids)
            if sum(map(len, grouped)) == 500:
                done.set()

    def deliver_batch(outbox_ids: list[str]) -> None:
        batches.append(outbox_ids)

    dramatiq.Actor(deliver, broker=broker, actor_name=DELIVER_ACTOR, queue_name=queue, priority=0, options={})
    dramatiq.Actor(deliver_group, broker=broker, actor_name=GROUP_ACTOR, queue_name=queue, priority=0, options={})
    dramatiq.Actor(deliver_batch, broker=broker, actor_name=BATCH_ACTOR, queue_name=queue, priority=0, options={})
    return singles, grouped, batches, done


@pytest.mark.parametrize("kind", ["redis", "stub"])
def test_every_enqueued_id_reaches_a_worker_once(kind: str) -> None:
    queue = f"outreach_test_{uuid.uuid4().hex[:8]}"
    broker: dramatiq.Broker = RedisBroker(url=REDIS_URL) if kind == "redis" else StubBroker()  # type: ignore[no-untyped-call]
    singles, grouped, batches, done = _collecting_actors(broker, queue)
    ids = [uuid.uuid4().hex for _ in range(500)]
    enqueue_deliveries(ids, broker=broker, queue_name=queue)
    enqueue_batch(ids[:3], broker=broker, queue_name=queue)
    # A message of the single-id actor, as queued before groups existed, still reaches it.
    enqueue_calls(DELIVER_ACTOR, [(ids[0],)], broker=broker, queue_name=queue)
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
    assert sorted(i for group in grouped for i in group) == sorted(ids)
    assert sorted(map(len, grouped)) == sorted(map(len, groups(ids)))
    assert max(map(len, grouped)) <= GROUP_SIZE
    assert singles == [ids[0]]
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
        enqueue_deliveries([uuid.uuid4().hex for _ in range(1500 * GROUP_SIZE)], broker=broker, queue_name=queue)
        assert single_commands == []
        assert pipelines == [4]  # one round trip: HSET + RPUSH per 1000 messages
        assert broker.client.llen(f"{broker.namespace}:{queue}") == 1500
        assert broker.client.hlen(f"{broker.namespace}:{queue}.msgs") == 1500
    finally:
        broker.client.execute_command = send_command  # type: ignore[method-assign]
        broker.client.pipeline = make_pipeline  # type: ignore[method-assign]
        broker.flush(queue)
        broker.close()


def test_groups_are_formed_from_one_call_in_order_and_spread_over_workers() -> None:
    ids = [f"id-{i:04d}" for i in range(1000)]
    assert groups([]) == []
    assert groups(ids[:1]) == [ids[:1]]
    # A few ids: one each, so idle workers share them (a lone message never waits for company).
    assert groups(ids[:3]) == [[i] for i in ids[:3]]
    assert [len(g) for g in groups(ids[:SPREAD])] == [1] * SPREAD
    # A small pass: spread over SPREAD messages; a big one: full groups.
    assert len(groups(ids[:100])) == SPREAD and max(len(g) for g in groups(ids[:100])) <= GROUP_SIZE
    assert [len(g) for g in groups(ids)] == [GROUP_SIZE] * (1000 // GROUP_SIZE)
    for count in (1, 7, 16, 17, 99, 400, 401, 1000):
        cut = groups(ids[:count])
        assert [i for group in cut for i in group] == ids[:count]
        assert max(map(len, cut)) - min(map(len, cut)) <= 1 and max(map(len, cut)) <= GROUP_SIZE


def test_delayed_groups_wait_in_the_delay_queue() -> None:
    queue = f"outreach_test_{uuid.uuid4().hex[:8]}"
    broker = RedisBroker(url=REDIS_URL)  # type: ignore[no-untyped-call]
    try:
        broker.declare_queue(queue)
        enqueue_deliveries([uuid.uuid4().hex for _ in range(3)], broker=broker, queue_name=queue, delay=60)
        assert broker.client.llen(f"{broker.namespace}:{queue}") == 0
        delayed = broker.client.hvals(f"{broker.namespace}:{queue}.DQ.msgs")
        assert len(delayed) == 3
        messages = [dramatiq.Message.decode(body) for body in delayed]
        assert {m.actor_name for m in messages} == {GROUP_ACTOR}
        assert all(m.options["eta"] > 0 for m in messages)
    finally:
        broker.flush(queue)
        broker.close()
