"""The baseline: bare Dramatiq actors on a Redis broker.

``python -m dramatiq bench.noop --processes 2 --threads 8 --queues <queue>`` runs them. It reads the same
variables as the service's workers (``OUTREACH_BROKER_URL``, ``OUTREACH_QUEUE``) so both sides of a benchmark
start from the same environment, and it imports nothing from ``outreach``: what it measures is Dramatiq, Redis
and the worker settings alone.

* ``noop`` does nothing (throughput, memory).
* ``stamp`` writes the moment it ran into a Redis hash (enqueue → run latency); one ``HSET`` is all it does.
"""

from __future__ import annotations

import os
import time

import dramatiq
import redis
from dramatiq.brokers.redis import RedisBroker

from bench import DEFAULT_REDIS_URL, NOOP_ACTOR
from bench.bare import STAMP_ACTOR

_url = os.environ.get("OUTREACH_BROKER_URL", DEFAULT_REDIS_URL)
broker = RedisBroker(url=_url)  # type: ignore[no-untyped-call]
dramatiq.set_broker(broker)
_queue = os.environ.get("OUTREACH_QUEUE", "bench")
_client = redis.Redis.from_url(_url)


def noop(i: int) -> None:
    """Accept one message and return."""


def stamp(key: str, i: int) -> None:
    """Record when message ``i`` ran (wall clock, seconds) in the hash ``key``."""
    _client.hset(key, str(i), repr(time.time()))


actor: dramatiq.Actor[[int], None] = dramatiq.Actor(
    noop, broker=broker, actor_name=NOOP_ACTOR, queue_name=_queue, priority=0, options={}
)
stamp_actor: dramatiq.Actor[[str, int], None] = dramatiq.Actor(
    stamp, broker=broker, actor_name=STAMP_ACTOR, queue_name=_queue, priority=0, options={}
)
