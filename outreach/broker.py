"""The Dramatiq broker and the one way the rest of the service puts work on it.

The broker only wakes workers: every message carries an outbox id and nothing else, so a flushed broker loses
nothing the sweeper cannot re-enqueue from the database.
"""

from __future__ import annotations

from collections.abc import Sequence

import dramatiq
from dramatiq import Broker, Message
from dramatiq.brokers.stub import StubBroker

from outreach.config import Settings

DELIVER_ACTOR = "deliver_message"


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


def install_broker(broker: Broker) -> Broker:
    """Make ``broker`` the process-wide broker and declare our actors on it."""
    global _installed
    dramatiq.set_broker(broker)
    _installed = broker
    from workers.actors import declare_actors

    declare_actors(broker)
    return broker


def installed_broker() -> Broker | None:
    return _installed


def current_broker() -> Broker:
    if _installed is None:
        raise RuntimeError("no broker installed; call install_broker() first")
    return _installed


def enqueue_deliveries(outbox_ids: Sequence[str], *, broker: Broker | None = None, queue_name: str) -> None:
    """Wake workers for these outbox rows. Called only after the rows are committed."""
    target = broker or current_broker()
    for outbox_id in outbox_ids:
        target.enqueue(
            Message(queue_name=queue_name, actor_name=DELIVER_ACTOR, args=(outbox_id,), kwargs={}, options={})
        )
