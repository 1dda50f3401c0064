"""Every /api route needs a key (401), writes need the hr role (403), and ops answers hold no personal data.

The routes are walked from the app itself, so a route added later is covered without touching this file.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from outreach.core.clock import utcnow
from outreach.core.models import InboundMessage, OutboundMessage
from outreach.service.runtime import Runtime
from outreach.web import create_app
from tests.helpers import add_candidate, add_job, api_key

CANARY_NAME = "Zebulon Quartermaine"
CANARY_EMAIL = "zebulon.canary@example.net"
CANARY_PHONE = "+8613912345678"
CANARY_SALARY = 987654
CANARY_BODY = "canary-body-text-5f1c"
CANARIES = (CANARY_NAME, CANARY_EMAIL, CANARY_PHONE, str(CANARY_SALARY), CANARY_BODY, "Zebulon", "zebulon")


def api_routes(app: FastAPI) -> list[tuple[str, str]]:
    """(method, path) of every /api operation, from the app's own OpenAPI document."""
    paths = app.openapi()["paths"]
    return sorted(
        (method.upper(), path) for path, operations in paths.items() if path.startswith("/api") for method in operations
    )


def concrete(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "1", path)


def call(client: TestClient, method: str, path: str, key: str | None = None) -> Any:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return client.request(
        method, concrete(path), headers=headers, json={} if method in ("POST", "PUT", "PATCH") else None
    )


@pytest.fixture
def app(runtime: Runtime) -> FastAPI:
    return create_app(runtime)


def test_no_key_is_401_and_a_bad_key_is_401(app: FastAPI) -> None:
    client = TestClient(app, raise_server_exceptions=False)
    routes = api_routes(app)
    assert len(routes) >= 8
    for method, path in routes:
        for key in (None, "ork_not-a-key", "Basic abc"):
            response = call(client, method, path, key)
            assert response.status_code == 401, (method, path, key, response.status_code)
            assert response.headers["www-authenticate"].startswith("Bearer")
    assert client.get("/api/v1/messages", headers={"Authorization": "Basic dXNlcjpwYXNz"}).status_code == 401


def ops_readable_routes(runtime: Runtime, app: FastAPI) -> list[str]:
    """The GET paths an ops key may read; every write must answer 403 to it."""
    client = TestClient(app, raise_server_exceptions=False)
    ops = api_key(runtime, "ops")
    readable = []
    for method, path in api_routes(app):
        response = call(client, method, path.replace("{external_id}", "canary-1"), ops)
        if method == "GET" and response.status_code != 403:
            assert response.status_code != 401, path
            readable.append(path)
        else:
            assert response.status_code == 403, (method, path, response.status_code)
            assert response.json()["error"] == "forbidden"
    return readable


def test_ops_may_read_metrics_and_statuses_but_write_nothing(runtime: Runtime, app: FastAPI) -> None:
    readable = ops_readable_routes(runtime, app)
    assert {"/api/v1/messages", "/api/v1/alerts"} <= set(readable)
    assert "/api/v1/candidates/{external_id}" not in readable
    assert "/api/v1/candidates/{external_id}/conversation" not in readable


def test_writes_need_hr_and_a_revoked_key_stops_at_once(runtime: Runtime, app: FastAPI) -> None:
    from outreach.domain.auth import revoke_key

    client = TestClient(app)
    hr = api_key(runtime, "hr", "lead")
    body = {"external_id": "c-9", "name": "Sam Lee", "email": "sam@example.org"}
    assert client.post("/api/v1/candidates", json=body, headers={"Authorization": f"Bearer {hr}"}).status_code == 201
    with Session(runtime.engine) as session, session.begin():
        revoke_key(session, hr[:12])
    assert client.post("/api/v1/candidates", json=body, headers={"Authorization": f"Bearer {hr}"}).status_code == 401


def plant_canaries(runtime: Runtime) -> None:
    candidate = add_candidate(
        runtime, "canary-1", name=CANARY_NAME, email=CANARY_EMAIL, phone=CANARY_PHONE, source="referral"
    )
    add_job(runtime, "job-canary", salary_min=CANARY_SALARY, salary_max=CANARY_SALARY + 1)
    now = utcnow()
    with Session(runtime.engine) as session, session.begin():
        session.add(
            OutboundMessage(
                candidate_id=candidate.id,
                campaign="jd_intro",
                step=0,
                channel="email",
                template="jd_intro",
                category="transactional",
                status="sent",
                locale="en",
                not_before=now,
                sent_at=now,
                subject=f"Hello {CANARY_NAME}",
                body=f"{CANARY_BODY} {CANARY_EMAIL} {CANARY_SALARY}",
            )
        )
        session.add(
            InboundMessage(
                candidate_id=candidate.id,
                channel="email",
                provider="sendgrid",
                provider_message_id="in-1",
                from_address=CANARY_EMAIL,
                subject=f"Re: Hello {CANARY_NAME}",
                body=CANARY_BODY,
                kind="reply",
                received_at=now,
            )
        )


def test_ops_answers_carry_no_personal_data(runtime: Runtime, app: FastAPI) -> None:
    plant_canaries(runtime)
    client = TestClient(app, raise_server_exceptions=False)
    ops = api_key(runtime, "ops")
    hr = api_key(runtime, "hr")
    # The hr role sees the canaries (so the check below is not vacuous) ...
    seen = client.get("/api/v1/candidates/canary-1", headers={"Authorization": f"Bearer {hr}"}).text
    assert CANARY_EMAIL in seen
    # ... and no route ops may read shows any of them.
    readable = ops_readable_routes(runtime, app)
    for path in readable:
        text = client.get(
            concrete(path.replace("{external_id}", "canary-1")), headers={"Authorization": f"Bearer {ops}"}
        ).text
        for canary in CANARIES:
            assert canary not in text, (path, canary)
    assert len(readable) >= 2
