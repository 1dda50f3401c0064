"""Provider pacing: a steady rate per sender, shared through Redis by every worker."""

from __future__ import annotations

import threading
import time
import uuid

import pytest

from outreach.policy.config import RateLimitSpec
from outreach.policy.pacing import LocalPacer, RedisPacer
from tests.conftest import REDIS_URL, require_server


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_local_pacer_spaces_sends_by_the_rate() -> None:
    clock = FakeClock()
    pacer = LocalPacer(clock)
    one_per_second = RateLimitSpec(per_second=1, burst=1)
    waits = [pacer.book("twilio:+1500", one_per_second).wait for _ in range(4)]
    assert waits == [0.0, 1.0, 2.0, 3.0]
    clock.now += 10
    assert pacer.book("twilio:+1500", one_per_second).wait == 0.0


def test_local_pacer_allows_a_burst_then_paces() -> None:
    pacer = LocalPacer(FakeClock())
    spec = RateLimitSpec(per_second=10, burst=5)
    waits = [pacer.book("sendgrid:a", spec).wait for _ in range(7)]
    assert waits[:5] == pytest.approx([0.0] * 5, abs=1e-9)
    assert waits[5] == pytest.approx(0.1) and waits[6] == pytest.approx(0.2)


def test_a_long_wait_is_refused_and_books_nothing() -> None:
    pacer = LocalPacer(FakeClock())
    spec = RateLimitSpec(per_second=1)
    for _ in range(6):
        pacer.book("k", spec)
    refused = pacer.book("k", spec, max_wait=5.0)
    assert (refused.granted, refused.wait) == (False, 6.0)
    assert pacer.book("k", spec, max_wait=5.0).wait == 6.0  # the refusal did not book a slot


def test_senders_are_paced_independently() -> None:
    pacer = LocalPacer(FakeClock())
    spec = RateLimitSpec(per_second=1)
    pacer.book("twilio:+1", spec)
    assert pacer.book("twilio:+2", spec).wait == 0.0


def test_redis_pacer_is_shared_and_atomic_across_threads() -> None:
    require_server("Redis", REDIS_URL, 6379)
    key = f"test:{uuid.uuid4().hex}"
    spec = RateLimitSpec(per_second=100, burst=1)
    pacers = [RedisPacer(REDIS_URL) for _ in range(4)]
    waits: list[float] = []
    lock = threading.Lock()

    def run(pacer: RedisPacer) -> None:
        for _ in range(25):
            booking = pacer.book(key, spec, max_wait=60)
            with lock:
                waits.append(booking.wait)

    threads = [threading.Thread(target=run, args=(p,)) for p in pacers]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - started
    # 100 bookings at 100/s: the slots are spread over about a second, one every 10 ms, none shared.
    assert len(waits) == 100
    # Slot k starts 10 ms after slot k-1, however the bookings interleave: the last one waits for the rest.
    assert 0.99 - elapsed - 0.02 <= max(waits) <= 0.99 + 0.01
    assert waits.count(0.0) <= 1 + int(elapsed / 0.01)
