"""The metrics API on both databases: figures equal the ones recomputed from a synthetic history, the ops role
reads every route, and no answer carries the planted canary personal data."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import date, datetime, timedelta

import pytest
from fastapi.testclient import TestClient

from outreach.core.clock import utcnow
from outreach.service.runtime import Runtime
from tests import synthetic_history as synth
from tests.helpers import api_client

FIELDS = ("messages", "delivered", "emails_delivered", "opened", "clicked", "replied", "opted_out", "bounced")
ROUTES = ("/api/v1/metrics", "/api/v1/metrics/funnel", "/api/v1/metrics/sla", "/api/v1/queue", "/api/v1/campaigns")


@pytest.fixture
def ops(runtime: Runtime) -> Iterator[TestClient]:
    with api_client(runtime, role="ops", raise_server_exceptions=False) as client:
        yield client


def no_canary(text: str) -> None:
    assert synth.CANARY_NAME not in text
    assert synth.CANARY_EMAIL_DOMAIN not in text
    assert synth.CANARY_PHONE not in text


def table(items: list[dict[str, object]]) -> dict[tuple[object, object], dict[str, object]]:
    return {
        (date.fromisoformat(str(i["period"])) if i["period"] else None, i["key"]): {f: i[f] for f in FIELDS}
        for i in items
    }


def expected(h: synth.History, **kwargs: object) -> dict[tuple[object, object], dict[str, object]]:
    got = synth.expected_rates(h, **kwargs)  # type: ignore[arg-type]
    return {key: {f: counts.get(f, 0) for f in FIELDS} for key, counts in got.items()}


def test_api_figures_equal_the_recomputed_ones_and_hold_no_personal_data(runtime: Runtime, ops: TestClient) -> None:
    history = synth.generate()
    synth.insert_history(runtime.engine, history)
    since, until = synth.START.isoformat(), synth.NOW.isoformat()
    window = {"since": since, "until": until}

    answer = ops.get("/api/v1/metrics", params=window)
    assert answer.status_code == 200, answer.text
    bounds = {"since": synth.START, "until": synth.NOW}
    assert table(answer.json()["items"]) == expected(history, **bounds)
    for by in ("campaign", "step", "channel", "template", "locale", "source"):
        answer = ops.get("/api/v1/metrics", params={**window, "by": by})
        assert answer.status_code == 200, answer.text
        assert answer.json()["by"] == by
        assert table(answer.json()["items"]) == expected(history, by=by, **bounds), by
        no_canary(answer.text)
    answer = ops.get("/api/v1/metrics", params={**window, "by": "period", "bucket": "week"})
    assert table(answer.json()["items"]) == expected(history, by="period", bucket="week", **bounds)
    inner = {"since": (synth.START + timedelta(days=3)).date().isoformat(), "until": "2026-10-01T12:00:00+02:00"}
    answer = ops.get("/api/v1/metrics", params={**inner, "by": "source", "bucket": "day"})
    assert table(answer.json()["items"]) == expected(
        history,
        by="source",
        bucket="day",
        since=synth.START + timedelta(days=3),
        until=synth.START + timedelta(days=30, hours=10),
    )
    rate = answer.json()["items"][0]
    assert rate["delivery_rate"] == rate["delivered"] / rate["messages"]

    funnel = ops.get("/api/v1/metrics/funnel", params=window).json()
    want = synth.expected_funnel(history, synth.START, synth.NOW)
    assert [s["reached"] for s in funnel["total"]["stages"]] == want[None]
    assert {row["source"]: [s["reached"] for s in row["stages"]] for row in funnel["by_source"]} == {
        k: v for k, v in want.items() if k is not None
    }

    answer = ops.get("/api/v1/metrics/sla", params={**window, "limit": 5})
    now = utcnow()
    want_sla = synth.expected_sla(history, synth.START, synth.NOW, now=now)
    items = answer.json()["items"]
    assert {i["name"]: {k: i[k] for k in ("total", "met", "breached", "pending")} for i in items} == want_sla
    breaches = [b for i in items for b in i["breaches"]]
    assert breaches and all(b["candidate"].startswith("ext-") for b in breaches)
    assert all(len(i["breaches"]) <= 5 for i in items)

    for route in ROUTES:
        answer = ops.get(route, params=window if "metrics" in route else None)
        assert answer.status_code == 200, (route, answer.text)
        no_canary(answer.text)
        assert "Thanks," not in answer.text and "Hello" not in answer.text  # message bodies


def test_every_route_needs_a_key_and_ops_reads_them(runtime: Runtime, ops: TestClient) -> None:
    anonymous = TestClient(ops.app)
    for route in ROUTES:
        assert anonymous.get(route).status_code == 401, route
        assert ops.get(route).status_code == 200, route


def test_queue_and_campaigns(ops: TestClient) -> None:
    queue = ops.get("/api/v1/queue").json()
    assert queue["by_status"]["pending"] == 0 and queue["oldest_due_lag_seconds"] == 0.0
    campaigns = {c["name"]: c for c in ops.get("/api/v1/campaigns").json()["items"]}
    assert {"jd_intro", "offer_followup", "quarterly_nurture"} <= set(campaigns)
    intro = campaigns["jd_intro"]
    assert intro["category"] == "transactional" and intro["trigger"]["event"] == "applied"
    assert [s["channel"] for s in intro["steps"]] == ["email", "sms", "sms"]
    assert intro["steps"][2]["delay_seconds"] == 2 * 86400
    assert campaigns["offer_followup"]["steps"][0]["alert"] == "offer_unanswered"
    assert campaigns["quarterly_nurture"]["trigger"]["cron"]


@pytest.mark.parametrize(
    ("route", "params", "field"),
    [
        ("/api/v1/metrics", {"by": "colour"}, "by"),
        ("/api/v1/metrics", {"bucket": "fortnight"}, "bucket"),
        ("/api/v1/metrics", {"since": "last tuesday"}, "since"),
        ("/api/v1/metrics", {"since": "2026-10-02", "until": "2026-10-01"}, "until"),
        ("/api/v1/metrics/funnel", {"until": "soon"}, "until"),
        ("/api/v1/metrics/sla", {"since": "2026-13-40"}, "since"),
        ("/api/v1/metrics/sla", {"limit": "-1"}, "limit"),
    ],
)
def test_bad_parameters_are_named(ops: TestClient, route: str, params: dict[str, str], field: str) -> None:
    answer = ops.get(route, params=params)
    assert answer.status_code == 422
    assert answer.json()["field"] == field


def test_relative_since(ops: TestClient) -> None:
    answer = ops.get("/api/v1/metrics", params={"since": "7d"}).json()
    since = answer["since"]
    assert abs((utcnow() - timedelta(days=7)) - datetime.fromisoformat(since)) < timedelta(minutes=1)
    assert answer["items"] == [
        {
            "key": None,
            "period": None,
            **dict.fromkeys(FIELDS, 0),
            **dict.fromkeys(
                ("delivery_rate", "open_rate", "click_rate", "reply_rate", "opt_out_rate", "bounce_rate"), None
            ),
        }
    ]
