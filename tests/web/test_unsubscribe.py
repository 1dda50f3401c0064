"""One-click unsubscribe: POST suppresses, GET only asks, forged tokens change nothing."""

from __future__ import annotations

from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session

from outreach.core.models import Candidate, Suppression
from outreach.domain.tokens import unsubscribe_url
from outreach.service.runtime import Runtime
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


def test_ten_thousand_forged_tokens_unsubscribe_no_one(runtime: Runtime) -> None:
    import base64
    import random

    from outreach.domain.tokens import verify

    people = [add_candidate(runtime, f"c-{n}") for n in range(3)]
    real = unsubscribe_url(runtime.settings, "email", people[0].id).rsplit("/", 1)[1]
    body, mac = real.split(".")
    rng = random.Random(20261125)

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    forged: list[str] = []
    for n in range(10_000):
        kind = n % 4
        if kind == 0:  # a payload naming someone else, with a random MAC
            forged.append(f"{b64(f'email:{rng.randint(1, 10**6)}'.encode())}.{b64(rng.randbytes(16))}")
        elif kind == 1:  # the real MAC on another candidate's payload
            forged.append(f"{b64(f'email:{people[1 + n % 2].id}'.encode())}.{mac}")
        elif kind == 2:  # one character of the real MAC changed
            position = rng.randrange(len(mac))
            replacement = "A" if mac[position] != "A" else "B"
            forged.append(f"{body}.{mac[:position]}{replacement}{mac[position + 1 :]}")
        else:  # noise
            forged.append(b64(rng.randbytes(rng.randint(1, 40))))
    assert all(verify(runtime.settings, "unsubscribe", token) is None for token in forged)
    client = TestClient(create_app(runtime))
    for token in forged[:200]:
        assert client.post(f"/unsubscribe/{token}").status_code == 404
    assert suppressions(runtime) == []
