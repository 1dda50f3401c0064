"""Candidate events: update the candidate's stage, then enroll them in the campaigns the event triggers.

The stage follows the ATS event (an offer extended puts the candidate at ``offer``) and every move is written to
the stage history (``outreach.domain.intent.move_stage``); enrollments remember the stage they started at, so a later
change makes campaigns with ``exit_on: [stage_changed]`` stop on their next step. Replies come in through
:func:`record_reply`, the hook the inbound webhooks call.

Re-activation (:func:`reactivate`) is the one way a ``job_opened`` reaches candidates, whether the ATS sends the
event for one candidate or HR opens the job for the whole talent pool (``POST /api/v1/jobs/{id}/open``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo

from pydantic import ConfigDict, Field
from sqlalchemy import false, func, or_, select, update
from sqlalchemy.orm import Session

from outreach.core.clock import utcnow
from outreach.core.config import get_settings
from outreach.core.errors import NotFoundError, ValidationError
from outreach.core.inputs import InputModel, Instant
from outreach.core.models import (
    Candidate,
    CandidateEvent,
    Enrollment,
    EnrollmentStatus,
    Job,
    MessageStatus,
    OutboundMessage,
    Stage,
)
from outreach.domain.campaigns import Audience, Campaign, CampaignSet, EventType, ExitCondition
from outreach.domain.candidates import add_tags, as_utc
from outreach.domain.intent import (
    LEVEL_ORDER,
    RECONTACT_AFTER_DECLINE,
    IntentSpec,
    decline_reason,
    has_tags,
    level_of,
    move_stage,
)
from outreach.pipeline.timing import step_due
from outreach.policy.calendar import BusinessCalendar

if TYPE_CHECKING:
    from outreach.policy.engine import PolicyEngine

#: The stage an ATS event puts the candidate in; job_opened says nothing about the candidate.
STAGE_AFTER_EVENT: dict[EventType, Stage | None] = {
    EventType.APPLIED: Stage.APPLIED,
    EventType.CONTACTED: Stage.CONTACTED,
    EventType.INTERVIEW_SCHEDULED: Stage.INTERVIEWING,
    EventType.FINAL_INTERVIEW: Stage.FINAL,
    EventType.MOVED_TO_TALENT_POOL: Stage.TALENT_POOL,
    EventType.OFFER_EXTENDED: Stage.OFFER,
    EventType.OFFER_ACCEPTED: Stage.ACCEPTED,
    EventType.OFFER_DECLINED: Stage.DECLINED,
    EventType.FINAL_INTERVIEW_FAILED: Stage.REJECTED,
    EventType.HIRED: Stage.HIRED,
    EventType.JOB_OPENED: None,
}

__all__ = ["RECONTACT_AFTER_DECLINE", "EventIn", "Reactivation", "enroll", "reactivate", "record_event"]


class EventIn(InputModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    type: EventType
    job_id: str | None = Field(default=None, max_length=128)
    reason: str | None = Field(default=None, max_length=500)
    occurred_at: Instant | None = None
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
    if audience.match_job_tags and (job is None or not tags & set(job.tags)):
        return False
    return not (audience.intent and level_of(candidate) not in audience.intent)


def first_due(
    campaign: Campaign,
    anchor: datetime,
    candidate: Candidate,
    company_tz: str,
    calendar: BusinessCalendar | None = None,
) -> datetime:
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
    policy: PolicyEngine | None = None,
    intent: IntentSpec | None = None,
) -> tuple[CandidateEvent, list[Enrollment]]:
    """Store the event, move the candidate's stage, and enroll them where the event triggers a campaign.

    ``job_opened`` goes through :func:`reactivate` for this one candidate (frequency caps are checked there when
    ``policy`` is given; the send-time policy checks them again in any case). ``intent`` gives the talent-pool
    re-contact delay (when None, ``intent.yaml`` in the configured campaigns folder).
    """
    candidate = session.scalar(select(Candidate).where(Candidate.external_id == external_id))
    if candidate is None:
        raise NotFoundError(f"candidate {external_id!r} not found")
    problems: list[tuple[str, str]] = []
    job: Job | None = None
    if event_in.job_id:
        job = session.scalar(select(Job).where(Job.external_id == event_in.job_id))
        if job is None:
            problems.append(("job_id", "unknown job; create it first with POST /api/v1/jobs"))
    elif event_in.type is EventType.JOB_OPENED:
        problems.append(("job_id", "job_opened needs the job that opened"))
    if campaigns.events is not None:
        # The event data contract (events.yaml): every problem at once, nothing stored.
        problems += campaigns.events.check(event_in.type.value, event_in.data)
    if problems:
        raise ValidationError.of(problems)
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
    session.flush()
    stage = STAGE_AFTER_EVENT[event_in.type]
    if stage is not None:
        move_stage(session, candidate, stage, by=f"event:{event.type}", at=occurred_at, event_id=event.id)
    if event_in.type is EventType.OFFER_DECLINED:
        known = decline_reason(event_in.reason)
        if known is not None:
            add_tags(candidate, f"decline_reason:{known}")
        candidate.recontact_at = occurred_at + RECONTACT_AFTER_DECLINE
    if event_in.type is EventType.FINAL_INTERVIEW_FAILED:
        candidate.recontact_at = occurred_at + RECONTACT_AFTER_DECLINE
    if event_in.type is EventType.MOVED_TO_TALENT_POOL:
        if intent is None:
            from outreach.domain.intent import load_intent

            intent = load_intent(get_settings().campaigns_dir)
        candidate.recontact_at = occurred_at + intent.talent_pool_recontact
    candidate.updated_at = utcnow()
    session.flush()

    if event_in.type is EventType.JOB_OPENED:
        assert job is not None
        result = reactivate(
            session,
            campaigns,
            job,
            company_tz=company_tz,
            calendar=calendar,
            policy=policy,
            now=occurred_at,
            candidates=[candidate],
            event=event,
        )
        return event, result.enrollments

    context = event_context(event)
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


def event_context(event: CandidateEvent) -> dict[str, Any]:
    """What templates see as ``event``."""
    return {
        "event": {
            "type": event.type,
            "reason": event.reason,
            "occurred_at": event.occurred_at.isoformat(),
            "data": event.data,
        }
    }


#: The stages re-activation looks in when the campaign's audience names none.
POOL_STAGES = (Stage.TALENT_POOL, Stage.DECLINED, Stage.REJECTED)


@dataclass
class Reactivation:
    """Who a job opening reached: the new enrollments, and how many candidates were passed over, by reason.

    Reasons (the first that applies; for a whole pool, tags are checked first): ``erased``; ``not_in_pool``
    (stage outside the campaign's audience); ``recontact_later`` (declined or rejected, and their re-contact
    date is still ahead; talent-pool entries are always eligible: a matching opening is what the pool is for);
    ``no_matching_tags`` (no tag in common with the job, or the audience's tag rules fail);
    ``intent_not_targeted`` (the audience names intent levels); ``opted_out`` (address suppressed, or no nurture
    consent where the campaign needs it); ``no_address``; ``already_enrolled`` (this job reached them before:
    opening twice enrolls once); ``capped`` (a frequency cap would hold the message); ``over_limit`` (beyond the
    ``limit`` asked for; high intent goes first).
    """

    enrollments: list[Enrollment] = field(default_factory=list)
    excluded: Counter[str] = field(default_factory=Counter)

    def summary(self) -> dict[str, Any]:
        return {"selected": len(self.enrollments), "excluded": dict(sorted(self.excluded.items()))}


@dataclass
class _PoolReads:
    """What the exclusion checks read, loaded once for every candidate considered (a few queries, not a few per
    candidate): suppressions and recent sends through :class:`outreach.policy.bulk.PolicyReads` (the same
    lookups the send-time rules make), and who this job already reached."""

    reads: Any
    enrolled: set[tuple[str, int]]


def _load_reads(
    session: Session,
    chosen: Sequence[Campaign],
    candidates: Sequence[Candidate],
    dedupe_key: str,
    policy: PolicyEngine | None,
    now: datetime,
) -> _PoolReads:
    from outreach.policy.bulk import PolicyReads
    from outreach.policy.config import PolicySpec
    from outreach.policy.engine import PolicyEngine as Engine

    engine = policy or Engine(PolicySpec(caps=()), get_settings())
    channels = {c.steps[0].channel.value for c in chosen}
    reads = PolicyReads.load(session, engine, candidates, channels, now)
    enrolled: set[tuple[str, int]] = set()
    ids = [c.id for c in candidates]
    for start in range(0, len(ids), 1000):
        enrolled.update(
            (campaign, candidate_id)
            for campaign, candidate_id in session.execute(
                select(Enrollment.campaign, Enrollment.candidate_id).where(
                    Enrollment.candidate_id.in_(ids[start : start + 1000]),
                    Enrollment.campaign.in_([c.name for c in chosen]),
                    Enrollment.dedupe_key == dedupe_key,
                )
            )
        )
    return _PoolReads(reads, enrolled)


def _exclusion(
    session: Session,
    campaign: Campaign,
    candidate: Candidate,
    job: Job,
    now: datetime,
    pool: _PoolReads,
    policy: PolicyEngine | None,
) -> str | None:
    """Why ``candidate`` is not re-activated for ``job`` by ``campaign`` (None: they are)."""
    from outreach.policy.base import Stage as PolicyStage
    from outreach.policy.base import Subject
    from outreach.policy.caps import FrequencyCaps
    from outreach.policy.consent import NurtureConsentRule, SuppressionRule

    audience = campaign.trigger.audience
    if candidate.erased_at is not None:
        return "erased"
    if candidate.stage not in [s.value for s in (audience.stages or POOL_STAGES)]:
        return "not_in_pool"
    if (
        candidate.stage in (Stage.DECLINED.value, Stage.REJECTED.value)
        and candidate.recontact_at is not None
        and candidate.recontact_at > now
    ):
        return "recontact_later"
    tags = set(candidate.tags)
    if (
        (audience.match_job_tags and not tags & set(job.tags))
        or (audience.tags_all and not set(audience.tags_all) <= tags)
        or (audience.tags_any and not tags & set(audience.tags_any))
    ):
        return "no_matching_tags"
    if audience.intent and level_of(candidate) not in audience.intent:
        return "intent_not_targeted"
    if audience.require_nurture_consent and not candidate.nurture_consent:
        return "opted_out"
    channel = campaign.steps[0].channel.value
    subject = Subject(
        candidate_id=candidate.id,
        channel=channel,
        category=campaign.category.value,
        campaign=campaign.name,
        address=candidate.email if channel == "email" else candidate.phone,
        zone=ZoneInfo("UTC"),  # read by no rule asked here
        country=None,
        now=now,
        stage=PolicyStage.SCHEDULE,
    )
    # The consent rules and the caps, decided on the loaded reads exactly as at send time; quiet hours and
    # pacing only delay a message, so they exclude nobody.
    for rule in (SuppressionRule(), NurtureConsentRule()):
        decision = pool.reads._decide(session, rule, subject, candidate)
        if not decision.allowed:
            return "no_address" if decision.rule == "address" else "opted_out"
    if (campaign.name, candidate.id) in pool.enrolled:
        return "already_enrolled"
    if policy is not None:
        decision = pool.reads._decide(session, FrequencyCaps(policy.spec.caps), subject, candidate)
        if not decision.allowed:
            return "capped"
    return None


def _best_first(candidate: Candidate) -> tuple[int, float, int]:
    return (LEVEL_ORDER.index(level_of(candidate)), -(candidate.intent_score or 0.0), candidate.id)


def reactivate(
    session: Session,
    campaigns: CampaignSet,
    job: Job,
    *,
    company_tz: str,
    calendar: BusinessCalendar | None = None,
    policy: PolicyEngine | None = None,
    now: datetime | None = None,
    candidates: Sequence[Candidate] | None = None,
    event: CandidateEvent | None = None,
    limit: int | None = None,
) -> Reactivation:
    """Start the ``job_opened`` campaigns (the seed's ``job_reactivation``) for the candidates ``job`` suits.

    ``candidates`` None means the whole pool (the audience's stages, by default talent_pool, declined and
    rejected), high intent first, then medium, low and unassessed; ``event`` is the ATS event that named one
    candidate (without one, a ``job_opened`` event is recorded for each candidate selected, so templates and
    the history see the same as for an ATS event). Idempotent per job: the enrollment's key is the job.
    """
    now = now or utcnow()
    chosen = campaigns.for_event(EventType.JOB_OPENED.value)
    result = Reactivation()
    if not chosen:
        return result
    if candidates is None:
        stages = {s.value for c in chosen for s in (c.trigger.audience.stages or POOL_STAGES)}
        pool = select(Candidate).where(Candidate.stage.in_(stages), Candidate.erased_at.is_(None))
        if all(c.trigger.audience.match_job_tags for c in chosen):
            # Only candidates sharing a tag with the job are loaded (the tag index answers on PostgreSQL); the
            # rest are only counted.
            total = session.scalar(select(func.count()).select_from(pool.subquery())) or 0
            sharing = or_(*(has_tags(session, [tag]) for tag in job.tags)) if job.tags else false()
            candidates = list(session.scalars(pool.where(sharing)))
            if total > len(candidates):
                result.excluded["no_matching_tags"] += total - len(candidates)
        else:
            candidates = list(session.scalars(pool))
    dedupe_key = f"{EventType.JOB_OPENED.value}:{job.external_id}"
    reads = _load_reads(session, chosen, candidates, dedupe_key, policy, now)
    picked: list[tuple[Candidate, list[Campaign]]] = []
    for candidate in sorted(candidates, key=_best_first):
        reasons = [_exclusion(session, c, candidate, job, now, reads, policy) for c in chosen]
        eligible = [c for c, reason in zip(chosen, reasons, strict=True) if reason is None]
        if not eligible:
            result.excluded[str(reasons[0])] += 1
        elif limit is not None and len(picked) >= limit:
            result.excluded["over_limit"] += 1
        else:
            picked.append((candidate, eligible))
    triggers: dict[int, CandidateEvent] = {}
    for candidate, _ in picked:
        triggers[candidate.id] = event or CandidateEvent(
            candidate_id=candidate.id, type=EventType.JOB_OPENED.value, job_id=job.id, data={}, occurred_at=now
        )
    if event is None and triggers:
        session.add_all(triggers.values())
        session.flush()  # one INSERT for every new event
    for candidate, eligible in picked:
        trigger = triggers[candidate.id]
        for campaign in eligible:
            enrollment = enroll(
                session,
                campaign,
                candidate,
                anchor=trigger.occurred_at,
                dedupe_key=dedupe_key,
                company_tz=company_tz,
                job=job,
                event=trigger,
                context=event_context(trigger),
                calendar=calendar,
            )
            if enrollment is not None:
                result.enrollments.append(enrollment)
    return result


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
    """Stop these enrollments and cancel their messages not sent yet (two statements however many: a scheduler
    pass exits up to a thousand at once)."""
    from outreach.core.sql import one_of

    now = utcnow()
    session.execute(
        update(Enrollment)
        .where(one_of(session, Enrollment.id, enrollment_ids))
        .values(status=EnrollmentStatus.EXITED.value, exit_reason=reason, next_run_at=None, updated_at=now)
    )
    session.execute(
        update(OutboundMessage)
        .where(
            one_of(session, OutboundMessage.enrollment_id, enrollment_ids),
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
