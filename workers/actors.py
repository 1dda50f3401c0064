"""Dramatiq actors. Each takes an id, never a payload: the database holds the message.

Retry policy lives on the actor: a transient provider failure (429, 5xx, timeout) raises ``Retry`` with the
provider's own reset time; anything else unexpected is retried with backoff a few times. Permanent failures
are recorded by :func:`outreach.delivery.deliver` and end there.
"""

from __future__ import annotations

import dramatiq
from dramatiq import Broker
from sqlalchemy.exc import OperationalError

from outreach.broker import DELIVER_ACTOR
from outreach.delivery import deliver
from outreach.runtime import get_runtime
from workers.batch import declare_batch_actor

#: Unexpected errors (a database that went away) are retried this many times before dramatiq gives up; the
#: outbox row stays pending and the sweeper picks it up again after that.
MAX_UNEXPECTED_RETRIES = 5


def should_retry(retries: int, exception: BaseException) -> bool:
    if isinstance(exception, dramatiq.Retry):
        return retries < get_runtime().settings.max_retries + MAX_UNEXPECTED_RETRIES
    if isinstance(exception, OperationalError):
        return retries < MAX_UNEXPECTED_RETRIES
    return retries < 2


def deliver_message(outbox_id: str) -> None:
    outcome = deliver(get_runtime(), outbox_id)
    if outcome.retry_in is not None:
        raise dramatiq.Retry("provider asked us to wait", delay=max(1, int(outcome.retry_in * 1000)))


def declare_actors(broker: Broker) -> dict[str, dramatiq.Actor[..., None]]:
    """Declare our actors on ``broker`` (replacing earlier declarations, so tests can switch brokers)."""
    queue = get_runtime().settings.queue_name
    broker.actors.pop(DELIVER_ACTOR, None)
    actor: dramatiq.Actor[..., None] = dramatiq.Actor(
        deliver_message,
        broker=broker,
        actor_name=DELIVER_ACTOR,
        queue_name=queue,
        priority=0,
        options={
            "retry_when": should_retry,
            "min_backoff": 1000,
            "max_backoff": 300_000,
            "time_limit": 120_000,
        },
    )
    return {DELIVER_ACTOR: actor, **declare_batch_actor(broker, queue, actor.options)}
