"""Candidate events: update the candidate's stage, then enroll them in the campaigns the event triggers.

The stage follows the ATS event (an offer extended puts the candidate at ``offer``); enrollments remember the
stage they started at, so a later change makes campaigns with ``exit_on: [stage_changed]`` stop on their next
step. Replies come in through :func:`record_reply`, the hook the inbound webhooks call.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from outreach.calendar import BusinessCalendar
from outreach.campaigns import Audience, Campaign, CampaignSet, EventType, ExitCondition
from outreach.candidates import add_tags, as_utc, slug
from outreach.errors import NotFoundError, ValidationError
from outreach.models import (
    Candidate,
    CandidateEvent,
    Enrollment,
    EnrollmentStatus,
    Job,
    MessageStatus,
    OutboundMessage,
    Stage,
    utcnow,
)
from outreach.render import REQUIRED_EVENT_DATA

#: The stage an ATS event puts the candidate in; job_opened says nothing about the candidate.
STAGE_AFTER_EVENT: dict[EventType, Stage | None] = {
    EventType.APPLIED: Stage.APPLIED,
    EventType.OFFER_EXTENDED: Stage.OFFER,
    EventType.OFFER_ACCEPTED: Stage.ACCEPTED,
    EventType.OFFER_DECLINED: Stage.DECLINED,
    EventType.FINAL_INTERVIEW_FAILED: Stage.REJECTED,
    EventType.HIRED: Stage.HIRED,
    EventType.JOB_OPENED: None,
}

#: Declined candidates are contacted again after about six months.
RECONTACT_AFTER_DECLINE = timedelta(days=182)


class EventIn(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    type: EventType
    job_id: str | None = Field(default=None, max_length=128)
    reason: str | None = Field(default=None, max_length=500)
    occurred_at: datetime | None = None
    data: dict[str, Any] = Field(default_factory=dict)


def audience_matches(audience: Audience, candidate: Candidate, job: Job | None) -> bool:
    if audience.stages and candidate.stage not in audience.stages:
        return False
    if audience.require_nurture_consent and not candidate.nurture_consent:
        return False
    tags = set(candidate.tags)
    if audience.tags_all and not set(audience.tags_all) <= tags:
        return False
    if audience.tags_any and not tags & set(audience.tags_any):
        return False
    return not (audience.match_job_tags and (job is None or not tags & set(job.tags)))


def first_due(
    campaign: Campaign,
    anchor: datetime,
    candidate: Candidate,
    company_tz: str,
    calendar: BusinessCalendar | None = None,
) -> datetime:
    from outreach.scheduler import step_due

    return step_due(campaign.steps[0], anchor, candidate, company_tz, calendar)


def enroll(
    session: Session,
    campaign: Campaign,
    candidate: Candidate,
    *,
    anchor: datetime,
    dedupe_key: str,
    company_tz: str,
    job: Job | None = None,
    event: CandidateEvent | None = None,
    context: dict[str, Any] | None = None,
    calendar: BusinessCalendar | None = None,
) -> Enrollment | None:
    """Start ``candidate`` on ``campaign`` unless this very enrollment exists already (returns None then)."""
    existing = session.scalar(
        select(Enrollment.id).where(
            Enrollment.campaign == campaign.name,
            Enrollment.candidate_id == candidate.id,
            Enrollment.dedupe_key == dedupe_key,
        )
    )
    if existing is not None:
        return None
    enrollment = Enrollment(
        candidate_id=candidate.id,
        campaign=campaign.name,
        dedupe_key=dedupe_key,
        job_id=job.id if job else None,
        event_id=event.id if event else None,
        stage_at_start=candidate.stage,
        current_step=0,
        status=EnrollmentStatus.ACTIVE.value,
        anchor_at=anchor,
        next_run_at=first_due(campaign, anchor, candidate, company_tz, calendar),
        context=context or {},
    )
    session.add(enrollment)
    session.flush()
    return enrollment


def record_event(
    session: Session,
    campaigns: CampaignSet,
    external_id: str,
    event_in: EventIn,
    *,
    company_tz: str,
    calendar: BusinessCalendar | None = None,
) -> tuple[CandidateEvent, list[Enrollment]]:
    """Store the event, move the candidate's stage, and enroll them where the event triggers a campaign."""
    candidate = session.scalar(select(Candidate).where(Candidate.external_id == external_id))
    if candidate is None:
        raise NotFoundError(f"candidate {external_id!r} not found")
    job: Job | None = None
    if event_in.job_id:
        job = session.scalar(select(Job).where(Job.external_id == event_in.job_id))
        if job is None:
            raise ValidationError("job_id", "unknown job; create it first with POST /api/v1/jobs")
    if event_in.type is EventType.JOB_OPENED and job is None:
        raise ValidationError("job_id", "job_opened needs the job that opened")
    for key in REQUIRED_EVENT_DATA.get(event_in.type.value, ()):
        if event_in.data.get(key) in (None, "", {}, []):
            raise ValidationError(f"data.{key}", f"required for {event_in.type.value} (the templates print it)")
    occurred_at = as_utc(event_in.occurred_at) if event_in.occurred_at else utcnow()

    event = CandidateEvent(
        candidate_id=candidate.id,
        type=event_in.type.value,
        job_id=job.id if job else None,
        reason=event_in.reason,
        data=event_in.data,
        occurred_at=occurred_at,
    )
    session.add(event)
    stage = STAGE_AFTER_EVENT[event_in.type]
    if stage is not None and candidate.stage != stage.value:
        candidate.stage = stage.value
    if event_in.type is EventType.OFFER_DECLINED:
        add_tags(candidate, f"decline_reason:{slug(event_in.reason or 'unspecified')}")
        candidate.recontact_at = occurred_at + RECONTACT_AFTER_DECLINE
    if event_in.type is EventType.FINAL_INTERVIEW_FAILED:
        candidate.recontact_at = occurred_at + RECONTACT_AFTER_DECLINE
    candidate.updated_at = utcnow()
    session.flush()

    context = {
        "event": {
            "type": event.type,
            "reason": event.reason,
            "occurred_at": occurred_at.isoformat(),
            "data": event.data,
        }
    }
    enrollments: list[Enrollment] = []
    for campaign in campaigns.for_event(event_in.type.value):
        if not audience_matches(campaign.trigger.audience, candidate, job):
            continue
        enrollment = enroll(
            session,
            campaign,
            candidate,
            anchor=occurred_at,
            dedupe_key=f"{event.type}:{job.external_id if job else '-'}",
            company_tz=company_tz,
            job=job,
            event=event,
            context=context,
            calendar=calendar,
        )
        if enrollment is not None:
            enrollments.append(enrollment)
    return event, enrollments


def record_reply(session: Session, campaigns: CampaignSet, candidate: Candidate, at: datetime) -> int:
    """The hook for inbound replies: remember the time and stop campaigns that exit on a reply.

    Returns how many enrollments stopped. Pending messages of those enrollments are cancelled so a worker that
    picks them up later finds nothing to send.
    """
    candidate.last_reply_at = at
    stopping = [c.name for c in campaigns if ExitCondition.REPLIED in c.exit_on]
    if not stopping:
        return 0
    ids = list(
        session.scalars(
            select(Enrollment.id).where(
                Enrollment.candidate_id == candidate.id,
                Enrollment.status == EnrollmentStatus.ACTIVE.value,
                Enrollment.campaign.in_(stopping),
            )
        )
    )
    if not ids:
        return 0
    exit_enrollments(session, ids, "replied")
    return len(ids)


def exit_enrollments(session: Session, enrollment_ids: list[int], reason: str) -> None:
    now = utcnow()
    session.execute(
        update(Enrollment)
        .where(Enrollment.id.in_(enrollment_ids))
        .values(status=EnrollmentStatus.EXITED.value, exit_reason=reason, next_run_at=None, updated_at=now)
    )
    session.execute(
        update(OutboundMessage)
        .where(
            OutboundMessage.enrollment_id.in_(enrollment_ids),
            OutboundMessage.status.in_([MessageStatus.PENDING.value, MessageStatus.HELD.value]),
        )
        .values(
            status=MessageStatus.CANCELLED.value,
            rule="exit",
            reason=f"enrollment exited: {reason}",
            updated_at=now,
        )
    )


def pause_for_out_of_office(session: Session, candidate: Candidate, at: datetime, pause: timedelta) -> int:
    """An out-of-office answer is not a reply: the candidate's active sequences wait ``pause`` and go on.

    Steps due before ``at + pause`` move to that time; later steps keep their schedule. Returns how many
    enrollments were pushed back.
    """
    resume_at = at + pause
    result = session.execute(
        update(Enrollment)
        .where(
            Enrollment.candidate_id == candidate.id,
            Enrollment.status == EnrollmentStatus.ACTIVE.value,
            Enrollment.next_run_at.is_not(None),
            Enrollment.next_run_at < resume_at,
        )
        .values(next_run_at=resume_at, updated_at=utcnow())
        .returning(Enrollment.id)
    )
    paused = [row[0] for row in result]
    if paused:
        # Queued but unsent steps of those sequences wait too.
        session.execute(
            update(OutboundMessage)
            .where(
                OutboundMessage.enrollment_id.in_(paused),
                OutboundMessage.status.in_([MessageStatus.PENDING.value, MessageStatus.HELD.value]),
            )
            .values(
                status=MessageStatus.HELD.value,
                not_before=resume_at,
                enqueued_at=None,
                rule="out_of_office",
                reason=f"candidate is away; resumes {resume_at.isoformat(timespec='minutes')}",
                updated_at=utcnow(),
            )
        )
    return len(paused)
