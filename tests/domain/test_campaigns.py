"""Campaign files: the seeds load, and every mistake is reported with its file, line and field."""

from __future__ import annotations

import shutil
from datetime import timedelta
from pathlib import Path

import pytest

from outreach.core.errors import CampaignError, Problem
from outreach.core.models import Channel, Stage
from outreach.domain.campaigns import (
    Category,
    EventType,
    ExitCondition,
    field_line,
    load_campaign_file,
    load_campaigns,
    parse_duration,
    readable_steps,
    scan_campaigns,
)

ROOT = Path(__file__).resolve().parents[2]
CAMPAIGNS = ROOT / "campaigns"

VALID = """\
name: {name}
category: transactional
trigger:
  event: applied
steps:
  - channel: email
    template: jd_intro
  - channel: sms
    template: jd_nudge
    delay: 5m
"""


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def line_of(path: Path, needle: str) -> int:
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if needle in line:
            return number
    raise AssertionError(f"{needle!r} not in {path}")


def problems_of(path: Path) -> list[Problem]:
    campaign, problems = load_campaign_file(path)
    assert campaign is None
    assert problems
    return problems


def only(problems: list[Problem]) -> Problem:
    assert len(problems) == 1, "\n".join(map(str, problems))
    return problems[0]


# --- the seeds ---------------------------------------------------------------------------------------------


def test_seed_campaigns_load() -> None:
    campaigns = load_campaigns(CAMPAIGNS)
    assert len(campaigns) == 8
    for campaign in campaigns:
        assert campaigns.sources[campaign.name] == CAMPAIGNS / f"{campaign.name}.yaml"
        assert campaign.enabled
        assert campaign.description

    jd = campaigns["jd_intro"]
    assert jd.category is Category.TRANSACTIONAL
    assert jd.trigger.event is EventType.APPLIED
    assert [(s.channel, s.template, s.only_if) for s in jd.steps] == [
        (Channel.EMAIL, "jd_intro", "always"),
        (Channel.SMS, "jd_nudge", "always"),
        (Channel.SMS, "jd_reminder", "no_reply"),
    ]
    assert jd.steps[0].delay == timedelta(0)
    assert timedelta(0) < jd.steps[1].delay <= timedelta(minutes=15)
    assert jd.steps[2].delay == timedelta(days=2)

    followup = campaigns["offer_followup"]
    assert followup.trigger.event is EventType.OFFER_EXTENDED
    (step,) = followup.steps
    assert (step.template, step.delay, step.only_if, step.alert) == (
        "offer_followup",
        timedelta(days=3),
        "no_reply",
        "offer_unanswered",
    )

    priority = campaigns["offer_followup_priority"]
    assert priority.trigger.event is EventType.OFFER_EXTENDED
    assert priority.trigger.audience.intent == ("high",)
    (fast,) = priority.steps
    assert (fast.template, fast.delay, fast.only_if, fast.intent) == (
        "offer_followup_personal",
        timedelta(days=1),
        "no_reply",
        ("high",),
    )
    assert jd.steps[2].intent == ("high", "medium", "unassessed")  # low intent: no SMS reminder

    letter = campaigns["offer_letter"]
    assert letter.trigger.event is EventType.OFFER_ACCEPTED
    assert letter.exit_on == ()
    assert [(s.template, s.delay) for s in letter.steps] == [("offer_letter", timedelta(0))]

    thanks = campaigns["final_thanks"]
    assert thanks.trigger.event is EventType.FINAL_INTERVIEW_FAILED
    assert thanks.exit_on == ()

    decline = campaigns["decline_followup"]
    assert decline.trigger.event is EventType.OFFER_DECLINED
    assert decline.exit_on == (ExitCondition.REPLIED,)
    assert [(s.template, s.delay) for s in decline.steps] == [
        ("decline_thanks", timedelta(0)),
        ("decline_recontact", timedelta(days=182)),
    ]

    nurture_stages = (Stage.DECLINED, Stage.REJECTED, Stage.TALENT_POOL)
    quarterly = campaigns["quarterly_nurture"]
    assert quarterly.category is Category.NURTURE
    assert quarterly.is_cron and quarterly.trigger.cron == "0 10 1 1,4,7,10 *"
    assert quarterly.trigger.audience.stages == nurture_stages
    assert quarterly.trigger.audience.require_nurture_consent
    assert quarterly.exit_on == ()
    assert campaigns.scheduled() == [quarterly]

    reactivation = campaigns["job_reactivation"]
    assert reactivation.category is Category.NURTURE
    assert reactivation.trigger.event is EventType.JOB_OPENED
    assert reactivation.trigger.audience.stages == nurture_stages
    assert reactivation.trigger.audience.match_job_tags
    assert reactivation.trigger.audience.require_nurture_consent
    assert [s.template for s in reactivation.steps] == ["job_reactivation"]

    assert [c.name for c in campaigns.for_event("offer_declined")] == ["decline_followup"]


def test_field_line_points_at_step_templates() -> None:
    path = CAMPAIGNS / "jd_intro.yaml"
    assert field_line(path, ("steps", 2, "template")) == line_of(path, "template: jd_reminder")
    assert field_line(path, ("trigger", "event")) == line_of(path, "event: applied")
    assert field_line(path, ("nothing", "here")) == 1
    assert field_line(path.with_name("missing.yaml"), ("name",)) is None


# --- problems ----------------------------------------------------------------------------------------------


def test_broken_yaml_reports_the_line(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "bad_indent",
        "name: bad_indent\ncategory: transactional\ntrigger:\n  event: applied\n steps:\n  - channel: email\n",
    )
    problem = only(problems_of(path))
    assert (problem.file, problem.line, problem.field) == (str(path), 5, "(yaml)")
    assert problem.message.startswith("invalid YAML")


def test_tab_indentation_reports_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, "tabs", "name: tabs\ncategory: nurture\ntrigger:\n\tevent: applied\n")
    problem = only(problems_of(path))
    assert (problem.line, problem.field) == (4, "(yaml)")


def test_unknown_field(tmp_path: Path) -> None:
    path = write(tmp_path, "extra", VALID.format(name="extra").replace("    delay: 5m", "    delay: 5m\n    dealy: 1h"))
    problem = only(problems_of(path))
    assert (problem.file, problem.line, problem.field) == (str(path), line_of(path, "dealy"), "steps[1].dealy")
    assert problem.message == "unknown field"


def test_bad_enum(tmp_path: Path) -> None:
    path = write(tmp_path, "enum", VALID.format(name="enum").replace("category: transactional", "category: marketing"))
    problem = only(problems_of(path))
    assert (problem.line, problem.field) == (2, "category")
    assert "'transactional' or 'nurture'" in problem.message


def test_bad_event_and_exit_condition(tmp_path: Path) -> None:
    text = VALID.format(name="events").replace("event: applied", "event: applyed") + "exit_on: [replied, bored]\n"
    path = write(tmp_path, "events", text)
    problems = {p.field: p for p in problems_of(path)}
    assert set(problems) == {"trigger.event", "exit_on[1]"}
    assert problems["trigger.event"].line == 4
    assert problems["exit_on[1]"].line == line_of(path, "exit_on")


@pytest.mark.parametrize("delay", ["2 days", "2x", "-1d", "soon", "true"])
def test_bad_duration(tmp_path: Path, delay: str) -> None:
    path = write(tmp_path, "delay", VALID.format(name="delay").replace("delay: 5m", f"delay: {delay}"))
    problem = only(problems_of(path))
    assert (problem.line, problem.field) == (line_of(path, "delay:"), "steps[1].delay")
    assert "duration" in problem.message


@pytest.mark.parametrize(("text", "expected"), [(0, 0), ("90s", 90), ("15m", 900), ("36h", 129600), ("2d", 172800)])
def test_parse_duration(text: object, expected: int) -> None:
    assert parse_duration(text) == timedelta(seconds=expected)


@pytest.mark.parametrize("cron", ["every monday", "0 10 * *", "61 10 * * *", "0 10 1 13 *"])
def test_bad_cron(tmp_path: Path, cron: str) -> None:
    text = VALID.format(name="cron").replace("  event: applied", f'  cron: "{cron}"')
    path = write(tmp_path, "cron", text)
    problem = only(problems_of(path))
    assert (problem.line, problem.field) == (4, "trigger.cron")
    assert "not a valid cron expression" in problem.message


def test_both_event_and_cron(tmp_path: Path) -> None:
    text = VALID.format(name="both").replace("  event: applied", '  event: applied\n  cron: "0 10 * * 1"')
    path = write(tmp_path, "both", text)
    problem = only(problems_of(path))
    assert (problem.line, problem.field) == (3, "trigger")
    assert "exactly one of `event` or `cron`" in problem.message


def test_neither_event_nor_cron(tmp_path: Path) -> None:
    text = VALID.format(name="neither").replace("  event: applied", "  audience: {stages: [declined]}")
    problem = only(problems_of(write(tmp_path, "neither", text)))
    assert problem.field == "trigger"


def test_name_must_match_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "jd_intro_copy", VALID.format(name="jd_intro"))
    problem = only(problems_of(path))
    assert (problem.file, problem.line, problem.field) == (str(path), 1, "name")
    assert "'jd_intro_copy'" in problem.message


def test_every_problem_of_a_file_is_reported_at_once(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "many",
        """\
name: many
category: marketing
colour: blue
trigger:
  event: applied
steps:
  - channel: email
    template: jd_intro
  - channel: sms
    template: jd_nudge
    delay: 2 days
  - channel: fax
    template: Bad-Name
    only_if: sometimes
    at: "25:00"
""",
    )
    problems = problems_of(path)
    found = {p.field: p.line for p in problems}
    assert found == {
        "category": 2,
        "colour": 3,
        "steps[1].delay": 11,
        "steps[2].channel": 12,
        "steps[2].template": 13,
        "steps[2].only_if": 14,
        "steps[2].at": 15,
    }
    assert all(p.file == str(path) for p in problems)


def test_empty_or_non_mapping_file(tmp_path: Path) -> None:
    for text in ("", "- just\n- a list\n"):
        problem = only(problems_of(write(tmp_path, "odd", text)))
        assert problem.field == "(file)"


def test_steps_are_required(tmp_path: Path) -> None:
    text = "name: nosteps\ncategory: nurture\ntrigger:\n  event: applied\nsteps: []\n"
    problem = only(problems_of(write(tmp_path, "nosteps", text)))
    assert (problem.field, problem.line) == ("steps", 5)


def test_an_invalid_only_step_is_reported_without_a_length_error(tmp_path: Path) -> None:
    # pydantic counts the steps left after dropping the invalid one: "should have at least 1 item … not 0" is noise.
    text = "name: fax\ncategory: nurture\ntrigger:\n  event: applied\nsteps:\n  - channel: fax\n    template: x\n"
    problem = only(problems_of(write(tmp_path, "fax", text)))
    assert (problem.field, problem.line) == ("steps[0].channel", 6)
    assert "at least 1 item" not in str(problem)


def test_readable_steps_of_a_file_with_problems(tmp_path: Path) -> None:
    text = VALID.format(name="readable").replace("transactional", "sometimes").replace("5m", "5 minutes")
    path = write(tmp_path, "readable", text)
    assert [(index, step.template) for index, step in readable_steps(path)] == [(0, "jd_intro")]
    assert readable_steps(write(tmp_path, "junk", "steps: {a: 1}\n")) == []
    assert readable_steps(write(tmp_path, "broken", "steps: [\n")) == []


def test_scan_keeps_the_valid_campaigns_beside_the_problems(tmp_path: Path) -> None:
    write(tmp_path, "good", VALID.format(name="good"))
    bad = write(tmp_path, "bad", VALID.format(name="bad").replace("transactional", "sometimes"))
    scan = scan_campaigns(tmp_path)
    assert [c.name for c in scan.campaigns] == ["good"]
    assert [(p.file, p.field) for p in scan.problems] == [(str(bad), "category")]
    assert [(path, index, step.template) for path, index, step in scan.steps_of_invalid] == [
        (bad, 0, "jd_intro"),
        (bad, 1, "jd_nudge"),
    ]


def test_folder_reports_every_file_and_skips_non_campaigns(tmp_path: Path) -> None:
    folder = tmp_path / "campaigns"
    shutil.copytree(CAMPAIGNS, folder)
    (folder / "policies.yaml").write_text("quiet_hours: nonsense: [\n")
    (folder / "_draft.yaml").write_text("not: [valid\n")
    bad_one = write(folder, "bad_one", VALID.format(name="bad_one").replace("5m", "5 minutes"))
    bad_two = write(folder, "bad_two", VALID.format(name="wrong"))
    with pytest.raises(CampaignError) as info:
        load_campaigns(folder)
    problems = info.value.problems
    assert {(p.file, p.field) for p in problems} == {(str(bad_one), "steps[1].delay"), (str(bad_two), "name")}
    assert str(bad_one) in str(info.value)


def test_duplicate_names_across_extensions(tmp_path: Path) -> None:
    write(tmp_path, "twin", VALID.format(name="twin"))
    (tmp_path / "twin.yml").write_text(VALID.format(name="twin"))
    with pytest.raises(CampaignError, match="duplicate campaign name"):
        load_campaigns(tmp_path)


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(CampaignError, match="campaigns folder not found"):
        load_campaigns(tmp_path / "nowhere")
