"""Quiet hours: messages reach candidates only at civil hours of their own day, in their own timezone.

SMS always has a window (``quiet_hours.sms``, or one per country in ``sms_by_country``: carriers and regulators
set different hours). Email has one per category: nurture mail waits for working hours on working days, while
transactional mail (an offer letter, an interview confirmation) goes at any time unless the policy file says
otherwise. Working days are the company calendar's rule (weekends, public holidays, closures, make-up days)
applied to the candidate's local date.

A message outside its window is deferred to the moment the window next opens, plus a small offset derived from
the message id, so that a night's worth of deferred messages goes out over the first minutes of the morning
instead of in the same second.
"""

from __future__ import annotations

import hashlib
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

from sqlalchemy.orm import Session

from outreach.core.models import Channel
from outreach.domain.campaigns import Category
from outreach.policy.base import Decision, Subject
from outreach.policy.calendar import BusinessCalendar, first_in_window, in_window, require_aware, window_close
from outreach.policy.config import QuietHoursSpec, Window

ALL_DAY = Window.parse("00:00-24:00")
"""The window used when only the day matters (email on working days, at any hour)."""

TWILIO_MIN_VALIDITY = 1
TWILIO_MAX_VALIDITY = 36_000
"""Twilio accepts a ``ValidityPeriod`` from 1 second to 10 hours."""


def window_for(spec: QuietHoursSpec, channel: str, category: str, country: str | None) -> tuple[Window | None, bool]:
    """The daily window for a message and whether it must also fall on a working day.

    ``(None, False)`` means any time. SMS is never any time: the country's window if the policy names one, else the
    default SMS window, whatever the category. Email follows its category's entry; a category without an entry, or
    with ``hours: any``, goes at any time.
    """
    if channel == Channel.SMS:
        by_country = spec.sms_by_country.get(country.upper()) if country else None
        return (by_country or spec.sms), False
    if channel == Channel.EMAIL:
        try:
            key = Category(category)
        except ValueError:
            raise ValueError(f"unknown message category {category!r}") from None
        email = spec.email.get(key)
        if email is None or email.hours is None:
            return None, False
        return email.hours, email.working_days_only
    raise ValueError(f"unknown channel {channel!r}")


def next_allowed(
    moment: datetime, zone: ZoneInfo, window: Window | None, working_days_only: bool, calendar: BusinessCalendar
) -> datetime:
    """``moment`` if a message may go then, else the first instant the recipient's window opens (UTC).

    The window is read on the recipient's wall clock in ``zone``. An opening time skipped by a spring-forward jump
    opens at the jump; an hour repeated when the clocks go back is inside the window both times.
    """
    require_aware(moment)
    if window is None:
        if not working_days_only:
            return moment
        window = ALL_DAY
    found = first_in_window(moment, zone, window, calendar.is_working_day if working_days_only else None)
    if found is None:
        raise ValueError(f"no working day in the business calendar for a window {window} in {zone}")
    return moment if found == moment else found


def spread_offset(message_id: str, spread: timedelta) -> timedelta:
    """A deterministic offset in ``[0, spread)`` from a hash of ``message_id``.

    Deterministic so that re-checking the same message (at schedule time and again at send time) names the same
    instant. Whole seconds when the spread is at least a second, so the stored times stay readable.
    """
    if spread <= timedelta(0):
        return timedelta(0)
    # A stable hash: Python's hash() of a str changes with every process.
    number = int.from_bytes(hashlib.sha256(message_id.encode()).digest()[:8], "big")
    micros = spread // timedelta(microseconds=1)
    if micros >= 1_000_000:
        return timedelta(seconds=number % (micros // 1_000_000))
    return timedelta(microseconds=number % micros)


def validity_period(moment: datetime, zone: ZoneInfo, window: Window) -> int:
    """Seconds from ``moment`` until the recipient's window closes, within Twilio's 1..36000.

    A window open until 24:00 closes at the recipient's midnight. Outside the window the answer is the minimum:
    a message that should not have been sent now must not sit at the provider until morning either.
    """
    require_aware(moment)
    if not in_window(moment, zone, window):
        return TWILIO_MIN_VALIDITY
    seconds = int((window_close(moment, zone, window) - moment).total_seconds())
    return max(TWILIO_MIN_VALIDITY, min(TWILIO_MAX_VALIDITY, seconds))


class QuietHoursRule:
    """Defer messages that would reach the candidate outside their window (see :func:`window_for`)."""

    name = "quiet_hours"

    def __init__(self, spec: QuietHoursSpec, calendar: BusinessCalendar) -> None:
        self.spec = spec
        self.calendar = calendar

    def check(self, session: Session, subject: Subject) -> Decision:
        return self.decide(subject, self.opens(subject))

    def opens(self, subject: Subject) -> datetime:
        """When the subject's window is next open (``subject.now`` if it is now). The same for every subject with
        the same time, zone, channel, category and country, which is what :meth:`opens_key` names, so a caller
        deciding many messages asks once per key (:class:`outreach.policy.bulk.PolicyReads` does)."""
        window, working_days_only = window_for(self.spec, subject.channel, subject.category, subject.country)
        if window is None and not working_days_only:
            return subject.now
        return next_allowed(subject.now, subject.zone, window, working_days_only, self.calendar)

    @staticmethod
    def opens_key(subject: Subject) -> tuple[object, ...]:
        country = subject.country if subject.channel == Channel.SMS else None
        return (subject.now, subject.zone, subject.channel, subject.category, country)

    def decide(self, subject: Subject, opens: datetime) -> Decision:
        """The decision once :meth:`opens` is known: allowed now, or deferred to then plus the message's offset."""
        if opens == subject.now:
            return Decision.allow()
        window, working_days_only = window_for(self.spec, subject.channel, subject.category, subject.country)
        until = opens + self._offset(subject, opens, window or ALL_DAY)
        return Decision.defer(self.name, self._reason(subject, window, working_days_only, opens), until)

    def _offset(self, subject: Subject, opens: datetime, window: Window) -> timedelta:
        # The spread must not carry the message past the end of the window it was deferred into: with a spread
        # longer than the window (or a window cut short by a DST jump) the offset is taken over what is left.
        room = window_close(opens, subject.zone, window) - opens
        key = subject.message_id or str(subject.candidate_id)
        return spread_offset(key, min(self.spec.spread, room))

    def _reason(self, subject: Subject, window: Window | None, working_days_only: bool, opens: datetime) -> str:
        # Only the window, the zone and the kind of message: the reason is stored and shown, so no address.
        kind = "SMS" if subject.channel == Channel.SMS else f"{subject.category} email"
        when = str(window) if window is not None else "any time"
        if working_days_only:
            when += " on working days"
        local = opens.astimezone(subject.zone)
        return f"outside {when} in {subject.zone} ({kind}); next window opens {local:%Y-%m-%d %H:%M} local"
