"""Property: whatever the recipient's timezone and the hour, no SMS reaches the provider outside its window."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import select
from sqlalchemy.orm import Session

from outreach.core.clock import set_clock
from outreach.core.models import OutboundMessage
from outreach.ops.sandbox import SandboxServer
from outreach.pipeline.delivery import deliver
from outreach.policy.config import PolicySpec, Window
from outreach.policy.engine import PolicyEngine
from outreach.service.runtime import Runtime
from tests.conftest import empty_tables
from tests.helpers import add_candidate
from tests.policy.test_engine import queue_rows

ZONES = [
    "Asia/Shanghai",
    "America/New_York",
    "Europe/Berlin",
    "Australia/Adelaide",
    "Asia/Kolkata",
    "America/Sao_Paulo",
    "Pacific/Chatham",
    "Europe/London",
    "America/Los_Angeles",
    "Asia/Tokyo",
]
SMS_WINDOW = Window.parse("08:00-20:00")


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    zone=st.sampled_from(ZONES),
    start=st.datetimes(min_value=datetime(2026, 1, 1), max_value=datetime(2027, 12, 31)),
)
def test_no_sms_handed_to_the_provider_outside_its_window(
    runtime: Runtime, sandbox: SandboxServer, zone: str, start: datetime
) -> None:
    empty_tables(runtime.settings.database_url)
    sandbox.clear()
    runtime.policy = PolicyEngine(PolicySpec(caps=(), rate_limits={}), runtime.settings)
    candidate = add_candidate(runtime, timezone=zone)
    (outbox_id,) = queue_rows(runtime, candidate.id, 1, channel="sms", category="transactional", template="system_help")
    moment = start.replace(tzinfo=UTC)
    try:
        for _ in range(3):  # the worker comes back when the row says it may (the sweeper's job in production)
            set_clock(lambda at=moment: at)
            deliver(runtime, outbox_id, now=moment)
            with Session(runtime.engine) as session, session.begin():
                row = session.get(OutboundMessage, outbox_id)
                assert row is not None
                if row.status != "held":
                    break
                assert row.not_before > moment and row.rule == "quiet_hours"
                moment = row.not_before
                row.status = "pending"
    finally:
        set_clock(None)
    with Session(runtime.engine) as session:
        row = session.scalars(select(OutboundMessage)).one()
    assert row.status == "sent" and row.sent_at is not None
    local = row.sent_at.astimezone(ZoneInfo(zone))
    assert SMS_WINDOW.contains(local.time()), (zone, local)
    assert row.sent_at - start.replace(tzinfo=UTC) < timedelta(days=1)
    assert len(sandbox.messages()) == 1
