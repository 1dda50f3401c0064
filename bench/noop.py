"""The baseline: a bare Dramatiq actor that does nothing, on a Redis broker.

``python -m dramatiq bench.noop --processes 2 --threads 8 --queues <queue>`` runs it. It reads the same
variables as the service's workers (``OUTREACH_BROKER_URL``, ``OUTREACH_QUEUE``) so both sides of the benchmark
start from the same environment, and it imports nothing from ``outreach``: what it measures is Dramatiq, Redis
and the worker settings alone.
"""

from __future__ import annotations

import os

import dramatiq
from dramatiq.brokers.redis import RedisBroker

from bench import DEFAULT_REDIS_URL, NOOP_ACTOR

broker = RedisBroker(url=os.environ.get("OUTREACH_BROKER_URL", DEFAULT_REDIS_URL))  # type: ignore[no-untyped-call]
dramatiq.set_broker(broker)


def noop(i: int) -> None:
    """Accept one message and return."""


actor: dramatiq.Actor[[int], None] = dramatiq.Actor(
    noop,
    broker=broker,
    actor_name=NOOP_ACTOR,
    queue_name=os.environ.get("OUTREACH_QUEUE", "bench"),
    priority=0,
    options={},
)
