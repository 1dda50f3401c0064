"""The policy engine with the real rules: caps that hold under races, quiet hours, consent, business days."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from outreach.core.clock import set_clock, utcnow
from outreach.core.models import Candidate, Enrollment, MessageStatus, OutboundMessage, new_id
from outreach.domain.campaigns import Category
from outreach.domain.tokens import unsubscribe_url
from outreach.ops.sandbox import SandboxServer
from outreach.pipeline.delivery import deliver
from outreach.pipeline.enrollment import pause_for_out_of_office
from outreach.policy.config import CapSpec, EmailWindow, PolicySpec, QuietHoursSpec, Window
from outreach.policy.engine import PolicyEngine
from outreach.service.runtime import Runtime
from outreach.web import create_app
from tests.conftest import empty_tables
from tests.helpers import add_candidate, add_job, api_client, fire

EPOCH = datetime(2020, 1, 1, tzinfo=UTC)
ALWAYS = Window.parse("00:00-24:00")


def caps_only(runtime: Runtime, *caps: CapSpec) -> PolicyEngine:
    """The real cap rules, without quiet hours (tests deliver at the wall-clock hour)."""
    spec = PolicySpec(
        caps=caps or PolicySpec().caps,
        rate_limits={},
        quiet_hours=QuietHoursSpec(
            sms=ALWAYS, email={Category.NURTURE: EmailWindow(), Category.TRANSACTIONAL: EmailWindow()}
        ),
    )
    return PolicyEngine(spec, runtime.settings)


def queue_rows(
    runtime: Runtime,
    candidate_id: int,
    count: int,
    *,
    category: str = "nurture",
    channel: str = "email",
    template: str = "quarterly_nurture",
    campaign: str = "quarterly_nurture",
) -> list[str]:
    """Pending outbox rows straight in the table (as if scheduled long ago), one enrollment each."""
    ids = []
    with Session(runtime.engine) as session, session.begin():
        for n in range(count):
            enrollment = Enrollment(
                candidate_id=candidate_id,
                campaign=campaign,
                dedupe_key=f"t:{new_id()}",
                stage_at_start="talent_pool",
                anchor_at=EPOCH,
                current_step=1,
                status="completed",
            )
            session.add(enrollment)
            session.flush()
            row = OutboundMessage(
                enrollment_id=enrollment.id,
                candidate_id=candidate_id,
                campaign=campaign,
                step=n,
                channel=channel,
                template=template,
                category=category,
                status="pending",
                not_before=EPOCH,
            )
            session.add(row)
            session.flush()
            ids.append(row.id)
    return ids


def statuses(runtime: Runtime) -> list[tuple[str, str | None]]:
    with Session(runtime.engine) as session:
        return [
            (m.status, m.rule) for m in session.scalars(select(OutboundMessage).order_by(OutboundMessage.created_at))
        ]


def test_eight_workers_racing_on_one_candidate_pass_a_nurture_cap_once(
    pg_runtime: Runtime, sandbox: SandboxServer
) -> None:
    runtime = pg_runtime
    runtime.policy = caps_only(runtime)
    candidate = add_candidate(runtime, stage="talent_pool", nurture_consent=True)
    ids = queue_rows(runtime, candidate.id, 8)
    barrier = threading.Barrier(8)

    def go(outbox_id: str) -> None:
        barrier.wait()
        deliver(runtime, outbox_id)

    threads = [threading.Thread(target=go, args=(i,)) for i in ids]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    result = statuses(runtime)
    assert result.count(("sent", None)) == 1
    assert result.count(("held", "cap:nurture_60d")) == 7
    assert len(sandbox.messages()) == 1
    with Session(runtime.engine) as session:
        sent_at = session.scalar(select(OutboundMessage.sent_at).where(OutboundMessage.status == "sent"))
        held = session.scalars(select(OutboundMessage).where(OutboundMessage.status == "held")).all()
    assert sent_at is not None
    for row in held:
        assert row.not_before - sent_at >= timedelta(days=60)
        assert "at most 1 per 60 days" in (row.reason or "")


def test_transactional_safety_cap_drops_the_sixth_in_a_day(runtime: Runtime, sandbox: SandboxServer) -> None:
    runtime.policy = caps_only(runtime)
    candidate = add_candidate(runtime)
    ids = queue_rows(
        runtime, candidate.id, 6, category="transactional", template="final_thanks", campaign="final_thanks"
    )
    outcomes = [deliver(runtime, i).status for i in ids]
    assert outcomes == ["sent"] * 5 + ["suppressed"]
    assert statuses(runtime)[-1] == ("suppressed", "cap:transactional_safety")


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(gaps=st.lists(st.integers(min_value=0, max_value=40 * 24 * 60), min_size=1, max_size=8))
def test_no_candidate_ever_exceeds_a_cap(runtime: Runtime, sandbox: SandboxServer, gaps: list[int]) -> None:
    """Attempts at random times: in every window the sends stay within every cap."""
    empty_tables(runtime.settings.database_url)
    sandbox.clear()
    caps = (
        CapSpec(name="two_per_week", max=2, per=timedelta(days=7), categories=(Category.NURTURE,)),
        CapSpec(name="one_per_day", max=1, per=timedelta(days=1), categories=(Category.NURTURE,)),
    )
    runtime.policy = caps_only(runtime, *caps)
    candidate = add_candidate(runtime, stage="talent_pool", nurture_consent=True)
    ids = queue_rows(runtime, candidate.id, len(gaps))
    moment = utcnow()
    for outbox_id, gap in zip(ids, gaps, strict=True):
        moment += timedelta(minutes=gap)
        deliver(runtime, outbox_id, now=moment)
    with Session(runtime.engine) as session:
        sent = sorted(
            t for t in session.scalars(select(OutboundMessage.sent_at).where(OutboundMessage.status == "sent")) if t
        )
    for cap in caps:
        for index, start in enumerate(sent):
            inside = [t for t in sent[index:] if t - start < cap.per]
            assert len(inside) <= cap.max, (cap.name, sent)


@pytest.fixture
def clock() -> Iterator[Callable[[datetime], None]]:
    """Run the service's clock at a chosen instant (the sweeper and the outbox read it)."""

    def at(moment: datetime) -> None:
        set_clock(lambda: moment)

    yield at
    set_clock(None)


def test_sms_at_night_is_held_until_the_window_opens_then_released(
    runtime: Runtime, clock: Callable[[datetime], None]
) -> None:
    runtime.policy = PolicyEngine(PolicySpec(caps=(), rate_limits={}), runtime.settings)
    add_candidate(runtime)  # Asia/Shanghai, +86
    add_job(runtime)
    night = datetime(2026, 11, 25, 13, 30, tzinfo=UTC)  # 21:30 in Shanghai
    clock(night + timedelta(minutes=5))
    fire(runtime, "c-1", "applied", at=night, job="j-1")
    result = runtime.scheduler.tick(night + timedelta(minutes=5))
    with Session(runtime.engine) as session:
        email, sms = session.scalars(select(OutboundMessage).order_by(OutboundMessage.step)).all()
    assert email.status == "pending"  # transactional email: any time
    assert (sms.status, sms.rule) == ("held", "quiet_hours")
    opens = datetime(2026, 11, 26, 0, 0, tzinfo=UTC)  # 08:00 Shanghai
    assert opens <= sms.not_before < opens + timedelta(minutes=10)
    assert "08:00-20:00" in (sms.reason or "") and "+86" not in (sms.reason or "")
    assert result.queued == [email.id]
    assert sms.id not in runtime.scheduler.tick(opens - timedelta(minutes=1)).requeued
    # When its time has come, the sweeper hands it to the workers.
    clock(sms.not_before + timedelta(seconds=1))
    swept = runtime.scheduler.tick(sms.not_before + timedelta(seconds=1))
    assert sms.id in swept.requeued


def test_messages_api_shows_why_a_message_was_held(runtime: Runtime, clock: Callable[[datetime], None]) -> None:
    runtime.policy = PolicyEngine(PolicySpec(caps=(), rate_limits={}), runtime.settings)
    add_candidate(runtime)
    add_job(runtime)
    night = datetime(2026, 11, 25, 13, 30, tzinfo=UTC)
    clock(night + timedelta(minutes=5))
    fire(runtime, "c-1", "applied", at=night, job="j-1")
    runtime.scheduler.tick(night + timedelta(minutes=5))
    items = api_client(runtime).get("/api/v1/messages", params={"status": "held"}).json()["items"]
    assert [(i["channel"], i["rule"]) for i in items] == [("sms", "quiet_hours")]
    assert items[0]["reason"].startswith("outside 08:00-20:00")


def test_nurture_email_on_a_public_holiday_waits_for_the_next_working_day(runtime: Runtime) -> None:
    runtime.policy = PolicyEngine(PolicySpec(caps=(), rate_limits={}), runtime.settings)
    add_candidate(runtime, "pool", nurture_consent=True)
    with Session(runtime.engine) as session, session.begin():
        session.execute(update(Candidate).values(stage="talent_pool"))
    runtime.scheduler.tick(datetime(2027, 1, 1, 2, 5, tzinfo=UTC))  # New Year's Day, 10:05 in Shanghai
    (row,) = statuses(runtime)
    assert row == ("held", "quiet_hours")
    with Session(runtime.engine) as session:
        not_before = session.scalars(select(OutboundMessage.not_before)).one()
    local = not_before.astimezone(runtime.policy.calendar.zone)
    assert local.date().isoformat() == "2027-01-04" and local.hour == 9


def test_withdrawn_consent_suppresses_queued_nurture(runtime: Runtime, sandbox: SandboxServer) -> None:
    runtime.policy = caps_only(runtime)
    candidate = add_candidate(runtime, stage="talent_pool", nurture_consent=True)
    ids = queue_rows(runtime, candidate.id, 100)
    client = TestClient(create_app(runtime))
    path = unsubscribe_url(runtime.settings, ids[0], utcnow()).removeprefix(runtime.settings.public_url)
    assert client.get(path).status_code == 200
    assert statuses(runtime)[0] == ("pending", None)  # a GET changes nothing
    assert client.post(path).status_code == 200
    assert set(statuses(runtime)) == {("suppressed", "suppression")}  # ended at once
    assert {deliver(runtime, i).status for i in ids} == {"not-pending"}
    assert sandbox.messages() == []


def test_business_day_delay_skips_weekend_and_holidays(runtime: Runtime, tmp_path: Any) -> None:
    (tmp_path / "bd.yaml").write_text(
        "name: bd\ncategory: transactional\ntrigger: {event: offer_extended}\nexit_on: []\n"
        "steps:\n  - {channel: email, template: offer_followup, delay: 2 business days}\n",
        encoding="utf-8",
    )
    rt = Runtime(runtime.settings.with_overrides(campaigns_dir=tmp_path), sandbox_url=runtime.sandbox_url)
    rt.policy = runtime.policy
    add_candidate(rt)
    friday = datetime(2026, 9, 25, 2, 0, tzinfo=UTC)  # Fri 25 Sep 2026, 10:00 Shanghai; Oct 1-7 is a holiday
    (enrollment,) = fire(rt, "c-1", "offer_extended", at=friday)
    due = enrollment.next_run_at
    assert due is not None
    local = due.astimezone(rt.policy.calendar.zone)
    assert (local.year, local.month, local.day, local.hour) == (2026, 9, 29, 10)  # Mon 28, Tue 29


def test_out_of_office_pauses_and_resumes(runtime: Runtime) -> None:
    add_candidate(runtime)
    add_job(runtime)
    t0 = datetime(2026, 11, 25, 2, 0, tzinfo=UTC)
    fire(runtime, "c-1", "applied", at=t0, job="j-1")
    runtime.scheduler.tick(t0)  # email written; the SMS nudge is due at +5m
    with Session(runtime.engine) as session, session.begin():
        candidate = session.scalars(select(Candidate)).one()
        paused = pause_for_out_of_office(session, candidate, t0 + timedelta(minutes=1), timedelta(days=7))
    assert paused == 1
    assert runtime.scheduler.tick(t0 + timedelta(days=1)).claimed == 0
    assert [s for s, _ in statuses(runtime)] == [MessageStatus.HELD.value]  # the email waits with the rest
    with Session(runtime.engine) as session:
        enrollment = session.scalars(select(Enrollment)).one()
        assert enrollment.status == "active" and enrollment.next_run_at == t0 + timedelta(days=7, minutes=1)
        assert session.scalars(select(Candidate.last_reply_at)).one() is None  # not counted as a reply
    resumed = runtime.scheduler.tick(t0 + timedelta(days=7, minutes=2))
    # The pause is over: the held email is released and the SMS nudge written, both judged at the pass's time.
    assert [s for s, _ in statuses(runtime)] == ["pending", "pending"]
    assert len(resumed.requeued) == 1 and len(resumed.queued) == 1


def test_sms_carries_a_validity_period_that_ends_with_its_window(
    runtime: Runtime, sandbox: SandboxServer, clock: Callable[[datetime], None]
) -> None:
    runtime.policy = PolicyEngine(PolicySpec(caps=(), rate_limits={}), runtime.settings)
    candidate = add_candidate(runtime)  # Asia/Shanghai
    (outbox_id,) = queue_rows(runtime, candidate.id, 1, channel="sms", category="transactional", template="system_help")
    afternoon = datetime(2026, 11, 26, 11, 0, tzinfo=UTC)  # 19:00 in Shanghai: one hour before the window closes
    clock(afternoon)
    assert deliver(runtime, outbox_id, now=afternoon).status == "sent"
    (sms,) = sandbox.messages()
    assert sms.validity_period == 3600
