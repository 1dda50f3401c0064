"""JSON API for HR: a candidate's conversation (both directions), marking it answered, and the alerts list."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from outreach.core.clock import utcnow
from outreach.core.errors import NotFoundError
from outreach.core.inputs import RowId
from outreach.core.models import Alert, Candidate
from outreach.inbound.conversation import mark_answered, thread
from outreach.web.api import RuntimeDep
from outreach.web.auth import ops_readable

__all__ = ["alert_out", "router"]

router = APIRouter(prefix="/api/v1")


def _candidate(session: Session, external_id: str) -> Candidate:
    candidate = session.scalar(select(Candidate).where(Candidate.external_id == external_id))
    if candidate is None:
        raise NotFoundError(f"candidate {external_id!r} not found")
    return candidate


@router.get("/candidates/{external_id}/conversation", tags=["conversation"])
def get_conversation(
    external_id: str, runtime: RuntimeDep, limit: Annotated[int, Query(ge=1, le=1000)] = 100
) -> dict[str, Any]:
    """The latest ``limit`` messages with the candidate, both directions, oldest first."""
    with Session(runtime.engine) as session:
        candidate = _candidate(session, external_id)
        items = [item.as_dict() for item in thread(session, candidate.id, limit)]
    return {"candidate": external_id, "items": items}


@router.post("/candidates/{external_id}/conversation/answered", tags=["conversation"])
def post_answered(external_id: str, runtime: RuntimeDep) -> dict[str, Any]:
    """HR has answered: the candidate's waiting replies are marked answered and their reply alerts resolved."""
    with Session(runtime.engine, expire_on_commit=False) as session, session.begin():
        candidate = _candidate(session, external_id)
        answered = mark_answered(session, candidate.id, utcnow())
    return {"candidate": external_id, "answered": answered}


def alert_out(alert: Alert, external_id: str | None) -> dict[str, Any]:
    return {
        "id": alert.id,
        "kind": alert.kind,
        "candidate": external_id,
        "campaign": alert.campaign,
        "outbox_id": alert.outbox_id,
        "message": alert.message,
        "created_at": alert.created_at.isoformat(),
        "resolved_at": alert.resolved_at.isoformat() if alert.resolved_at else None,
    }


@router.get("/alerts", tags=["alerts"])
@ops_readable
def list_alerts(
    runtime: RuntimeDep,
    open_: Annotated[bool | None, Query(alias="open")] = None,
    kind: str | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> dict[str, Any]:
    """Alerts, newest first; ``open=true`` only the unresolved ones, ``open=false`` only the resolved ones."""
    query = select(Alert, Candidate.external_id).outerjoin(Candidate, Candidate.id == Alert.candidate_id)
    if open_ is not None:
        query = query.where(Alert.resolved_at.is_(None) if open_ else Alert.resolved_at.is_not(None))
    if kind:
        query = query.where(Alert.kind == kind)
    query = query.order_by(Alert.created_at.desc(), Alert.id.desc()).limit(limit)
    with Session(runtime.engine) as session:
        items = [alert_out(alert, external_id) for alert, external_id in session.execute(query)]
    return {"items": items, "count": len(items)}


@router.post("/alerts/{alert_id}/resolve", tags=["alerts"])
def resolve_alert(alert_id: RowId, runtime: RuntimeDep) -> dict[str, Any]:
    """Resolve an alert (again: no change, the first resolution time stays)."""
    with Session(runtime.engine, expire_on_commit=False) as session, session.begin():
        session.execute(
            update(Alert)
            .where(Alert.id == alert_id, Alert.resolved_at.is_(None))
            .values(resolved_at=utcnow())
            .execution_options(synchronize_session=False)
        )
        row = session.execute(
            select(Alert, Candidate.external_id)
            .outerjoin(Candidate, Candidate.id == Alert.candidate_id)
            .where(Alert.id == alert_id)
        ).first()
        if row is None:
            raise NotFoundError(f"alert {alert_id} not found")
        return alert_out(row[0], row[1])
