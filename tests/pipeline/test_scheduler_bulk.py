"""One scheduler pass over a mixed population, on both databases: every step condition and policy rule decides
as before, and the pass's statement count does not grow with the number of due steps."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, event, select
from sqlalchemy.orm import Session

from outreach.core.config import Settings
from outreach.core.db import get_engine
from outreach.core.models import (
    Alert,
    Candidate,
    Enrollment,
    Job,
    LinkClick,
    OutboundMessage,
    Suppression,
    TrackedLink,
)
from outreach.domain.campaigns import CampaignSet
from outreach.pipeline.scheduler import Scheduler, TickResult
from outreach.pipeline.timing import default_calendar
from outreach.policy.config import load_policies
from outreach.policy.consent import address_hash
from outreach.policy.engine import PolicyEngine
from outreach.service.validation import validate_all
from tests.conftest import ROOT, empty_tables

T0 = datetime(2026, 11, 25, 2, 0, tzinfo=UTC)  # Wednesday 10:00 in Shanghai, Tuesday 21:00 in New York
DUE = T0 - timedelta(minutes=1)
ANCHOR = T0 - timedelta(days=3)

EXTRA_CAMPAIGNS = {
    # No exit conditions, so a reply or a click reaches the step conditions instead of ending the enrollment.
    "bulk_checks.yaml": (
        "name: bulk_checks\ncategory: transactional\ntrigger: {event: applied}\nexit_on: []\nsteps:\n"
        "  - {channel: email, template: jd_intro}\n"
        "  - {channel: sms, template: jd_nudge, delay: 1d, at: '09:00', only_if: no_reply}\n"
        "  - {channel: sms, template: jd_reminder, delay: 2bd, only_if: no_click}\n"
        "  - {channel: email, template: final_thanks, delay: 1d}\n"
    ),
    "switched_off.yaml": (
        "name: switched_off\ncategory: transactional\nenabled: false\ntrigger: {event: applied}\nsteps:\n"
        "  - {channel: email, template: final_thanks}\n"
    ),
}


@dataclass
class World:
    engine: Engine
    scheduler: Scheduler
    settings: Settings
    campaigns: CampaignSet
    queued: list[str] = field(default_factory=list)
    batches: list[list[str]] = field(default_factory=list)
    #: case name -> (enrollment id, the step that was due)
    cases: dict[str, tuple[int, int]] = field(default_factory=dict)


def campaigns_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "campaigns"
    shutil.copytree(ROOT / "campaigns", folder)
    for name, text in EXTRA_CAMPAIGNS.items():
        (folder / name).write_text(text, encoding="utf-8")
    return folder


@pytest.fixture
def world(settings: Settings, tmp_path: Path) -> Iterator[World]:
    settings = settings.with_overrides(campaigns_dir=campaigns_dir(tmp_path))
    campaigns, problems = validate_all(settings.campaigns_dir, settings.templates_dir)
    assert campaigns is not None and not problems, problems
    # The real policies (caps, quiet hours, spread) from the repository's policies.yaml.
    policy = PolicyEngine(load_policies(settings.campaigns_dir), settings)
    engine = get_engine(settings.database_url)
    found = World(engine, None, settings, campaigns)  # type: ignore[arg-type]
    found.scheduler = Scheduler(
        engine, campaigns, settings, found.queued.extend, policy=policy, enqueue_batch=found.batches.append
    )
    yield found


def person(session: Session, key: str, **fields: Any) -> Candidate:
    values: dict[str, Any] = {
        "external_id": key,
        "name": "Sam Lee",
        "email": f"{key}@example.org",
        "phone": "+8613800138000",
        "locale": "en",
        "timezone": "Asia/Shanghai",
        "tags": [],
        "stage": "applied",
        "nurture_consent": False,
        "data": {},
    }
    values.update(fields)
    candidate = Candidate(**values)
    session.add(candidate)
    session.flush()
    return candidate


def sent(session: Session, candidate: Candidate, at: datetime, *, channel: str, category: str, n: int = 1) -> None:
    """Messages sent earlier by another campaign (what the caps count)."""
    for _ in range(n):
        session.add(
            OutboundMessage(
                candidate_id=candidate.id,
                campaign="earlier",
                step=0,
                channel=channel,
                template="earlier",
                category=category,
                status="delivered",
                sent_at=at,
            )
        )


def enrol(
    world: World, session: Session, case: str, candidate: Candidate, campaign: str, step: int, **fields: Any
) -> Enrollment:
    values: dict[str, Any] = {
        "candidate_id": candidate.id,
        "campaign": campaign,
        "dedupe_key": case,
        "stage_at_start": candidate.stage,
        "current_step": step,
        "status": "active",
        "next_run_at": DUE,
        "anchor_at": ANCHOR,
        "last_step_at": ANCHOR + timedelta(hours=1) if step else None,
        "context": {},
    }
    values.update(fields)
    enrollment = Enrollment(**values)
    session.add(enrollment)
    session.flush()
    world.cases[case] = (enrollment.id, step)
    return enrollment


def populate(world: World) -> None:
    """One enrollment per case, all due at ``DUE``."""
    key = world.settings.signing_key
    earlier = T0 - timedelta(hours=2)
    with Session(world.engine, expire_on_commit=False) as session, session.begin():
        job = Job(external_id="j-1", title="Backend Engineer", description="", tags=[])
        session.add(job)
        session.flush()

        plain = person(session, "plain")
        enrol(world, session, "email_goes", plain, "jd_intro", 0, job_id=job.id)
        enrol(world, session, "sms_goes", person(session, "sms-goes"), "jd_intro", 1)
        enrol(world, session, "sms_quiet", person(session, "sms-quiet", timezone="America/New_York"), "jd_intro", 1)
        capped = person(session, "sms-capped")
        sent(session, capped, earlier, channel="sms", category="transactional")
        enrol(world, session, "sms_capped", capped, "jd_intro", 1)
        dropped = person(session, "dropped")
        sent(session, dropped, earlier, channel="email", category="transactional", n=5)
        enrol(world, session, "transactional_dropped", dropped, "jd_intro", 0)
        phone_off = person(session, "phone-off", phone="+8613900139000")
        session.add(Suppression(channel="sms", address="+8613900139000", reason="opt_out"))
        enrol(world, session, "sms_suppressed", phone_off, "jd_intro", 1)
        erased = person(session, "erased")
        session.add(
            Suppression(channel="email", address=address_hash(key, "email", "erased@example.org"), reason="bounce")
        )
        enrol(world, session, "email_hash_suppressed", erased, "jd_intro", 0)
        enrol(world, session, "no_email", person(session, "no-email", email=None), "jd_intro", 0)
        enrol(world, session, "no_phone", person(session, "no-phone", phone=None), "jd_intro", 1)

        enrol(world, session, "reminder_goes", person(session, "reminder-goes"), "jd_intro", 2)
        low = person(session, "low", intent_level="low", intent_score=1.5)
        enrol(world, session, "intent_low", low, "jd_intro", 2)
        clicker = person(session, "clicker")
        mine = enrol(world, session, "clicked_booking", clicker, "jd_intro", 2)
        other_clicker = person(session, "other-clicker")
        theirs = enrol(world, session, "clicked_elsewhere", other_clicker, "jd_intro", 2)
        other = enrol(world, session, "other_enrollment", other_clicker, "final_thanks", 1, dedupe_key="x")
        for enrollment, who in ((mine, clicker), (other, other_clicker)):
            message = OutboundMessage(
                enrollment_id=enrollment.id,
                candidate_id=who.id,
                campaign=enrollment.campaign,
                step=0,
                channel="email",
                template="jd_intro",
                category="transactional",
                status="delivered",
                sent_at=ANCHOR,
            )
            session.add(message)
            session.flush()
            link = TrackedLink(message_id=message.id, position=0, name="book_interview", url="https://b.example")
            session.add(link)
            session.flush()
            # A click on another link of the same message does not count.
            salary = TrackedLink(message_id=message.id, position=1, name="salary_range", url="https://s.example")
            session.add(salary)
            session.flush()
            session.add(LinkClick(link_id=salary.id, candidate_id=who.id, name="salary_range", clicked_at=ANCHOR))
            session.add(
                LinkClick(
                    link_id=link.id, candidate_id=who.id, name="book_interview", clicked_at=ANCHOR + timedelta(hours=2)
                )
            )
        assert theirs.id != other.id

        moved = person(session, "moved")
        gone = enrol(world, session, "stage_changed", moved, "jd_intro", 1)
        session.add(
            OutboundMessage(
                enrollment_id=gone.id,
                candidate_id=moved.id,
                campaign="jd_intro",
                step=0,
                channel="email",
                template="jd_intro",
                category="transactional",
                status="pending",
            )
        )
        moved.stage = "interviewing"
        enrol(
            world,
            session,
            "replied_exit",
            person(session, "replied", last_reply_at=ANCHOR + timedelta(hours=5)),
            "jd_intro",
            1,
        )
        enrol(world, session, "campaign_gone", person(session, "gone"), "no_such_campaign", 0)
        enrol(world, session, "campaign_disabled", person(session, "disabled"), "switched_off", 0)
        enrol(world, session, "past_last_step", person(session, "finished"), "final_thanks", 1)

        enrol(
            world,
            session,
            "followup_alert",
            person(session, "offer", stage="offer"),
            "offer_followup",
            0,
            job_id=job.id,
        )
        again = enrol(
            world, session, "followup_alert_again", person(session, "offer-2", stage="offer"), "offer_followup", 0
        )
        session.add(Alert(kind="offer_unanswered", enrollment_id=again.id, message="raised earlier"))
        high = person(session, "high", stage="offer", intent_level="high", intent_score=4.5)
        enrol(world, session, "priority_high", high, "offer_followup_priority", 0)
        medium = person(session, "medium", stage="offer", intent_level="medium", intent_score=3.0)
        enrol(world, session, "priority_medium", medium, "offer_followup_priority", 0)

        enrol(world, session, "checks_first", person(session, "checks-1"), "bulk_checks", 0)
        enrol(
            world,
            session,
            "only_if_no_reply",
            person(session, "checks-2", last_reply_at=ANCHOR + timedelta(hours=3)),
            "bulk_checks",
            1,
        )
        enrol(
            world,
            session,
            "only_if_no_reply_older",
            person(session, "checks-3", last_reply_at=ANCHOR - timedelta(hours=3)),
            "bulk_checks",
            1,
        )
        enrol(
            world,
            session,
            "only_if_no_click",
            person(session, "checks-4", last_click_at=ANCHOR + timedelta(hours=3)),
            "bulk_checks",
            2,
        )
        enrol(world, session, "last_step", person(session, "checks-5"), "bulk_checks", 3)
        conflict = enrol(world, session, "row_exists", person(session, "checks-6"), "bulk_checks", 3)
        session.add(
            OutboundMessage(
                enrollment_id=conflict.id,
                candidate_id=conflict.candidate_id,
                campaign="bulk_checks",
                step=3,
                channel="email",
                template="final_thanks",
                category="transactional",
                status="sent",
                sent_at=ANCHOR,
            )
        )

        pool = {"stage": "declined", "nurture_consent": True}
        enrol(world, session, "nurture_goes", person(session, "n-goes", **pool), "quarterly_nurture", 0)
        enrol(world, session, "nurture_zh", person(session, "n-zh", locale="zh-CN", **pool), "quarterly_nurture", 0)
        enrol(
            world,
            session,
            "nurture_no_consent",
            person(session, "n-no", stage="declined"),
            "quarterly_nurture",
            0,
        )
        nurtured = person(session, "n-capped", **pool)
        sent(session, nurtured, T0 - timedelta(days=10), channel="email", category="nurture")
        enrol(world, session, "nurture_capped", nurtured, "quarterly_nurture", 0)
        enrol(
            world,
            session,
            "nurture_quiet",
            person(session, "n-quiet", timezone="America/New_York", **pool),
            "quarterly_nurture",
            0,
        )
        # Two due steps of one candidate in one pass (two campaigns): each decided on its own.
        enrol(world, session, "same_person_email", plain, "final_thanks", 0, dedupe_key="twice")
        # Not due yet: left alone.
        enrol(world, session, "not_due", person(session, "later"), "jd_intro", 0, next_run_at=T0 + timedelta(hours=1))


#: case -> (status of the step's row or None for no row, its rule)
EXPECTED_ROWS: dict[str, tuple[str | None, str | None]] = {
    "email_goes": ("pending", None),
    "sms_goes": ("pending", None),
    "sms_quiet": ("held", "quiet_hours"),
    "sms_capped": ("held", "cap:sms_daily"),
    "transactional_dropped": ("suppressed", "cap:transactional_safety"),
    "sms_suppressed": ("suppressed", "suppression"),
    "email_hash_suppressed": ("suppressed", "suppression"),
    "no_email": ("skipped", "address"),
    "no_phone": ("skipped", "address"),
    "reminder_goes": ("pending", None),
    "intent_low": ("skipped", "intent"),
    "clicked_booking": ("skipped", "unless_clicked:book_interview"),
    "clicked_elsewhere": ("pending", None),
    "other_enrollment": (None, None),
    "stage_changed": (None, None),
    "replied_exit": (None, None),
    "campaign_gone": (None, None),
    "campaign_disabled": (None, None),
    "past_last_step": (None, None),
    "followup_alert": ("pending", None),
    "followup_alert_again": ("pending", None),
    "priority_high": ("pending", None),
    "priority_medium": ("skipped", "intent"),
    "checks_first": ("pending", None),
    "only_if_no_reply": ("skipped", "only_if:no_reply"),
    "only_if_no_reply_older": ("pending", None),
    "only_if_no_click": ("skipped", "only_if:no_click"),
    "last_step": ("pending", None),
    "row_exists": ("sent", None),
    "nurture_goes": ("pending", None),
    "nurture_zh": ("pending", None),
    "nurture_no_consent": ("suppressed", "consent"),
    "nurture_capped": ("held", "cap:nurture_60d"),
    "nurture_quiet": ("held", "quiet_hours"),
    "same_person_email": ("pending", None),
    "not_due": (None, None),
}

REASONS = {
    "sms_quiet": "outside 08:00-20:00 in America/New_York (SMS); next window opens 2026-11-25 08:00 local",
    "sms_capped": "at most 1 per 1 day (transactional, nurture; sms): limit reached, deferred",
    "transactional_dropped": "at most 5 per 1 day (transactional; email, sms): limit reached, dropped",
    "sms_suppressed": "address suppressed: opt_out",
    "email_hash_suppressed": "address suppressed: bounce",
    "no_email": "candidate has no email",
    "no_phone": "candidate has no phone",
    "intent_low": "step is for high, medium, unassessed intent; candidate is low",
    "clicked_booking": "candidate clicked the book_interview link of this campaign",
    "priority_medium": "step is for high intent; candidate is medium",
    "only_if_no_reply": "candidate replied since the previous step",
    "only_if_no_click": "candidate clicked since the previous step",
    "nurture_no_consent": "no consent to nurture messages",
}

#: case -> (enrollment status, current_step, exit_reason) after the pass
EXPECTED_ENROLLMENTS: dict[str, tuple[str, int, str | None]] = {
    "email_goes": ("active", 1, None),
    "sms_goes": ("active", 2, None),
    "sms_quiet": ("active", 2, None),
    "sms_capped": ("active", 2, None),
    "transactional_dropped": ("active", 1, None),
    "sms_suppressed": ("active", 2, None),
    "email_hash_suppressed": ("active", 1, None),
    "no_email": ("active", 1, None),
    "no_phone": ("active", 2, None),
    "reminder_goes": ("completed", 3, None),
    "intent_low": ("completed", 3, None),
    "clicked_booking": ("completed", 3, None),
    "clicked_elsewhere": ("completed", 3, None),
    "other_enrollment": ("completed", 1, None),
    "stage_changed": ("exited", 1, "stage changed to interviewing"),
    "replied_exit": ("exited", 1, "replied"),
    "campaign_gone": ("exited", 0, "campaign removed or disabled"),
    "campaign_disabled": ("exited", 0, "campaign removed or disabled"),
    "past_last_step": ("completed", 1, None),
    "followup_alert": ("completed", 1, None),
    "followup_alert_again": ("completed", 1, None),
    "priority_high": ("completed", 1, None),
    "priority_medium": ("completed", 1, None),
    "checks_first": ("active", 1, None),
    "only_if_no_reply": ("active", 2, None),
    "only_if_no_reply_older": ("active", 2, None),
    "only_if_no_click": ("active", 3, None),
    "last_step": ("completed", 4, None),
    "row_exists": ("completed", 4, None),
    "nurture_goes": ("completed", 1, None),
    "nurture_zh": ("completed", 1, None),
    "nurture_no_consent": ("completed", 1, None),
    "nurture_capped": ("completed", 1, None),
    "nurture_quiet": ("completed", 1, None),
    "same_person_email": ("completed", 1, None),
    "not_due": ("active", 0, None),
}


def outcome(world: World) -> tuple[dict[int, Enrollment], dict[tuple[int, int], OutboundMessage], list[Alert]]:
    with Session(world.engine) as session:
        enrollments = {e.id: e for e in session.scalars(select(Enrollment))}
        messages = {
            (m.enrollment_id, m.step): m
            for m in session.scalars(select(OutboundMessage).where(OutboundMessage.enrollment_id.is_not(None)))
        }
        alerts = list(session.scalars(select(Alert).order_by(Alert.id)))
    return enrollments, messages, alerts


def test_a_mixed_pass_decides_every_step_as_the_rules_say(world: World) -> None:
    populate(world)
    result = TickResult()
    claimed = world.scheduler.run_due(T0, result)
    enrollments, messages, alerts = outcome(world)

    def row(case: str) -> OutboundMessage | None:
        return messages.get(world.cases[case])

    def enrollment(case: str) -> Enrollment:
        return enrollments[world.cases[case][0]]

    assert claimed == len(world.cases) - 1  # all but not_due
    assert set(EXPECTED_ROWS) == set(EXPECTED_ENROLLMENTS) == set(world.cases)
    for case, (status, rule) in EXPECTED_ROWS.items():
        found = row(case)
        if status is None:
            assert found is None, case
            continue
        assert found is not None, case
        assert (found.status, found.rule) == (status, rule), case
        if case in REASONS:
            assert found.reason == REASONS[case], case
    for case in world.cases:
        state, step, reason = EXPECTED_ENROLLMENTS[case]
        found_enrollment = enrollment(case)
        assert (found_enrollment.status, found_enrollment.current_step, found_enrollment.exit_reason) == (
            state,
            step,
            reason,
        ), case
        if state != "active":
            assert found_enrollment.next_run_at is None, case

    # Held rows wait for their window (plus the spread) or for the cap to free, and never less than the wall clock
    # when the row was written (a pass at a simulated ``now`` may run later); they are not queued.
    quiet = row("sms_quiet")
    assert quiet is not None and quiet.enqueued_at is None
    opens = datetime(2026, 11, 25, 13, 0, tzinfo=UTC)  # 08:00 in New York
    assert quiet.not_before == quiet.created_at or opens <= quiet.not_before < opens + timedelta(minutes=10)
    assert quiet.not_before >= opens
    capped = row("sms_capped")
    assert capped is not None
    assert capped.not_before == max(T0 - timedelta(hours=2) + timedelta(days=1, seconds=1), capped.created_at)
    nurture_quiet = row("nurture_quiet")
    assert nurture_quiet is not None
    opens = datetime(2026, 11, 25, 14, 0, tzinfo=UTC)  # 09:00 in New York, a working day
    assert (
        nurture_quiet.not_before == nurture_quiet.created_at
        or opens <= nurture_quiet.not_before < opens + timedelta(minutes=10)
    )
    assert nurture_quiet.not_before >= opens

    # Pending rows carry what the workers need and are all queued, once; nurture email goes in batches, one per
    # (campaign, step, template, locale).
    pending = sorted(m.id for m in messages.values() if m.status == "pending")
    assert len(pending) == sum(1 for status, _ in EXPECTED_ROWS.values() if status == "pending")
    assert all(m.enqueued_at is not None for m in messages.values() if m.status == "pending")
    batched = [outbox_id for batch in world.batches for outbox_id in batch]
    assert sorted(world.queued + batched) == pending
    nurture = [row("nurture_goes"), row("nurture_zh")]
    assert sorted(world.batches) == sorted([m.id] for m in nurture if m is not None)
    goes = row("email_goes")
    assert goes is not None
    assert (goes.campaign, goes.channel, goes.template, goes.category, goes.attempts) == (
        "jd_intro",
        "email",
        "jd_intro",
        "transactional",
        0,
    )
    assert goes.candidate_id == enrollment("email_goes").candidate_id

    # The exited enrollment's earlier pending row is cancelled.
    cancelled = messages[(world.cases["stage_changed"][0], 0)]
    assert (cancelled.status, cancelled.rule) == ("cancelled", "exit")
    assert cancelled.reason == "enrollment exited: stage changed to interviewing"

    # The next step's time: delays, an ``at`` time in the candidate's zone, business days.
    first = enrollment("checks_first")
    assert first.last_step_at == DUE
    # 09:59 in Shanghai a day later, so the next 09:00 there is the day after.
    assert first.next_run_at == datetime(2026, 11, 27, 1, 0, tzinfo=UTC)
    assert enrollment("only_if_no_reply").next_run_at == default_calendar().add_business_days(DUE, 2)
    assert enrollment("only_if_no_click").next_run_at == DUE + timedelta(days=1)
    assert enrollment("email_goes").next_run_at == DUE + timedelta(minutes=5)
    assert enrollment("not_due").next_run_at == T0 + timedelta(hours=1)

    # The alert of offer_followup: raised once (the second enrollment had one already), no personal data.
    raised = [a for a in alerts if a.message != "raised earlier"]
    assert [(a.kind, a.enrollment_id, a.campaign) for a in raised] == [
        ("offer_unanswered", world.cases["followup_alert"][0], "offer_followup")
    ]
    assert raised[0].message == "offer_followup step 1: offer unanswered (job j-1)"

    # held counts every row a rule stopped (held, suppressed, skipped for a missing address); skipped the step
    # conditions (intent, only_if, unless_clicked).
    assert (result.claimed, result.skipped, result.held, result.exited, result.completed, result.alerts) == (
        claimed,
        5,
        10,
        4,
        18,
        1,
    )
    assert sorted(result.queued) == pending

    # Nothing is due any more: the next pass claims nothing.
    assert world.scheduler.run_due(T0, TickResult()) == 0


def decisions(world: World) -> dict[str, tuple[str | None, str | None, str | None, str, int]]:
    """case -> (row status, rule, reason, enrollment status, current step) after one pass at T0."""
    populate(world)
    world.scheduler.run_due(T0, TickResult())
    enrollments, messages, _ = outcome(world)
    found = {}
    for case, (enrollment_id, step) in world.cases.items():
        row = messages.get((enrollment_id, step))
        enrollment = enrollments[enrollment_id]
        found[case] = (
            None if row is None else row.status,
            None if row is None else row.rule,
            None if row is None else row.reason,
            enrollment.status,
            enrollment.current_step,
        )
    return found


def test_the_pass_decides_as_the_engine_does_one_message_at_a_time(world: World, database_url: str) -> None:
    bulk = decisions(world)
    empty_tables(database_url)
    world.cases.clear()
    single = PolicyEngine(world.scheduler.policy.spec, world.settings)
    world.scheduler = Scheduler(world.engine, world.campaigns, world.settings, world.queued.extend, policy=single)
    world.scheduler.shared_reads = False  # the engine asked for every message on its own, rule by rule
    assert decisions(world) == bulk


@pytest.fixture
def statements(world: World) -> Iterator[list[str]]:
    seen: list[str] = []

    def count(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        seen.append(statement)

    event.listen(world.engine, "before_cursor_execute", count)
    yield seen
    event.remove(world.engine, "before_cursor_execute", count)


def many(world: World, n: int, prefix: str) -> None:
    """``n`` due steps over mixed campaigns and channels, with some suppressed, capped, quiet, low intent, clicked
    and exited (the candidate's stage moved on)."""
    campaigns = [("jd_intro", 0), ("jd_intro", 1), ("jd_intro", 2), ("offer_followup", 0), ("quarterly_nurture", 0)]
    with Session(world.engine, expire_on_commit=False) as session, session.begin():
        for i in range(n):
            campaign, step = campaigns[i % len(campaigns)]
            key = f"{prefix}-{i}"
            who = person(
                session,
                key,
                timezone="America/New_York" if i % 7 == 0 else "Asia/Shanghai",
                intent_level="low" if i % 11 == 0 else None,
                stage="offer" if campaign == "offer_followup" else "applied",
                nurture_consent=i % 3 != 0,
                phone=f"+86138{i:08d}",
            )
            if i % 13 == 0:
                session.add(Suppression(channel="email", address=f"{key}@example.org", reason="bounce"))
            if i % 17 == 0:
                sent(session, who, T0 - timedelta(hours=3), channel="sms", category="transactional")
            enrollment = enrol(world, session, key, who, campaign, step)
            if i % 19 == 0:
                who.stage = "interviewing"
            if i % 23 == 2:  # among them jd_intro reminders (i % 5 == 2), skipped unless_clicked
                message = OutboundMessage(
                    enrollment_id=enrollment.id,
                    candidate_id=who.id,
                    campaign=campaign,
                    step=9,
                    channel="email",
                    template="jd_intro",
                    category="transactional",
                    status="delivered",
                )
                session.add(message)
                session.flush()
                link = TrackedLink(message_id=message.id, position=0, name="book_interview", url="https://b.example")
                session.add(link)
                session.flush()
                session.add(LinkClick(link_id=link.id, candidate_id=who.id, name="book_interview", clicked_at=ANCHOR))


def test_a_pass_uses_the_same_few_statements_whatever_the_number_of_due_steps(
    world: World, statements: list[str]
) -> None:
    counts = []
    for n in (30, 300):
        many(world, n, f"n{n}")
        statements.clear()
        result = TickResult()
        assert world.scheduler.run_due(T0, result) == n
        assert len(result.queued) > n // 3
        assert result.exited and result.skipped and result.held and result.alerts
        counts.append(len(statements))
    # The claim and read, unless_clicked's clicks, suppressions, recent sends, the outbox rows, the alerts, the
    # enrollments, and two per exit reason: as many for 300 due steps as for 30.
    assert counts[0] == counts[1] <= 12, statements
