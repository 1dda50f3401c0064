"""The scheduler on both databases: steps become outbox rows at the right time, exactly once."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from outreach.core.models import CLAIMED_RULE, Alert, CampaignRun, Candidate, Enrollment, MessageStatus, OutboundMessage
from outreach.pipeline.enrollment import record_reply
from outreach.service.runtime import Runtime
from tests.helpers import add_candidate, add_job, fire

T0 = datetime(2026, 11, 25, 2, 0, tzinfo=UTC)  # 10:00 in Shanghai


def rows(runtime: Runtime) -> list[OutboundMessage]:
    with Session(runtime.engine) as session:
        return list(session.scalars(select(OutboundMessage).order_by(OutboundMessage.campaign, OutboundMessage.step)))


def test_applied_runs_jd_intro_steps_on_time(runtime: Runtime) -> None:
    add_candidate(runtime)
    add_job(runtime)
    enrollments = fire(runtime, "c-1", "applied", at=T0, job="j-1")
    assert [e.campaign for e in enrollments] == ["jd_intro"]

    first = runtime.scheduler.tick(T0)
    assert [(m.step, m.channel, m.template) for m in rows(runtime)] == [(0, "email", "jd_intro")]
    assert first.queued == [rows(runtime)[0].id]

    assert runtime.scheduler.tick(T0 + timedelta(minutes=1)).claimed == 0  # the nudge is not due yet
    runtime.scheduler.tick(T0 + timedelta(hours=1))
    runtime.scheduler.tick(T0 + timedelta(days=3))
    assert [(m.step, m.channel) for m in rows(runtime)] == [(0, "email"), (1, "sms"), (2, "sms")]
    with Session(runtime.engine) as session:
        enrollment = session.scalars(select(Enrollment)).one()
        assert enrollment.status == "completed"
        assert enrollment.next_run_at is None


def test_outbox_ids_come_from_the_runtimes_id_source(runtime: Runtime) -> None:
    """A runtime built with ``new_id`` hands it to its scheduler: every outbox id the passes write comes from it."""
    minted = iter(range(1, 100))
    seeded = Runtime(runtime.settings, enqueue_override=runtime.enqueue_override, new_id=lambda: f"{next(minted):032x}")
    seeded.policy = runtime.policy
    add_candidate(seeded)
    add_job(seeded)
    fire(seeded, "c-1", "applied", at=T0, job="j-1")
    seeded.scheduler.tick(T0)
    seeded.scheduler.tick(T0 + timedelta(hours=1))
    assert [m.id for m in rows(seeded)] == [f"{1:032x}", f"{2:032x}"]


def test_reply_stops_campaign_and_cancels_pending(runtime: Runtime) -> None:
    add_candidate(runtime)
    add_job(runtime)
    fire(runtime, "c-1", "applied", at=T0, job="j-1")
    runtime.scheduler.tick(T0 + timedelta(hours=1))  # email and nudge written, still pending
    with Session(runtime.engine) as session, session.begin():
        candidate = session.scalars(select(Candidate)).one()
        stopped = record_reply(session, runtime.campaigns, candidate, T0 + timedelta(hours=2))
    assert stopped == 1
    result = runtime.scheduler.tick(T0 + timedelta(days=3))
    assert result.queued == []
    assert {m.status for m in rows(runtime)} == {MessageStatus.CANCELLED.value}
    with Session(runtime.engine) as session:
        enrollment = session.scalars(select(Enrollment)).one()
        assert (enrollment.status, enrollment.exit_reason) == ("exited", "replied")


def test_stage_change_exits_offer_followup(runtime: Runtime) -> None:
    add_candidate(runtime)
    fire(runtime, "c-1", "offer_extended", at=T0)
    onboarding = {"start_date": "2027-01-04", "start_place": "Shanghai", "hr_contact": {"name": "Li Na"}}
    fire(runtime, "c-1", "offer_accepted", at=T0 + timedelta(days=1), data=onboarding)
    runtime.scheduler.tick(T0 + timedelta(days=4))
    campaigns = [m.campaign for m in rows(runtime)]
    assert "offer_followup" not in campaigns  # accepted: no follow-up, no alert
    assert campaigns == ["offer_letter"]
    with Session(runtime.engine) as session:
        assert session.scalar(select(func.count(Alert.id))) == 0


def test_offer_unanswered_sends_followup_and_raises_alert(runtime: Runtime) -> None:
    add_candidate(runtime)
    fire(runtime, "c-1", "offer_extended", at=T0)
    assert runtime.scheduler.tick(T0 + timedelta(days=2, hours=23)).claimed == 0
    runtime.scheduler.tick(T0 + timedelta(days=3))
    assert [(m.campaign, m.template) for m in rows(runtime)] == [("offer_followup", "offer_followup")]
    with Session(runtime.engine) as session:
        alert = session.scalars(select(Alert)).one()
        assert alert.kind == "offer_unanswered"
        assert "c-1@example.org" not in alert.message


def test_reply_before_offer_followup_means_no_followup_and_no_alert(runtime: Runtime) -> None:
    add_candidate(runtime)
    fire(runtime, "c-1", "offer_extended", at=T0)
    with Session(runtime.engine) as session, session.begin():
        session.execute(update(Candidate).values(last_reply_at=T0 + timedelta(days=1)))
    result = runtime.scheduler.tick(T0 + timedelta(days=3))
    assert (result.exited, result.queued, result.alerts) == (1, [], 0)
    assert rows(runtime) == []


def test_only_if_no_reply_skips_the_step_with_rule_and_reason(runtime: Runtime, tmp_path: Path) -> None:
    (tmp_path / "nudge_twice.yaml").write_text(
        "name: nudge_twice\ncategory: transactional\ntrigger: {event: applied}\nexit_on: []\n"
        "steps:\n  - {channel: sms, template: jd_nudge}\n"
        "  - {channel: sms, template: jd_reminder, delay: 2d, only_if: no_reply}\n",
        encoding="utf-8",
    )
    rt = Runtime(runtime.settings.with_overrides(campaigns_dir=tmp_path), sandbox_url=runtime.sandbox_url)
    rt.policy = runtime.policy
    rt.enqueue_override = lambda ids: None
    add_candidate(rt)
    fire(rt, "c-1", "applied", at=T0)
    rt.scheduler.tick(T0)
    with Session(rt.engine) as session, session.begin():
        session.execute(update(Candidate).values(last_reply_at=T0 + timedelta(hours=5)))
    result = rt.scheduler.tick(T0 + timedelta(days=2))
    assert result.skipped == 1
    skipped = rows(rt)[1]
    assert (skipped.status, skipped.rule) == ("skipped", "only_if:no_reply")
    assert skipped.reason == "candidate replied since the previous step"


def test_decline_tags_reason_and_schedules_recontact(runtime: Runtime) -> None:
    add_candidate(runtime)
    fire(runtime, "c-1", "offer_declined", at=T0, reason="Salary below expectations")
    runtime.scheduler.tick(T0 + timedelta(hours=1))
    with Session(runtime.engine) as session:
        candidate = session.scalars(select(Candidate)).one()
        assert "decline_reason:salary" in candidate.tags  # a known reason (outreach.domain.intent.DECLINE_REASONS)
        assert candidate.stage == "declined"
        assert candidate.recontact_at is not None
        assert candidate.recontact_at - T0 == timedelta(days=182)
    assert [m.template for m in rows(runtime)] == ["decline_thanks"]
    runtime.scheduler.tick(T0 + timedelta(days=181))
    assert len(rows(runtime)) == 1
    runtime.scheduler.tick(T0 + timedelta(days=183))
    assert [m.template for m in rows(runtime)] == ["decline_thanks", "decline_recontact"]


def test_quarterly_cron_fires_once_for_consenting_talent_pool(runtime: Runtime) -> None:
    add_candidate(runtime, "pool-yes", nurture_consent=True)
    add_candidate(runtime, "pool-no", nurture_consent=False)
    add_candidate(runtime, "active", nurture_consent=True)
    with Session(runtime.engine) as session, session.begin():
        session.execute(update(Candidate).where(Candidate.external_id != "active").values(stage="declined"))
    fire_at = datetime(2027, 1, 1, 2, 0, tzinfo=UTC)  # 1 Jan 10:00 Asia/Shanghai
    assert runtime.scheduler.tick(fire_at - timedelta(minutes=1)).fired == []
    result = runtime.scheduler.tick(fire_at + timedelta(minutes=5))
    assert result.fired == ["quarterly_nurture"]
    assert result.enrolled == 1
    again = runtime.scheduler.tick(fire_at + timedelta(minutes=10))
    assert again.fired == []
    messages = rows(runtime)
    assert [(m.campaign, m.category) for m in messages] == [("quarterly_nurture", "nurture")]
    with Session(runtime.engine) as session:
        assert session.scalar(select(func.count(CampaignRun.id))) == 1


def test_cron_misfire_beyond_grace_is_not_fired(runtime: Runtime) -> None:
    add_candidate(runtime, nurture_consent=True)
    late = datetime(2027, 1, 3, 2, 0, tzinfo=UTC)
    assert runtime.scheduler.tick(late).fired == []


def applied_rows_gone_stale(runtime: Runtime) -> tuple[OutboundMessage, OutboundMessage, datetime]:
    """The JD email and SMS nudge of one application, written by a pass at T0 + 1 h, and a time ten minutes
    before that pass (the sweeper judges leases at the pass's time, like everything else)."""
    add_candidate(runtime)
    add_job(runtime)
    fire(runtime, "c-1", "applied", at=T0, job="j-1")
    runtime.scheduler.tick(T0 + timedelta(hours=1))
    email, nudge = rows(runtime)
    return email, nudge, T0 + timedelta(minutes=50)


def test_sweeper_requeues_stale_pending_and_marks_lost_sends_uncertain(runtime: Runtime) -> None:
    email, nudge, old = applied_rows_gone_stale(runtime)
    with Session(runtime.engine) as session, session.begin():
        session.execute(update(OutboundMessage).where(OutboundMessage.id == email.id).values(enqueued_at=old))
        session.execute(
            update(OutboundMessage).where(OutboundMessage.id == nudge.id).values(status="sending", lease_until=old)
        )
    result = runtime.scheduler.tick(T0 + timedelta(hours=1))
    assert result.requeued == [email.id]
    assert result.uncertain == 1
    assert runtime.scheduler.tick(T0 + timedelta(hours=1)).requeued == []  # freshly enqueued now
    statuses = {m.id: m.status for m in rows(runtime)}
    assert statuses[nudge.id] == "uncertain"


def test_sweeper_returns_claimed_but_never_handed_off_rows_to_pending(runtime: Runtime) -> None:
    email, nudge, old = applied_rows_gone_stale(runtime)
    with Session(runtime.engine) as session, session.begin():
        # A worker claimed both in a group and stopped after handing only the nudge to the provider.
        session.execute(
            update(OutboundMessage)
            .where(OutboundMessage.id == email.id)
            .values(status="sending", rule=CLAIMED_RULE, lease_until=old, sent_at=old)
        )
        session.execute(
            update(OutboundMessage).where(OutboundMessage.id == nudge.id).values(status="sending", lease_until=old)
        )
    result = runtime.scheduler.tick(T0 + timedelta(hours=1))
    assert result.requeued == [email.id]
    assert result.uncertain == 1
    after = {m.id: m for m in rows(runtime)}
    assert (after[email.id].status, after[email.id].rule, after[email.id].sent_at) == ("pending", None, None)
    assert after[email.id].attempts == email.attempts
    assert after[nudge.id].status == "uncertain"


def test_two_schedulers_at_once_write_each_step_once(runtime: Runtime) -> None:
    add_job(runtime)
    for n in range(60):
        add_candidate(runtime, f"c-{n}")
        fire(runtime, f"c-{n}", "applied", at=T0, job="j-1")
    barrier = threading.Barrier(3)
    queued: list[str] = []
    lock = threading.Lock()

    def collect(ids: list[str]) -> None:
        with lock:
            queued.extend(ids)

    runtime.enqueue_override = collect
    runtime.settings = runtime.settings.with_overrides(claim_batch=7)
    from outreach.pipeline.scheduler import Scheduler

    def run() -> None:
        scheduler = Scheduler(runtime.engine, runtime.campaigns, runtime.settings, collect, policy=runtime.policy)
        barrier.wait()
        # Three passes each, all within the lease (30 s): the sweeper has nothing to re-enqueue.
        for second in (0, 10, 20):
            scheduler.tick(T0 + timedelta(minutes=5, seconds=second))

    threads = [threading.Thread(target=run) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    messages = rows(runtime)
    assert len(messages) == 120  # email + nudge for each of 60 candidates
    assert len({(m.enrollment_id, m.step) for m in messages}) == 120
    assert sorted(queued) == sorted(m.id for m in messages)
