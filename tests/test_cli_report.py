"""``outreach report`` on both databases: the table, JSON and CSV formats carry the analytics figures."""

from __future__ import annotations

import csv
import io
import json
import os

import pytest
from click.testing import CliRunner

from outreach.cli import main
from outreach.service.runtime import Runtime
from tests import synthetic_history as synth


@pytest.fixture
def history(runtime: Runtime) -> synth.History:
    h = synth.generate(seed=7, candidates=150)
    synth.insert_history(runtime.engine, h)
    return h


def run(runtime: Runtime, *args: str, company_timezone: str = "Asia/Shanghai") -> str:
    env = {k: v for k, v in os.environ.items() if k.startswith("OUTREACH_")}
    env = dict.fromkeys(env, None)  # type: ignore[arg-type]
    env.update(
        {
            "OUTREACH_DATABASE_URL": runtime.settings.database_url,
            "OUTREACH_CAMPAIGNS_DIR": str(runtime.settings.campaigns_dir),
            "OUTREACH_TEMPLATES_DIR": str(runtime.settings.templates_dir),
            "OUTREACH_LOG_LEVEL": "WARNING",
            "OUTREACH_COMPANY_TIMEZONE": company_timezone,
        }
    )
    result = CliRunner().invoke(main, ["report", *args], env=env, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


WINDOW = ("--since", synth.START.isoformat(), "--until", synth.NOW.isoformat())


def test_json_and_csv_carry_the_recomputed_figures(runtime: Runtime, history: synth.History) -> None:
    document = json.loads(run(runtime, *WINDOW, "--by", "channel", "--format", "json"))
    want = synth.expected_rates(history, by="channel", since=synth.START, until=synth.NOW)
    assert {row["key"]: row["messages"] for row in document["rates"]} == {
        key: counts["messages"] for (_, key), counts in want.items()
    }
    assert {row["key"]: row["replied"] for row in document["rates"]} == {
        key: counts.get("replied", 0) for (_, key), counts in want.items()
    }
    funnel = synth.expected_funnel(history, synth.START, synth.NOW)
    assert [s["reached"] for s in document["funnel"]["total"]["stages"]] == funnel[None]
    assert {s["name"] for s in document["sla"]} >= {"first_contact", "offer_letter", "decline_note"}

    rows = list(csv.DictReader(io.StringIO(run(runtime, *WINDOW, "--format", "csv"))))
    assert set(rows[0]) == {"section", "group", "period", "metric", "value"}
    total = synth.expected_rates(history, since=synth.START, until=synth.NOW)[(None, None)]
    got = {r["metric"]: r["value"] for r in rows if r["section"] == "rates"}
    assert int(got["messages"]) == total["messages"] and int(got["bounced"]) == total["bounced"]
    assert float(got["delivery_rate"]) == pytest.approx(total["delivered"] / total["messages"])
    reached = {r["metric"]: r["value"] for r in rows if r["section"] == "funnel" and r["group"] == "all"}
    assert [int(reached[f"{stage}.reached"]) for stage in synth.STAGES] == funnel[None]
    assert {r["group"] for r in rows if r["section"] == "sla"} >= {"first_contact", "offer_unanswered_alert"}

    for output in (json.dumps(document), run(runtime, *WINDOW, "--format", "csv")):
        assert synth.CANARY_NAME not in output and synth.CANARY_EMAIL_DOMAIN not in output


def test_table(runtime: Runtime, history: synth.History) -> None:
    text = run(runtime, *WINDOW, "--by", "campaign")
    assert "Rates" in text and "Funnel" in text and "SLAs" in text
    for campaign in synth.CAMPAIGNS:
        assert campaign in text
    assert "first_contact" in text and "linkedin" in text
    assert synth.CANARY_NAME not in text
    weekly = run(runtime, *WINDOW, "--by", "period", "--bucket", "week")
    assert "2026-09-07" in weekly  # a Monday


def test_bad_since_names_the_option(runtime: Runtime) -> None:
    env = {"OUTREACH_DATABASE_URL": runtime.settings.database_url}
    result = CliRunner().invoke(main, ["report", "--since", "yesterday-ish"], env=env)
    assert result.exit_code == 2 and "--since" in result.output
    result = CliRunner().invoke(main, ["report", "--since", "2026-10-02", "--until", "2026-10-01"], env=env)
    assert result.exit_code == 2 and "--until" in result.output
    result = CliRunner().invoke(main, ["report", "--format", "xml"], env=env)
    assert result.exit_code == 2 and "--format" in result.output


def sent_at(runtime: Runtime, *moments: str) -> None:
    """One delivered email per instant (UTC ISO), to one candidate."""
    from datetime import datetime

    from sqlalchemy.orm import Session

    from tests.helpers import add_candidate, past_nurture_send

    candidate = add_candidate(runtime, "month-1")
    with Session(runtime.engine) as session, session.begin():
        for moment in moments:
            session.add(past_nurture_send(candidate.id, datetime.fromisoformat(moment)))


def test_month_buckets_are_the_company_calendar_months(runtime: Runtime) -> None:
    # Shanghai is UTC+8 all year: 16:00 UTC is already the next day there.
    sent_at(
        runtime,
        "2027-12-31T15:59:59+00:00",  # 31 December, 23:59:59 in Shanghai
        "2027-12-31T16:00:00+00:00",  # 1 January 2028, 00:00 in Shanghai: the next year's first month
        "2028-01-31T15:59:59+00:00",  # 31 January (a 31-day month), the last second in Shanghai
        "2028-02-28T23:00:00+00:00",  # 29 February 2028 (a leap year), 07:00 in Shanghai
        "2028-02-29T15:59:59+00:00",  # 29 February, 23:59:59 in Shanghai
        "2028-02-29T16:00:00+00:00",  # 1 March in Shanghai, still 29 February in UTC
        "2028-03-31T15:00:00+00:00",  # 31 March, 23:00 in Shanghai
    )
    window = ("--since", "2027-12-01T00:00:00+08:00", "--until", "2028-04-01T00:00:00+08:00")
    document = json.loads(run(runtime, *window, "--by", "period", "--bucket", "month", "--format", "json"))
    assert [(row["period"], row["messages"]) for row in document["rates"]] == [
        ("2027-12-01", 1),
        ("2028-01-01", 2),
        ("2028-02-01", 2),
        ("2028-03-01", 2),
    ]
    # Another timezone draws the lines elsewhere: UTC keeps 29 February's last hours in February. (No --until:
    # the months run to the last message.)
    since = ("--since", "2027-01-01")
    document = json.loads(run(runtime, *since, "--bucket", "month", "--format", "json", company_timezone="UTC"))
    assert [(row["period"], row["messages"]) for row in document["rates"]] == [
        ("2027-12-01", 2),
        ("2028-01-01", 1),
        ("2028-02-01", 3),
        ("2028-03-01", 1),
    ]
    table = run(runtime, *window, "--bucket", "month")
    assert "2028-02-01" in table and "2027-12-01" in table


def test_month_is_offered_and_a_wrong_bucket_named(runtime: Runtime) -> None:
    env = {"OUTREACH_DATABASE_URL": runtime.settings.database_url}
    result = CliRunner().invoke(main, ["report", "--bucket", "fortnight"], env=env)
    assert result.exit_code == 2 and "'day', 'week', 'month'" in result.output
