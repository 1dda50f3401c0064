"""Guards in front of the routes (OWASP API4/API8): rate limits on public routes, body size limits, no stack traces."""

from __future__ import annotations

import logging
import time

import pytest
import redis
from fastapi import FastAPI
from fastapi.testclient import TestClient

from outreach.service.runtime import Runtime
from outreach.web import create_app
from outreach.web.ratelimit import LocalLimiter, RedisLimiter
from tests.conftest import REDIS_URL, require_server

CANARY = "Canary Zhao canary.zhao@example.net"


def app_with(runtime: Runtime, **settings: object) -> FastAPI:
    runtime.settings = runtime.settings.with_overrides(**settings)
    return create_app(runtime)


def test_public_routes_answer_429_with_retry_after_per_client_ip(runtime: Runtime) -> None:
    # One request per 100 s after the burst: no refill while the test runs, however slow the machine is.
    app = app_with(runtime, public_rate_limit=0.01, public_rate_burst=5, webhook_rate_limit=0.01, webhook_rate_burst=2)
    attacker = TestClient(app, client=("203.0.113.7", 4000))
    other = TestClient(app, client=("198.51.100.9", 4000))
    answers = [attacker.get("/unsubscribe/forged.token").status_code for _ in range(8)]
    print(f"requests from one IP: {len(answers)}, 404: {answers.count(404)}, 429: {answers.count(429)}")
    assert answers == [404] * 5 + [429] * 3
    # Webhooks have a bucket of their own (providers post a lot from few addresses): two, then 429.
    webhook = [attacker.post("/webhooks/twilio/inbound", content=b"From=x").status_code for _ in range(2)]
    assert 429 not in webhook
    limited = attacker.post("/webhooks/twilio/inbound", content=b"From=x")
    assert limited.status_code == 429
    assert int(limited.headers["Retry-After"]) >= 1
    assert limited.json()["error"] == "rate_limited"
    assert attacker.get("/r/forged.token").status_code == 429
    # Another address has its own bucket; the authenticated API is not limited here.
    assert other.get("/unsubscribe/forged.token").status_code == 404
    assert attacker.get("/healthz").status_code != 429
    # X-Forwarded-For does not let a client choose its bucket.
    spoofed = attacker.get("/unsubscribe/forged.token", headers={"X-Forwarded-For": "192.0.2.1"})
    assert spoofed.status_code == 429


def test_rate_limit_zero_turns_it_off(runtime: Runtime) -> None:
    client = TestClient(app_with(runtime, public_rate_limit=0.0, public_rate_burst=1))
    assert {client.get("/r/forged.token").status_code for _ in range(50)} == {404}


def test_local_bucket_refills_and_forgets_idle_clients() -> None:
    now = [0.0]
    limiter = LocalLimiter(per_second=2.0, burst=2, clock=lambda: now[0])
    assert [limiter.hit("a").allowed for _ in range(3)] == [True, True, False]
    assert limiter.hit("a").retry_after == pytest.approx(0.5)
    now[0] += 0.5
    assert limiter.hit("a").allowed


def test_redis_bucket_is_shared_between_replicas() -> None:
    require_server("Redis", REDIS_URL, 6379)
    prefix = f"outreach:test:ratelimit:{time.time_ns()}:"
    one = RedisLimiter(REDIS_URL, per_second=0.5, burst=3, prefix=prefix)
    two = RedisLimiter(REDIS_URL, per_second=0.5, burst=3, prefix=prefix)
    results = [limiter.hit("203.0.113.7").allowed for limiter in (one, two, one, two)]
    assert results == [True, True, True, False]
    assert two.hit("203.0.113.7").retry_after > 0
    assert one.hit("198.51.100.9").allowed
    redis.Redis.from_url(REDIS_URL).delete(*[prefix + ip for ip in ("203.0.113.7", "198.51.100.9")])


def test_unreachable_redis_lets_requests_through() -> None:
    limiter = RedisLimiter("redis://127.0.0.1:1/0", per_second=1.0, burst=1)
    assert all(limiter.hit("203.0.113.7").allowed for _ in range(3))


def test_bodies_over_the_limit_are_413_with_a_clear_message(runtime: Runtime) -> None:
    client = TestClient(app_with(runtime, public_rate_limit=0.0))
    big = b"{" + b" " * (1024 * 1024) + b"}"
    answer = client.post("/api/v1/candidates", content=big, headers={"content-type": "application/json"})
    assert answer.status_code == 413
    assert answer.json() == {"error": "too_large", "message": "request body over the limit of 1048576 bytes"}

    # Without Content-Length (chunked): stopped as the stream passes the limit.
    def chunks() -> object:
        for _ in range(40):
            yield b" " * 65536

    streamed = client.post("/api/v1/candidates", content=chunks(), headers={"content-type": "application/json"})
    assert streamed.status_code == 413
    # A webhook body of 3 MiB passes the guard (SendGrid batches reach about 1 MiB); it is refused later
    # only because it is not signed.
    batch = b"[" + b" " * (3 * 1024 * 1024) + b"]"
    hook = client.post("/webhooks/sendgrid/events", content=batch, headers={"content-type": "application/json"})
    assert hook.status_code in {403, 503}
    huge = client.post("/webhooks/sendgrid/events", content=b" " * (6 * 1024 * 1024))
    assert huge.status_code == 413


def test_unexpected_errors_are_generic_json_with_a_request_id(
    runtime: Runtime, caplog: pytest.LogCaptureFixture
) -> None:
    app = create_app(runtime)

    @app.get("/boom")
    def boom() -> None:
        raise RuntimeError(f"could not mail {CANARY}")

    client = TestClient(app)
    with caplog.at_level(logging.DEBUG):
        answer = client.get("/boom")
    assert answer.status_code == 500
    body = answer.json()
    assert body["error"] == "internal" and body["message"] == "internal error"
    assert body["request_id"] == answer.headers["X-Request-ID"]
    assert "Traceback" not in answer.text and "RuntimeError" not in answer.text and CANARY not in answer.text
    records = [r for r in caplog.records if getattr(r, "request_id", None) == body["request_id"]]
    assert records and records[0].error == "RuntimeError"  # type: ignore[attr-defined]
    assert "in boom" in records[0].stack  # type: ignore[attr-defined]
    assert CANARY not in caplog.text
    assert client.get("/healthz").headers["X-Request-ID"]
