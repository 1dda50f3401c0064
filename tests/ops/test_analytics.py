"""Analytics on both databases: every figure equals the one recomputed in plain Python from a synthetic history."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import insert
from sqlalchemy.orm import Session

from outreach.core.models import Candidate, OutboundMessage
from outreach.ops import analytics
from outreach.ops.analytics import Dimension, rates
from outreach.service.runtime import Runtime
from tests import synthetic_history as synth

FIELDS = ("messages", "delivered", "emails_delivered", "opened", "clicked", "replied", "opted_out", "bounced")


@pytest.fixture
def history(runtime: Runtime) -> synth.History:
    h = synth.generate()
    synth.insert_history(runtime.engine, h)
    return h


def as_table(rows: list[analytics.RateRow]) -> dict[tuple[object, object], dict[str, int]]:
    return {(r.period, r.key): {f: getattr(r, f) for f in FIELDS} for r in rows}


def expected(h: synth.History, **kwargs: object) -> dict[tuple[object, object], dict[str, int]]:
    table = synth.expected_rates(h, **kwargs)  # type: ignore[arg-type]
    return {key: {f: counts.get(f, 0) for f in FIELDS} for key, counts in table.items()}


def test_history_is_big_and_varied() -> None:
    history = synth.generate()
    counted = synth.counted_messages(history)
    assert len(history.messages) > 3000 and len(counted) > 2500
    assert len({m["campaign"] for m in counted}) == len(synth.CAMPAIGNS)
    assert {e["type"] for e in history.events} >= {"delivered", "opened", "clicked", "bounced", "unsubscribed"}
    assert {i["kind"] for i in history.inbound} >= {"reply", "auto_reply", "opt_out"}


def test_rates_equal_the_recomputed_figures_for_every_dimension(runtime: Runtime, history: synth.History) -> None:
    engine = runtime.engine
    total = rates(engine)
    assert len(total) == 1 and total[0].key is None
    assert as_table(total) == expected(history)
    figures = expected(history)[(None, None)]
    # Distinct per message: the history has several opens and delivery receipts for one message.
    assert figures["opened"] < sum(1 for e in history.events if e["type"] == "opened")
    assert figures["delivered"] < sum(1 for e in history.events if e["type"] == "delivered")
    assert 0 < figures["replied"] < figures["delivered"] < figures["messages"]
    for dimension in ("campaign", "step", "channel", "template", "locale", "source"):
        got = as_table(rates(engine, by=Dimension(dimension)))
        assert got == expected(history, by=dimension), dimension
        assert sum(g["messages"] for g in got.values()) == figures["messages"]
    # By period and over a window.
    since, until = synth.START + timedelta(days=10, hours=5), synth.START + timedelta(days=30)
    for bucket in ("day", "week"):
        got = as_table(rates(engine, since=since, until=until, bucket=bucket))  # type: ignore[arg-type]
        assert got == expected(history, since=since, until=until, bucket=bucket), bucket
    got = as_table(rates(engine, by=Dimension.PERIOD, bucket="week"))
    assert got == expected(history, by="period", bucket="week")
    assert all(period.weekday() == 0 for period, _ in got)  # type: ignore[union-attr]
    got = as_table(rates(engine, by=Dimension.CHANNEL, since=since, until=until, bucket="day"))
    assert got == expected(history, by="channel", since=since, until=until, bucket="day")
    # The rates follow the documented denominators.
    row = rates(engine, by=Dimension.CHANNEL, since=synth.START, until=synth.NOW)[0]
    assert row.key == "email"
    assert row.delivery_rate == row.delivered / row.messages
    assert row.open_rate == row.opened / row.emails_delivered
    assert row.click_rate == row.clicked / row.delivered
    assert row.reply_rate == row.replied / row.delivered
    assert row.opt_out_rate == row.opted_out / row.delivered
    assert row.bounce_rate == row.bounced / row.messages
    data = row.as_dict()
    assert data["delivery_rate"] == row.delivery_rate and data["period"] is None


def test_funnel_and_sla_equal_the_recomputed_figures(runtime: Runtime, history: synth.History) -> None:
    want = synth.expected_funnel(history)
    report = analytics.funnel(runtime.engine)
    assert [s.reached for s in report.total.stages] == want[None]
    assert {row.source: [s.reached for s in row.stages] for row in report.by_source} == {
        k: v for k, v in want.items() if k is not None
    }
    first = report.total.stages[0]
    assert first.dropped == first.reached - report.total.stages[1].reached
    assert report.total.stages[-1].dropped == 0 and report.total.stages[-1].conversion is None
    since, until = synth.START + timedelta(days=7), synth.START + timedelta(days=21)
    windowed = analytics.funnel(runtime.engine, since=since, until=until)
    assert [s.reached for s in windowed.total.stages] == synth.expected_funnel(history, since, until)[None]
    # The SLAs.
    want = synth.expected_sla(history)
    got = {
        r.name: {"total": r.total, "met": r.met, "breached": r.breached, "pending": r.pending}
        for r in analytics.sla(runtime.engine, now=synth.NOW)
    }
    assert got == want
    assert all(counts["total"] > 0 for counts in want.values()), want
    since = synth.START + timedelta(days=20)
    got = {
        r.name: {"total": r.total, "met": r.met, "breached": r.breached, "pending": r.pending}
        for r in analytics.sla(runtime.engine, since=since, now=synth.NOW)
    }
    assert got == synth.expected_sla(history, since=since)


def test_sla_pending_breached_lateness(runtime: Runtime) -> None:
    """One candidate answered in time, one late, one not yet and still inside the window, one never."""
    start = synth.START
    with Session(runtime.engine) as session, session.begin():
        for cid in range(1, 5):
            session.add(Candidate(id=cid, external_id=f"c{cid}", name="N", created_at=start))
        session.flush()
        from outreach.core.models import CandidateEvent

        applied = {1: start, 2: start, 3: start + timedelta(days=9), 4: start}
        for cid, at in applied.items():
            session.add(CandidateEvent(candidate_id=cid, type="applied", occurred_at=at))
        rows = [(1, start + timedelta(hours=47)), (2, start + timedelta(hours=50))]
        session.execute(
            insert(OutboundMessage),
            [
                {
                    "candidate_id": cid,
                    "campaign": "jd_intro",
                    "step": 0,
                    "channel": "email",
                    "template": "jd_intro",
                    "category": "transactional",
                    "status": "sent",
                    "sent_at": at,
                }
                for cid, at in rows
            ],
        )
    now = start + timedelta(days=10)
    (report,) = analytics.sla(runtime.engine, now=now, specs=analytics.SLAS[:1])
    assert (report.total, report.met, report.breached, report.pending) == (4, 1, 2, 1)
    assert report.met_pct == pytest.approx(100 / 3, abs=0.01)
    never = now - (start + timedelta(hours=48))
    assert report.worst_late_seconds == never.total_seconds()
    assert {b.candidate: b.late_seconds for b in report.breaches} == {"c2": 7200.0, "c4": never.total_seconds()}
    assert next(b for b in report.breaches if b.candidate == "c4").done_at is None


def test_queue_depth_and_lag(runtime: Runtime) -> None:
    now = synth.START
    with Session(runtime.engine) as session, session.begin():
        session.add(Candidate(id=1, external_id="c1", name="N"))
        session.flush()
        base = {"candidate_id": 1, "campaign": "c", "channel": "email", "template": "t", "category": "nurture"}
        session.execute(
            insert(OutboundMessage),
            [
                {**base, "step": 0, "status": "pending", "not_before": now - timedelta(seconds=90)},
                {**base, "step": 1, "status": "pending", "not_before": now - timedelta(seconds=5)},
                {**base, "step": 2, "status": "pending", "not_before": now + timedelta(hours=1)},
                {**base, "step": 3, "status": "held", "not_before": now - timedelta(seconds=1)},
                {**base, "step": 4, "status": "sent", "not_before": now - timedelta(days=1)},
            ],
        )
    report = analytics.queue(runtime.engine, now=now)
    assert report.by_status["pending"] == 3 and report.by_status["held"] == 1 and report.by_status["sent"] == 1
    assert report.by_status["failed"] == 0
    assert (report.due_pending, report.held_due, report.oldest_due_lag_seconds) == (2, 1, 90.0)
    empty = analytics.queue(runtime.engine, now=now - timedelta(days=2))
    assert empty.due_pending == 0 and empty.oldest_due_lag_seconds == 0.0
