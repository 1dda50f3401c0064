"""The company business calendar: working days, working hours, public holidays and company closures.

Campaign delays written in business days ("2 business days") count with :meth:`BusinessCalendar.add_business_days`;
the out-of-hours auto-reply asks :meth:`BusinessCalendar.is_open` and :meth:`BusinessCalendar.next_opening`.

A day is a working day when it is not a public holiday, not a company closure, and either one of the configured
working weekdays or an official make-up working day. Mainland China moves working days onto weekends around its
long holidays (调休): the Saturday or Sunday before or after a golden week is worked, and the weekdays in the week
are off. The ``holidays`` package publishes both halves: the weekday days off are ordinary holidays, the worked
weekend days are its ``weekend_workdays``. Make-up days are known only for the years the government has announced
(each November for the next year); for later years the package estimates the holidays and lists no make-up days.

The module also holds the local-time arithmetic that quiet hours share: finding the first instant whose wall-clock
time falls inside a daily window, across DST gaps (a wall time that does not exist on a spring-forward day becomes
the first valid instant after it) and folds (a wall time that happens twice counts both times).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from functools import lru_cache
from zoneinfo import ZoneInfo

import holidays

from outreach.policy.config import WEEKDAYS, CalendarSpec, Closure, Window

SEARCH_DAYS = 400
"""How far ahead searches look for a working day or an open window before giving up."""

_DAY = timedelta(days=1)

DayFilter = Callable[[date], bool]


def require_aware(moment: datetime, what: str = "moment") -> None:
    """Refuse naive datetimes: ``astimezone`` would silently read them as the server's local time."""
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError(f"{what} must be timezone-aware, got {moment.isoformat()}")


def _offset(instant: datetime, zone: ZoneInfo) -> timedelta:
    offset = instant.astimezone(zone).utcoffset()
    assert offset is not None  # a ZoneInfo always has an offset for an aware instant
    return offset


def _transition_within(low: datetime, high: datetime, zone: ZoneInfo) -> datetime:
    """The first instant in ``(low, high]`` whose UTC offset differs from ``low``'s (there must be one).

    Transitions fall on whole seconds, so a bisection over POSIX seconds finds the exact instant.
    """
    before = _offset(low, zone)
    lo = math.floor(low.timestamp())
    hi = math.ceil(high.timestamp())
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if _offset(datetime.fromtimestamp(mid, UTC), zone) == before:
            lo = mid
        else:
            hi = mid
    return datetime.fromtimestamp(hi, UTC)


def next_transition(start: datetime, limit: datetime, zone: ZoneInfo) -> datetime | None:
    """The first UTC-offset change of ``zone`` in ``(start, limit]``, or None.

    ``zoneinfo`` does not expose its transition table, so this probes once a day and bisects the day in which the
    offset changed. Two transitions less than a day apart would be missed; no zone has had those in decades.
    """
    before = _offset(start, zone)
    probe = start
    while probe < limit:
        step = min(probe + _DAY, limit)
        if _offset(step, zone) != before:
            return _transition_within(probe, step, zone)
        probe = step
    return None


def localize(wall: datetime, zone: ZoneInfo) -> datetime:
    """The UTC instant of the naive wall-clock time ``wall`` in ``zone``.

    A wall time that happens twice (a DST fold) is its first occurrence. One that never happens (a DST gap) is the
    first valid instant after it, the moment the clocks jump, so "08:00 on a day whose 08:00 is skipped" still
    names a real instant and never one before the wall time asked for.
    """
    first = wall.replace(tzinfo=zone, fold=0)
    if first.astimezone(UTC).astimezone(zone).replace(tzinfo=None) == wall.replace(tzinfo=None):
        return first.astimezone(UTC)
    # In a gap, fold=0 reads the wall time with the offset before the jump and fold=1 with the one after; the two
    # UTC readings bracket the transition.
    a = first.astimezone(UTC)
    b = wall.replace(tzinfo=zone, fold=1).astimezone(UTC)
    return _transition_within(min(a, b), max(a, b), zone)


def _first_wall_time(start: datetime, window: Window, day_ok: DayFilter | None, limit: date) -> datetime | None:
    """The first naive wall time at or after ``start`` inside ``window`` on a day passing ``day_ok``."""
    day = start.date()
    if day_ok is None or day_ok(day):
        if window.contains(start.time()):
            return start
        if start.time() < window.start:
            return datetime.combine(day, window.start)
    day += _DAY
    while day <= limit:
        if day_ok is None or day_ok(day):
            return datetime.combine(day, window.start)
        day += _DAY
    return None


def in_window(moment: datetime, zone: ZoneInfo, window: Window, day_ok: DayFilter | None = None) -> bool:
    """Whether the wall-clock time of ``moment`` in ``zone`` is inside ``window`` on a day passing ``day_ok``."""
    local = moment.astimezone(zone)
    return window.contains(local.time()) and (day_ok is None or day_ok(local.date()))


def first_in_window(
    moment: datetime,
    zone: ZoneInfo,
    window: Window,
    day_ok: DayFilter | None = None,
    *,
    search_days: int = SEARCH_DAYS,
) -> datetime | None:
    """The first instant at or after ``moment`` whose local time in ``zone`` is inside ``window`` on an allowed day.

    ``day_ok`` decides which local dates count (None: every day). Returns ``moment`` itself (in UTC) when it is
    already inside, None when nothing qualifies within ``search_days``.

    The search walks stretches of constant UTC offset: inside one, wall time runs straight, so the answer is plain
    date arithmetic; when a DST transition comes first, the search restarts at the transition with the new offset.
    That one loop covers skipped opening times (the answer is the jump), repeated hours (the window can open a
    second time when the clocks go back) and transitions at midnight.
    """
    require_aware(moment)
    cursor = moment.astimezone(UTC)
    last_day = (cursor + timedelta(days=search_days)).astimezone(zone).date()
    while True:
        offset = _offset(cursor, zone)
        wall = _first_wall_time((cursor + offset).replace(tzinfo=None), window, day_ok, last_day)
        if wall is None:
            return None
        candidate = (wall - offset).replace(tzinfo=UTC)
        transition = next_transition(cursor, candidate, zone)
        if transition is None:
            return candidate
        cursor = transition


def window_close(moment: datetime, zone: ZoneInfo, window: Window) -> datetime:
    """When the stretch of ``window`` that contains ``moment`` ends: the window's end, or midnight if it runs to 24:00.

    A DST jump that moves the wall clock out of the window ends it early; one that keeps it inside does not.
    ``moment`` must be inside the window.
    """
    require_aware(moment)
    cursor = moment.astimezone(UTC)
    day = cursor.astimezone(zone).date()
    while True:
        offset = _offset(cursor, zone)
        end = datetime.combine(day, window.end) if window.end is not None else datetime.combine(day + _DAY, time())
        candidate = (end - offset).replace(tzinfo=UTC)
        transition = next_transition(cursor, candidate, zone)
        if transition is None:
            return candidate
        local = transition.astimezone(zone)
        if local.date() != day or not window.contains(local.time()):
            return transition
        cursor = transition


@lru_cache(maxsize=64)
def _check_region(country: str, subdivision: str | None) -> None:
    """Fail at start on an unknown subdivision rather than on the first holiday lookup."""
    try:
        # An empty year list validates country and subdivision without computing any holidays.
        holidays.country_holidays(country, subdiv=subdivision, years=())
    except NotImplementedError as exc:
        raise ValueError(f"calendar: {exc}") from None


@dataclass(frozen=True)
class _Year:
    holidays: Mapping[date, str]
    makeup_days: frozenset[date]


@lru_cache(maxsize=256)
def _public_holidays(country: str, subdivision: str | None, year: int) -> _Year:
    """One year of public holidays and make-up working days, shared by every calendar for that country.

    The package is asked for the neighbouring years too and the result cut to ``year``: an observed holiday can move
    across New Year (the US observes 2022's New Year's Day on 2021-12-31), and its make-up day list is not limited
    to the years asked for.
    """
    table = holidays.country_holidays(country, subdiv=subdivision, years=(year - 1, year, year + 1))
    names = {day: str(name) for day, name in table.items() if day.year == year}
    makeup = frozenset(day for day in table.weekend_workdays if day.year == year)
    return _Year(names, makeup)


class BusinessCalendar:
    """Working days and hours of the company, in the company's timezone.

    Build it with :meth:`from_spec`. Holiday tables are loaded per year on first use and shared process-wide;
    loading is idempotent, so two threads racing on a cold year at worst both compute the same table.
    """

    def __init__(
        self,
        zone: ZoneInfo,
        *,
        working_weekdays: Iterable[int],
        hours: Window,
        country: str | None = None,
        subdivision: str | None = None,
        closures: Mapping[date, str] | None = None,
    ) -> None:
        self.zone = zone
        self.working_weekdays = frozenset(working_weekdays)
        if not self.working_weekdays:
            # Make-up days alone would open the company a few weekends a year; that is a configuration mistake.
            raise ValueError("calendar.working_days is empty: the business calendar needs at least one working day")
        self.hours = hours
        self.country = country
        self.subdivision = subdivision
        self.closures: Mapping[date, str] = dict(closures or {})
        self._lock = threading.Lock()
        self._years: dict[int, _Year] = {}

    @classmethod
    def from_spec(cls, spec: CalendarSpec) -> BusinessCalendar:
        """The calendar described by the ``calendar`` section of the policy file."""
        if spec.country is not None:
            _check_region(spec.country, spec.subdivision)
        closures: dict[date, str] = {}
        for closure in spec.closures:
            if isinstance(closure, Closure):
                closures.update(dict.fromkeys(closure.days(), closure.name))
            else:
                closures[closure] = "company closure"
        return cls(
            ZoneInfo(spec.timezone),
            working_weekdays=(WEEKDAYS.index(day) for day in spec.working_days),
            hours=spec.working_hours,
            country=spec.country,
            subdivision=spec.subdivision,
            closures=closures,
        )

    def _year(self, year: int) -> _Year:
        found = self._years.get(year)
        if found is not None:
            return found
        if self.country is None:
            found = _Year({}, frozenset())
        else:
            found = _public_holidays(self.country, self.subdivision, year)
        with self._lock:
            return self._years.setdefault(year, found)

    def holiday_name(self, day: date) -> str | None:
        """The public holiday or company closure on ``day``, or None on an ordinary day (weekends included)."""
        name = self._year(day.year).holidays.get(day)
        return name if name is not None else self.closures.get(day)

    def is_makeup_day(self, day: date) -> bool:
        """Whether ``day`` is an official make-up working day (a weekend day worked in exchange for a holiday)."""
        return day in self._year(day.year).makeup_days

    def is_working_day(self, day: date) -> bool:
        """Whether ``day`` (a date in the company's timezone) is worked."""
        if day in self.closures:
            return False
        year = self._year(day.year)
        if day in year.holidays:
            return False
        return day.weekday() in self.working_weekdays or day in year.makeup_days

    def is_open(self, moment: datetime) -> bool:
        """Whether the company is at work at ``moment``: a working day, inside working hours, company time."""
        require_aware(moment)
        return in_window(moment, self.zone, self.hours, self.is_working_day)

    def next_opening(self, moment: datetime) -> datetime:
        """``moment`` (as UTC) if the company is open then, else when it next opens.

        Raises ValueError when no working day follows within :data:`SEARCH_DAYS` days (closures covering them all).
        """
        found = first_in_window(moment, self.zone, self.hours, self.is_working_day)
        if found is None:
            raise ValueError(self._nothing_open(moment))
        return found

    def add_business_days(self, moment: datetime, days: int) -> datetime:
        """The same company-local time of day ``days`` working days after ``moment`` (before it, if negative).

        The days in between that are not worked (weekends, holidays, closures) are skipped, make-up working days
        count. The starting day counts as day zero whether or not it is worked, so 2 business days from a Saturday
        is the following Tuesday. A time of day that does not exist on the target day (DST) moves to the first
        valid instant after it. ``days=0`` returns ``moment`` unchanged.
        """
        require_aware(moment)
        if days == 0:
            return moment
        local = moment.astimezone(self.zone)
        step = _DAY if days > 0 else -_DAY
        day = local.date()
        remaining = abs(days)
        idle = 0
        while remaining:
            day += step
            if self.is_working_day(day):
                remaining -= 1
                idle = 0
            else:
                idle += 1
                if idle > SEARCH_DAYS:
                    raise ValueError(self._nothing_open(moment))
        return localize(datetime.combine(day, local.time()), self.zone)

    def _nothing_open(self, moment: datetime) -> str:
        weekdays = ", ".join(WEEKDAYS[d] for d in sorted(self.working_weekdays))
        return (
            f"the business calendar has no working day within {SEARCH_DAYS} days of {moment.isoformat()} "
            f"(working days: {weekdays}); check calendar.working_days and calendar.closures in the policy file"
        )
