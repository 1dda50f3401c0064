"""The conversation view, HR notifications for replies, and alerts for replies nobody answered in time."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from outreach.core.clock import set_clock
from outreach.core.config import Secret
from outreach.core.models import Alert, Candidate, InboundMessage, OutboundMessage
from outreach.inbound.conversation import (
    RESPONSE_TIME,
    mark_answered,
    notify_reply,
    raise_unanswered_alerts,
    stored_inbound_id,
    thread,
)
from outreach.inbound.replies import InboundEmail, handle_inbound_email
from outreach.inbound.sms import InboundSms, handle_inbound_sms
from outreach.service.runtime import Runtime
from outreach.web import create_app
from outreach.web.webhooks import WebhookSettings
from tests.helpers import add_candidate, api_client

# Tuesday 24 November 2026, 10:00 in Shanghai (the company's timezone): business hours.
TUESDAY_10 = datetime(2026, 11, 24, 2, 0, tzinfo=UTC)
# The same day, 22:00 in Shanghai: closed.
TUESDAY_22 = datetime(2026, 11, 24, 14, 0, tzinfo=UTC)


@pytest.fixture(autouse=True)
def no_auto_reply(runtime: Runtime) -> None:
    """These tests are about people answering; the out-of-hours auto-reply has its own tests."""
    runtime.auto_reply = lambda *args: None


@pytest.fixture
def clock() -> Iterator[list[datetime]]:
    now = [TUESDAY_10]
    set_clock(lambda: now[0])
    yield now
    set_clock(None)


def outbox(
    runtime: Runtime,
    candidate: Candidate,
    *,
    sent_at: datetime | None,
    channel: str = "email",
    status: str = "sent",
    campaign: str = "jd_intro",
    category: str = "transactional",
    subject: str | None = "Backend Engineer at Example Co.",
    body: str = "Hello",
) -> str:
    with Session(runtime.engine, expire_on_commit=False) as session, session.begin():
        message = OutboundMessage(
            candidate_id=candidate.id,
            campaign=campaign,
            step=0,
            channel=channel,
            template=campaign,
            category=category,
            status=status,
            subject=subject if channel == "email" else None,
            body=body,
            sent_at=sent_at,
            created_at=sent_at or TUESDAY_10,
            updated_at=sent_at or TUESDAY_10,
        )
        session.add(message)
    return message.id


def email_reply(runtime: Runtime, external_id: str, at: datetime, message_id: str | None = None) -> str:
    email = InboundEmail(
        message_id or f"<{external_id}-{at.timestamp()}@example.org>",
        f"{external_id}@example.org",
        "talent@example.com",
        "Re: Backend Engineer",
        "Thursday works for me.",
        at,
    )
    with Session(runtime.engine) as session, session.begin():
        return handle_inbound_email(session, runtime, email).kind


def unanswered(runtime: Runtime, now: datetime) -> int:
    with Session(runtime.engine) as session, session.begin():
        return raise_unanswered_alerts(session, now, runtime.settings, runtime.policy)


def alerts(runtime: Runtime, kind: str = "reply_unanswered") -> list[tuple[str, str]]:
    with Session(runtime.engine) as session:
        rows = session.execute(
            select(Candidate.external_id, Alert.message)
            .join(Candidate, Candidate.id == Alert.candidate_id)
            .where(Alert.kind == kind)
            .order_by(Alert.id)
        )
        return [(external_id, message) for external_id, message in rows]


# -- the thread -------------------------------------------------------------------------------------------------


def test_thread_merges_both_directions_in_time_order(runtime: Runtime) -> None:
    candidate = add_candidate(runtime)
    jd = outbox(runtime, candidate, sent_at=TUESDAY_10 - timedelta(hours=2))
    nudge = outbox(runtime, candidate, sent_at=TUESDAY_10 - timedelta(hours=1), channel="sms", body="See your email")
    outbox(runtime, candidate, sent_at=None, status="pending", channel="sms")  # not sent: not shown
    outbox(runtime, candidate, sent_at=None, status="cancelled")
    email_reply(runtime, "c-1", TUESDAY_10)
    auto = outbox(
        runtime,
        candidate,
        sent_at=TUESDAY_10 + timedelta(seconds=5),
        campaign="auto_reply",
        category="auto_reply",
        body="We will answer tomorrow",
    )
    with Session(runtime.engine) as session:
        items = thread(session, candidate.id)
        reply_id = str(session.scalars(select(InboundMessage.id)).one())
        assert [i.id for i in thread(session, candidate.id, limit=2)] == [reply_id, auto]
    assert [(i.direction, i.id, i.channel) for i in items] == [
        ("out", jd, "email"),
        ("out", nudge, "sms"),
        ("in", reply_id, "email"),
        ("out", auto, "email"),
    ]
    assert [i.auto_reply for i in items] == [False, False, False, True]
    reply = items[2].as_dict()
    assert reply["kind"] == "reply" and reply["answered_at"] is None and reply["subject"] == "Re: Backend Engineer"
    assert items[0].as_dict()["campaign"] == "jd_intro" and items[0].as_dict()["status"] == "sent"


def test_conversation_api(runtime: Runtime) -> None:
    candidate = add_candidate(runtime)
    jd = outbox(runtime, candidate, sent_at=TUESDAY_10 - timedelta(hours=2))
    email_reply(runtime, "c-1", TUESDAY_10)
    client = api_client(runtime, app=create_app(runtime, WebhookSettings(inbound_token=Secret("t0k"))))

    answer = client.get("/api/v1/candidates/c-1/conversation")
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["candidate"] == "c-1"
    assert [(i["direction"], i["channel"]) for i in body["items"]] == [("out", "email"), ("in", "email")]
    assert body["items"][0]["id"] == jd and body["items"][0]["body"] == "Hello"
    assert body["items"][1]["answered_at"] is None
    assert client.get("/api/v1/candidates/nobody/conversation").status_code == 404

    [replied] = client.get("/api/v1/alerts", params={"open": "true"}).json()["items"]
    assert (replied["kind"], replied["candidate"], replied["campaign"], replied["message"]) == (
        "candidate_replied",
        "c-1",
        "jd_intro",
        "c-1 replied by email",
    )
    answered = client.post("/api/v1/candidates/c-1/conversation/answered")
    assert answered.json() == {"candidate": "c-1", "answered": 1}
    assert client.post("/api/v1/candidates/c-1/conversation/answered").json()["answered"] == 0
    assert client.get("/api/v1/candidates/c-1/conversation").json()["items"][1]["answered_at"] is not None
    # Answering resolved the reply alert.
    assert client.get("/api/v1/alerts", params={"open": "true"}).json()["items"] == []
    assert client.post("/api/v1/candidates/nobody/conversation/answered").status_code == 404


def test_alerts_api_lists_newest_first_and_resolves(runtime: Runtime) -> None:
    add_candidate(runtime)
    email_reply(runtime, "c-1", TUESDAY_10 - timedelta(hours=1))
    email_reply(runtime, "c-1", TUESDAY_10)
    client = api_client(runtime, app=create_app(runtime, WebhookSettings(inbound_token=Secret("t0k"))))
    listed = client.get("/api/v1/alerts", params={"open": "true"}).json()
    assert listed["count"] == 2
    newest, oldest = listed["items"]
    assert newest["id"] > oldest["id"]
    resolved = client.post(f"/api/v1/alerts/{oldest['id']}/resolve")
    assert resolved.status_code == 200 and resolved.json()["resolved_at"] is not None
    again = client.post(f"/api/v1/alerts/{oldest['id']}/resolve").json()
    assert again["resolved_at"] == resolved.json()["resolved_at"]
    assert [a["id"] for a in client.get("/api/v1/alerts?open=true").json()["items"]] == [newest["id"]]
    assert [a["id"] for a in client.get("/api/v1/alerts?open=false").json()["items"]] == [oldest["id"]]
    assert client.get("/api/v1/alerts").json()["count"] == 2
    assert client.post("/api/v1/alerts/999999/resolve").status_code == 404


# -- notifications ----------------------------------------------------------------------------------------------


def test_notify_reply_for_an_sms_names_the_campaign_answered(runtime: Runtime) -> None:
    candidate = add_candidate(runtime)
    outbox(runtime, candidate, sent_at=TUESDAY_10 - timedelta(hours=1), channel="sms", campaign="offer_followup")
    with Session(runtime.engine) as session, session.begin():
        sms = InboundSms("SM1", "+8613800138000", "+15005550006", "Yes, I accept!", TUESDAY_10, {})
        assert handle_inbound_sms(session, runtime, sms).kind == "reply"
        inbound_id = stored_inbound_id(session, "twilio", "SM1")
        assert inbound_id is not None
        row = session.get(Candidate, candidate.id)
        assert row is not None
        alert = notify_reply(session, row, "sms", inbound_id)
        assert (alert.kind, alert.campaign, alert.message) == (
            "candidate_replied",
            "offer_followup",
            "c-1 replied by sms",
        )


# -- unanswered replies ---------------------------------------------------------------------------------------


def test_a_business_hours_reply_unanswered_after_four_hours_alerts_once(runtime: Runtime) -> None:
    candidate = add_candidate(runtime)
    outbox(runtime, candidate, sent_at=TUESDAY_10 - timedelta(days=1))
    email_reply(runtime, "c-1", TUESDAY_10)
    assert timedelta(hours=4) == RESPONSE_TIME
    assert unanswered(runtime, TUESDAY_10 + timedelta(hours=3, minutes=59)) == 0
    assert unanswered(runtime, TUESDAY_10 + timedelta(hours=4, minutes=1)) == 1
    assert unanswered(runtime, TUESDAY_10 + timedelta(hours=4, minutes=2)) == 0
    assert unanswered(runtime, TUESDAY_10 + timedelta(days=1)) == 0
    with Session(runtime.engine) as session:
        inbound_id = session.scalars(select(InboundMessage.id)).one()
        alert = session.scalars(select(Alert).where(Alert.kind == "reply_unanswered")).one()
    assert alert.message == f"c-1: email reply unanswered for 4h (inbound #{inbound_id})"
    assert (alert.candidate_id, alert.campaign, alert.enrollment_id) == (candidate.id, "jd_intro", None)


def test_an_out_of_hours_reply_is_left_to_the_auto_reply(runtime: Runtime) -> None:
    add_candidate(runtime)
    email_reply(runtime, "c-1", TUESDAY_22)
    assert unanswered(runtime, TUESDAY_22 + timedelta(hours=5)) == 0
    assert unanswered(runtime, TUESDAY_22 + timedelta(hours=13)) == 0  # Wednesday 11:00, still not in hours


def test_marking_answered_prevents_the_alert(runtime: Runtime) -> None:
    candidate = add_candidate(runtime)
    email_reply(runtime, "c-1", TUESDAY_10)
    with Session(runtime.engine) as session, session.begin():
        assert mark_answered(session, candidate.id, TUESDAY_10 + timedelta(hours=1)) == 1
    assert unanswered(runtime, TUESDAY_10 + timedelta(hours=5)) == 0
    # A later reply waits again; answering does not cover what came after it.
    email_reply(runtime, "c-1", TUESDAY_10 + timedelta(hours=2))
    assert unanswered(runtime, TUESDAY_10 + timedelta(hours=6, minutes=1)) == 1


def test_later_stages_are_alerted_first_then_oldest_first(runtime: Runtime) -> None:
    stages = {"c-app": "applied", "c-off2": "offer", "c-int": "interviewing", "c-fin": "final", "c-off1": "offer"}
    for external_id, stage in stages.items():
        add_candidate(runtime, external_id, stage=stage, phone=None)
    for minutes, external_id in enumerate(["c-app", "c-off2", "c-int", "c-fin", "c-off1"]):
        email_reply(runtime, external_id, TUESDAY_10 + timedelta(minutes=minutes * 10))
    email_reply(runtime, "c-off2", TUESDAY_10 - timedelta(minutes=30))  # c-off2's first reply is the oldest
    assert unanswered(runtime, TUESDAY_10 + timedelta(hours=6)) == 6
    assert [external_id for external_id, _ in alerts(runtime)] == [
        "c-off2",
        "c-off2",
        "c-off1",
        "c-fin",
        "c-int",
        "c-app",
    ]


def test_the_scheduler_tick_raises_them(runtime: Runtime, clock: list[datetime]) -> None:
    add_candidate(runtime)
    email_reply(runtime, "c-1", TUESDAY_10)
    assert runtime.scheduler.tick(TUESDAY_10 + timedelta(hours=3)).alerts == 0
    assert runtime.scheduler.tick(TUESDAY_10 + timedelta(hours=4, minutes=1)).alerts == 1
    assert runtime.scheduler.tick(TUESDAY_10 + timedelta(hours=5)).alerts == 0
    assert len(alerts(runtime)) == 1


def test_no_personal_data_in_alert_texts(runtime: Runtime) -> None:
    add_candidate(runtime, name="Alex Morgan")
    email_reply(runtime, "c-1", TUESDAY_10)
    unanswered(runtime, TUESDAY_10 + timedelta(hours=5))
    with Session(runtime.engine) as session:
        texts = list(session.scalars(select(Alert.message)))
    assert len(texts) == 2
    for text in texts:
        assert "@" not in text and "Alex" not in text and "Thursday" not in text
