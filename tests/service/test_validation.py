"""Campaigns checked against templates: what ``outreach campaigns validate`` and start-up report."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from outreach.core.errors import Problem
from outreach.domain.campaigns import load_campaigns
from outreach.domain.render import Renderer
from outreach.service.validation import check_templates, validate_all

ROOT = Path(__file__).resolve().parents[2]
TEMPLATES = ROOT / "templates"
CAMPAIGNS = ROOT / "campaigns"


@pytest.fixture
def seeds(tmp_path: Path) -> tuple[Path, Path]:
    """Copies of the seed campaigns and templates that a test may break."""
    campaigns = tmp_path / "campaigns"
    templates = tmp_path / "templates"
    shutil.copytree(CAMPAIGNS, campaigns)
    shutil.copytree(TEMPLATES, templates)
    return campaigns, templates


def line_of(path: Path, needle: str) -> int:
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if needle in line:
            return number
    raise AssertionError(f"{needle!r} not in {path}")


def only(problems: list[Problem]) -> Problem:
    assert len(problems) == 1, "\n".join(map(str, problems))
    return problems[0]


def test_seed_campaigns_validate_clean() -> None:
    campaigns, problems = validate_all(CAMPAIGNS, TEMPLATES)
    assert problems == []
    assert campaigns is not None
    assert sorted(c.name for c in campaigns) == [
        "decline_followup",
        "final_thanks",
        "jd_intro",
        "job_reactivation",
        "offer_followup",
        "offer_followup_priority",
        "offer_letter",
        "quarterly_nurture",
    ]
    assert check_templates(campaigns, Renderer(TEMPLATES)) == []


def test_missing_template_names_file_line_and_field(seeds: tuple[Path, Path]) -> None:
    campaigns_dir, templates_dir = seeds
    path = campaigns_dir / "offer_letter.yaml"
    path.write_text(path.read_text().replace("template: offer_letter", "template: offer_leter"))
    campaigns, problems = validate_all(campaigns_dir, templates_dir)
    assert campaigns is not None
    problem = only(problems)
    assert problem.file == str(path)
    assert problem.line == line_of(path, "template: offer_leter")
    assert problem.field == "steps[0].template"
    assert "no email template named 'offer_leter'" in problem.message
    assert "email/offer_leter.en.subject.txt" in problem.message
    assert f"{path}:{problem.line}: steps[0].template:" in str(problem)


def test_wrong_channel_is_a_missing_template(seeds: tuple[Path, Path]) -> None:
    campaigns_dir, templates_dir = seeds
    path = campaigns_dir / "jd_intro.yaml"
    path.write_text(path.read_text().replace("template: jd_nudge", "template: jd_intro", 1))
    _, problems = validate_all(campaigns_dir, templates_dir)
    problem = only(problems)
    assert problem.field == "steps[1].template"
    assert problem.line == line_of(path, "delay: 5m") - 1
    assert "no sms template named 'jd_intro'" in problem.message
    assert "sms/jd_intro.en.txt" in problem.message


def test_unknown_variable_is_a_problem(seeds: tuple[Path, Path]) -> None:
    campaigns_dir, templates_dir = seeds
    sms = templates_dir / "sms" / "jd_reminder.zh-CN.txt"
    sms.write_text(sms.read_text() + "\n招聘顾问：{{ recruiter.name }}\n")
    _, problems = validate_all(campaigns_dir, templates_dir)
    problem = only(problems)
    assert problem.file == str(campaigns_dir / "jd_intro.yaml")
    assert problem.field == "steps[2].template"
    assert problem.line == line_of(campaigns_dir / "jd_intro.yaml", "template: jd_reminder")
    assert "'recruiter'" in problem.message
    assert "(zh-CN)" in problem.message
    assert "sms/jd_reminder.zh-CN.txt line" in problem.message


def test_syntax_error_in_a_partial_is_reported_for_every_step_using_it(seeds: tuple[Path, Path]) -> None:
    campaigns_dir, templates_dir = seeds
    (templates_dir / "partials" / "signature.en.txt").write_text("Warm regards,\n{{ company.name \n")
    _, problems = validate_all(campaigns_dir, templates_dir)
    email_steps = sum(
        1 for campaign in load_campaigns(campaigns_dir) for step in campaign.steps if step.channel == "email"
    )
    assert len(problems) == email_steps
    assert all("syntax error at partials/signature.en.txt line" in p.message for p in problems)


def test_cron_campaign_template_that_needs_a_job_is_a_problem(seeds: tuple[Path, Path]) -> None:
    campaigns_dir, templates_dir = seeds
    text = templates_dir / "email" / "quarterly_nurture.en.txt"
    text.write_text(text.read_text().replace("Thanks for staying in touch.", "Still hiring: {{ job.title }}."))
    _, problems = validate_all(campaigns_dir, templates_dir)
    problem = only(problems)
    assert problem.file == str(campaigns_dir / "quarterly_nurture.yaml")
    assert problem.field == "steps[0].template"
    assert "no event and no job" in problem.message
    assert "cron" in problem.message


def test_job_used_without_guard_where_the_event_may_have_no_job(seeds: tuple[Path, Path]) -> None:
    campaigns_dir, templates_dir = seeds
    html = templates_dir / "email" / "final_thanks.en.html"
    html.write_text(html.read_text().replace("{% block content %}", "{% block content %}<p>{{ job.title }}</p>"))
    _, problems = validate_all(campaigns_dir, templates_dir)
    problem = only(problems)
    assert problem.file == str(campaigns_dir / "final_thanks.yaml")
    assert "final_interview_failed event may come without a job" in problem.message
    assert "{% if job %}" in problem.message


def test_job_is_fine_for_job_bound_triggers(seeds: tuple[Path, Path]) -> None:
    campaigns_dir, templates_dir = seeds
    for name in ("jd_nudge.en.txt", "jd_nudge.zh-CN.txt"):
        sms = templates_dir / "sms" / name
        sms.write_text(sms.read_text() + "\n{{ job.title }}\n")
    assert validate_all(campaigns_dir, templates_dir)[1] == []


def test_optional_data_used_without_guard_is_a_problem(seeds: tuple[Path, Path]) -> None:
    campaigns_dir, templates_dir = seeds
    text = templates_dir / "email" / "offer_letter.zh-CN.txt"
    text.write_text(text.read_text() + "\n体检地点：{{ event.data.medical_check.place }}\n")
    _, problems = validate_all(campaigns_dir, templates_dir)
    problem = only(problems)
    assert problem.file == str(campaigns_dir / "offer_letter.yaml")
    assert "only the required data" in problem.message
    assert "'medical_check'" in problem.message
    assert "is defined" in problem.message


def test_a_template_reading_an_undeclared_field_names_file_line_and_field(seeds: tuple[Path, Path]) -> None:
    campaigns_dir, templates_dir = seeds
    text = templates_dir / "email" / "offer_letter.en.txt"
    lines = text.read_text().splitlines()
    # Read through a name, as the seed templates do, and guarded: undeclared is undeclared, guard or not.
    lines.insert(1, "{% set d = event.data %}{% if d.wechat_id is defined %}WeChat: {{ d.wechat_id }}{% endif %}")
    text.write_text("\n".join(lines) + "\n")
    _, problems = validate_all(campaigns_dir, templates_dir)
    problem = only(problems)
    assert problem.file == str(campaigns_dir / "offer_letter.yaml")
    assert f"{text}:2 reads event.data.wechat_id" in problem.message
    assert "events.yaml does not declare" in problem.message


def test_declaring_the_field_in_the_contract_is_all_a_template_needs(seeds: tuple[Path, Path]) -> None:
    campaigns_dir, templates_dir = seeds
    contract = campaigns_dir / "events.yaml"
    declared = "    wechat_id: {type: string, example: lina_hr}\n"
    contract.write_text(contract.read_text().replace("    salary:", declared + "    salary:"))
    for locale in ("en", "zh-CN"):
        text = templates_dir / "email" / f"offer_letter.{locale}.txt"
        text.write_text(
            text.read_text() + "\n{% if event.data.wechat_id is defined %}{{ event.data.wechat_id }}{% endif %}\n"
        )
    campaigns, problems = validate_all(campaigns_dir, templates_dir)
    assert problems == []
    assert campaigns is not None and campaigns.events is not None
    assert campaigns.events.declared("offer_accepted", ("wechat_id",))


def test_a_declared_optional_field_read_without_a_guard_is_a_problem(seeds: tuple[Path, Path]) -> None:
    campaigns_dir, templates_dir = seeds
    text = templates_dir / "email" / "offer_letter.en.txt"
    text.write_text(text.read_text() + "\nBring: {{ event.data.documents|join(', ') }}\n")
    problem = only(validate_all(campaigns_dir, templates_dir)[1])
    assert "only the required data" in problem.message and "documents" in problem.message


def test_a_broken_contract_is_reported_alone(seeds: tuple[Path, Path]) -> None:
    campaigns_dir, templates_dir = seeds
    contract = campaigns_dir / "events.yaml"
    contract.write_text(contract.read_text().replace("start_date: {type: date", "start_date: {type: day", 1))
    problem = only(validate_all(campaigns_dir, templates_dir)[1])
    assert problem.file == str(contract)
    assert problem.field == "offer_accepted.data.start_date.type"
    assert problem.line == line_of(contract, "start_date: {type: day")


def test_incomplete_locale_and_missing_default_are_problems(seeds: tuple[Path, Path]) -> None:
    campaigns_dir, templates_dir = seeds
    (templates_dir / "email" / "final_thanks.zh-CN.html").unlink()
    for part in ("subject.txt", "txt", "html"):
        (templates_dir / "email" / f"decline_recontact.en.{part}").unlink()
    _, problems = validate_all(campaigns_dir, templates_dir)
    by_file = {Path(p.file).name: p for p in problems}
    assert len(problems) == 2
    incomplete = by_file["final_thanks.yaml"]
    assert "in zh-CN is incomplete: email/final_thanks.zh-CN.html missing" in incomplete.message
    no_default = by_file["decline_followup.yaml"]
    assert no_default.field == "steps[1].template"
    assert "no version in the default locale en" in no_default.message
    assert no_default.line == line_of(campaigns_dir / "decline_followup.yaml", "template: decline_recontact")


def test_invalid_campaign_files_are_returned_as_problems(seeds: tuple[Path, Path]) -> None:
    campaigns_dir, templates_dir = seeds
    path = campaigns_dir / "final_thanks.yaml"
    path.write_text(path.read_text().replace("category: transactional", "category: marketing"))
    campaigns, problems = validate_all(campaigns_dir, templates_dir)
    assert campaigns is None
    problem = only(problems)
    assert (problem.file, problem.field, problem.line) == (str(path), "category", line_of(path, "category:"))


def test_one_pass_reports_field_errors_and_every_missing_template(seeds: tuple[Path, Path]) -> None:
    campaigns_dir, templates_dir = seeds
    # A file with a field error whose step is readable (its missing template is still named) ...
    broken = campaigns_dir / "final_thanks.yaml"
    broken.write_text(
        broken.read_text()
        .replace("category: transactional", "category: marketing")
        .replace("template: final_thanks", "template: final_thanx")
    )
    # ... one whose only step is unreadable (no follow-on length error) ...
    unreadable = campaigns_dir / "offer_followup.yaml"
    unreadable.write_text(unreadable.read_text().replace("channel: email", "channel: fax"))
    # ... and a valid file naming a missing template: its template is checked all the same.
    missing = campaigns_dir / "offer_letter.yaml"
    missing.write_text(missing.read_text().replace("template: offer_letter", "template: offer_leter"))
    campaigns, problems = validate_all(campaigns_dir, templates_dir)
    assert campaigns is None
    found = [(Path(p.file).name, p.line, p.field) for p in problems]
    assert found == [
        ("final_thanks.yaml", line_of(broken, "category:"), "category"),
        ("final_thanks.yaml", line_of(broken, "template: final_thanx"), "steps[0].template"),
        ("offer_followup.yaml", line_of(unreadable, "channel: fax"), "steps[0].channel"),
        ("offer_letter.yaml", line_of(missing, "template: offer_leter"), "steps[0].template"),
    ]
    assert "no email template named 'final_thanx'" in problems[1].message
    assert "no email template named 'offer_leter'" in problems[3].message
    assert not any("at least 1 item" in str(p) for p in problems)


def test_missing_templates_folder(seeds: tuple[Path, Path], tmp_path: Path) -> None:
    campaigns_dir, _ = seeds
    campaigns, problems = validate_all(campaigns_dir, tmp_path / "nowhere")
    assert campaigns is not None
    assert only(problems).message == "templates folder not found"


def test_validation_leaves_the_real_folders_alone() -> None:
    before = sorted((p, p.stat().st_mtime_ns) for p in [*CAMPAIGNS.rglob("*"), *TEMPLATES.rglob("*")])
    validate_all(CAMPAIGNS, TEMPLATES)
    after = sorted((p, p.stat().st_mtime_ns) for p in [*CAMPAIGNS.rglob("*"), *TEMPLATES.rglob("*")])
    assert before == after
