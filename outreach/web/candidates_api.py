"""HR's candidate routes: search, stage moves and their history, intent assessments, tags, and job re-activation.

Every route here answers with or changes personal data, so all are ``hr``-only (none is ``ops_readable``). The
domain rules live in :mod:`outreach.domain.intent` and :func:`outreach.pipeline.enrollment.reactivate`; these handlers
only parse, call, and shape the answer. Bad input is a 422 naming the field, and nothing is written.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query
from pydantic import ConfigDict, Field
from sqlalchemy import select
from sqlalchemy.orm import Session

from outreach.core.clock import utcnow
from outreach.core.errors import NotFoundError, ValidationError
from outreach.core.inputs import InputModel, Instant, UTCInstant
from outreach.core.models import Candidate, IntentAssessment, Job, Stage, StageChange
from outreach.domain.candidates import add_tags
from outreach.domain.intent import (
    SearchQuery,
    assess,
    check_move,
    check_tag_list,
    decline_reason,
    load_intent,
    move_stage,
    parse_levels,
    recontact_date,
    search,
)
from outreach.pipeline.enrollment import reactivate
from outreach.web.api import RuntimeDep, candidate_out
from outreach.web.auth import PrincipalDep

router = APIRouter(tags=["candidates"])


def candidate_view(candidate: Candidate) -> dict[str, Any]:
    return {
        **candidate_out(candidate),
        "intent_level": candidate.intent_level,
        "intent_score": candidate.intent_score,
    }


def _candidate(session: Session, external_id: str) -> Candidate:
    candidate = session.scalar(
        select(Candidate).where(Candidate.external_id == external_id, Candidate.erased_at.is_(None))
    )
    if candidate is None:
        raise NotFoundError(f"candidate {external_id!r} not found")
    return candidate


def _csv(values: list[str] | None) -> list[str]:
    return [part.strip() for value in values or [] for part in value.split(",") if part.strip()]


@router.get("/api/v1/candidates")
def search_candidates(
    runtime: RuntimeDep,
    stage: Annotated[list[str] | None, Query()] = None,
    tag: Annotated[list[str] | None, Query(description="every one must match")] = None,
    tag_any: Annotated[list[str] | None, Query(description="at least one must match")] = None,
    intent: Annotated[list[str] | None, Query(description="high, medium, low, unassessed; comma-separated")] = None,
    recontact_before: UTCInstant | None = None,
    recontact_after: UTCInstant | None = None,
    source: Annotated[str | None, Query(max_length=64)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    cursor: Annotated[str | None, Query(max_length=200)] = None,
) -> dict[str, Any]:
    """Candidates by stage, tags, intent, re-contact date and source, in a stable order; page with ``cursor``."""
    stages: list[Stage] = []
    for value in _csv(stage):
        if value not in Stage._value2member_map_:
            raise ValidationError("stage", f"unknown stage; use {', '.join(s.value for s in Stage)}")
        stages.append(Stage(value))
    query = SearchQuery(
        stages=tuple(stages),
        tags_all=tuple(check_tag_list(_csv(tag), "tag")) if tag else (),
        tags_any=tuple(check_tag_list(_csv(tag_any), "tag_any")) if tag_any else (),
        intent=parse_levels(intent or []),
        recontact_before=recontact_before,
        recontact_after=recontact_after,
        source=source,
        limit=limit,
        cursor=cursor,
    )
    with Session(runtime.engine) as session:
        page, next_cursor = search(session, query)
        items = [candidate_view(c) for c in page]
    return {"items": items, "count": len(items), "next_cursor": next_cursor}


class StageIn(InputModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    stage: Stage
    reason: str | None = Field(default=None, max_length=500)
    #: For talent_pool, declined and rejected: when to approach the candidate again (default from the config).
    recontact_at: Instant | None = None


@router.post("/api/v1/candidates/{external_id}/stage")
def post_stage(external_id: str, body: StageIn, runtime: RuntimeDep, principal: PrincipalDep) -> dict[str, Any]:
    """Move a candidate to another stage by hand; impossible moves are refused (422 on ``stage``)."""
    spec = load_intent(runtime.settings.campaigns_dir)
    given = body.recontact_at
    if given is not None and body.stage not in (Stage.TALENT_POOL, Stage.DECLINED, Stage.REJECTED):
        raise ValidationError("recontact_at", "only a move to talent_pool, declined or rejected carries one")
    now = utcnow()
    with Session(runtime.engine, expire_on_commit=False) as session, session.begin():
        candidate = _candidate(session, external_id)
        check_move(candidate.stage, body.stage)
        change = move_stage(session, candidate, body.stage, by=principal.label, at=now, reason=body.reason)
        recontact = recontact_date(body.stage, now, spec, given)
        if recontact is not None:
            candidate.recontact_at = recontact
        if body.stage is Stage.DECLINED:
            known = decline_reason(body.reason)
            if known is not None:
                add_tags(candidate, f"decline_reason:{known}")
        session.flush()
        assert change is not None
        return {
            "candidate": candidate_view(candidate),
            "change": change_out(change),
        }


def change_out(change: StageChange) -> dict[str, Any]:
    return {
        "from": change.from_stage,
        "to": change.to_stage,
        "by": change.changed_by,
        "reason": change.reason,
        "event_id": change.event_id,
        "at": change.changed_at.isoformat(),
    }


def assessment_out(assessment: IntentAssessment) -> dict[str, Any]:
    return {
        "scores": assessment.scores,
        "mean": round(assessment.mean, 4),
        "level": assessment.level,
        "by": assessment.assessed_by,
        "at": assessment.assessed_at.isoformat(),
    }


@router.get("/api/v1/candidates/{external_id}/history")
def get_history(external_id: str, runtime: RuntimeDep) -> dict[str, Any]:
    """Every stage move and every intent assessment, oldest first."""
    with Session(runtime.engine) as session:
        candidate = _candidate(session, external_id)
        changes = session.scalars(
            select(StageChange)
            .where(StageChange.candidate_id == candidate.id)
            .order_by(StageChange.changed_at, StageChange.id)
        )
        assessments = session.scalars(
            select(IntentAssessment)
            .where(IntentAssessment.candidate_id == candidate.id)
            .order_by(IntentAssessment.assessed_at, IntentAssessment.id)
        )
        return {
            "candidate": external_id,
            "stage": candidate.stage,
            "intent_level": candidate.intent_level,
            "recontact_at": candidate.recontact_at.isoformat() if candidate.recontact_at else None,
            "stages": [change_out(c) for c in changes],
            "assessments": [assessment_out(a) for a in assessments],
        }


class AssessmentIn(InputModel):
    model_config = ConfigDict(extra="forbid")

    #: {dimension: 1..5} for every configured dimension; checked in :func:`outreach.domain.intent.check_scores`.
    scores: dict[str, Any]


@router.post("/api/v1/candidates/{external_id}/assessments", status_code=201)
def post_assessment(
    external_id: str, body: AssessmentIn, runtime: RuntimeDep, principal: PrincipalDep
) -> dict[str, Any]:
    """Store an intent assessment by the caller; the candidate's intent level follows its mean."""
    spec = load_intent(runtime.settings.campaigns_dir)
    with Session(runtime.engine, expire_on_commit=False) as session, session.begin():
        candidate = _candidate(session, external_id)
        assessment = assess(session, candidate, body.scores, spec, by=principal.label)
        return {"candidate": external_id, **assessment_out(assessment), "intent_score": candidate.intent_score}


class TagsIn(InputModel):
    model_config = ConfigDict(extra="forbid")

    tags: list[str] = Field(max_length=100)


@router.post("/api/v1/candidates/{external_id}/tags")
def post_tags(external_id: str, body: TagsIn, runtime: RuntimeDep) -> dict[str, Any]:
    """Add ``dimension:value`` tags (single-valued dimensions such as decline_reason replace their old value)."""
    tags = check_tag_list(body.tags)
    with Session(runtime.engine) as session, session.begin():
        candidate = _candidate(session, external_id)
        add_tags(candidate, *tags)
        candidate.updated_at = utcnow()
        return {"candidate": external_id, "tags": list(candidate.tags)}


@router.delete("/api/v1/candidates/{external_id}/tags")
def delete_tags(
    external_id: str, runtime: RuntimeDep, tag: Annotated[list[str] | None, Query()] = None
) -> dict[str, Any]:
    """Remove tags given as ``?tag=stack:java&tag=status:passive``; tags the candidate lacks are ignored."""
    tags = set(check_tag_list(tag or [], "tag"))
    with Session(runtime.engine) as session, session.begin():
        candidate = _candidate(session, external_id)
        candidate.tags = [t for t in candidate.tags if t not in tags]
        candidate.updated_at = utcnow()
        return {"candidate": external_id, "tags": list(candidate.tags)}


class OpenJobIn(InputModel):
    model_config = ConfigDict(extra="forbid")

    #: At most this many candidates (high intent first); None: everyone who qualifies.
    limit: int | None = Field(default=None, ge=1, le=100000)


@router.post("/api/v1/jobs/{external_id}/open")
def open_job(external_id: str, runtime: RuntimeDep, body: OpenJobIn | None = None) -> dict[str, Any]:
    """Open the job and start ``job_reactivation`` for the talent-pool candidates it suits.

    Counts only (no personal data): how many were selected, and how many were not, by reason (see
    :class:`outreach.pipeline.enrollment.Reactivation`). Opening the same job again enrolls nobody twice.
    """
    limit = body.limit if body else None
    with Session(runtime.engine, expire_on_commit=False) as session, session.begin():
        job = session.scalar(select(Job).where(Job.external_id == external_id))
        if job is None:
            raise NotFoundError(f"job {external_id!r} not found")
        job.status = "open"
        result = reactivate(
            session,
            runtime.campaigns,
            job,
            company_tz=runtime.settings.company_timezone,
            calendar=runtime.policy.calendar,
            policy=runtime.policy,
            limit=limit,
        )
        ids = [e.id for e in result.enrollments]
    # After commit, like an ATS event: steps due now go out at once.
    queued = runtime.scheduler.run_enrollments(ids) if ids else None
    return {"job": external_id, **result.summary(), "queued": len(queued.queued) if queued else 0}
