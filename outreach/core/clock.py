"""The one clock: every read of business time ("now") in the service goes through :func:`now`.

Business time decides everything the candidate can notice: which steps are due, quiet hours, caps and their
windows, the business calendar, out-of-office pauses, leases and the sweeper, alerts, analytics windows, token
and webhook freshness. Reading it in one place is what lets a test, ``outreach tick --now``, the simulator and
``OUTREACH_CLOCK_START`` move the whole service to another instant at once, instead of judging half a pass at
one time and half at another.

Durations that are not times of day (a render's CPU budget, a rate limiter's refill, a retry's backoff) use
:func:`time.monotonic` directly: they measure elapsed seconds and must not jump when the clock is moved.

The clock is process-wide (worker threads read the same one) and replaced with :func:`set_clock`. A block of
code can run on a clock of its own with :func:`using` or :func:`travel` (a scheduler pass "as if at T" and the
sends it makes in the same thread): that override is a context variable, so other threads (the workers of
``outreach up``) keep the process's clock. Three kinds ship here:

- :class:`WallClock`, the default: the machine's time.
- :class:`TravelClock`: starts at a given instant and runs at real speed from there (``tick --now``,
  ``OUTREACH_CLOCK_START``, tests).
- :class:`FixedClock`: stands still until it is told to move (tests, the simulator).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime, timedelta
from typing import Protocol, runtime_checkable


@runtime_checkable
class Clock(Protocol):
    def now(self) -> datetime:
        """The current instant, timezone-aware, in UTC."""


class WallClock:
    """The machine's clock."""

    def now(self) -> datetime:
        return datetime.now(UTC)

    def __repr__(self) -> str:
        return "WallClock()"


def _aware(at: datetime) -> datetime:
    if at.tzinfo is None:
        raise ValueError(f"a clock needs a timezone-aware instant, got {at.isoformat()}")
    return check_instant(at)


class TravelClock:
    """Starts at ``start`` and runs at the wall clock's pace from the moment it is made."""

    def __init__(self, start: datetime) -> None:
        self.start = _aware(start)
        self._began = time.monotonic()

    def now(self) -> datetime:
        return self.start + timedelta(seconds=time.monotonic() - self._began)

    def __repr__(self) -> str:
        return f"TravelClock(start={self.start.isoformat()})"


class FixedClock:
    """Stands at one instant until :meth:`set` or :meth:`advance` moves it."""

    def __init__(self, at: datetime) -> None:
        self._at = _aware(at)
        self._lock = threading.Lock()

    def now(self) -> datetime:
        return self._at

    def set(self, at: datetime) -> None:
        with self._lock:
            self._at = _aware(at)

    def advance(self, delta: timedelta) -> datetime:
        with self._lock:
            self._at += delta
            return self._at

    def __repr__(self) -> str:
        return f"FixedClock(at={self._at.isoformat()})"


class _CallableClock:
    def __init__(self, read: Callable[[], datetime]) -> None:
        self._read = read

    def now(self) -> datetime:
        return self._read()


#: The instants a clock may be moved to: far enough either way for any trial, near enough that the service's
#: arithmetic on them (leases, windows of months, a re-contact in half a year) stays inside ``datetime``'s range.
EARLIEST = datetime(1970, 1, 1, tzinfo=UTC)
LATEST = datetime(2999, 12, 31, 23, 59, 59, tzinfo=UTC)


def check_instant(at: datetime) -> datetime:
    """``at`` in UTC if it is aware and between :data:`EARLIEST` and :data:`LATEST`; ``ValueError`` saying why not."""
    if at.tzinfo is None:
        raise ValueError("needs a timezone offset (Z or +08:00)")
    try:
        utc: datetime | None = at.astimezone(UTC)
    except OverflowError:  # 0001-01-01T00:00+14:00 has no UTC
        utc = None
    if utc is None or not EARLIEST <= utc <= LATEST:
        raise ValueError(f"must lie between {EARLIEST:%Y-%m-%d} and {LATEST:%Y-%m-%d}")
    return utc


_WALL = WallClock()
_current: Clock = _WALL
_override: ContextVar[Clock | None] = ContextVar("outreach_clock", default=None)


def now() -> datetime:
    """Business time: the current instant of the service's clock, aware UTC."""
    override = _override.get()
    return (override or _current).now()


#: The name most of the code base reads the time by.
utcnow = now


def current() -> Clock:
    return _override.get() or _current


def set_clock(clock: Clock | Callable[[], datetime] | None) -> None:
    """Replace the process's clock; ``None`` restores the wall clock. A plain function returning an aware
    datetime is accepted too."""
    global _current
    if clock is None:
        _current = _WALL
    elif isinstance(clock, WallClock | TravelClock | FixedClock) or not callable(clock):
        _current = clock
    else:
        _current = _CallableClock(clock)


@contextmanager
def using(clock: Clock) -> Iterator[Clock]:
    """Run a block (in this thread or task) on ``clock``; other threads keep theirs."""
    token = _override.set(clock)
    try:
        yield clock
    finally:
        _override.reset(token)


@contextmanager
def travel(at: datetime | None) -> Iterator[Clock]:
    """Run a block as if it started at ``at`` (time runs on from there); ``None``, or the instant the clock
    already reads (a test's fixed clock), leaves the clock alone."""
    if at is None or current().now() == at:
        yield current()
        return
    with using(TravelClock(at)) as clock:
        yield clock
