"""Provider pacing per sender, so a big nurture run is spread out instead of rejected with 429s.

A generic cell rate algorithm (GCRA): each sender has a "theoretical arrival time"; a send of cost ``c`` books
``c / rate`` seconds of it. A send that would have to wait longer than ``max_wait`` books nothing and is
deferred instead (the worker thread is not parked for minutes). On Redis the booking is one Lua script, so
every worker process on every host shares the pace; without Redis the pace is per process.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any, Protocol

from outreach.policy.config import RateLimitSpec


@dataclass(frozen=True)
class Booking:
    granted: bool
    wait: float  # seconds: sleep this long then send (granted), or try again after it (not granted)


class Pacer(Protocol):
    def book(self, key: str, spec: RateLimitSpec, cost: float = 1.0, max_wait: float = 5.0) -> Booking: ...


class LocalPacer:
    """In-process pacing, for the embedded default and tests."""

    def __init__(self, clock: Any = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._tat: dict[str, float] = {}

    def book(self, key: str, spec: RateLimitSpec, cost: float = 1.0, max_wait: float = 5.0) -> Booking:
        interval = 1.0 / spec.per_second
        tolerance = interval * (spec.burst - 1)
        with self._lock:
            now = self._clock()
            tat = max(self._tat.get(key, now), now)
            wait = max(0.0, tat - tolerance - now)
            if wait > max_wait:
                return Booking(False, wait)
            self._tat[key] = tat + cost * interval
            return Booking(True, wait)


_GCRA = """
local key = KEYS[1]
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local max_wait = tonumber(ARGV[4])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local tat = tonumber(redis.call('GET', key) or now)
if tat < now then tat = now end
local wait = tat - tolerance - now
if wait < 0 then wait = 0 end
if wait > max_wait then return {0, tostring(wait)} end
local new_tat = tat + cost * interval
redis.call('SET', key, tostring(new_tat), 'PX', math.ceil((new_tat - now) * 1000) + 1000)
return {1, tostring(wait)}
"""


class RedisPacer:
    """Pacing shared by every worker through one Redis (the broker's, usually)."""

    def __init__(self, url: str, prefix: str = "outreach:pace:") -> None:
        import redis

        self._client = redis.Redis.from_url(url)
        self._script = self._client.register_script(_GCRA)
        self._prefix = prefix

    def book(self, key: str, spec: RateLimitSpec, cost: float = 1.0, max_wait: float = 5.0) -> Booking:
        interval = 1.0 / spec.per_second
        granted, wait = self._script(
            keys=[self._prefix + key], args=[interval, interval * (spec.burst - 1), cost, max_wait]
        )
        return Booking(bool(int(granted)), float(wait))
