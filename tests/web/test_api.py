"""The JSON API on both databases: upserts, validation that names the field and writes nothing, the outbox."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from outreach.core.models import Candidate, CandidateEvent, Enrollment, OutboundMessage
from outreach.service.runtime import Runtime

CANDIDATE = {
    "external_id": "ats-1001",
    "name": "Priya Raman",
    "email": "Priya.Raman@Example.org",
    "phone": "+44 7911 123456",
    "locale": "en-GB",
    "timezone": "Europe/London",
    "source": "linkedin",
    "tags": ["Stack:java", "status:passive"],
}


def count(runtime: Runtime, model: type) -> int:
    with Session(runtime.engine) as session:
        return int(session.scalar(select(func.count()).select_from(model)) or 0)


def test_candidate_upsert_normalises_and_reads_back(hr: TestClient) -> None:
    created = hr.post("/api/v1/candidates", json=CANDIDATE)
    assert created.status_code == 201
    body = created.json()
    assert body["phone"] == "+447911123456"
    assert body["email"] == "Priya.Raman@example.org"
    assert body["tags"] == ["stack:java", "status:passive"]
    assert body["locale"] == "en-GB"
    updated = hr.post("/api/v1/candidates", json={"external_id": "ats-1001", "source": "referral"})
    assert updated.status_code == 200
    fetched = hr.get("/api/v1/candidates/ats-1001").json()
    assert (fetched["source"], fetched["name"], fetched["stage"]) == ("referral", "Priya Raman", "applied")


def test_unknown_candidate_is_404(hr: TestClient) -> None:
    response = hr.get("/api/v1/candidates/nobody")
    assert response.status_code == 404


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("email", "priya@", "not a valid email address"),
        ("phone", "12345", "phone number"),
        ("phone", "+86 138", "phone number"),
        ("timezone", "Asia/Atlantis", "unknown IANA timezone"),
        ("locale", "fr-FR", "unsupported locale"),
        ("tags", ["has space"], "tag 0"),
        ("shoe_size", 42, "Extra inputs"),
    ],
)
def test_bad_candidate_field_is_named_and_nothing_written(
    hr: TestClient, runtime: Runtime, field: str, value: object, message: str
) -> None:
    response = hr.post("/api/v1/candidates", json={**CANDIDATE, field: value})
    assert response.status_code == 422
    body = response.json()
    assert body["field"] == field
    assert message in body["message"]
    assert str(value) not in response.text or field == "shoe_size"
    assert count(runtime, Candidate) == 0


def test_job_upsert_and_salary_range(hr: TestClient) -> None:
    job = {
        "external_id": "be-1",
        "title": "Backend Engineer",
        "salary_min": 30000,
        "salary_max": 45000,
        "booking_url": "https://cal.example.com/be",
        "tags": ["stack:java"],
    }
    assert hr.post("/api/v1/jobs", json=job).status_code == 201
    assert hr.post("/api/v1/jobs", json={**job, "title": "Senior Backend Engineer"}).status_code == 200
    bad = hr.post("/api/v1/jobs", json={**job, "salary_max": 100})
    assert (bad.status_code, bad.json()["field"]) == (422, "salary_max")
    bad_url = hr.post("/api/v1/jobs", json={**job, "booking_url": "javascript:alert(1)"})
    assert (bad_url.status_code, bad_url.json()["field"]) == (422, "booking_url")


def test_event_enrolls_and_queues_the_first_step(hr: TestClient, runtime: Runtime) -> None:
    hr.post("/api/v1/jobs", json={"external_id": "be-1", "title": "Backend Engineer"})
    hr.post("/api/v1/candidates", json=CANDIDATE)
    response = hr.post("/api/v1/candidates/ats-1001/events", json={"type": "applied", "job_id": "be-1"})
    assert response.status_code == 202
    body = response.json()
    assert [e["campaign"] for e in body["enrollments"]] == ["jd_intro"]
    assert body["queued"] == 1
    assert runtime.queued  # type: ignore[attr-defined]
    messages = hr.get("/api/v1/messages", params={"candidate": "ats-1001"}).json()["items"]
    assert [(m["campaign"], m["step"], m["channel"], m["status"]) for m in messages] == [
        ("jd_intro", 0, "email", "pending")
    ]
    again = hr.post("/api/v1/candidates/ats-1001/events", json={"type": "applied", "job_id": "be-1"})
    assert again.json()["enrollments"] == []  # same application: no second JD mail
    assert count(runtime, Enrollment) == 1


@pytest.mark.parametrize(
    ("payload", "field", "status"),
    [
        ({"type": "interviewed"}, "type", 422),
        ({"type": "applied", "job_id": "nope"}, "job_id", 422),
        ({"type": "job_opened"}, "job_id", 422),
        ({"type": "applied", "occurred_at": "yesterday"}, "occurred_at", 422),
        # PostgreSQL stores no NUL in text or JSONB: refused up front, not as a failed write.
        ({"type": "offer_declined", "reason": "salary\u0000"}, "reason", 422),
        ({"type": "applied", "data": {"note": ["ok", "a\u0000b"]}}, "data", 422),
        ({"type": "applied", "data": {"k\u0000": 1}}, "data", 422),
    ],
)
def test_bad_event_is_refused_and_nothing_written(
    hr: TestClient, runtime: Runtime, payload: dict[str, object], field: str, status: int
) -> None:
    hr.post("/api/v1/candidates", json=CANDIDATE)
    response = hr.post("/api/v1/candidates/ats-1001/events", json=payload)
    assert response.status_code == status
    assert response.json()["field"] == field
    assert count(runtime, CandidateEvent) == 0
    assert count(runtime, Enrollment) == 0


def test_event_for_unknown_candidate_is_404(hr: TestClient) -> None:
    response = hr.post("/api/v1/candidates/ghost/events", json={"type": "applied"})
    assert response.status_code == 404


def test_healthz(hr: TestClient) -> None:
    response = hr.get("/healthz")
    assert response.status_code == 200
    assert response.json()["status"] == "ok"


def test_openapi_docs_are_served(hr: TestClient) -> None:
    assert hr.get("/docs").status_code == 200
    paths = hr.get("/openapi.json").json()["paths"]
    assert "/api/v1/candidates/{external_id}/events" in paths


def test_messages_filter_by_status_campaign_and_since(hr: TestClient) -> None:
    hr.post("/api/v1/candidates", json=CANDIDATE)
    hr.post("/api/v1/candidates/ats-1001/events", json={"type": "final_interview_failed"})
    for params, expected in [
        ({"status": "pending"}, 1),
        ({"status": "sent"}, 0),
        ({"campaign": "final_thanks"}, 1),
        ({"campaign": "jd_intro"}, 0),
        ({"since": "2000-01-01T00:00:00"}, 1),
        ({"since": "2999-01-01T00:00:00+08:00"}, 0),
    ]:
        response = hr.get("/api/v1/messages", params=params)
        assert response.status_code == 200, response.text
        assert response.json()["count"] == expected, params


def test_offer_accepted_without_the_onboarding_data_is_refused(hr: TestClient, runtime: Runtime) -> None:
    hr.post("/api/v1/candidates", json=CANDIDATE)
    response = hr.post(
        "/api/v1/candidates/ats-1001/events",
        json={"type": "offer_accepted", "data": {"start_date": "2027-01-04", "hr_contact": {"name": "Li Na"}}},
    )
    assert (response.status_code, response.json()["field"]) == (422, "data.start_place")
    assert count(runtime, CandidateEvent) == 0


def test_a_wrongly_shaped_offer_is_refused_with_every_field_at_once(hr: TestClient, runtime: Runtime) -> None:
    hr.post("/api/v1/candidates", json=CANDIDATE)
    stage = hr.get("/api/v1/candidates/ats-1001").json()["stage"]
    response = hr.post(
        "/api/v1/candidates/ats-1001/events",
        json={
            "type": "offer_accepted",
            "job_id": "no-such-job",
            "data": {"start_date": "next Monday", "hr_contact": "Li Wei", "documents": "ID card"},
        },
    )
    assert response.status_code == 422
    errors = {error["field"]: error["message"] for error in response.json()["errors"]}
    assert set(errors) == {"job_id", "data.start_date", "data.start_place", "data.hr_contact", "data.documents"}
    assert errors["data.hr_contact"] == "expected an object with name, got text"
    assert "Li Wei" not in response.text and "next Monday" not in response.text
    # Nothing is stored: no event, no enrollment, no outbox row, the stage unchanged.
    assert count(runtime, CandidateEvent) == 0
    assert count(runtime, Enrollment) == 0
    assert count(runtime, OutboundMessage) == 0
    assert hr.get("/api/v1/candidates/ats-1001").json()["stage"] == stage
