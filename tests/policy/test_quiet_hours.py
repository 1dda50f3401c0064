"""Quiet hours: windows per channel, category and country, in the recipient's timezone, across DST."""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta
from typing import cast
from zoneinfo import ZoneInfo, available_timezones

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy.orm import Session

from outreach.domain.campaigns import Category
from outreach.policy.base import Stage, Subject, Verdict
from outreach.policy.calendar import BusinessCalendar, next_transition
from outreach.policy.config import CalendarSpec, EmailWindow, QuietHoursSpec, Window
from outreach.policy.quiet_hours import QuietHoursRule, next_allowed, spread_offset, validity_period, window_for

SHANGHAI = ZoneInfo("Asia/Shanghai")
BERLIN = ZoneInfo("Europe/Berlin")
NEW_YORK = ZoneInfo("America/New_York")
LOS_ANGELES = ZoneInfo("America/Los_Angeles")
CALENDAR = BusinessCalendar.from_spec(CalendarSpec())
NO_SESSION = cast(Session, None)  # the rule reads no data


def at(
    zone: ZoneInfo, year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0, us: int = 0
) -> datetime:
    """A wall-clock time in ``zone`` (the first occurrence if the clocks go back)."""
    return datetime(year, month, day, hour, minute, second, us, tzinfo=zone)


def subject(
    now: datetime,
    *,
    channel: str = "sms",
    category: str = "transactional",
    zone: ZoneInfo = SHANGHAI,
    country: str | None = "CN",
    address: str | None = "+8613800138000",
    message_id: str | None = "msg-1",
) -> Subject:
    return Subject(
        candidate_id=42,
        channel=channel,
        category=category,
        campaign="jd_intro",
        address=address,
        zone=zone,
        country=country,
        now=now,
        stage=Stage.SEND,
        message_id=message_id,
    )


# --- window_for -------------------------------------------------------------------------------------------------


def test_sms_window_by_country_else_the_default() -> None:
    spec = QuietHoursSpec.model_validate({"sms_by_country": {"us": "09:00-20:00"}})
    assert window_for(spec, "sms", "nurture", "US") == (Window.parse("09:00-20:00"), False)
    assert window_for(spec, "sms", "transactional", "us") == (Window.parse("09:00-20:00"), False)
    assert window_for(spec, "sms", "transactional", "CN") == (Window.parse("08:00-20:00"), False)
    assert window_for(spec, "sms", "transactional", None) == (Window.parse("08:00-20:00"), False)


def test_email_window_by_category() -> None:
    spec = QuietHoursSpec()
    assert window_for(spec, "email", "nurture", "CN") == (Window.parse("09:00-19:00"), True)
    assert window_for(spec, "email", "transactional", "CN") == (None, False)
    only_nurture = QuietHoursSpec(email={Category.NURTURE: EmailWindow(hours=Window.parse("10:00-16:00"))})
    assert window_for(only_nurture, "email", "transactional", None) == (None, False)
    with pytest.raises(ValueError, match="category"):
        window_for(spec, "email", "newsletter", None)
    with pytest.raises(ValueError, match="channel"):
        window_for(spec, "fax", "nurture", None)


# --- the rule -----------------------------------------------------------------------------------------------------


def test_sms_at_night_in_shanghai_is_deferred_to_the_morning() -> None:
    spec = QuietHoursSpec()
    decision = QuietHoursRule(spec, CALENDAR).check(NO_SESSION, subject(at(SHANGHAI, 2026, 11, 25, 21, 0)))
    assert decision.verdict is Verdict.DEFER
    assert decision.rule == "quiet_hours"
    opens = at(SHANGHAI, 2026, 11, 26, 8, 0)
    assert decision.until is not None
    assert opens <= decision.until < opens + spec.spread
    assert decision.reason == "outside 08:00-20:00 in Asia/Shanghai (SMS); next window opens 2026-11-26 08:00 local"


def test_sms_in_the_morning_is_allowed() -> None:
    decision = QuietHoursRule(QuietHoursSpec(), CALENDAR).check(NO_SESSION, subject(at(SHANGHAI, 2026, 11, 25, 10, 0)))
    assert decision.allowed


def test_sms_windows_ignore_weekends_and_holidays() -> None:
    rule = QuietHoursRule(QuietHoursSpec(), CALENDAR)
    assert rule.check(NO_SESSION, subject(at(SHANGHAI, 2025, 10, 1, 10, 0))).allowed  # National Day
    assert rule.check(NO_SESSION, subject(at(SHANGHAI, 2026, 11, 28, 10, 0))).allowed  # a Saturday


def test_us_number_uses_the_us_window_in_its_own_zone() -> None:
    spec = QuietHoursSpec.model_validate({"sms_by_country": {"US": "09:00-20:00"}})
    rule = QuietHoursRule(spec, CALENDAR)
    early = subject(at(LOS_ANGELES, 2026, 11, 25, 8, 30), zone=LOS_ANGELES, country="US", address="+14155550100")
    decision = rule.check(NO_SESSION, early)
    assert decision.verdict is Verdict.DEFER and decision.until is not None
    opens = at(LOS_ANGELES, 2026, 11, 25, 9, 0)
    assert opens <= decision.until < opens + spec.spread
    assert "America/Los_Angeles" in decision.reason
    late = subject(at(LOS_ANGELES, 2026, 11, 25, 19, 30), zone=LOS_ANGELES, country="US")
    assert rule.check(NO_SESSION, late).allowed
    # The same local time on a Chinese number is inside the default 08:00-20:00.
    assert rule.check(NO_SESSION, subject(at(SHANGHAI, 2026, 11, 25, 8, 30))).allowed


def test_nurture_email_on_a_saturday_waits_for_monday_morning() -> None:
    spec = QuietHoursSpec()
    saturday = subject(
        at(BERLIN, 2026, 11, 28, 11, 0), channel="email", category="nurture", zone=BERLIN, address="anna@example.de"
    )
    decision = QuietHoursRule(spec, CALENDAR).check(NO_SESSION, saturday)
    assert decision.verdict is Verdict.DEFER and decision.until is not None
    monday = at(BERLIN, 2026, 11, 30, 9, 0)
    assert monday <= decision.until < monday + spec.spread
    assert decision.reason == (
        "outside 09:00-19:00 on working days in Europe/Berlin (nurture email); next window opens 2026-11-30 09:00 local"
    )


def test_nurture_email_waits_out_the_golden_week() -> None:
    golden_week = subject(at(SHANGHAI, 2026, 10, 1, 10, 0), channel="email", category="nurture")
    decision = QuietHoursRule(QuietHoursSpec(), CALENDAR).check(NO_SESSION, golden_week)
    assert decision.until is not None
    assert decision.until.astimezone(SHANGHAI).date() == date(2026, 10, 8)


def test_transactional_email_goes_at_any_time() -> None:
    night = subject(at(SHANGHAI, 2026, 11, 28, 3, 0), channel="email", category="transactional")
    assert QuietHoursRule(QuietHoursSpec(), CALENDAR).check(NO_SESSION, night).allowed


def test_email_on_working_days_at_any_hour() -> None:
    spec = QuietHoursSpec(email={Category.NURTURE: EmailWindow(hours=None, working_days_only=True)})
    # The schema reads "hours: any" as any time at all, working days or not.
    assert window_for(spec, "email", "nurture", None) == (None, False)
    # next_allowed itself can still keep to working days at any hour.
    saturday = at(SHANGHAI, 2026, 11, 28, 15, 0)
    assert next_allowed(saturday, SHANGHAI, None, True, CALENDAR) == at(SHANGHAI, 2026, 11, 30, 0, 0)
    assert next_allowed(saturday, SHANGHAI, None, False, CALENDAR) is saturday


def test_the_reason_holds_no_personal_data() -> None:
    rule = QuietHoursRule(QuietHoursSpec(), CALENDAR)
    sms = rule.check(NO_SESSION, subject(at(SHANGHAI, 2026, 11, 25, 23, 0), address="+8613800138000"))
    email = rule.check(
        NO_SESSION,
        subject(at(SHANGHAI, 2026, 11, 28, 23, 0), channel="email", category="nurture", address="zhangwei@example.cn"),
    )
    for decision in (sms, email):
        assert decision.verdict is Verdict.DEFER
        assert "@" not in decision.reason
        assert "13800138000" not in decision.reason and "zhangwei" not in decision.reason


def test_the_spread_is_deterministic_and_falls_back_to_the_candidate() -> None:
    rule = QuietHoursRule(QuietHoursSpec(), CALENDAR)
    night = at(SHANGHAI, 2026, 11, 25, 22, 0)
    first = rule.check(NO_SESSION, subject(night, message_id="abc")).until
    assert first == rule.check(NO_SESSION, subject(night + timedelta(hours=1), message_id="abc")).until
    by_candidate = rule.check(NO_SESSION, subject(night, message_id=None)).until
    opens = at(SHANGHAI, 2026, 11, 26, 8, 0)
    assert by_candidate == opens + spread_offset("42", timedelta(minutes=10))


def test_a_long_spread_stays_inside_a_short_window() -> None:
    spec = QuietHoursSpec.model_validate({"sms": "08:00-08:05", "spread": "2h"})
    rule = QuietHoursRule(spec, CALENDAR)
    for n in range(50):
        decision = rule.check(NO_SESSION, subject(at(SHANGHAI, 2026, 11, 25, 21, 0), message_id=f"m{n}"))
        assert decision.until is not None
        local = decision.until.astimezone(SHANGHAI)
        assert local.date() == date(2026, 11, 26) and time(8, 0) <= local.time() < time(8, 5)


def test_the_spread_stays_inside_a_window_cut_short_by_dst() -> None:
    # 2026-03-29 in Berlin: 02:00 jumps to 03:00, so a 01:30-02:30 window is open for only 30 minutes.
    spec = QuietHoursSpec.model_validate({"sms": "01:30-02:30", "spread": "1h"})
    rule = QuietHoursRule(spec, CALENDAR)
    for n in range(50):
        decision = rule.check(NO_SESSION, subject(at(BERLIN, 2026, 3, 28, 23, 0), zone=BERLIN, message_id=f"m{n}"))
        assert decision.until is not None
        assert at(BERLIN, 2026, 3, 29, 1, 30) <= decision.until < datetime(2026, 3, 29, 1, 0, tzinfo=UTC)


# --- next_allowed across DST ----------------------------------------------------------------------------------


def test_an_opening_time_skipped_by_spring_forward_opens_at_the_jump() -> None:
    window = Window.parse("02:30-05:00")
    result = next_allowed(at(BERLIN, 2026, 3, 29, 0, 0), BERLIN, window, False, CALENDAR)
    assert result == datetime(2026, 3, 29, 1, 0, tzinfo=UTC)
    assert result.astimezone(BERLIN).time() == time(3, 0)


def test_a_repeated_hour_opens_the_window_a_second_time() -> None:
    # 2026-11-01 in New York: 02:00 EDT goes back to 01:00 EST, so 01:00-01:30 happens twice.
    window = Window.parse("01:00-01:30")
    after_first = at(NEW_YORK, 2026, 11, 1, 1, 45)  # fold=0: EDT
    result = next_allowed(after_first, NEW_YORK, window, False, CALENDAR)
    assert result == datetime(2026, 11, 1, 6, 0, tzinfo=UTC)  # 01:00 EST
    assert result - after_first == timedelta(minutes=15)


def test_a_midnight_transition() -> None:
    # Havana springs forward at midnight (2026-03-08 00:00 → 01:00): a window opening at 00:15 opens at 01:00.
    havana = ZoneInfo("America/Havana")
    result = next_allowed(at(havana, 2026, 3, 7, 23, 0), havana, Window.parse("00:15-06:00"), False, CALENDAR)
    assert result.astimezone(havana).replace(tzinfo=None) == datetime(2026, 3, 8, 1, 0)


# --- validity_period ----------------------------------------------------------------------------------------------


def test_validity_until_the_window_closes() -> None:
    window = Window.parse("08:00-20:00")
    assert validity_period(at(SHANGHAI, 2026, 11, 25, 19, 0), SHANGHAI, window) == 3600
    assert validity_period(at(SHANGHAI, 2026, 11, 25, 19, 59, 59, 500000), SHANGHAI, window) == 1
    assert validity_period(at(SHANGHAI, 2026, 11, 25, 8, 0), SHANGHAI, window) == 36000  # 12 h, Twilio's cap is 10
    assert validity_period(at(SHANGHAI, 2026, 11, 25, 21, 0), SHANGHAI, window) == 1  # outside: expire at once


def test_validity_of_a_window_open_until_midnight() -> None:
    window = Window.parse("08:00-24:00")
    assert validity_period(at(SHANGHAI, 2026, 11, 25, 22, 30), SHANGHAI, window) == 5400


def test_validity_counts_real_seconds_across_dst() -> None:
    # The night Berlin's clocks go back (03:00 → 02:00), 00:30 to 04:00 on the wall is four and a half hours.
    assert validity_period(at(BERLIN, 2026, 10, 25, 0, 30), BERLIN, Window.parse("00:00-04:00")) == 16200
    # The night they go forward (02:00 → 03:00), it is two and a half.
    assert validity_period(at(BERLIN, 2026, 3, 29, 0, 30), BERLIN, Window.parse("00:00-04:00")) == 9000


# --- properties -------------------------------------------------------------------------------------------------

ZONE_NAMES = sorted(available_timezones() - {"localtime"})
INSTANTS = st.datetimes(min_value=datetime(2024, 1, 1), max_value=datetime(2028, 12, 31), timezones=st.just(UTC))


@st.composite
def windows(draw: st.DrawFn, near: time | None = None) -> Window:
    if near is not None and draw(st.booleans()):
        # Open close to a DST jump, so that gaps and folds are exercised, not just met by chance.
        base = near.hour * 60 + near.minute + draw(st.integers(-90, 90))
        start = min(max(base, 0), 1438)
    else:
        start = draw(st.integers(0, 1438))
    end = draw(st.integers(start + 1, 1440))
    return Window(start=time(start // 60, start % 60), end=None if end == 1440 else time(end // 60, end % 60))


@st.composite
def situations(draw: st.DrawFn) -> tuple[datetime, ZoneInfo, Window, bool]:
    zone = ZoneInfo(draw(st.sampled_from(ZONE_NAMES)))
    moment = draw(INSTANTS)
    near: time | None = None
    if draw(st.booleans()):
        jump = next_transition(moment, moment + timedelta(days=370), zone)
        if jump is not None:
            moment = jump + timedelta(minutes=draw(st.integers(-36 * 60, 6 * 60)), seconds=draw(st.integers(0, 59)))
            near = jump.astimezone(zone).time()
    return moment, zone, draw(windows(near)), draw(st.booleans())


def allowed(moment: datetime, zone: ZoneInfo, window: Window, working_days_only: bool) -> bool:
    local = moment.astimezone(zone)
    return window.contains(local.time()) and (not working_days_only or CALENDAR.is_working_day(local.date()))


@settings(max_examples=200, deadline=None)
@given(situations())
def test_next_allowed_is_the_first_allowed_minute(situation: tuple[datetime, ZoneInfo, Window, bool]) -> None:
    moment, zone, window, working_days_only = situation
    result = next_allowed(moment, zone, window, working_days_only, CALENDAR)
    assert result >= moment
    assert allowed(result, zone, window, working_days_only)
    if result == moment:
        return
    assert not allowed(moment, zone, window, working_days_only)
    assert not allowed(result - timedelta(minutes=1), zone, window, working_days_only)
    # Window edges and UTC offsets are whole minutes, so no allowed instant hides between minute marks: walk them.
    minute = moment.replace(second=0, microsecond=0) + timedelta(minutes=1)
    while minute < result:
        assert not allowed(minute, zone, window, working_days_only), minute
        minute += timedelta(minutes=1)


@settings(max_examples=200, deadline=None)
@given(situations())
def test_validity_ends_when_the_window_does(situation: tuple[datetime, ZoneInfo, Window, bool]) -> None:
    moment, zone, window, _ = situation
    start = next_allowed(moment, zone, window, False, CALENDAR)
    seconds = validity_period(start, zone, window)
    assert 1 <= seconds <= 36000
    day = start.astimezone(zone).date()
    # Open every minute up to the reported close, on the same local day ...
    minute = start
    while minute < start + timedelta(seconds=seconds):
        local = minute.astimezone(zone)
        assert window.contains(local.time()) and local.date() == day, minute
        minute += timedelta(minutes=1)
    # ... and closed (or past the day) right after it, unless Twilio's cap cut it short.
    if seconds < 36000:
        after = (start + timedelta(seconds=seconds + 1)).astimezone(zone)
        assert not window.contains(after.time()) or after.date() != day


@settings(max_examples=200, deadline=None)
@given(st.text(min_size=1, max_size=40), st.timedeltas(min_value=timedelta(0), max_value=timedelta(hours=3)))
def test_spread_offset_is_within_the_spread(message_id: str, spread: timedelta) -> None:
    offset = spread_offset(message_id, spread)
    assert offset == spread_offset(message_id, spread)
    if spread == timedelta(0):
        assert offset == timedelta(0)
    else:
        assert timedelta(0) <= offset < spread


def test_spread_offsets_actually_spread() -> None:
    offsets = {spread_offset(f"msg-{n}", timedelta(minutes=10)) for n in range(200)}
    assert len(offsets) > 150
    assert max(offsets) - min(offsets) > timedelta(minutes=8)
