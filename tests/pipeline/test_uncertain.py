"""The ``message_uncertain`` alert: once per uncertain row, not before the window, resolved when events arrive."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from outreach.core.models import Alert, OutboundMessage
from outreach.inbound.events import ingest
from outreach.inbound.provider_events import parse_sendgrid_batch, parse_twilio_status
from outreach.pipeline import message_alerts
from outreach.pipeline.message_alerts import ALERT_UNCERTAIN, raise_uncertain_alerts
from outreach.pipeline.scheduler import TickResult
from outreach.service.runtime import Runtime
from tests.helpers import add_candidate, add_job, fire

T0 = datetime(2026, 11, 25, 2, 0, tzinfo=UTC)
WINDOW = timedelta(minutes=30)


def uncertain_rows(runtime: Runtime, since: datetime, category: str = "nurture") -> list[str]:
    """jd_intro's email and SMS of one enrollment, both left ``uncertain`` (the answer lost) at ``since``, counted
    as ``category`` (nurture rows wait for the window, transactional ones do not)."""
    add_candidate(runtime, name="Wei Zhang")
    add_job(runtime)
    fire(runtime, "c-1", "applied", at=T0, job="j-1")
    runtime.scheduler.tick(T0 + timedelta(hours=1))
    with Session(runtime.engine) as session, session.begin():
        ids = list(session.scalars(select(OutboundMessage.id).order_by(OutboundMessage.step)))
        session.execute(
            update(OutboundMessage)
            .where(OutboundMessage.id.in_(ids))
            .values(
                status="uncertain",
                rule="ambiguous",
                provider="sendgrid",
                attempts=1,
                updated_at=since,
                category=category,
            )
        )
    assert len(ids) == 2
    return ids


def alerts(runtime: Runtime) -> list[Alert]:
    with Session(runtime.engine) as session:
        return list(session.scalars(select(Alert).where(Alert.kind == ALERT_UNCERTAIN).order_by(Alert.id)))


def sweep(runtime: Runtime, now: datetime) -> tuple[int, int]:
    with Session(runtime.engine, expire_on_commit=False) as session, session.begin():
        return raise_uncertain_alerts(session, now, WINDOW)


def test_one_alert_per_uncertain_row_after_the_window_only(runtime: Runtime) -> None:
    email, sms = uncertain_rows(runtime, T0)
    assert sweep(runtime, T0 + WINDOW - timedelta(seconds=1)) == (0, 0)
    assert alerts(runtime) == []
    # Two rows of the same enrollment: two alerts (the alerts table allows one per enrollment and kind).
    assert sweep(runtime, T0 + WINDOW) == (2, 0)
    assert sweep(runtime, T0 + WINDOW + timedelta(hours=5)) == (0, 0)
    raised = alerts(runtime)
    assert sorted(a.outbox_id for a in raised) == sorted((email, sms))
    assert {a.campaign for a in raised} == {"jd_intro"} and {a.enrollment_id for a in raised} == {None}
    assert all(a.candidate_id is not None and a.resolved_at is None for a in raised)
    text = " ".join(a.message for a in raised)
    assert "jd_intro step 1" in text and "30 min" in text
    for personal in ("Wei", "Zhang", "c-1@example.org", "+86", "13800138000"):
        assert personal not in text
    # Never resent: the rows stay uncertain.
    with Session(runtime.engine) as session:
        statuses = set(session.scalars(select(OutboundMessage.status)))
    assert statuses == {"uncertain"}


def test_a_person_resolving_the_alert_does_not_bring_it_back(runtime: Runtime) -> None:
    uncertain_rows(runtime, T0)
    sweep(runtime, T0 + WINDOW)
    with Session(runtime.engine) as session, session.begin():
        session.execute(update(Alert).values(resolved_at=T0 + WINDOW))
    assert sweep(runtime, T0 + 2 * WINDOW) == (0, 0)
    assert len(alerts(runtime)) == 2


def test_events_before_the_window_mean_no_alert_and_after_it_resolve_it(runtime: Runtime) -> None:
    email, sms = uncertain_rows(runtime, T0)
    processed = {"event": "processed", "timestamp": int(T0.timestamp()), "outreach_id": email}
    with Session(runtime.engine) as session, session.begin():
        ingest(session, parse_sendgrid_batch([{**processed, "sg_event_id": "p1", "sg_message_id": "XMSG.f.1"}]))
    assert sweep(runtime, T0 + WINDOW) == (1, 0)
    (alert,) = alerts(runtime)
    assert alert.outbox_id == sms
    # The SMS's callback arrives late: its alert is resolved on the next pass.
    callback = parse_twilio_status({"MessageSid": "SM" + "0" * 32, "MessageStatus": "delivered"}, sms)
    with Session(runtime.engine) as session, session.begin():
        ingest(session, [callback])
    assert sweep(runtime, T0 + 2 * WINDOW) == (0, 1)
    (alert,) = alerts(runtime)
    assert alert.resolved_at == T0 + 2 * WINDOW


def test_the_scheduler_sweep_raises_it_with_the_setting(runtime: Runtime) -> None:
    uncertain_rows(runtime, T0)
    window = timedelta(seconds=runtime.settings.uncertain_alert_after)
    assert window == timedelta(minutes=30)  # the default
    result = TickResult()
    runtime.scheduler.sweep(T0 + window + timedelta(seconds=1), result)
    assert result.alerts == 2 and len(alerts(runtime)) == 2


def test_a_transactional_row_is_alerted_at_once(runtime: Runtime) -> None:
    email, sms = uncertain_rows(runtime, T0, category="transactional")
    assert sweep(runtime, T0) == (2, 0)
    assert sorted(a.outbox_id for a in alerts(runtime)) == sorted((email, sms))
    assert sweep(runtime, T0 + 2 * WINDOW) == (0, 0)


def test_two_passes_racing_raise_one_alert_per_row(runtime: Runtime) -> None:
    """Two schedulers both found the rows before either wrote its alerts: the alert's key keeps one per row."""
    uncertain_rows(runtime, T0)
    query = select(OutboundMessage).where(OutboundMessage.status == "uncertain")
    with Session(runtime.engine) as session:
        found = session.execute(select(*message_alerts._COLUMNS).where(query.whereclause)).all()  # type: ignore[arg-type]
    raised = []
    for _ in range(2):  # the second pass writes what it found before the first committed
        with Session(runtime.engine) as session, session.begin():
            raised.append(message_alerts._raise(session, T0, ALERT_UNCERTAIN, found, lambda row: "lost answer"))
    assert raised == [2, 0] and len(alerts(runtime)) == 2
