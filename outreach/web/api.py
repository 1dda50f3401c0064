"""JSON API, version 1: candidates, jobs, candidate events and the outbox."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request, Response
from pydantic import BaseModel
from sqlalchemy import select, text
from sqlalchemy.orm import Session

from outreach.core.errors import NotFoundError
from outreach.core.inputs import UTCInstant
from outreach.core.models import Candidate, Job, OutboundMessage
from outreach.domain.candidates import CandidateIn, JobIn, save_candidate, save_job
from outreach.domain.intent import load_intent
from outreach.ops.erasure import erase_candidate, forget_in_sandbox
from outreach.pipeline.enrollment import EventIn, record_event
from outreach.service.runtime import Runtime
from outreach.web.auth import ops_readable

#: Routes without authentication (health checks for load balancers and the compose file).
public = APIRouter()
#: Everything under /api: included with the ``authorize`` dependency, so every route needs a key.
router = APIRouter()


def get_runtime(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]


def candidate_out(candidate: Candidate) -> dict[str, Any]:
    return {
        "external_id": candidate.external_id,
        "name": candidate.name,
        "email": candidate.email,
        "phone": candidate.phone,
        "locale": candidate.locale,
        "timezone": candidate.timezone,
        "source": candidate.source,
        "tags": candidate.tags,
        "stage": candidate.stage,
        "nurture_consent": candidate.nurture_consent,
        "recontact_at": candidate.recontact_at.isoformat() if candidate.recontact_at else None,
        "created_at": candidate.created_at.isoformat(),
        "updated_at": candidate.updated_at.isoformat(),
    }


def job_out(job: Job) -> dict[str, Any]:
    return {
        "external_id": job.external_id,
        "title": job.title,
        "department": job.department,
        "location": job.location,
        "description": job.description,
        "salary_min": job.salary_min,
        "salary_max": job.salary_max,
        "booking_url": job.booking_url,
        "tags": job.tags,
        "status": job.status,
    }


def message_out(message: OutboundMessage, external_id: str) -> dict[str, Any]:
    return {
        "id": message.id,
        "candidate": external_id,
        "campaign": message.campaign,
        "step": message.step,
        "channel": message.channel,
        "template": message.template,
        "category": message.category,
        "status": message.status,
        "rule": message.rule,
        "reason": message.reason,
        "attempts": message.attempts,
        "provider": message.provider,
        "provider_message_id": message.provider_message_id,
        "error_code": message.error_code,
        "error_detail": message.error_detail,
        "locale": message.locale,
        "segments": message.segments,
        "not_before": message.not_before.isoformat(),
        "created_at": message.created_at.isoformat(),
        "sent_at": message.sent_at.isoformat() if message.sent_at else None,
        "delivered_at": message.delivered_at.isoformat() if message.delivered_at else None,
    }


@public.get("/healthz", tags=["health"])
def healthz(runtime: RuntimeDep, response: Response) -> dict[str, Any]:
    try:
        with runtime.engine.connect() as connection:
            connection.execute(text("SELECT 1"))
    except Exception:
        response.status_code = 503
        return {"status": "unavailable", "database": "down"}
    return {"status": "ok", "database": "up", "campaigns": len(runtime.campaigns)}


@router.post("/api/v1/candidates", tags=["candidates"])
def post_candidate(body: CandidateIn, runtime: RuntimeDep, response: Response) -> dict[str, Any]:
    with Session(runtime.engine, expire_on_commit=False) as session, session.begin():
        candidate, created = save_candidate(session, body, runtime.settings)
    response.status_code = 201 if created else 200
    return candidate_out(candidate)


@router.get("/api/v1/candidates/{external_id}", tags=["candidates"])
def get_candidate(external_id: str, runtime: RuntimeDep) -> dict[str, Any]:
    with Session(runtime.engine) as session:
        candidate = session.scalar(select(Candidate).where(Candidate.external_id == external_id))
        if candidate is None:
            raise NotFoundError(f"candidate {external_id!r} not found")
        return candidate_out(candidate)


@router.delete("/api/v1/candidates/{external_id}", tags=["candidates"])
def delete_candidate(external_id: str, runtime: RuntimeDep) -> dict[str, Any]:
    """Erase the candidate's personal data everywhere; opt-outs survive as keyed hashes, metrics stay intact."""
    with Session(runtime.engine) as session, session.begin():
        report, addresses = erase_candidate(session, runtime.settings, external_id)
    counts = report.as_dict()
    if runtime.sandbox_url:
        counts["sandbox_records"] = forget_in_sandbox(runtime.sandbox_url, addresses)
    return {"erased": True, "counts": counts}


@router.post("/api/v1/jobs", tags=["jobs"])
def post_job(body: JobIn, runtime: RuntimeDep, response: Response) -> dict[str, Any]:
    with Session(runtime.engine, expire_on_commit=False) as session, session.begin():
        job, created = save_job(session, body)
    response.status_code = 201 if created else 200
    return job_out(job)


class EventAccepted(BaseModel):
    event_id: int
    candidate: str
    type: str
    stage: str
    enrollments: list[dict[str, Any]]
    queued: int


@router.post("/api/v1/candidates/{external_id}/events", tags=["candidates"], status_code=202)
def post_event(external_id: str, body: EventIn, runtime: RuntimeDep) -> EventAccepted:
    with Session(runtime.engine, expire_on_commit=False) as session, session.begin():
        event, enrollments = record_event(
            session,
            runtime.campaigns,
            external_id,
            body,
            company_tz=runtime.settings.company_timezone,
            calendar=runtime.policy.calendar,
            policy=runtime.policy,
            intent=load_intent(runtime.settings.campaigns_dir),
        )
        stage = session.scalar(select(Candidate.stage).where(Candidate.id == event.candidate_id)) or ""
        listed = [
            {
                "id": e.id,
                "campaign": e.campaign,
                "next_run_at": e.next_run_at.isoformat() if e.next_run_at else None,
            }
            for e in enrollments
        ]
    # After commit: steps due now go out at once instead of waiting for the next tick.
    result = runtime.scheduler.run_enrollments([e.id for e in enrollments])
    return EventAccepted(
        event_id=event.id,
        candidate=external_id,
        type=event.type,
        stage=stage,
        enrollments=listed,
        queued=len(result.queued),
    )


@router.get("/api/v1/messages", tags=["messages"])
@ops_readable
def list_messages(
    runtime: RuntimeDep,
    candidate: str | None = None,
    campaign: str | None = None,
    status: str | None = None,
    since: UTCInstant | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> dict[str, Any]:
    query = select(OutboundMessage, Candidate.external_id).join(Candidate, Candidate.id == OutboundMessage.candidate_id)
    if candidate:
        query = query.where(Candidate.external_id == candidate)
    if campaign:
        query = query.where(OutboundMessage.campaign == campaign)
    if status:
        query = query.where(OutboundMessage.status == status)
    if since:
        query = query.where(OutboundMessage.created_at >= since)
    query = query.order_by(OutboundMessage.created_at.desc(), OutboundMessage.step.desc()).limit(limit)
    with Session(runtime.engine) as session:
        items = [message_out(message, external) for message, external in session.execute(query)]
    return {"items": items, "count": len(items)}
