"""Prometheus /metrics on both databases: counts read from the tables at scrape time, cached a few seconds."""

from __future__ import annotations

from datetime import timedelta

from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import insert
from sqlalchemy.orm import Session

from outreach.core.clock import utcnow
from outreach.core.models import Candidate, DeliveryEvent, InboundMessage, OutboundMessage
from outreach.service.runtime import Runtime
from outreach.web import create_app
from outreach.web.prometheus import OutboxCollector

CANARY = "Quentin Canaryfield"


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def row(step: int, **values: object) -> dict[str, object]:
    base: dict[str, object] = {
        "candidate_id": 1,
        "campaign": "jd_intro",
        "step": step,
        "channel": "email",
        "template": "jd_intro",
        "category": "transactional",
        "body": f"Dear {CANARY}",
    }
    return {**base, **values}


def seed(runtime: Runtime) -> None:
    now = utcnow()
    with Session(runtime.engine) as session, session.begin():
        session.add(Candidate(id=1, external_id="c1", name=CANARY, email="quentin@canary.example"))
        session.flush()
        session.execute(
            insert(OutboundMessage),
            [
                row(0, id="m0", status="sent", provider="sendgrid", provider_message_id="sg0", sent_at=now),
                row(1, id="m1", status="delivered", provider="sendgrid", provider_message_id="sg1", sent_at=now),
                row(2, id="m2", channel="sms", status="delivered", provider="twilio", provider_message_id="SM2"),
                row(3, id="m3", status="bounced", provider="sendgrid", provider_message_id="sg3", error_code="550"),
                row(4, id="m4", channel="sms", status="failed", provider="twilio", error_code="21610", rule="provider"),
                row(5, id="m5", status="failed", error_code="template", rule="template"),
                row(6, id="m6", status="suppressed", rule="suppression"),
                row(7, id="m7", status="skipped", rule="no_reply"),
                row(8, id="m8", status="cancelled", rule="stage_changed"),
                row(9, id="m9", status="held", rule="quiet_hours", not_before=now + timedelta(hours=3)),
                # Held once by a cap, then released and sent: still counted as deferred.
                row(10, id="m10", status="sent", rule="sms_daily", provider="sendgrid", provider_message_id="sg10"),
                row(11, id="m11", status="pending", not_before=now - timedelta(seconds=120)),
                row(12, id="m12", status="pending", not_before=now + timedelta(hours=1)),
                row(
                    13,
                    id="m13",
                    status="sent",
                    category="auto_reply",
                    campaign="auto_reply",
                    provider="sendgrid",
                    provider_message_id="sg13",
                ),
            ],
        )
        session.execute(
            insert(DeliveryEvent),
            [
                {
                    "message_id": "m1",
                    "provider": "sendgrid",
                    "provider_event_id": "e1",
                    "type": "delivered",
                    "occurred_at": now,
                },
                {
                    "message_id": "m1",
                    "provider": "sendgrid",
                    "provider_event_id": "e2",
                    "type": "opened",
                    "occurred_at": now,
                },
                {
                    "message_id": "m1",
                    "provider": "sendgrid",
                    "provider_event_id": "e3",
                    "type": "opened",
                    "occurred_at": now,
                },
                {
                    "message_id": "m2",
                    "provider": "twilio",
                    "provider_event_id": "e4",
                    "type": "delivered",
                    "occurred_at": now,
                },
            ],
        )
        session.execute(
            insert(InboundMessage),
            [
                {"candidate_id": 1, "channel": "email", "provider": "sendgrid", "provider_message_id": f"i{n}",
                 "from_address": "quentin@canary.example", "body": f"Hi, {CANARY}", "kind": kind,
                 "received_at": now}
                for n, kind in enumerate(["reply", "reply", "auto_reply"])
            ],
        )  # fmt: skip


def test_metrics_need_no_key_and_count_from_the_tables(runtime: Runtime) -> None:
    seed(runtime)
    answer = TestClient(create_app(runtime)).get("/metrics")
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/plain")
    assert CANARY not in answer.text and "canary.example" not in answer.text
    got = samples(answer.text)

    def value(name: str, **labels: str) -> float:
        return got[(name, tuple(sorted(labels.items())))]

    assert value("outreach_messages_sent_total", channel="email", provider="sendgrid") == 4  # m0 m1 m3 m10
    assert value("outreach_messages_sent_total", channel="sms", provider="twilio") == 1
    failed = "outreach_messages_failed_total"
    assert value(failed, channel="email", provider="sendgrid", status="bounced", error_code="550") == 1
    assert value(failed, channel="sms", provider="twilio", status="failed", error_code="21610") == 1
    assert value(failed, channel="email", provider="none", status="failed", error_code="template") == 1
    assert value("outreach_messages_dropped_total", status="suppressed", rule="suppression") == 1
    assert value("outreach_messages_dropped_total", status="skipped", rule="no_reply") == 1
    assert value("outreach_messages_dropped_total", status="cancelled", rule="stage_changed") == 1
    assert value("outreach_messages_deferred_total", rule="quiet_hours") == 1
    assert value("outreach_messages_deferred_total", rule="sms_daily") == 1
    assert {k[1] for k in got if k[0] == "outreach_messages_deferred_total"} == {
        (("rule", "quiet_hours"),),
        (("rule", "sms_daily"),),
    }
    assert value("outreach_messages_held", rule="quiet_hours") == 1
    assert value("outreach_queue_depth", status="pending") == 2
    assert value("outreach_queue_depth", status="uncertain") == 0
    assert 119 <= value("outreach_queue_lag_seconds") < 180
    assert value("outreach_webhook_events_total", provider="sendgrid", type="opened") == 2
    assert value("outreach_webhook_events_total", provider="twilio", type="delivered") == 1
    assert value("outreach_inbound_messages_total", channel="email", kind="reply") == 2
    assert value("outreach_inbound_messages_total", channel="email", kind="auto_reply") == 1
    assert value("outreach_auto_replies_sent_total", channel="email") == 1


def test_answers_are_cached_for_a_few_seconds(runtime: Runtime) -> None:
    seed(runtime)
    cached = OutboxCollector(runtime.engine, cache_seconds=60)
    fresh = OutboxCollector(runtime.engine, cache_seconds=0)
    before = cached.snapshot()
    assert fresh.snapshot().sent == before.sent
    with Session(runtime.engine) as session, session.begin():
        session.execute(
            insert(OutboundMessage),
            [row(20, status="sent", provider="sendgrid", provider_message_id="sg20")],
        )
    assert cached.snapshot() is before
    assert fresh.snapshot().sent[("email", "sendgrid")] == before.sent[("email", "sendgrid")] + 1
