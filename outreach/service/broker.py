"""The Dramatiq broker and the one way the rest of the service puts work on it.

The broker only wakes workers: every message carries outbox ids and nothing else, so a flushed broker loses
nothing the sweeper cannot re-enqueue from the database.

Ids enqueued together (a scheduler pass, the sweeper) travel in groups: one ``deliver_messages`` message per up
to :data:`GROUP_SIZE` ids, which one worker claims, checks and renders in one transaction and then sends one by one
(:func:`outreach.pipeline.delivery.deliver_group`). A group is only ever formed from one call's ids, so a lone message
is not held back waiting for company; a call with few ids spreads them over several messages (at most :data:`GROUP_SIZE`
each, at least :data:`SPREAD` messages when there are that many ids) so idle workers share them. The single-id
``deliver_message`` actor stays declared for messages already on a queue.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

import dramatiq
from dramatiq import Broker, Message
from dramatiq.brokers.stub import StubBroker

from outreach.core.config import Settings

DELIVER_ACTOR = "deliver_message"
GROUP_ACTOR = "deliver_messages"
BATCH_ACTOR = "deliver_batch"

#: Most outbox ids in one group message. Larger groups share more per-group work (50 used about 12% less worker
#: CPU per message than 25); the last row of a group waits for the sends before it (50 provider calls, well under
#: a second normally), and a group must fit the lease and the actor's time limit even when the provider is slow
#: (rows not yet handed off when their lease runs out go back to ``pending`` and are sent by another worker).
GROUP_SIZE = 50
#: A call with fewer than ``SPREAD * GROUP_SIZE`` ids still makes up to this many messages, so several workers
#: share a small pass instead of one sending it all.
SPREAD = 16


def build_broker(settings: Settings) -> Broker:
    """A broker for ``OUTREACH_BROKER_URL``: Redis, RabbitMQ, or (unset) an in-process stub."""
    url = settings.broker_url
    if url.startswith(("redis://", "rediss://")):
        from dramatiq.brokers.redis import RedisBroker

        return RedisBroker(url=url)  # type: ignore[no-untyped-call]
    if url.startswith(("amqp://", "amqps://")):
        from dramatiq.brokers.rabbitmq import RabbitmqBroker

        return RabbitmqBroker(url=url)
    broker = StubBroker()
    broker.emit_after("process_boot")
    return broker


_installed: Broker | None = None


def install_broker(broker: Broker, queue_name: str | None = None) -> Broker:
    """Make ``broker`` the process-wide broker, and declare ``queue_name`` on it so this process can put work
    there. The actors are the workers' business: the worker entry point declares them
    (:func:`workers.actors.install`); a process that only enqueues never imports them."""
    global _installed
    dramatiq.set_broker(broker)
    _installed = broker
    if queue_name is not None:
        broker.declare_queue(queue_name)
    return broker


def installed_broker() -> Broker | None:
    return _installed


def current_broker() -> Broker:
    if _installed is None:
        raise RuntimeError("no broker installed; call install_broker() first")
    return _installed


def declare_actor(
    broker: Broker, fn: Any, name: str, queue_name: str, options: dict[str, Any]
) -> dramatiq.Actor[..., None]:
    """Declare ``fn`` as actor ``name`` on ``broker``, replacing an earlier declaration (tests switch brokers)."""
    broker.actors.pop(name, None)
    return dramatiq.Actor(fn, broker=broker, actor_name=name, queue_name=queue_name, priority=0, options=dict(options))


def groups(outbox_ids: Sequence[str], size: int = GROUP_SIZE, spread: int = SPREAD) -> list[list[str]]:
    """``outbox_ids`` cut into groups of at most ``size``, and into at least ``min(spread, len)`` groups, in order."""
    ids = list(outbox_ids)
    if not ids:
        return []
    count = max(-(-len(ids) // size), min(spread, len(ids)))
    base, extra = divmod(len(ids), count)
    out: list[list[str]] = []
    start = 0
    for index in range(count):
        end = start + base + (1 if index < extra else 0)
        out.append(ids[start:end])
        start = end
    return out


def enqueue_deliveries(
    outbox_ids: Sequence[str], *, broker: Broker | None = None, queue_name: str, delay: float | None = None
) -> None:
    """Wake workers for these outbox rows, in groups (see the module docstring). Called only after the rows are
    committed. ``delay`` (seconds) makes the messages visible only then (a retry at the provider's reset time)."""
    calls = [(group,) for group in groups(outbox_ids)]
    if delay:
        target = broker or current_broker()
        milliseconds = max(1, int(delay * 1000))
        for args in calls:
            message: Message[Any] = Message(
                queue_name=queue_name, actor_name=GROUP_ACTOR, args=args, kwargs={}, options={}
            )
            target.enqueue(message, delay=milliseconds)
        return
    enqueue_calls(GROUP_ACTOR, calls, broker=broker, queue_name=queue_name)


def enqueue_batch(outbox_ids: Sequence[str], *, broker: Broker | None = None, queue_name: str) -> None:
    """Wake one worker for a batch of nurture email rows (sent together, see :mod:`outreach.pipeline.batch`)."""
    if outbox_ids:
        enqueue_calls(BATCH_ACTOR, [(list(outbox_ids),)], broker=broker, queue_name=queue_name)


def enqueue_calls(
    actor_name: str, calls: Sequence[tuple[Any, ...]], *, broker: Broker | None = None, queue_name: str
) -> None:
    """Put one message per argument tuple on the queue for ``actor_name``.

    On Redis every message body and the queue push go out in one pipelined round trip (a MULTI/EXEC, so no
    worker sees an id before its body), instead of one script call per message; the broker's enqueue
    middleware still sees each message. Other brokers enqueue one by one.
    """
    if not calls:
        return
    target = broker or current_broker()
    if not _is_redis(target):
        for args in calls:
            target.enqueue(Message(queue_name=queue_name, actor_name=actor_name, args=args, kwargs={}, options={}))
        return
    redis_broker: Any = target
    # Stamped with the Redis id at once (the broker's own enqueue copies each message to add it).
    stamped: list[Message[Any]] = [
        Message(
            queue_name=queue_name,
            actor_name=actor_name,
            args=args,
            kwargs={},
            options={"redis_message_id": str(uuid.uuid4())},
        )
        for args in calls
    ]
    for message in stamped:
        target.emit_before("enqueue", message, None)
    queue_key = f"{redis_broker.namespace}:{queue_name}"
    with redis_broker.client.pipeline(transaction=True) as pipe:
        # The same two writes Dramatiq's dispatch script makes for "enqueue": body into the hash, id onto the list.
        for start in range(0, len(stamped), _PIPELINE_CHUNK):
            chunk = stamped[start : start + _PIPELINE_CHUNK]
            pipe.hset(f"{queue_key}.msgs", mapping={m.options["redis_message_id"]: m.encode() for m in chunk})
            pipe.rpush(queue_key, *(m.options["redis_message_id"] for m in chunk))
        pipe.execute()
    for message in stamped:
        target.emit_after("enqueue", message, None)


#: Messages per HSET/RPUSH command in one pipeline (keeps each command's argument list moderate).
_PIPELINE_CHUNK = 1000


def _is_redis(broker: Broker) -> bool:
    try:
        from dramatiq.brokers.redis import RedisBroker
    except ImportError:  # pragma: no cover - redis is a dependency
        return False
    return isinstance(broker, RedisBroker)
