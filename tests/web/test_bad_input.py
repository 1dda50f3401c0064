"""Values the database cannot hold, sent to every kind of API input: each is a 422 naming the field, never a 500,
and nothing is written (on both databases; PostgreSQL is the one that refuses NUL and lone surrogates)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session

from outreach.core.inputs import InputModel
from outreach.core.models import Candidate, CandidateEvent, Job, OutboundMessage
from outreach.domain.intent import encode_cursor
from outreach.ops.sandbox import SandboxServer
from outreach.pipeline.delivery import deliver
from outreach.service.runtime import Runtime
from outreach.web import create_app
from tests.helpers import add_candidate, add_job
from tests.security.util import snapshot

JOB = {"external_id": "be-1", "title": "Backend Engineer", "booking_url": "https://cal.example.com/be"}
CANDIDATE = {"external_id": "c-9", "name": "Alex Morgan", "email": "c-9@example.org"}
EVENTS = "/api/v1/candidates/c-1/events"

#: (what, method, path, request, the field the answer must name)
BAD: list[tuple[str, str, str, dict[str, Any], str]] = [
    ("NUL in a candidate tag", "post", "/api/v1/candidates", {"json": {**CANDIDATE, "tags": ["stack:ja\x00va"]}},
     "tags"),
    ("NUL in a candidate email", "post", "/api/v1/candidates", {"json": {**CANDIDATE, "email": "a\x00@b.org"}},
     "email"),
    ("NUL in a booking_url", "post", "/api/v1/jobs", {"json": {**JOB, "booking_url": "https://cal.example.com/\x00"}},
     "booking_url"),
    ("NUL in a job tag", "post", "/api/v1/jobs", {"json": {**JOB, "tags": ["stack:\x00"]}}, "tags"),
    ("salary_min of 2**31", "post", "/api/v1/jobs", {"json": {**JOB, "salary_min": 2**31}}, "salary_min"),
    ("salary_max beyond 64 bits", "post", "/api/v1/jobs", {"json": {**JOB, "salary_max": 2**64}}, "salary_max"),
    ("NUL in a stage reason", "post", "/api/v1/candidates/c-1/stage",
     {"json": {"stage": "contacted", "reason": "moved\x00"}}, "reason"),
    ("recontact_at in year 9999", "post", "/api/v1/candidates/c-1/stage",
     {"json": {"stage": "talent_pool", "recontact_at": "9999-06-01T00:00:00+00:00"}}, "recontact_at"),
    ("NUL in POST tags", "post", "/api/v1/candidates/c-1/tags", {"json": {"tags": ["stack:\x00"]}}, "tags"),
    ("NUL in an assessment dimension", "post", "/api/v1/candidates/c-1/assessments",
     {"json": {"scores": {"fit\x00": 3}}}, "scores"),
    ("NUL in a tag to delete", "delete", "/api/v1/candidates/c-1/tags", {"params": {"tag": "stack:\x00"}}, "tag"),
    ("NUL in a path value", "get", "/api/v1/candidates/c-1%00", {}, "external_id"),
    ("NUL in the path of an event", "post", "/api/v1/candidates/c-1%00/events", {"json": {"type": "applied"}},
     "external_id"),
    ("NUL in a search value", "get", "/api/v1/candidates", {"params": {"source": "x\x00"}}, "source"),
    ("NUL in a messages filter", "get", "/api/v1/messages", {"params": {"campaign": "\x00"}}, "campaign"),
    ("NUL in an alerts filter", "get", "/api/v1/alerts", {"params": {"kind": "a\x00"}}, "kind"),
    ("NUL in a query name", "get", "/api/v1/queue", {"params": {"x\x00": "1"}}, "x\\0"),
    ("an alert id beyond bigint", "post", "/api/v1/alerts/99999999999999999999/resolve", {}, "alert_id"),
    ("an alert id beyond the column", "post", f"/api/v1/alerts/{2**31}/resolve", {}, "alert_id"),
    ("a cursor beyond bigint", "get", "/api/v1/candidates", {"params": {"cursor": encode_cursor(2**63)}}, "cursor"),
    ("since=99999999d", "get", "/api/v1/metrics", {"params": {"since": "99999999d"}}, "since"),
    ("since=0001-01-01", "get", "/api/v1/metrics", {"params": {"since": "0001-01-01"}}, "since"),
    ("until in year 9999 -12:00", "get", "/api/v1/metrics/sla", {"params": {"until": "9999-12-31T23:59:59-12:00"}},
     "until"),
    ("messages since year 1 +14:00", "get", "/api/v1/messages", {"params": {"since": "0001-01-01T00:00:00+14:00"}},
     "since"),
    ("recontact_before in year 10000 UTC", "get", "/api/v1/candidates",
     {"params": {"recontact_before": "9999-12-31T23:59:59-12:00"}}, "recontact_before"),
    ("occurred_at 0001-01-01T00:00:00+14:00", "post", EVENTS,
     {"json": {"type": "applied", "occurred_at": "0001-01-01T00:00:00+14:00"}}, "occurred_at"),
    ("occurred_at 9999-12-31T23:59:59-12:00", "post", EVENTS,
     {"json": {"type": "applied", "occurred_at": "9999-12-31T23:59:59-12:00"}}, "occurred_at"),
    ("occurred_at without an offset", "post", EVENTS, {"json": {"type": "applied", "occurred_at": "2027-01-01T10:00"}},
     "occurred_at"),
]  # fmt: skip


def unchanged(runtime: Runtime) -> dict[str, list[tuple[Any, ...]]]:
    """Every table but the API keys (each request marks its key used)."""
    return {name: rows for name, rows in snapshot(runtime).items() if name != "api_keys"}


@pytest.mark.parametrize(("what", "method", "path", "request_", "field"), BAD, ids=[case[0] for case in BAD])
def test_a_value_the_database_cannot_hold_is_422_naming_the_field(
    hr: TestClient, runtime: Runtime, what: str, method: str, path: str, request_: dict[str, Any], field: str
) -> None:
    add_candidate(runtime, "c-1")
    add_job(runtime, "be-0")
    before = unchanged(runtime)
    answer = getattr(hr, method)(path, **request_)
    assert answer.status_code == 422, (what, answer.status_code, answer.text)
    assert answer.json()["field"] == field, answer.text
    assert answer.json()["message"]
    assert unchanged(runtime) == before


def test_a_lone_surrogate_becomes_the_replacement_character(hr: TestClient, runtime: Runtime) -> None:
    """A JSON ``\\udc80`` cannot be stored in UTF-8; like the webhooks, the API keeps the rest and marks the spot."""

    def post(path: str, payload: dict[str, Any]) -> Any:
        body = json.dumps(payload).encode()  # ASCII escapes: \\udc80 on the wire
        assert b"\\udc80" in body
        return hr.post(path, content=body, headers={"content-type": "application/json"})

    assert post("/api/v1/candidates", {**CANDIDATE, "name": "Alex \udc80", "data": {"k\udc80": ["v\udc80"]}}).is_success
    assert post("/api/v1/jobs", {**JOB, "description": "Build \udc80 things"}).status_code == 201
    event = post("/api/v1/candidates/c-9/events", {"type": "applied", "job_id": "be-1", "data": {"note": "\udc80"}})
    assert event.status_code == 202, event.text
    with Session(runtime.engine) as session:
        candidate = session.scalars(select(Candidate)).one()
        job = session.scalars(select(Job)).one()
        stored = session.scalars(select(CandidateEvent)).one()
    assert stored.data == {"note": "\ufffd"}
    assert candidate.name == "Alex \ufffd"
    assert candidate.data == {"k\ufffd": ["v\ufffd"]}
    assert job.description == "Build \ufffd things"


def test_every_body_the_api_reads_is_an_input_model(runtime: Runtime) -> None:
    """The text rule applies to a body only through :class:`InputModel`: a new route's model must derive from it."""

    def subclasses(model: type) -> set[str]:
        return {model.__name__}.union(*(subclasses(sub) for sub in model.__subclasses__()))

    input_models = subclasses(InputModel)
    bodies = {}
    for path, operations in create_app(runtime).openapi()["paths"].items():
        for method, operation in operations.items():
            for media in operation.get("requestBody", {}).get("content", {}).values():
                schema = media["schema"]
                refs = [schema.get("$ref")] + [option.get("$ref") for option in schema.get("anyOf", [])]
                bodies[f"{method} {path}"] = {ref.rsplit("/", 1)[1] for ref in refs if ref}
    assert bodies["post /api/v1/candidates/{external_id}/events"] == {"EventIn"}
    for operation, models in bodies.items():
        assert models and models <= input_models, (operation, models)


def test_an_offer_letter_with_a_lone_surrogate_in_its_data_is_sent_and_recorded(
    hr: TestClient, runtime: Runtime, sandbox: SandboxServer
) -> None:
    """The finding: the letter reached the provider, then recording it failed and the row went ``uncertain``."""
    add_candidate(runtime, "c-1")
    add_job(runtime, "be-1")
    data = {"start_date": "2030-03-01", "start_place": "Floor 18 \udc80", "hr_contact": {"name": "Li Na"}}
    body = json.dumps({"type": "offer_accepted", "job_id": "be-1", "data": data}).encode()
    answer = hr.post(EVENTS, content=body, headers={"content-type": "application/json"})
    assert answer.status_code == 202, answer.text
    with Session(runtime.engine) as session:
        letter = session.scalars(select(OutboundMessage).where(OutboundMessage.campaign == "offer_letter")).first()
    assert letter is not None
    assert deliver(runtime, letter.id).status == "sent"
    with Session(runtime.engine) as session:
        assert session.get(OutboundMessage, letter.id).status == "sent"  # type: ignore[union-attr]
    assert "Floor 18 \ufffd" in sandbox.messages()[-1].text
