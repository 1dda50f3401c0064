"""End to end on real brokers: API event → scheduler → Dramatiq worker → real SDK → sandbox.

The same bodies run on Redis, RabbitMQ and the in-process broker ``outreach up`` uses, on PostgreSQL.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from datetime import timedelta

import pytest
from dramatiq import Worker
from fastapi.testclient import TestClient
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from outreach.core.clock import utcnow
from outreach.core.config import set_settings
from outreach.core.models import OutboundMessage
from outreach.ops.sandbox import SandboxMessage, SandboxServer
from outreach.service.broker import build_broker
from outreach.service.runtime import Runtime, set_runtime
from tests.conftest import RABBITMQ_URL, REDIS_URL, install_workers, make_settings, open_policy, require_server
from tests.helpers import api_client

BROKERS = {"in-process": "", "redis": REDIS_URL, "rabbitmq": RABBITMQ_URL}


@pytest.fixture(params=list(BROKERS))
def live(request: pytest.FixtureRequest, pg_database_url: str, sandbox: SandboxServer) -> Iterator[Runtime]:
    url = BROKERS[request.param]
    if url:
        require_server(request.param, url, 6379 if url.startswith("redis") else 5672)
    settings = make_settings(pg_database_url, broker_url=url, queue_name=f"outreach_test_{uuid.uuid4().hex[:8]}")
    runtime = Runtime(settings, sandbox_url=sandbox.url)
    runtime.policy = open_policy(settings)
    set_settings(settings)
    set_runtime(runtime)
    broker = install_workers(build_broker(settings))
    worker = Worker(broker, worker_threads=4, queues={settings.queue_name}, worker_timeout=100)
    worker.start()

    def drain() -> None:
        """Wait until the queue is empty and the worker has finished what it took: then nothing more will come."""
        broker.join(settings.queue_name, timeout=20_000)
        worker.join()

    runtime.drain = drain  # type: ignore[attr-defined]
    yield runtime
    worker.stop()
    broker.flush_all()
    broker.close()
    set_runtime(None)
    set_settings(None)


def wait_for(sandbox: SandboxServer, predicate: object, timeout: float) -> list[SandboxMessage]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [m for m in sandbox.messages() if predicate(m)]  # type: ignore[operator]
        if found:
            return found
        time.sleep(0.02)
    raise AssertionError(f"nothing matching arrived within {timeout}s; sandbox has {sandbox.messages()!r}")


def apply(client: TestClient) -> dict[str, object]:
    assert client.post(
        "/api/v1/jobs",
        json={
            "external_id": "j-1",
            "title": "Data Engineer",
            "booking_url": "https://book.example.com/de",
            "tags": ["stack:python"],
        },
    ).status_code in (200, 201)
    assert client.post(
        "/api/v1/candidates",
        json={
            "external_id": "c-1",
            "name": "Alex Morgan",
            "email": "alex@example.org",
            "phone": "+8613800138000",
            "locale": "en",
            "timezone": "Europe/Berlin",
            "source": "referral",
        },
    ).status_code in (200, 201)
    response = client.post("/api/v1/candidates/c-1/events", json={"type": "applied", "job_id": "j-1"})
    assert response.status_code == 202, response.text
    body: dict[str, object] = response.json()
    return body


def test_applied_event_reaches_the_sandbox_within_five_seconds(live: Runtime, sandbox: SandboxServer) -> None:
    client = api_client(live)
    started = time.monotonic()
    body = apply(client)
    assert body["queued"] == 1
    (mail,) = wait_for(sandbox, lambda m: m.channel == "email", timeout=5)
    assert time.monotonic() - started < 5
    assert "Data Engineer" in mail.subject + mail.text
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        items = client.get("/api/v1/messages", params={"candidate": "c-1"}).json()["items"]
        if items and items[0]["status"] == "sent":
            break
        time.sleep(0.05)
    assert [(i["campaign"], i["step"], i["channel"], i["status"]) for i in items] == [("jd_intro", 0, "email", "sent")]


def test_flushed_broker_loses_nothing_and_sends_nothing_twice(live: Runtime, sandbox: SandboxServer) -> None:
    client = api_client(live)
    dropped: list[str] = []
    live.enqueue_override = dropped.extend  # the broker "loses" every wake-up
    for n in range(20):
        client.post(
            "/api/v1/candidates",
            json={"external_id": f"c-{n}", "email": f"c{n}@example.org", "phone": "+8613800138000"},
        )
        client.post(
            f"/api/v1/candidates/c-{n}/events",
            json={
                "type": "offer_accepted",
                "data": {
                    "start_date": "2027-01-04",
                    "start_place": "Shanghai office",
                    "hr_contact": {"name": "Li Na", "email": "hr@example.com", "phone": "+862100000000"},
                },
            },
        )
    assert len(dropped) == 20
    live.drain()  # type: ignore[attr-defined]
    assert sandbox.messages() == []
    live.enqueue_override = None
    with Session(live.engine) as session, session.begin():
        session.execute(update(OutboundMessage).values(enqueued_at=utcnow() - timedelta(minutes=5)))
    result = live.scheduler.tick()
    assert len(result.requeued) == 20
    live.scheduler.tick()  # a second sweep right away must not re-send
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and len(sandbox.messages()) < 20:
        time.sleep(0.05)
    live.drain()  # type: ignore[attr-defined]
    received = sandbox.messages()
    assert len(received) == 20
    assert len({m.custom_args["outreach_id"] for m in received}) == 20
    with Session(live.engine) as session:
        assert set(session.scalars(select(OutboundMessage.status))) == {"sent"}


def test_rate_limit_then_success_is_sent_once_after_the_reset(live: Runtime, sandbox: SandboxServer) -> None:
    client = api_client(live)
    sandbox.fail("sendgrid", "429", reset_after=2)
    started = utcnow().timestamp()
    apply(client)
    (mail,) = wait_for(sandbox, lambda m: m.channel == "email", timeout=10)
    assert mail.received_at.timestamp() - started >= 1.0
    live.drain()  # type: ignore[attr-defined]
    assert len([m for m in sandbox.messages() if m.channel == "email"]) == 1
    with Session(live.engine) as session:
        row = session.scalars(select(OutboundMessage)).one()
        assert (row.status, row.attempts) == ("sent", 2)
