"""The company business calendar: holidays, make-up working days, closures, opening times, business-day delays."""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

import holidays
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from outreach.policy.calendar import BusinessCalendar, localize
from outreach.policy.config import WEEKDAYS, CalendarSpec, Window

SHANGHAI = ZoneInfo("Asia/Shanghai")
NEW_YORK = ZoneInfo("America/New_York")


@pytest.fixture(scope="module")
def cn() -> BusinessCalendar:
    return BusinessCalendar.from_spec(CalendarSpec())


@pytest.fixture(scope="module")
def us() -> BusinessCalendar:
    return BusinessCalendar.from_spec(CalendarSpec(timezone="America/New_York", country="US"))


def at(
    zone: ZoneInfo, year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0, us: int = 0
) -> datetime:
    """A wall-clock time in ``zone`` (the first occurrence if the clocks go back)."""
    return datetime(year, month, day, hour, minute, second, us, tzinfo=zone)


# --- China: golden weeks and make-up working days -------------------------------------------------------------


def test_national_day_week_is_closed(cn: BusinessCalendar) -> None:
    for day in range(1, 9):  # 2025: Oct 1-8 off (National Day, Mid-Autumn, two substituted days)
        assert not cn.is_working_day(date(2025, 10, day)), day
    assert cn.holiday_name(date(2025, 10, 1)) == "National Day"
    assert cn.is_working_day(date(2025, 10, 9))
    assert not cn.is_open(at(SHANGHAI, 2025, 10, 2, 10, 0))


def test_the_package_lists_the_makeup_days_we_rely_on() -> None:
    # If a new holidays release changed these, the calendar tests below would be testing the wrong thing.
    table = holidays.country_holidays("CN", years=(2025, 2026))
    announced = {date(2025, 1, 26), date(2025, 2, 8), date(2025, 9, 28), date(2025, 10, 11), date(2026, 2, 14)}
    assert announced <= table.weekend_workdays
    assert all(table.is_working_day(day) for day in announced)


@pytest.mark.parametrize(
    "day",
    [
        date(2025, 9, 28),  # Sunday before National Day 2025
        date(2025, 10, 11),  # Saturday after it
        date(2025, 1, 26),  # Sunday before Spring Festival 2025
        date(2026, 2, 14),  # Saturday before Spring Festival 2026
    ],
)
def test_makeup_weekend_days_are_working_days(cn: BusinessCalendar, day: date) -> None:
    assert day.weekday() in (5, 6)
    assert cn.is_makeup_day(day)
    assert cn.is_working_day(day)
    assert cn.holiday_name(day) is None
    assert cn.is_open(localize(datetime.combine(day, time(10, 0)), SHANGHAI))


def test_ordinary_weekend_is_closed(cn: BusinessCalendar) -> None:
    assert not cn.is_working_day(date(2025, 11, 15))
    assert not cn.is_working_day(date(2025, 11, 16))
    assert cn.holiday_name(date(2025, 11, 15)) is None


def test_next_opening_after_friday_evening_is_monday_morning(cn: BusinessCalendar) -> None:
    opening = cn.next_opening(at(SHANGHAI, 2025, 11, 14, 18, 1))
    assert opening == at(SHANGHAI, 2025, 11, 17, 9, 0)
    assert opening.tzinfo is UTC


def test_next_opening_skips_a_monday_holiday() -> None:
    us = BusinessCalendar.from_spec(CalendarSpec(timezone="America/New_York", country="US"))
    # Monday 2026-01-19 is Martin Luther King Jr. Day.
    assert us.next_opening(at(NEW_YORK, 2026, 1, 16, 18, 1)) == at(NEW_YORK, 2026, 1, 20, 9, 0)


def test_next_opening_lands_on_a_makeup_sunday(cn: BusinessCalendar) -> None:
    assert cn.next_opening(at(SHANGHAI, 2025, 9, 26, 18, 1)) == at(SHANGHAI, 2025, 9, 28, 9, 0)


def test_next_opening_across_the_golden_week(cn: BusinessCalendar) -> None:
    assert cn.next_opening(at(SHANGHAI, 2025, 9, 30, 18, 0)) == at(SHANGHAI, 2025, 10, 9, 9, 0)


def test_next_opening_is_the_moment_itself_when_open(cn: BusinessCalendar) -> None:
    moment = at(SHANGHAI, 2025, 11, 14, 17, 59, 59)
    assert cn.is_open(moment)
    assert cn.next_opening(moment) == moment


def test_opening_hours_are_end_exclusive(cn: BusinessCalendar) -> None:
    assert cn.is_open(at(SHANGHAI, 2025, 11, 14, 9, 0))
    assert not cn.is_open(at(SHANGHAI, 2025, 11, 14, 8, 59))
    assert not cn.is_open(at(SHANGHAI, 2025, 11, 14, 18, 0))
    assert cn.next_opening(at(SHANGHAI, 2025, 11, 14, 7, 0)) == at(SHANGHAI, 2025, 11, 14, 9, 0)


def test_open_is_judged_in_the_company_timezone(cn: BusinessCalendar) -> None:
    # 02:00 UTC on a Monday is 10:00 in Shanghai.
    assert cn.is_open(datetime(2025, 11, 17, 2, 0, tzinfo=UTC))
    assert not cn.is_open(datetime(2025, 11, 17, 12, 0, tzinfo=UTC))


# --- closures and other countries ---------------------------------------------------------------------------------


def test_configured_closures_are_closed() -> None:
    spec = CalendarSpec.model_validate(
        {
            "closures": [
                date(2025, 12, 24),
                {"from": date(2025, 12, 29), "to": date(2025, 12, 31), "name": "year-end shutdown"},
            ]
        }
    )
    calendar = BusinessCalendar.from_spec(spec)
    assert not calendar.is_working_day(date(2025, 12, 24))
    assert calendar.holiday_name(date(2025, 12, 24)) == "company closure"
    for day in (29, 30, 31):
        assert not calendar.is_working_day(date(2025, 12, day))
        assert calendar.holiday_name(date(2025, 12, day)) == "year-end shutdown"
    assert calendar.is_working_day(date(2025, 12, 26))
    # 2026-01-01 is New Year's Day, 01-02 a substituted day off, 01-03 Saturday, 01-04 a make-up Sunday.
    assert calendar.next_opening(at(SHANGHAI, 2025, 12, 26, 19, 0)) == at(SHANGHAI, 2026, 1, 4, 9, 0)


def test_us_calendar_has_independence_day(us: BusinessCalendar) -> None:
    assert not us.is_working_day(date(2025, 7, 4))  # a Friday
    assert us.holiday_name(date(2025, 7, 4)) == "Independence Day"
    assert not us.is_working_day(date(2026, 7, 3))  # observed: July 4th 2026 is a Saturday
    assert us.is_working_day(date(2025, 10, 1))  # China's National Day is nothing special in New York
    assert us.next_opening(at(NEW_YORK, 2025, 7, 3, 18, 30)) == at(NEW_YORK, 2025, 7, 7, 9, 0)


def test_observed_new_year_in_the_previous_year(us: BusinessCalendar) -> None:
    # 2022-01-01 was a Saturday; the US observed it on Friday 2021-12-31.
    assert not us.is_working_day(date(2021, 12, 31))


def test_subdivision_holidays() -> None:
    california = BusinessCalendar.from_spec(
        CalendarSpec(timezone="America/Los_Angeles", country="US", subdivision="CA")
    )
    assert not california.is_working_day(date(2025, 3, 31))  # Cesar Chavez Day
    assert BusinessCalendar.from_spec(CalendarSpec(timezone="America/New_York", country="US")).is_working_day(
        date(2025, 3, 31)
    )


def test_unknown_subdivision_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="subdivision"):
        BusinessCalendar.from_spec(CalendarSpec(country="US", subdivision="XX"))


def test_no_country_means_no_public_holidays() -> None:
    calendar = BusinessCalendar.from_spec(CalendarSpec(country=None))
    assert calendar.is_working_day(date(2025, 10, 1))
    assert not calendar.is_working_day(date(2025, 9, 28))  # no make-up days without a country either


def test_working_weekdays_follow_the_spec() -> None:
    calendar = BusinessCalendar.from_spec(
        CalendarSpec(country=None, working_days=("sun", "mon", "tue", "wed", "thu"), working_hours="08:00-16:00")
    )
    assert calendar.is_working_day(date(2025, 11, 16))  # Sunday
    assert not calendar.is_working_day(date(2025, 11, 14))  # Friday
    assert calendar.next_opening(at(SHANGHAI, 2025, 11, 13, 16, 0)) == at(SHANGHAI, 2025, 11, 16, 8, 0)


# --- business days --------------------------------------------------------------------------------------------


def test_add_business_days_across_a_weekend(cn: BusinessCalendar) -> None:
    friday = at(SHANGHAI, 2025, 11, 14, 15, 30)
    assert cn.add_business_days(friday, 1) == at(SHANGHAI, 2025, 11, 17, 15, 30)
    assert cn.add_business_days(friday, 2) == at(SHANGHAI, 2025, 11, 18, 15, 30)
    assert cn.add_business_days(at(SHANGHAI, 2025, 11, 15, 11, 0), 2) == at(SHANGHAI, 2025, 11, 18, 11, 0)


def test_add_business_days_across_a_holiday(cn: BusinessCalendar, us: BusinessCalendar) -> None:
    assert cn.add_business_days(at(SHANGHAI, 2025, 9, 30, 10, 0), 1) == at(SHANGHAI, 2025, 10, 9, 10, 0)
    assert us.add_business_days(at(NEW_YORK, 2025, 7, 3, 10, 0), 1) == at(NEW_YORK, 2025, 7, 7, 10, 0)


def test_add_business_days_counts_makeup_days(cn: BusinessCalendar) -> None:
    # Friday 2025-09-26 → Sunday 09-28 (make-up) → Monday 09-29.
    assert cn.add_business_days(at(SHANGHAI, 2025, 9, 26, 10, 0), 1) == at(SHANGHAI, 2025, 9, 28, 10, 0)
    assert cn.add_business_days(at(SHANGHAI, 2025, 9, 26, 10, 0), 2) == at(SHANGHAI, 2025, 9, 29, 10, 0)


def test_add_business_days_backwards_and_zero(cn: BusinessCalendar) -> None:
    monday = at(SHANGHAI, 2025, 11, 17, 10, 0)
    assert cn.add_business_days(monday, -1) == at(SHANGHAI, 2025, 11, 14, 10, 0)
    assert cn.add_business_days(monday, 0) is monday


def test_add_business_days_keeps_company_local_time(cn: BusinessCalendar) -> None:
    # 23:30 UTC on Thursday is 07:30 Friday in Shanghai: one business day later is Monday 07:30 Shanghai.
    moment = datetime(2025, 11, 13, 23, 30, tzinfo=UTC)
    assert cn.add_business_days(moment, 1) == at(SHANGHAI, 2025, 11, 17, 7, 30)


def test_add_business_days_into_a_dst_gap() -> None:
    calendar = BusinessCalendar(NEW_YORK, working_weekdays=range(7), hours=Window.parse("09:00-17:00"))
    # 02:30 does not exist on 2026-03-08 in New York: the clocks jump from 02:00 EST to 03:00 EDT (07:00 UTC).
    result = calendar.add_business_days(at(NEW_YORK, 2026, 3, 7, 2, 30), 1)
    assert result == datetime(2026, 3, 8, 7, 0, tzinfo=UTC)


def test_a_calendar_without_working_days_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="working_days is empty"):
        BusinessCalendar.from_spec(CalendarSpec(working_days=()))


def test_a_search_without_any_working_day_ends_with_a_clear_error() -> None:
    closed = CalendarSpec.model_validate({"closures": [{"from": date(2025, 11, 1), "to": date(2027, 6, 30)}]})
    calendar = BusinessCalendar.from_spec(closed)
    with pytest.raises(ValueError, match="no working day within 400 days"):
        calendar.next_opening(at(SHANGHAI, 2025, 11, 14, 18, 1))
    with pytest.raises(ValueError, match=r"calendar\.closures"):
        calendar.add_business_days(at(SHANGHAI, 2025, 11, 14, 18, 1), 2)
    # Before the closure it still works.
    assert calendar.add_business_days(at(SHANGHAI, 2025, 10, 29, 10, 0), 2) == at(SHANGHAI, 2025, 10, 31, 10, 0)


def test_naive_datetimes_are_refused(cn: BusinessCalendar) -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        cn.is_open(datetime(2025, 11, 14, 10, 0))
    with pytest.raises(ValueError, match="timezone-aware"):
        cn.add_business_days(datetime(2025, 11, 14, 10, 0), 1)


# --- properties -------------------------------------------------------------------------------------------------

COUNTRIES = st.sampled_from([None, "CN", "US", "DE"])
ZONES = st.sampled_from(["Asia/Shanghai", "America/New_York", "Europe/Berlin", "Australia/Lord_Howe", "UTC"])
INSTANTS = st.datetimes(min_value=datetime(2024, 1, 1), max_value=datetime(2028, 12, 31), timezones=st.just(UTC))


@st.composite
def calendars(draw: st.DrawFn) -> tuple[BusinessCalendar, CalendarSpec]:
    weekdays = draw(st.lists(st.sampled_from(WEEKDAYS), min_size=1, max_size=7, unique=True))
    closure_days = draw(st.lists(st.dates(date(2024, 1, 1), date(2029, 1, 31)), max_size=20))
    spec = CalendarSpec(
        timezone=draw(ZONES), country=draw(COUNTRIES), working_days=tuple(weekdays), closures=tuple(closure_days)
    )
    return BusinessCalendar.from_spec(spec), spec


def reference_working_days(spec: CalendarSpec, first: date, last: date) -> list[date]:
    """Every working day in [first, last], straight from the package's table for the whole span at once."""
    table = (
        holidays.country_holidays(spec.country, years=range(first.year - 1, last.year + 2))
        if spec.country
        else holidays.HolidayBase()
    )
    weekdays = {WEEKDAYS.index(name) for name in spec.working_days}
    closed = {c for c in spec.closures if isinstance(c, date)}
    days = [first + timedelta(days=n) for n in range((last - first).days + 1)]
    return [
        d
        for d in days
        if d not in closed and d not in table and (d.weekday() in weekdays or d in table.weekend_workdays)
    ]


@settings(max_examples=200, deadline=None)
@given(calendars(), INSTANTS, st.integers(min_value=-25, max_value=25))
def test_add_business_days_matches_a_slow_reference(
    built: tuple[BusinessCalendar, CalendarSpec], moment: datetime, days: int
) -> None:
    calendar, spec = built
    result = calendar.add_business_days(moment, days)
    if days == 0:
        assert result == moment
        return
    start = moment.astimezone(calendar.zone)
    end = result.astimezone(calendar.zone)
    assert calendar.is_working_day(end.date())
    assert (end > start) == (days > 0)
    low, high = sorted((start.date(), end.date()))
    between = reference_working_days(spec, low, high)
    # Working days strictly after the start day up to and including the target day (mirrored when going back).
    counted = [d for d in between if d != start.date()]
    assert len(counted) == abs(days)
    assert end.date() in between
    # Same wall time of day, unless that time did not exist on the target day (then the first instant after it).
    assert result == localize(datetime.combine(end.date(), start.time()), calendar.zone)


@settings(max_examples=200, deadline=None)
@given(st.dates(date(2024, 1, 1), date(2026, 12, 31)))
def test_mainland_working_days_agree_with_the_package(day: date) -> None:
    calendar = BusinessCalendar.from_spec(CalendarSpec())
    table = holidays.country_holidays("CN", years=day.year)
    assert calendar.is_working_day(day) == table.is_working_day(day)


@settings(max_examples=200, deadline=None)
@given(calendars(), INSTANTS)
def test_next_opening_is_the_first_open_minute(built: tuple[BusinessCalendar, CalendarSpec], moment: datetime) -> None:
    calendar, _ = built
    opening = calendar.next_opening(moment)
    assert opening >= moment
    assert calendar.is_open(opening)
    if opening != moment:
        assert not calendar.is_open(moment)
        assert not calendar.is_open(opening - timedelta(minutes=1))
