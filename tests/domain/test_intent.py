"""Intent: the level's rounding edges, assessments, the configuration file, stage moves and their history, tags,
the intent conditions of campaigns (the high-intent branch of the seed campaigns), and re-activation."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from outreach.core.errors import CampaignError, ValidationError
from outreach.core.models import (
    Candidate,
    Job,
    MessageStatus,
    OutboundMessage,
    Stage,
    StageChange,
    Suppression,
)
from outreach.domain.campaigns import Category, EventType
from outreach.domain.intent import (
    DEFAULT_DIMENSIONS,
    IntentSpec,
    assess,
    check_move,
    check_scores,
    check_tag_list,
    decline_reason,
    level_for,
    load_intent,
)
from outreach.ops.sandbox import SandboxServer
from outreach.pipeline.delivery import deliver
from outreach.pipeline.enrollment import EventIn, reactivate, record_event
from outreach.policy.config import CapSpec
from outreach.policy.engine import PolicyEngine
from outreach.service.runtime import Runtime
from outreach.service.validation import validate_all
from tests.conftest import ROOT
from tests.helpers import add_candidate, add_job, fire, past_nurture_send

T0 = datetime(2026, 11, 25, 2, 0, tzinfo=UTC)  # a Wednesday, 10:00 in Shanghai
SPEC = IntentSpec()


# -- the level -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("scores", "level"),
    [
        ((5, 4, 4), "high"),  # 4.33: the example
        ((4, 4, 3), "high"),  # 3.67 rounds to 4
        ((4, 3), "high"),  # 3.5 exactly: half rounds up
        ((4, 3, 3), "medium"),  # 3.33
        ((3, 3, 3), "medium"),
        ((3, 2), "medium"),  # 2.5 exactly: half rounds up, to 3
        ((3, 2, 2), "low"),  # 2.33
        ((1, 1, 1), "low"),
        ((5, 5, 5), "high"),
        ((2, 2), "low"),
    ],
)
def test_level_follows_the_mean_rounded_half_up(scores: tuple[int, ...], level: str) -> None:
    mean, found = level_for(scores)
    assert found.value == level
    assert mean == pytest.approx(sum(scores) / len(scores))


def test_scores_are_checked_field_by_field() -> None:
    good = {"career_goal_match": 5, "salary_fit": 4, "start_urgency": 4}
    assert check_scores(good, SPEC) == good
    cases = [
        ({**good, "charisma": 3}, "scores.charisma", "unknown dimension"),
        ({"career_goal_match": 5, "salary_fit": 4}, "scores.start_urgency", "missing"),
        ({**good, "salary_fit": 6}, "scores.salary_fit", "1 to 5"),
        ({**good, "salary_fit": 0}, "scores.salary_fit", "1 to 5"),
        ({**good, "salary_fit": 4.5}, "scores.salary_fit", "whole number"),
        ({**good, "salary_fit": "4"}, "scores.salary_fit", "whole number"),
        ({**good, "salary_fit": True}, "scores.salary_fit", "whole number"),
    ]
    for scores, field, words in cases:
        with pytest.raises(ValidationError) as caught:
            check_scores(scores, SPEC)
        assert (caught.value.field, words in caught.value.message) == (field, True), scores


def test_intent_file_is_validated_with_file_line_and_field(tmp_path: Path) -> None:
    assert load_intent(tmp_path) == IntentSpec()  # no file: the defaults
    assert IntentSpec().dimensions == DEFAULT_DIMENSIONS
    assert load_intent(ROOT / "campaigns").talent_pool_recontact == timedelta(days=90)
    path = tmp_path / "intent.yaml"
    path.write_text("dimensions:\n  - career_goal_match\n  - Salary Fit\ntalent_pool_recontact: soon\n")
    with pytest.raises(CampaignError) as caught:
        load_intent(tmp_path)
    problems = {p.field: p for p in caught.value.problems}
    assert set(problems) == {"dimensions[1]", "talent_pool_recontact"}
    assert (problems["dimensions[1]"].file, problems["dimensions[1]"].line) == (str(path), 3)
    assert problems["talent_pool_recontact"].line == 4
    path.write_text("dimensions: [a, a]\nextra: 1\n")
    with pytest.raises(CampaignError) as caught:
        load_intent(tmp_path)
    assert {p.field for p in caught.value.problems} == {"dimensions", "extra"}


def test_campaigns_validate_reports_a_bad_intent_file(tmp_path: Path) -> None:
    import shutil

    campaigns = tmp_path / "campaigns"
    shutil.copytree(ROOT / "campaigns", campaigns)
    (campaigns / "intent.yaml").write_text("dimensions: []\n")
    loaded, problems = validate_all(campaigns, ROOT / "templates")
    assert loaded is not None  # the campaigns themselves are fine
    ((problem),) = problems
    assert (problem.file, problem.field) == (str(campaigns / "intent.yaml"), "dimensions")


def test_campaign_intent_values_are_checked(tmp_path: Path) -> None:
    from outreach.domain.campaigns import load_campaign_file

    path = tmp_path / "x.yaml"
    path.write_text(
        "name: x\ncategory: transactional\ntrigger: {event: applied, audience: {intent: [hot]}}\n"
        "steps:\n  - {channel: email, template: jd_intro, intent: high}\n"
    )
    campaign, problems = load_campaign_file(path)
    assert campaign is None
    ((problem),) = problems
    assert (problem.field, problem.line) == ("trigger.audience.intent[0]", 3)
    path.write_text(
        "name: x\ncategory: transactional\ntrigger: {event: applied}\n"
        "steps:\n  - {channel: email, template: jd_intro, intent: high}\n"
    )
    campaign, problems = load_campaign_file(path)
    assert campaign is not None and campaign.steps[0].intent == ("high",)  # one level without brackets


# -- stages ----------------------------------------------------------------------------------------------------


def test_people_may_only_make_possible_moves() -> None:
    check_move("applied", Stage.CONTACTED)
    check_move("final", Stage.OFFER)
    check_move("declined", Stage.TALENT_POOL)
    check_move("talent_pool", Stage.CONTACTED)
    for current, target in [("applied", Stage.OFFER), ("hired", Stage.TALENT_POOL), ("offer", Stage.OFFER)]:
        with pytest.raises(ValidationError) as caught:
            check_move(current, target)
        assert caught.value.field == "stage"


def history(runtime: Runtime, external_id: str = "c-1") -> list[tuple[str | None, str, str]]:
    with Session(runtime.engine) as session:
        rows = session.execute(
            select(StageChange.from_stage, StageChange.to_stage, StageChange.changed_by)
            .join(Candidate, Candidate.id == StageChange.candidate_id)
            .where(Candidate.external_id == external_id)
            .order_by(StageChange.id)
        )
        return [tuple(row) for row in rows]  # type: ignore[misc]


def test_every_ats_event_that_moves_the_stage_writes_history(runtime: Runtime) -> None:
    add_candidate(runtime)
    add_job(runtime)
    for kind in ("applied", "contacted", "interview_scheduled", "final_interview", "moved_to_talent_pool"):
        fire(runtime, "c-1", kind, at=T0, job="j-1")
    fire(runtime, "c-1", "contacted", at=T0)  # back from the pool
    fire(runtime, "c-1", "contacted", at=T0)  # no move, no row
    assert history(runtime) == [
        ("applied", "contacted", "event:contacted"),
        ("contacted", "interviewing", "event:interview_scheduled"),
        ("interviewing", "final", "event:final_interview"),
        ("final", "talent_pool", "event:moved_to_talent_pool"),
        ("talent_pool", "contacted", "event:contacted"),
    ]
    with Session(runtime.engine) as session:
        changes = session.scalars(select(StageChange)).all()
        assert all(change.event_id is not None for change in changes)


def test_talent_pool_event_carries_the_configured_recontact_date(runtime: Runtime) -> None:
    add_candidate(runtime)
    fire(runtime, "c-1", "moved_to_talent_pool", at=T0)
    with Session(runtime.engine) as session:
        candidate = session.scalars(select(Candidate)).one()
        assert (candidate.stage, candidate.recontact_at) == ("talent_pool", T0 + timedelta(days=90))


# -- tags ------------------------------------------------------------------------------------------------------


def test_tags_are_dimension_value_with_a_lowercase_dimension() -> None:
    assert check_tag_list(["stack:java", " status:passive ", "stack:java"]) == ["stack:java", "status:passive"]
    for bad, words in [
        ("java", "dimension:value"),
        ("Stack:java", "lowercase"),
        ("stack:", "value"),
        ("stack:ja va", "value"),
        ("1stack:java", "lowercase"),
    ]:
        with pytest.raises(ValidationError) as caught:
            check_tag_list(["ok:1", bad])
        assert caught.value.field == "tags.1" and words in caught.value.message, bad
    with pytest.raises(ValidationError):
        check_tag_list([])


@pytest.mark.parametrize(
    ("reason", "tag"),
    [
        ("salary", "salary"),
        ("Salary below expectations", "salary"),
        ("counter offer from current employer", "counter_offer"),
        ("Role fit", "role_fit"),
        ("moving abroad", "other"),
        ("", None),
        (None, None),
    ],
)
def test_decline_reasons_map_to_the_known_list(reason: str | None, tag: str | None) -> None:
    assert decline_reason(reason) == tag


def test_offer_declined_adds_the_known_reason_tag(runtime: Runtime) -> None:
    add_candidate(runtime, tags=["stack:python", "decline_reason:timing"])
    fire(runtime, "c-1", "offer_declined", at=T0, reason="location")
    with Session(runtime.engine) as session:
        candidate = session.scalars(select(Candidate)).one()
        assert candidate.tags == ["stack:python", "decline_reason:location"]  # single-valued: replaced


# -- campaigns by intent ---------------------------------------------------------------------------------------


def set_intent(runtime: Runtime, scores: Sequence[int], external_id: str = "c-1") -> str:
    with Session(runtime.engine) as session, session.begin():
        candidate = session.scalars(select(Candidate).where(Candidate.external_id == external_id)).one()
        assessment = assess(session, candidate, dict(zip(DEFAULT_DIMENSIONS, scores, strict=True)), SPEC, by="test")
        return assessment.level


def rows(runtime: Runtime) -> list[OutboundMessage]:
    with Session(runtime.engine) as session:
        return list(session.scalars(select(OutboundMessage).order_by(OutboundMessage.created_at)))


def test_high_intent_candidate_gets_the_fast_personal_followup(runtime: Runtime, sandbox: SandboxServer) -> None:
    add_candidate(runtime, name="Alex Morgan")
    add_job(runtime, title="Backend Engineer")
    assert set_intent(runtime, (5, 4, 4)) == "high"
    enrolled = fire(runtime, "c-1", "offer_extended", at=T0, job="j-1")
    assert sorted(e.campaign for e in enrolled) == ["offer_followup", "offer_followup_priority"]
    runtime.scheduler.tick(T0 + timedelta(hours=23))
    assert rows(runtime) == []
    runtime.scheduler.tick(T0 + timedelta(days=1))
    (personal,) = rows(runtime)
    assert (personal.campaign, personal.template, personal.status) == (
        "offer_followup_priority",
        "offer_followup_personal",
        MessageStatus.PENDING.value,
    )
    assert deliver(runtime, personal.id).status == "sent"
    (mail,) = sandbox.wait_for(1, timeout=5)
    assert "Alex" in mail.text and "Backend Engineer" in mail.subject
    assert "future manager" in mail.text
    runtime.scheduler.tick(T0 + timedelta(days=3))  # the standard check-in and the alert still follow
    assert [m.template for m in rows(runtime)] == ["offer_followup_personal", "offer_followup"]


def test_medium_and_unassessed_candidates_wait_for_the_standard_followup(runtime: Runtime) -> None:
    add_candidate(runtime, "medium")
    add_candidate(runtime, "unknown")
    set_intent(runtime, (3, 3, 4), "medium")
    for name in ("medium", "unknown"):
        assert [e.campaign for e in fire(runtime, name, "offer_extended", at=T0)] == ["offer_followup"]


def test_a_reassessment_before_the_step_is_due_counts(runtime: Runtime) -> None:
    add_candidate(runtime)
    set_intent(runtime, (5, 5, 4))
    fire(runtime, "c-1", "offer_extended", at=T0)
    assert set_intent(runtime, (2, 3, 2)) == "low"
    runtime.scheduler.tick(T0 + timedelta(days=1))
    (skipped,) = rows(runtime)
    assert (skipped.template, skipped.status, skipped.rule) == ("offer_followup_personal", "skipped", "intent")
    assert skipped.reason == "step is for high intent; candidate is low"


def test_low_intent_applicants_get_no_sms_reminder(runtime: Runtime) -> None:
    add_candidate(runtime, "low")
    add_candidate(runtime, "high")
    add_job(runtime)
    set_intent(runtime, (1, 2, 2), "low")
    set_intent(runtime, (4, 4, 4), "high")
    for name in ("low", "high"):
        fire(runtime, name, "applied", at=T0, job="j-1")
    runtime.scheduler.tick(T0 + timedelta(days=2, minutes=5))
    with Session(runtime.engine) as session:
        reminders = dict(
            session.execute(
                select(Candidate.external_id, OutboundMessage.status)
                .join(Candidate, Candidate.id == OutboundMessage.candidate_id)
                .where(OutboundMessage.template == "jd_reminder")
            ).all()
        )
    assert reminders == {"low": "skipped", "high": "pending"}


# -- re-activation ---------------------------------------------------------------------------------------------


def capped_policy(runtime: Runtime) -> PolicyEngine:
    caps = (CapSpec(name="nurture_60d", max=1, per=timedelta(days=60), categories=(Category.NURTURE,)),)
    return PolicyEngine(runtime.policy.spec.model_copy(update={"caps": caps}), runtime.settings)


def test_the_job_opened_event_goes_through_reactivation(runtime: Runtime) -> None:
    add_job(runtime, "j-9", tags=["stack:java"])
    add_candidate(runtime, "fit", tags=["stack:java"], nurture_consent=True, stage="talent_pool")
    add_candidate(runtime, "opted-out", tags=["stack:java"], nurture_consent=True, stage="talent_pool")
    add_candidate(runtime, "too-soon", tags=["stack:java"], nurture_consent=True, stage="declined")
    with Session(runtime.engine) as session, session.begin():
        session.add(Suppression(channel="email", address="opted-out@example.org", reason="unsubscribe"))
        session.execute(
            update(Candidate).where(Candidate.external_id == "too-soon").values(recontact_at=T0 + timedelta(days=9))
        )
    assert [e.campaign for e in fire(runtime, "fit", "job_opened", at=T0, job="j-9")] == ["job_reactivation"]
    assert fire(runtime, "fit", "job_opened", at=T0, job="j-9") == []  # once per job
    assert fire(runtime, "opted-out", "job_opened", at=T0, job="j-9") == []
    assert fire(runtime, "too-soon", "job_opened", at=T0, job="j-9") == []


def test_reactivation_skips_capped_candidates_and_goes_high_intent_first(runtime: Runtime) -> None:
    job = add_job(runtime, "j-9", tags=["stack:java"])
    for name in ("low", "unassessed", "high", "capped"):
        add_candidate(runtime, name, tags=["stack:java"], nurture_consent=True, stage="talent_pool")
    set_intent(runtime, (1, 1, 2), "low")
    set_intent(runtime, (5, 5, 5), "high")
    with Session(runtime.engine) as session, session.begin():
        capped = session.scalars(select(Candidate).where(Candidate.external_id == "capped")).one()
        session.add(past_nurture_send(capped.id, T0 - timedelta(days=10)))
    policy = capped_policy(runtime)
    with Session(runtime.engine) as session, session.begin():
        result = reactivate(
            session,
            runtime.campaigns,
            session.get_one(Job, job.id),
            company_tz="Asia/Shanghai",
            policy=policy,
            now=T0,
            limit=2,
        )
        chosen = [session.get_one(Candidate, e.candidate_id).external_id for e in result.enrollments]
    assert chosen == ["high", "low"]  # best first (assessed before unassessed); the limit leaves one out
    assert result.summary() == {"selected": 2, "excluded": {"capped": 1, "over_limit": 1}}


def test_record_event_checks_caps_when_given_the_policy(runtime: Runtime) -> None:
    add_job(runtime, "j-9", tags=["stack:java"])
    add_candidate(runtime, "capped", tags=["stack:java"], nurture_consent=True, stage="talent_pool")
    with Session(runtime.engine) as session, session.begin():
        capped = session.scalars(select(Candidate)).one()
        session.add(past_nurture_send(capped.id, T0 - timedelta(days=1), MessageStatus.SENT.value))
    with Session(runtime.engine) as session, session.begin():
        _, enrolled = record_event(
            session,
            runtime.campaigns,
            "capped",
            EventIn(type=EventType.JOB_OPENED, job_id="j-9", occurred_at=T0),
            company_tz="Asia/Shanghai",
            policy=capped_policy(runtime),
        )
    assert enrolled == []
