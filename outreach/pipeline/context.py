"""The template context: what a message's templates see, built from the rows it is about.

:func:`build_context` is the one place that shapes it for sends (single, grouped and batched alike);
:func:`reply_by` adds, for an out-of-hours auto-reply, when a person will answer, written for the candidate.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from outreach.core.clock import utcnow
from outreach.core.config import Settings
from outreach.core.models import AUTO_REPLY, Candidate, Enrollment, Job, OutboundMessage
from outreach.domain.candidates import candidate_timezone
from outreach.domain.tokens import unsubscribe_url
from outreach.policy.calendar import BusinessCalendar

__all__ = ["build_context", "format_reply_by", "reply_by", "shape_context"]

_EN_WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
_EN_MONTHS = (
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
)
_ZH_WEEKDAYS = ("星期一", "星期二", "星期三", "星期四", "星期五", "星期六", "星期日")


def build_context(
    settings: Settings,
    calendar: BusinessCalendar,
    message: OutboundMessage,
    candidate: Candidate,
    enrollment: Enrollment | None,
    job: Job | None,
) -> dict[str, Any]:
    """The variables a send's templates see (``calendar`` tells an auto-reply when a person will answer)."""
    built = shape_context(
        message,
        candidate,
        enrollment,
        job,
        company={"name": settings.company_name, "timezone": settings.company_timezone},
        unsubscribe=unsubscribe_url(settings, message.id, utcnow()),
    )
    if message.category == AUTO_REPLY:
        # The out-of-hours answer names the next business opening, in the candidate's timezone.
        built["reply_by"] = reply_by(settings, calendar, message.created_at, candidate)
    return built


def shape_context(
    message: OutboundMessage,
    candidate: Candidate,
    enrollment: Enrollment | None,
    job: Job | None,
    *,
    company: dict[str, Any],
    unsubscribe: str,
) -> dict[str, Any]:
    """The one shape of a template context, from a message's rows (real ones, or the samples of
    :mod:`outreach.pipeline.samples` that ``campaigns validate`` and previews render)::

        candidate  {external_id, name, first_name, locale, timezone, stage, source, tags: [str]}
        job        {external_id, title, department, location, description, booking_url,
                    salary_min, salary_max, tags} or None
        company    {name, timezone}
        event      {type, reason, occurred_at (ISO string), data: {…from the ATS}} or None (cron campaigns)
        links      {booking: str | None, unsubscribe: str}
        message    {id}
        campaign   {name, category}
        concerns   [str]   from the candidate's "concern:<x>" tags

    An auto-reply also gets ``reply_by`` (:func:`reply_by`).
    """
    context = dict(enrollment.context) if enrollment is not None else {}
    name = candidate.name or ""
    return {
        "candidate": {
            "external_id": candidate.external_id,
            "name": name,
            "first_name": name.split()[0] if name.split() else name,
            "locale": candidate.locale,
            "timezone": candidate.timezone,
            "stage": candidate.stage,
            "source": candidate.source,
            "tags": list(candidate.tags),
        },
        "job": None
        if job is None
        else {
            "external_id": job.external_id,
            "title": job.title,
            "department": job.department,
            "location": job.location,
            "description": job.description,
            "booking_url": job.booking_url,
            "salary_min": job.salary_min,
            "salary_max": job.salary_max,
            "tags": list(job.tags),
        },
        "company": company,
        "event": context.get("event"),
        "links": {"booking": job.booking_url if job is not None else None, "unsubscribe": unsubscribe},
        "message": {"id": message.id},
        "campaign": {"name": message.campaign, "category": message.category},
        "concerns": [tag.split(":", 1)[1] for tag in candidate.tags if tag.startswith("concern:")],
    }


def format_reply_by(opening: datetime, zone_name: str, language: str) -> str:
    """``opening`` (already in the candidate's timezone) as the template says it, in ``en`` or ``zh``.

    en: ``Monday 1 December, 09:00 (your time, Europe/Berlin)``; zh: ``12月1日（星期一）09:00（您当地时间）``.
    Written out by hand so the result never depends on the server's C locale.
    """
    clock = f"{opening.hour:02d}:{opening.minute:02d}"
    if language == "zh":
        return f"{opening.month}月{opening.day}日（{_ZH_WEEKDAYS[opening.weekday()]}）{clock}（您当地时间）"
    weekday, month = _EN_WEEKDAYS[opening.weekday()], _EN_MONTHS[opening.month - 1]
    return f"{weekday} {opening.day} {month}, {clock} (your time, {zone_name})"


def reply_by(
    settings: Settings, calendar: BusinessCalendar, created_at: datetime, candidate: Candidate
) -> dict[str, str] | None:
    """When a person will answer an auto-reply created at ``created_at``: the next business opening after it.

    ``{"iso", "timezone", "en", "zh", "text"}``, all in the candidate's timezone; ``en`` and ``zh`` are the
    two written forms (each template uses its own language's), ``text`` the one in the candidate's language.
    None when the calendar has no opening ahead (templates then say "as soon as we are back").
    """
    try:
        opening = calendar.next_opening(created_at)
    except ValueError:
        return None
    zone = candidate_timezone(candidate, settings)
    local = opening.astimezone(zone)
    english = format_reply_by(local, zone.key, "en")
    chinese = format_reply_by(local, zone.key, "zh")
    language = (candidate.locale or "").split("-")[0].lower()
    return {
        "iso": local.isoformat(),
        "timezone": zone.key,
        "en": english,
        "zh": chinese,
        "text": chinese if language == "zh" else english,
    }
