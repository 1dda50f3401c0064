"""``outreach campaigns simulate``: the real campaigns and policies over a synthetic cohort on a virtual clock."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from datetime import datetime, timedelta
from pathlib import Path

import pytest
import yaml

from outreach.core.clock import current
from outreach.ops.simulate.report import CampaignStats, SimulationReport
from outreach.ops.simulate.run import simulate
from outreach.policy.engine import PolicyEngine
from tests.conftest import ROOT

CAMPAIGNS, TEMPLATES = ROOT / "campaigns", ROOT / "templates"
# Company time: seven weeks before the quarterly nurture's 1 April firing, so it falls inside a 60-day run.
START = datetime(2026, 2, 10)


def run(
    *, candidates: int = 60, days: int = 60, seed: int = 7, workers: int = 1, names: tuple[str, ...] = ()
) -> SimulationReport:
    return simulate(
        CAMPAIGNS, TEMPLATES, names=names, candidates=candidates, days=days, seed=seed, start=START, workers=workers
    )


@pytest.fixture(scope="module")
def report() -> SimulationReport:
    return run()


def campaign(report: SimulationReport, name: str) -> CampaignStats:
    (found,) = [c for c in report.campaigns if c.name == name]
    return found


def test_the_seed_campaigns_send(report: SimulationReport) -> None:
    for name in ("jd_intro", "offer_letter", "decline_followup", "quarterly_nurture"):
        assert campaign(report, name).sent > 0, name
    assert report.overall.sent == sum(c.sent for c in report.campaigns)
    assert report.overall.enrolled == 60
    assert report.life_events["applied"] == 60


def test_nothing_outside_a_window_and_no_cap_exceeded(report: SimulationReport) -> None:
    assert report.outside_window == 0, report.violations
    assert report.cap_violations == 0, report.violations
    assert report.duplicate_sends == 0
    assert report.ok
    # The rules did have work to do: night-time SMS waited for the morning.
    assert any(d.rule == "quiet_hours" and d.campaign == "jd_intro" for d in report.deferrals)


def test_first_contact_and_offer_letter_promises(report: SimulationReport) -> None:
    first_contact, offer_letter = report.promises
    assert first_contact.event == "applied" and first_contact.applicable
    assert first_contact.judged >= 55
    assert first_contact.met >= 0.98 * first_contact.judged
    assert first_contact.longest is not None and first_contact.longest <= timedelta(hours=48)
    assert offer_letter.event == "offer_accepted" and offer_letter.judged > 0


def test_the_table_names_every_campaign_and_the_checks(report: SimulationReport) -> None:
    table = report.render_table()
    for name in report.campaign_names:
        assert name in table
    assert "messages sent outside their window: 0" in table
    assert "frequency-cap violations: 0" in table
    assert "first contact within 48h of application" in table
    assert "all campaigns" in table


def test_the_clock_is_put_back_afterwards() -> None:
    before = current()
    run(candidates=4, days=7, workers=1)
    assert current() is before


def test_same_seed_same_report_whatever_the_number_of_processes() -> None:
    one = run(candidates=24, days=21, workers=1).to_dict()
    two = run(candidates=24, days=21, workers=2).to_dict()
    assert one == two
    other = run(candidates=24, days=21, workers=1, seed=8).to_dict()
    assert other["cohort"] != one["cohort"] or other["campaigns"] != one["campaigns"]


def test_names_restrict_the_run() -> None:
    only = run(candidates=20, days=20, names=("offer_letter",))
    assert only.campaign_names == ("offer_letter",)
    first_contact, offer_letter = only.promises
    assert not first_contact.applicable and offer_letter.applicable
    assert "not simulated" in only.render_table()
    with pytest.raises(ValueError, match="no campaign named nope"):
        run(candidates=5, days=5, names=("nope",))


@pytest.fixture
def weekly_sms_cap(tmp_path: Path) -> Path:
    """The seed campaigns with one more cap: at most one SMS a week (jd_intro's nudge and reminder are 2 days apart)."""
    campaigns = tmp_path / "campaigns"
    shutil.copytree(CAMPAIGNS, campaigns)
    policies = campaigns / "policies.yaml"
    spec = yaml.safe_load(policies.read_text(encoding="utf-8"))
    spec["caps"].append({"name": "sms_weekly", "max": 1, "per": "7d", "channels": ["sms"]})
    policies.write_text(yaml.safe_dump(spec, allow_unicode=True), encoding="utf-8")
    return campaigns


def test_a_cadence_change_shows_up_as_deferrals(weekly_sms_cap: Path) -> None:
    tighter = simulate(weekly_sms_cap, TEMPLATES, candidates=40, days=30, start=START, workers=1)
    assert tighter.ok
    (held,) = [d for d in tighter.deferrals if d.rule == "cap:sms_weekly"]
    assert held.campaign == "jd_intro" and held.messages > 0
    assert held.longest is not None and held.longest > timedelta(days=4)


def test_the_checks_catch_rules_that_let_messages_through(
    weekly_sms_cap: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The report re-checks every send on its own: with quiet hours and caps switched off, it must notice."""

    # Quiet hours and the caps are the engine's outreach rules, on the one-row path and on a group's shared reads.
    monkeypatch.setattr(PolicyEngine, "_outreach_rules", property(lambda self: []))
    broken = simulate(weekly_sms_cap, TEMPLATES, candidates=40, days=30, start=START, workers=1)
    assert broken.outside_window > 0
    assert broken.cap_violations > 0
    assert not broken.ok
    assert {v.kind for v in broken.violations} >= {"outside_window"}
    assert "FAILED" in broken.render_table()


@pytest.mark.slow
def test_cli_prints_json_and_exits_zero() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OUTREACH_", "SENDGRID_", "TWILIO_"))}
    env["OUTREACH_LOG_LEVEL"] = "WARNING"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "outreach",
            "campaigns",
            "simulate",
            *("--candidates", "30", "--days", "30"),
            "--format",
            "json",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["parameters"]["candidates"] == 30
    assert data["checks"] == {"outside_window": 0, "cap_violations": 0, "duplicate_sends": 0, "ok": True}
    assert data["overall"]["sent"] > 0
