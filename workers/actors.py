"""Dramatiq actors. Each takes ids, never a payload: the database holds the message.

``deliver_messages`` takes a group of outbox ids (:func:`outreach.pipeline.delivery.deliver_group`); ``deliver_message``
one id (messages enqueued before groups existed). Retry policy: a row the provider turned away for now (429,
5xx, a connection that never opened) is back to ``pending`` with its reset time, and the group actor enqueues a
new group message for those ids alone, delayed until then, so the rows already sent are never part of a retry;
the single-id actor raises ``Retry`` with that delay. Anything else unexpected is retried with backoff a few
times (a group's claimed rows were given back first). Permanent failures are recorded by delivery and end there.
"""

from __future__ import annotations

from collections import defaultdict

import dramatiq
from dramatiq import Broker
from sqlalchemy.exc import OperationalError

from outreach.pipeline.delivery import deliver, deliver_group
from outreach.service.broker import DELIVER_ACTOR, GROUP_ACTOR, declare_actor, enqueue_deliveries, install_broker
from outreach.service.runtime import get_runtime
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


def deliver_messages(outbox_ids: list[str]) -> None:
    runtime = get_runtime()
    outcomes = deliver_group(runtime, outbox_ids)
    later: dict[int, list[str]] = defaultdict(list)
    for outbox_id, outcome in outcomes.items():
        if outcome.retry_in is not None:
            # Whole seconds, a second past the row's own not_before, so the retry finds it due.
            later[int(outcome.retry_in) + 1].append(outbox_id)
    for delay, ids in sorted(later.items()):
        enqueue_deliveries(ids, queue_name=runtime.settings.queue_name, delay=float(delay))


def install(broker: Broker) -> Broker:
    """Make ``broker`` this process's broker and declare the actors on it: what a process that runs workers does
    (``dramatiq workers``, ``outreach up``)."""
    install_broker(broker)
    declare_actors(broker)
    return broker


def declare_actors(broker: Broker) -> dict[str, dramatiq.Actor[..., None]]:
    """Declare our actors on ``broker`` (replacing earlier declarations, so tests can switch brokers)."""
    queue = get_runtime().settings.queue_name
    options: dict[str, object] = {
        "retry_when": should_retry,
        "min_backoff": 1000,
        "max_backoff": 300_000,
        "time_limit": 120_000,
    }
    return {
        DELIVER_ACTOR: declare_actor(broker, deliver_message, DELIVER_ACTOR, queue, options),
        GROUP_ACTOR: declare_actor(broker, deliver_messages, GROUP_ACTOR, queue, options),
        **declare_batch_actor(broker, queue, options),
    }
