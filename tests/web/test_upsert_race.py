"""Twenty callers post the same new candidate (or job) at the same instant: one creates it, the others update it.

PostgreSQL, real threads, one HTTP client each, released together by a barrier: reading first and inserting after
let several of them insert (500s on the unique index, several "201 created").
"""

from __future__ import annotations

import threading
from collections import Counter
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from outreach.core.models import Candidate, Job
from outreach.service.runtime import Runtime
from outreach.web import create_app
from tests.helpers import api_key

RACERS = 20


def race(runtime: Runtime, path: str, bodies: list[dict[str, Any]]) -> Counter[int]:
    app = create_app(runtime)
    headers = {"Authorization": f"Bearer {api_key(runtime)}"}
    clients = [TestClient(app, headers=headers, raise_server_exceptions=False) for _ in bodies]
    barrier = threading.Barrier(len(bodies))
    statuses: list[int] = []

    def post(client: TestClient, body: dict[str, Any]) -> None:
        barrier.wait()
        statuses.append(client.post(path, json=body).status_code)

    threads = [threading.Thread(target=post, args=pair) for pair in zip(clients, bodies, strict=True)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    for client in clients:
        client.close()
    return Counter(statuses)


@pytest.mark.parametrize(
    ("path", "model", "body"),
    [
        (
            "/api/v1/candidates",
            Candidate,
            lambda n: {"external_id": "race-1", "name": f"Racer {n}", "tags": [f"t:{n}"]},
        ),
        ("/api/v1/jobs", Job, lambda n: {"external_id": "race-job", "title": f"Title {n}", "salary_min": n}),
    ],
    ids=["candidate", "job"],
)
def test_racing_upserts_create_once_and_update_the_rest(
    pg_runtime: Runtime, path: str, model: type[Any], body: Any
) -> None:
    statuses = race(pg_runtime, path, [body(n) for n in range(RACERS)])
    assert statuses == Counter({201: 1, 200: RACERS - 1}), statuses
    with Session(pg_runtime.engine) as session:
        assert session.scalar(select(func.count()).select_from(model)) == 1
        stored = session.scalars(select(model)).one()
    # Every racer's write landed on the one row, one after another: the last one's values are whole.
    if model is Candidate:
        number = int(stored.name.removeprefix("Racer "))
        assert stored.tags == [f"t:{number}"]
    else:
        assert stored.title == f"Title {stored.salary_min}"
