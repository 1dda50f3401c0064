"""OWASP API Top 10 items that apply to the JSON API: object- and function-level authorization, mass
assignment, keys only in the Authorization header, bounded resource use. (Personal data in ops answers:
tests/web/test_auth.py walks every route with canaries; rate and size limits: test_guards.py.)"""

from __future__ import annotations

from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session

from outreach.core.models import Alert, Candidate
from outreach.service.runtime import Runtime
from outreach.web.auth import COOKIE
from tests.helpers import add_candidate, api_key
from tests.security.util import changed_rows, snapshot


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_ops_cannot_reach_a_candidate_object_by_any_route(runtime: Runtime, client: TestClient) -> None:
    candidate = add_candidate(runtime, "c-1")
    with Session(runtime.engine) as session, session.begin():
        session.add(Alert(kind="candidate_replied", candidate_id=candidate.id, message="c-1 replied by email"))
    with Session(runtime.engine) as session:
        alert_id = session.scalars(select(Alert.id)).one()
    ops = bearer(api_key(runtime, "ops"))
    before = snapshot(runtime)
    attempts = [
        ("GET", "/api/v1/candidates/c-1"),
        ("GET", "/api/v1/candidates/c-1/conversation"),
        ("GET", "/api/v1/candidates/c-1/history"),
        ("GET", "/api/v1/candidates?stage=applied"),
        ("POST", "/api/v1/candidates/c-1/conversation/answered"),
        ("POST", f"/api/v1/alerts/{alert_id}/resolve"),
        ("DELETE", "/api/v1/candidates/c-1"),
        ("POST", "/api/v1/candidates/c-1/events"),
    ]
    codes = {(m, p): client.request(m, p, headers=ops, json={"type": "hired"}).status_code for m, p in attempts}
    print(f"ops object attempts: {len(codes)}, refused: {sum(c == 403 for c in codes.values())}")
    assert set(codes.values()) == {403}, codes
    # Only the key's own last-used stamp may move (one row modified: two entries in the symmetric difference).
    assert changed_rows(before, snapshot(runtime)) <= 2


def test_mass_assignment_of_server_owned_fields_is_refused(runtime: Runtime, client: TestClient) -> None:
    hr = bearer(api_key(runtime, "hr"))
    for field, value in [
        ("stage", "hired"),
        ("intent_level", "high"),
        ("erased_at", "2026-01-01T00:00:00Z"),
        ("id", 1),
        ("recontact_at", "2026-01-01T00:00:00Z"),
        ("last_reply_at", "2026-01-01T00:00:00Z"),
    ]:
        body = {"external_id": "c-2", "email": "c2@example.org", field: value}
        answer = client.post("/api/v1/candidates", json=body, headers=hr)
        assert answer.status_code == 422, (field, answer.status_code)
        assert answer.json()["field"] == field
    with Session(runtime.engine) as session:
        assert session.scalar(select(Candidate.id).where(Candidate.external_id == "c-2")) is None


def test_keys_count_only_in_the_authorization_header(runtime: Runtime, client: TestClient) -> None:
    key = api_key(runtime, "hr")
    assert client.get("/api/v1/messages", params={"api_key": key}).status_code == 401
    assert client.get("/api/v1/messages", params={"access_token": key}).status_code == 401
    # The dashboard's cookie is not an API credential: a cross-site form could otherwise ride on it.
    client.cookies.set(COOKIE, key)
    assert client.post("/api/v1/candidates", json={"external_id": "x"}).status_code == 401
    client.cookies.clear()
    assert client.get("/api/v1/messages", headers={"Authorization": f"bearer {key}"}).status_code == 200
    assert client.get("/api/v1/messages", headers={"Authorization": f"Token {key}"}).status_code == 401


def test_list_sizes_are_bounded(runtime: Runtime, client: TestClient) -> None:
    hr = bearer(api_key(runtime, "hr"))
    for path in ("/api/v1/messages", "/api/v1/alerts", "/api/v1/candidates"):
        answer = client.get(path, params={"limit": 1_000_000}, headers=hr)
        assert answer.status_code == 422, path
        assert answer.json()["field"] == "limit"


def test_errors_name_no_internals(runtime: Runtime, client: TestClient) -> None:
    hr = bearer(api_key(runtime, "hr"))
    for answer in (
        client.get("/api/v1/candidates/nobody", headers=hr),
        client.post("/api/v1/candidates", content=b"{not json", headers={**hr, "content-type": "application/json"}),
        client.get("/api/v1/messages", params={"since": "yesterday-ish"}, headers=hr),
    ):
        body = answer.text
        assert answer.status_code in (404, 422)
        for leak in ("Traceback", "sqlalchemy", 'File "', "psycopg", "outreach/"):
            assert leak not in body, (answer.request.url, leak)


def test_a_revoked_or_expired_looking_key_never_reaches_data(runtime: Runtime, client: TestClient) -> None:
    from outreach.domain.auth import revoke_key

    key = api_key(runtime, "hr")
    with Session(runtime.engine) as session, session.begin():
        revoke_key(session, key[:12])
    assert client.get("/api/v1/candidates/c-1", headers=bearer(key)).status_code == 401
    assert client.get("/api/v1/candidates/c-1", headers=bearer(key[:-1])).status_code == 401
