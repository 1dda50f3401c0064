"""Every failure a person must act on reaches a person: the ``message_failed`` alert, the message's reason, the SLA.

The acceptance path runs the service's own pieces end to end: the API takes ``offer_accepted``, the scheduler
queues the offer letter, SendGrid (the sandbox, through the real SDK) refuses it for good, and the next pass alerts
HR with the reason in words; the SLA report calls the promise breached at once.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from outreach.core.clock import utcnow
from outreach.core.models import Alert, OutboundMessage
from outreach.ops import analytics
from outreach.ops.sandbox import SandboxServer
from outreach.pipeline.delivery import deliver
from outreach.pipeline.message_alerts import ALERT_FAILED, FAILURE_LOOKBACK, raise_failure_alerts
from outreach.service.runtime import Runtime
from tests.helpers import add_candidate, add_job, api_client, fire

# Tuesday 24 November 2026, 10:00 in Shanghai.
T0 = datetime(2026, 11, 24, 2, 0, tzinfo=UTC)
OFFER = {
    "start_date": "2027-01-04",
    "start_place": "上海市浦东新区世纪大道1000号18楼",
    "hr_contact": {"name": "李娜", "phone": "021-5555 0123"},
}
PERSONAL = ("Wei", "Zhang", "c-1@example.org", "13800138000")


def failed_alerts(runtime: Runtime) -> list[Alert]:
    with Session(runtime.engine) as session:
        return list(session.scalars(select(Alert).where(Alert.kind == ALERT_FAILED).order_by(Alert.id)))


def test_an_offer_letter_refused_by_the_provider_reaches_hr_within_a_tick(
    runtime: Runtime, sandbox: SandboxServer
) -> None:
    add_candidate(runtime, name="Wei Zhang")
    add_job(runtime)
    with api_client(runtime) as hr:
        answer = hr.post(
            "/api/v1/candidates/c-1/events", json={"type": "offer_accepted", "job_id": "j-1", "data": OFFER}
        )
        assert answer.status_code == 202, answer.text
        (letter,) = runtime.queued  # type: ignore[attr-defined]
        sandbox.fail("sendgrid", "400")
        with Session(runtime.engine) as session:
            now = max(utcnow(), session.scalars(select(OutboundMessage.not_before)).one())
        assert deliver(runtime, letter, now=now).status == "failed"
        # The next pass tells a person, once.
        assert runtime.scheduler.tick(now + timedelta(minutes=1)).alerts == 1
        assert runtime.scheduler.tick(now + timedelta(minutes=2)).alerts == 0
        (alert,) = failed_alerts(runtime)
        assert (alert.outbox_id, alert.campaign, alert.resolved_at) == (letter, "offer_letter", None)
        assert "offer_letter step 1 (email) was not sent" in alert.message
        assert "sendgrid refused it (400" in alert.message and "Does not contain a valid address" in alert.message
        assert not any(value in alert.message for value in PERSONAL)
        # HR sees it in the alerts list, the reason on the message, and the promise broken at once.
        listed = hr.get("/api/v1/alerts", params={"open": "true"}).json()
        assert {(item["kind"], item["outbox_id"]) for item in listed["items"]} == {(ALERT_FAILED, letter)}
        (message,) = hr.get("/api/v1/messages", params={"campaign": "offer_letter"}).json()["items"]
        assert (message["status"], message["rule"], message["error_code"]) == ("failed", "provider", "400")
        assert message["reason"].startswith("the provider refused the message")
        assert message["error_detail"]
    reports = {report.name: report for report in analytics.sla(runtime.engine, now=now + timedelta(minutes=3))}
    letter_sla = reports["offer_letter"]
    assert (letter_sla.breached, letter_sla.pending, letter_sla.met) == (1, 0, 0)
    (breach,) = letter_sla.breaches
    assert breach.reason is not None and "offer_letter provider" in breach.reason
    assert breach.late_seconds == 0.0  # broken before it was due, not late


def rows(runtime: Runtime, count: int) -> list[str]:
    """``count`` jd_intro rows (an email and an SMS per applicant)."""
    add_job(runtime)
    for number in range((count + 1) // 2):
        add_candidate(runtime, f"c-{number + 1}", name="Wei Zhang")
        fire(runtime, f"c-{number + 1}", "applied", at=T0, job="j-1")
    runtime.scheduler.tick(T0 + timedelta(hours=1))
    with Session(runtime.engine) as session:
        ids = list(session.scalars(select(OutboundMessage.id).order_by(OutboundMessage.id)))
    assert len(ids) >= count
    return ids[:count]


def set_row(runtime: Runtime, outbox_id: str, **values: Any) -> None:
    with Session(runtime.engine) as session, session.begin():
        session.execute(update(OutboundMessage).where(OutboundMessage.id == outbox_id).values(**values))


def sweep(runtime: Runtime, now: datetime) -> tuple[int, int]:
    with Session(runtime.engine) as session, session.begin():
        return raise_failure_alerts(session, now)


def test_which_endings_alert_and_which_do_not(runtime: Runtime) -> None:
    ids = rows(runtime, 8)
    now = T0 + timedelta(hours=1)
    endings = [
        {"status": "failed", "rule": "template", "error_detail": "email/jd_intro.en.txt line 3: undefined 'x'"},
        {"status": "suppressed", "rule": "cap:offer_daily", "reason": "1 per day: limit reached, dropped"},
        {"status": "suppressed", "rule": "suppression", "reason": "address suppressed: unsubscribed"},
        {"status": "skipped", "rule": "address", "reason": "no email address"},
        # No alert: a step whose condition did not hold, an enrollment that ended, a nurture message, old history.
        {"status": "skipped", "rule": "only_if", "reason": "condition not met"},
        {"status": "cancelled", "rule": "exit", "reason": "stage changed"},
        {"status": "failed", "rule": "provider", "category": "nurture"},
        {"status": "failed", "rule": "provider", "updated_at": now - FAILURE_LOOKBACK - timedelta(seconds=1)},
    ]
    for outbox_id, ending in zip(ids, endings, strict=True):
        set_row(runtime, outbox_id, **{"updated_at": now, **ending})
    assert sweep(runtime, now) == (4, 0)
    alerted = {alert.outbox_id: alert.message for alert in failed_alerts(runtime)}
    assert set(alerted) == set(ids[:4])
    assert "its template could not be rendered: email/jd_intro.en.txt line 3" in alerted[ids[0]]
    assert "cap:offer_daily: 1 per day: limit reached, dropped" in alerted[ids[1]]
    assert "no email address" in alerted[ids[3]]
    # A person sends the first one by hand after all: its alert resolves; the rest stay open.
    set_row(runtime, ids[0], status="sent", sent_at=now)
    assert sweep(runtime, now + timedelta(minutes=1)) == (0, 1)
    assert sweep(runtime, now + timedelta(minutes=2)) == (0, 0)
