"""One-click unsubscribe: POST suppresses, GET only asks, forged tokens change nothing."""

from __future__ import annotations

from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session

from outreach.models import Candidate, Suppression
from outreach.runtime import Runtime
from outreach.tokens import unsubscribe_url
from outreach.web import create_app
from tests.helpers import add_candidate


def suppressions(runtime: Runtime) -> list[tuple[str, str]]:
    with Session(runtime.engine) as session:
        return [(s.channel, s.address) for s in session.scalars(select(Suppression))]


def test_get_asks_and_post_unsubscribes(runtime: Runtime) -> None:
    candidate = add_candidate(runtime, nurture_consent=True)
    path = unsubscribe_url(runtime.settings, "email", candidate.id).removeprefix(runtime.settings.public_url)
    client = TestClient(create_app(runtime))
    page = client.get(path)
    assert page.status_code == 200 and '<form method="post"' in page.text
    assert suppressions(runtime) == []
    done = client.post(path, content=b"List-Unsubscribe=One-Click")
    assert done.status_code == 200
    assert suppressions(runtime) == [("email", "c-1@example.org")]
    assert client.post(path).status_code == 200  # twice is harmless
    with Session(runtime.engine) as session:
        assert session.scalars(select(Candidate.nurture_consent)).one() is False


def test_forged_or_damaged_tokens_change_nothing(runtime: Runtime) -> None:
    candidate = add_candidate(runtime)
    good = unsubscribe_url(runtime.settings, "email", candidate.id).rsplit("/", 1)[1]
    client = TestClient(create_app(runtime))
    body, mac = good.split(".")
    for token in (f"{body}.{mac[:-2]}AA", "Zm9v.YmFy", "garbage", f"{body}x.{mac}", "."):
        assert client.post(f"/unsubscribe/{token}").status_code == 404
    assert suppressions(runtime) == []
