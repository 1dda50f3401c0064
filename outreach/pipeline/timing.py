"""When a campaign step falls due: its delay or business days after the step before, then its ``at`` time of day
in the candidate's timezone. Enrollment (the first step) and the scheduler (every later one) both ask here."""

from __future__ import annotations

import functools
from datetime import datetime, timedelta
from typing import Protocol

from outreach.domain.campaigns import Step
from outreach.domain.candidates import zone_for
from outreach.policy.calendar import BusinessCalendar


class ZoneFacts(Protocol):
    """What :func:`step_due` reads of a candidate: an ORM :class:`~outreach.core.models.Candidate` or a plain row."""

    @property
    def timezone(self) -> str | None: ...

    @property
    def phone(self) -> str | None: ...


def step_due(
    step: Step, base: datetime, candidate: ZoneFacts, company_tz: str, calendar: BusinessCalendar | None = None
) -> datetime:
    """When ``step`` is due: ``base`` plus the delay (or business days), then the next ``at`` (candidate's zone)."""
    if step.business_days:
        due = (calendar or default_calendar()).add_business_days(base, step.business_days)
    else:
        due = base + step.delay
    if step.at is None:
        return due
    zone = zone_for(candidate.timezone, candidate.phone, company_tz)
    local = due.astimezone(zone)
    hour, minute = (int(part) for part in step.at.split(":"))
    target = local.replace(hour=hour, minute=minute, second=0, microsecond=0)
    if target < local:
        target = (local + timedelta(days=1)).replace(hour=hour, minute=minute, second=0, microsecond=0)
    return target.astimezone(due.tzinfo)


@functools.cache
def default_calendar() -> BusinessCalendar:
    from outreach.policy.config import CalendarSpec

    return BusinessCalendar.from_spec(CalendarSpec())
