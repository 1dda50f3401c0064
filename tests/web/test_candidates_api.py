"""HR's candidate API on both databases: stage moves and history, assessments, tags, search, job re-activation.

Every route is hr-only: an ops key gets 403 and nothing changes.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from outreach.core.clock import utcnow
from outreach.core.models import Candidate, Enrollment, IntentAssessment, StageChange, Suppression
from outreach.domain.campaigns import Category
from outreach.policy.config import CapSpec
from outreach.policy.engine import PolicyEngine
from outreach.service.runtime import Runtime
from tests.helpers import add_candidate, add_job, api_client, past_nurture_send

SCORES = {"career_goal_match": 5, "salary_fit": 4, "start_urgency": 4}


def count(runtime: Runtime, model: type) -> int:
    with Session(runtime.engine) as session:
        return int(session.scalar(select(func.count()).select_from(model)) or 0)


def stage_of(runtime: Runtime, external_id: str = "c-1") -> tuple[str, datetime | None, list[str]]:
    with Session(runtime.engine) as session:
        candidate = session.scalars(select(Candidate).where(Candidate.external_id == external_id)).one()
        return candidate.stage, candidate.recontact_at, list(candidate.tags)


def test_ops_may_use_none_of_these_routes(runtime: Runtime) -> None:
    add_candidate(runtime)
    add_job(runtime)
    with api_client(runtime, "ops", raise_server_exceptions=False) as ops:
        calls: list[tuple[str, str, dict[str, Any] | None]] = [
            ("GET", "/api/v1/candidates", None),
            ("GET", "/api/v1/candidates/c-1/history", None),
            ("POST", "/api/v1/candidates/c-1/stage", {"stage": "contacted"}),
            ("POST", "/api/v1/candidates/c-1/assessments", {"scores": SCORES}),
            ("POST", "/api/v1/candidates/c-1/tags", {"tags": ["stack:java"]}),
            ("DELETE", "/api/v1/candidates/c-1/tags?tag=stack:python", None),
            ("POST", "/api/v1/jobs/j-1/open", None),
        ]
        for method, url, body in calls:
            assert ops.request(method, url, json=body).status_code == 403, url
    with TestClient(api_client(runtime).app) as anonymous:
        assert anonymous.get("/api/v1/candidates").status_code == 401
    assert stage_of(runtime) == ("applied", None, ["stack:python"])
    assert count(runtime, StageChange) == count(runtime, IntentAssessment) == count(runtime, Enrollment) == 0


def test_stage_moves_are_checked_and_kept_in_the_history(runtime: Runtime, hr: TestClient) -> None:
    add_candidate(runtime)
    moved = hr.post("/api/v1/candidates/c-1/stage", json={"stage": "contacted", "reason": "phone screen"})
    assert moved.status_code == 200, moved.text
    assert moved.json()["candidate"]["stage"] == "contacted"
    impossible = hr.post("/api/v1/candidates/c-1/stage", json={"stage": "hired"})
    assert impossible.status_code == 422
    assert impossible.json()["field"] == "stage" and "contacted" in impossible.json()["message"]
    unknown = hr.post("/api/v1/candidates/c-1/stage", json={"stage": "lost"})
    assert (unknown.status_code, unknown.json()["field"]) == (422, "stage")
    assert hr.post("/api/v1/candidates/nobody/stage", json={"stage": "contacted"}).status_code == 404

    before = utcnow()
    pooled = hr.post("/api/v1/candidates/c-1/stage", json={"stage": "talent_pool"})
    assert pooled.status_code == 200, pooled.text
    stage, recontact, _ = stage_of(runtime)
    assert stage == "talent_pool" and recontact is not None
    assert timedelta(days=90) <= recontact - before < timedelta(days=90, minutes=5)  # from campaigns/intent.yaml

    history = hr.get("/api/v1/candidates/c-1/history").json()
    assert [(h["from"], h["to"], h["reason"]) for h in history["stages"]] == [
        ("applied", "contacted", "phone screen"),
        ("contacted", "talent_pool", None),
    ]
    assert all(h["by"].startswith("api:") for h in history["stages"])
    assert history["recontact_at"] is not None


def test_recontact_date_may_be_given_and_declines_get_a_reason_tag(runtime: Runtime, hr: TestClient) -> None:
    add_candidate(runtime, stage="offer")
    when = "2027-06-01T09:00:00+08:00"
    wrong = hr.post("/api/v1/candidates/c-1/stage", json={"stage": "accepted", "recontact_at": when})
    assert (wrong.status_code, wrong.json()["field"]) == (422, "recontact_at")
    naive = hr.post("/api/v1/candidates/c-1/stage", json={"stage": "declined", "recontact_at": "2027-06-01T09:00"})
    assert (naive.status_code, naive.json()["field"]) == (422, "recontact_at")
    assert count(runtime, StageChange) == 0
    declined = hr.post(
        "/api/v1/candidates/c-1/stage",
        json={"stage": "declined", "reason": "Counter offer", "recontact_at": when},
    )
    assert declined.status_code == 200, declined.text
    stage, recontact, tags = stage_of(runtime)
    assert (stage, recontact) == ("declined", datetime(2027, 6, 1, 1, 0, tzinfo=UTC))
    assert "decline_reason:counter_offer" in tags


def test_assessment_sets_the_level_and_is_kept_with_who_and_when(runtime: Runtime, hr: TestClient) -> None:
    add_candidate(runtime)
    created = hr.post("/api/v1/candidates/c-1/assessments", json={"scores": SCORES})
    assert created.status_code == 201, created.text
    body = created.json()
    assert (body["level"], body["mean"]) == ("high", pytest.approx(13 / 3, abs=1e-3))
    assert body["by"].startswith("api:")
    assert hr.get("/api/v1/candidates?intent=high").json()["count"] == 1
    medium = hr.post(
        "/api/v1/candidates/c-1/assessments",
        json={"scores": {"career_goal_match": 3, "salary_fit": 2, "start_urgency": 4}},
    )
    assert medium.json()["level"] == "medium"
    history = hr.get("/api/v1/candidates/c-1/history").json()
    assert [a["level"] for a in history["assessments"]] == ["high", "medium"]
    assert history["intent_level"] == "medium"


@pytest.mark.parametrize(
    ("scores", "field"),
    [
        ({**SCORES, "vibe": 3}, "scores.vibe"),
        ({"career_goal_match": 5, "salary_fit": 4}, "scores.start_urgency"),
        ({**SCORES, "salary_fit": 9}, "scores.salary_fit"),
        ({**SCORES, "salary_fit": "4"}, "scores.salary_fit"),
    ],
)
def test_bad_assessments_name_the_field_and_write_nothing(
    runtime: Runtime, hr: TestClient, scores: dict[str, Any], field: str
) -> None:
    add_candidate(runtime)
    response = hr.post("/api/v1/candidates/c-1/assessments", json={"scores": scores})
    assert (response.status_code, response.json()["field"]) == (422, field)
    assert count(runtime, IntentAssessment) == 0
    with Session(runtime.engine) as session:
        assert session.scalar(select(Candidate.intent_level)) is None


def test_tags_are_added_and_removed(runtime: Runtime, hr: TestClient) -> None:
    add_candidate(runtime)
    added = hr.post("/api/v1/candidates/c-1/tags", json={"tags": ["stack:java", "status:passive"]})
    assert added.json()["tags"] == ["stack:python", "stack:java", "status:passive"]
    replaced = hr.post("/api/v1/candidates/c-1/tags", json={"tags": ["status:active"]})
    assert replaced.json()["tags"] == ["stack:python", "stack:java", "status:active"]  # status is single-valued
    bad = hr.post("/api/v1/candidates/c-1/tags", json={"tags": ["stack:go", "Stack:java"]})
    assert (bad.status_code, bad.json()["field"]) == (422, "tags.1")
    assert "lowercase" in bad.json()["message"]
    removed = hr.delete("/api/v1/candidates/c-1/tags?tag=stack:python&tag=nothing:here")
    assert removed.json()["tags"] == ["stack:java", "status:active"]
    assert stage_of(runtime)[2] == ["stack:java", "status:active"]


def plant_search_population(runtime: Runtime) -> None:
    now = utcnow()
    add_candidate(runtime, "java-pool", tags=["stack:java", "status:passive"], stage="talent_pool", source="referral")
    add_candidate(runtime, "java-active", tags=["stack:java", "status:active"])
    add_candidate(runtime, "go-pool", tags=["stack:go", "status:passive"], stage="talent_pool")
    add_candidate(runtime, "python", tags=["stack:python", "city:上海", 'nick:"q"'])
    with Session(runtime.engine) as session, session.begin():
        session.execute(
            update(Candidate)
            .where(Candidate.external_id == "java-pool")
            .values(intent_level="high", intent_score=4.3, recontact_at=now + timedelta(days=10))
        )
        session.execute(
            update(Candidate)
            .where(Candidate.external_id == "go-pool")
            .values(intent_level="medium", intent_score=3.0, recontact_at=now + timedelta(days=100))
        )


def found(hr: TestClient, query: str) -> list[str]:
    response = hr.get(f"/api/v1/candidates?{query}")
    assert response.status_code == 200, response.text
    return [item["external_id"] for item in response.json()["items"]]


def test_search_by_stage_tags_intent_recontact_and_source(runtime: Runtime, hr: TestClient) -> None:
    plant_search_population(runtime)
    soon = (utcnow() + timedelta(days=30)).isoformat().replace("+00:00", "Z")
    assert found(hr, "") == ["java-pool", "java-active", "go-pool", "python"]
    assert found(hr, "stage=talent_pool") == ["java-pool", "go-pool"]
    assert found(hr, "tag=stack:java") == ["java-pool", "java-active"]
    assert found(hr, "tag=stack:java&tag=status:passive") == ["java-pool"]  # all must match
    assert found(hr, "tag_any=stack:go&tag_any=stack:python") == ["go-pool", "python"]
    assert found(hr, "tag_any=stack:go,stack:java&tag=status:passive") == ["java-pool", "go-pool"]
    assert found(hr, "intent=high,medium") == ["java-pool", "go-pool"]
    assert found(hr, "intent=unassessed") == ["java-active", "python"]
    assert found(hr, f"recontact_before={soon}") == ["java-pool"]
    assert found(hr, f"recontact_after={soon}") == ["go-pool"]
    assert found(hr, "source=referral") == ["java-pool"]
    assert found(hr, "tag=stack:rust") == []
    assert found(hr, "tag=city:上海") == found(hr, 'tag=nick:"q"') == ["python"]  # stored JSON-escaped
    assert found(hr, "tag=city:上") == found(hr, "tag=stack:pyth") == []  # whole tags only
    item = hr.get("/api/v1/candidates?tag=stack:java&intent=high").json()["items"][0]
    assert (item["intent_level"], item["stage"], item["email"]) == ("high", "talent_pool", "java-pool@example.org")
    for query, field in [("intent=hot", "intent"), ("tag=Stack:java", "tag.0"), ("stage=lost", "stage")]:
        bad = hr.get(f"/api/v1/candidates?{query}")
        assert (bad.status_code, bad.json()["field"]) == (422, field), query
    assert hr.get("/api/v1/candidates?cursor=nonsense").json()["field"] == "cursor"


def test_search_pages_with_a_cursor(runtime: Runtime, hr: TestClient) -> None:
    plant_search_population(runtime)
    first = hr.get("/api/v1/candidates?limit=3").json()
    assert [i["external_id"] for i in first["items"]] == ["java-pool", "java-active", "go-pool"]
    second = hr.get(f"/api/v1/candidates?limit=3&cursor={first['next_cursor']}").json()
    assert ([i["external_id"] for i in second["items"]], second["next_cursor"]) == (["python"], None)


def plant_pool(runtime: Runtime) -> dict[str, str]:
    """One candidate of each kind; returns what each should come to (selected or the reason they are not)."""
    past, future = utcnow() - timedelta(days=1), utcnow() + timedelta(days=30)
    add_job(runtime, "j-9", title="Java Platform Lead", tags=["stack:java", "domain:payments"])
    kinds: dict[str, tuple[dict[str, Any], str]] = {
        "pool-high": ({"stage": "talent_pool", "intent_level": "high"}, "selected"),
        "pool-medium": ({"stage": "talent_pool", "intent_level": "medium"}, "selected"),
        "pool-unassessed": ({"stage": "talent_pool"}, "selected"),
        "pool-future-date": ({"stage": "talent_pool", "recontact_at": future}, "selected"),
        "declined-due": ({"stage": "declined", "recontact_at": past}, "selected"),
        "declined-later": ({"stage": "declined", "recontact_at": future}, "recontact_later"),
        "other-stack": ({"stage": "talent_pool", "tags": ["stack:go"]}, "no_matching_tags"),
        "no-consent": ({"stage": "talent_pool", "nurture_consent": False}, "opted_out"),
        "unsubscribed": ({"stage": "talent_pool"}, "opted_out"),
        "capped": ({"stage": "talent_pool"}, "capped"),
        "erased": ({"stage": "talent_pool", "erased_at": past}, "not considered"),
        "still-applying": ({"stage": "interviewing"}, "not considered"),
    }
    for name, (values, _) in kinds.items():
        tags = values.pop("tags", ["stack:java", "status:passive"])
        consent = values.pop("nurture_consent", True)
        candidate = add_candidate(runtime, name, tags=tags, nurture_consent=consent)
        with Session(runtime.engine) as session, session.begin():
            session.execute(update(Candidate).where(Candidate.id == candidate.id).values(**values))
            if name == "unsubscribed":
                session.add(Suppression(channel="email", address="unsubscribed@example.org", reason="unsubscribe"))
            if name == "capped":
                session.add(past_nurture_send(candidate.id, utcnow() - timedelta(days=20)))
    return {name: outcome for name, (_, outcome) in kinds.items()}


def test_opening_a_job_reactivates_exactly_the_matching_consenting_uncapped_pool(
    runtime: Runtime, hr: TestClient
) -> None:
    caps = (CapSpec(name="nurture_60d", max=1, per=timedelta(days=60), categories=(Category.NURTURE,)),)
    runtime.policy = PolicyEngine(runtime.policy.spec.model_copy(update={"caps": caps}), runtime.settings)
    expected = plant_pool(runtime)
    opened = hr.post("/api/v1/jobs/j-9/open")
    assert opened.status_code == 200, opened.text
    body = opened.json()
    selected = sorted(name for name, outcome in expected.items() if outcome == "selected")
    assert body["selected"] == len(selected) == 5
    assert body["excluded"] == {
        "capped": 1,
        "no_matching_tags": 1,
        "opted_out": 2,
        "recontact_later": 1,
    }
    assert "@" not in opened.text and "Alex" not in opened.text  # counts only
    with Session(runtime.engine) as session:
        enrolled = session.execute(
            select(Candidate.external_id, Enrollment.campaign)
            .join(Enrollment, Enrollment.candidate_id == Candidate.id)
            .order_by(Enrollment.id)
        ).all()
    assert sorted(name for name, _ in enrolled) == selected
    assert {campaign for _, campaign in enrolled} == {"job_reactivation"}
    assert [name for name, _ in enrolled][:2] == ["pool-high", "pool-medium"]  # high intent first
    assert body["queued"] == 5  # the first step is due at once

    again = hr.post("/api/v1/jobs/j-9/open").json()
    assert again["selected"] == 0 and again["excluded"]["already_enrolled"] == 5
    assert count(runtime, Enrollment) == 5


def test_opening_with_a_limit_and_unknown_jobs(runtime: Runtime, hr: TestClient) -> None:
    plant_pool(runtime)
    limited = hr.post("/api/v1/jobs/j-9/open", json={"limit": 1}).json()
    assert (limited["selected"], limited["excluded"]["over_limit"]) == (1, 5)  # no caps in the test policy
    assert hr.post("/api/v1/jobs/nope/open").status_code == 404
    bad = hr.post("/api/v1/jobs/j-9/open", json={"limit": 0})
    assert (bad.status_code, bad.json()["field"]) == (422, "limit")
