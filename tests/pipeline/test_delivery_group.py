"""Groups of outbox ids delivered together (``deliver_group``): one claim, one candidate lock and one read of the
rules' data per group, a hand-off and one provider request per message, outcomes recorded in bulk; every
guarantee of the single path per row."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import event, select, update
from sqlalchemy.orm import Session

from outreach.core.clock import utcnow
from outreach.core.models import CLAIMED_RULE, Candidate, Enrollment, OutboundMessage, Suppression
from outreach.ops.sandbox import SandboxServer
from outreach.pipeline.delivery import RECORD_EVERY, deliver, deliver_group
from outreach.policy.config import CapSpec, QuietHoursSpec, RateLimitSpec, Window
from outreach.policy.engine import PolicyEngine
from outreach.service.runtime import Runtime
from tests.helpers import add_candidate, add_job, fire

T0 = datetime(2026, 11, 25, 2, 0, tzinfo=UTC)
#: Monday 12:00 in Shanghai (the candidates' timezone), long after the rows were queued.
NOON = datetime(2027, 1, 4, 4, 0, tzinfo=UTC)


def queue(runtime: Runtime, count: int) -> dict[str, list[OutboundMessage]]:
    """``count`` candidates with their jd_intro rows (email, then SMS) queued; by candidate external id."""
    add_job(runtime)
    for index in range(count):
        add_candidate(runtime, f"c-{index}", phone=f"+86138001380{index:02d}")
        fire(runtime, f"c-{index}", "applied", at=T0, job="j-1")
    runtime.scheduler.tick(T0 + timedelta(hours=1))
    with Session(runtime.engine) as session:
        rows = session.execute(
            select(Candidate.external_id, OutboundMessage)
            .join(Candidate, Candidate.id == OutboundMessage.candidate_id)
            .order_by(Candidate.id, OutboundMessage.step)
        )
        by_candidate: dict[str, list[OutboundMessage]] = {}
        for external_id, row in rows:
            by_candidate.setdefault(external_id, []).append(row)
    return by_candidate


def emails(rows: dict[str, list[OutboundMessage]]) -> list[str]:
    return [m.id for ms in rows.values() for m in ms if m.channel == "email"]


def texts(rows: dict[str, list[OutboundMessage]]) -> list[str]:
    return [m.id for ms in rows.values() for m in ms if m.channel == "sms"]


def statuses(runtime: Runtime) -> dict[str, OutboundMessage]:
    with Session(runtime.engine) as session:
        return {row.id: row for row in session.scalars(select(OutboundMessage))}


def received(sandbox: SandboxServer) -> Counter[str]:
    """How many times the sandbox accepted each outbox id."""
    return Counter(
        (m.custom_args or {}).get("outreach_id") or (m.status_callback or "").rpartition("outreach_id=")[2]
        for m in sandbox.messages()
    )


def with_spec(runtime: Runtime, **changes: Any) -> None:
    runtime.policy = PolicyEngine(runtime.policy.spec.model_copy(update=changes), runtime.settings)


@pytest.fixture
def statements(runtime: Runtime) -> Iterator[list[str]]:
    seen: list[str] = []

    def on_execute(conn: object, cursor: object, statement: str, *args: object) -> None:
        seen.append(statement.split(None, 1)[0].upper())

    event.listen(runtime.engine, "before_cursor_execute", on_execute)
    yield seen
    event.remove(runtime.engine, "before_cursor_execute", on_execute)


def test_a_group_is_one_claim_one_lock_and_one_request_per_message(
    runtime: Runtime, sandbox: SandboxServer, statements: list[str]
) -> None:
    ids = emails(queue(runtime, 20))
    statements.clear()
    requests = sandbox.stats()["sendgrid"]["requests"]
    outcomes = deliver_group(runtime, ids)
    assert {outcome.status for outcome in outcomes.values()} == {"sent"}
    assert len({outcome.provider_message_id for outcome in outcomes.values()}) == 20
    assert received(sandbox) == Counter(dict.fromkeys(ids, 1))
    assert sandbox.stats()["sendgrid"]["requests"] == requests + 20
    # claim, lock, suppressions, caps, tracked links (read + one insert), a hand-off per message, the records
    # (PostgreSQL: with the next hand-off, and the last at the end; SQLite: every few sends): a fixed few per
    # group plus one per message, not eight per message.
    records = -(-20 // RECORD_EVERY)
    updates = statements.count("UPDATE") + statements.count("WITH")  # WITH: a hand-off carrying records
    assert 1 + 20 + 1 <= updates <= 1 + 20 + records, statements
    assert len(statements) <= 20 + records + 6, statements
    rows = statuses(runtime)
    for outbox_id in ids:
        row = rows[outbox_id]
        assert (row.status, row.rule, row.attempts, row.lease_until) == ("sent", None, 1, None)
        assert row.provider_message_id == outcomes[outbox_id].provider_message_id
        assert row.subject and row.body and row.locale == "en"
    # A second run of the same group finds nothing to do.
    assert {o.status for o in deliver_group(runtime, ids).values()} == {"not-pending"}
    assert sandbox.stats()["sendgrid"]["requests"] == requests + 20


def test_tracked_links_of_a_group_are_stored_together_and_resolve(runtime: Runtime, sandbox: SandboxServer) -> None:
    from tests.helpers import resolved_links

    ids = emails(queue(runtime, 3))
    deliver_group(runtime, ids)
    mails = {m.custom_args["outreach_id"]: m for m in sandbox.wait_for(3, timeout=5)}
    targets = [resolved_links(runtime, mails[outbox_id].html) for outbox_id in ids]
    assert all("https://book.example.com/backend" in found for found in targets)
    tokens = [mails[outbox_id].html.split('href="http://127.0.0.1:9/r/')[1].split('"')[0] for outbox_id in ids]
    assert len(set(tokens)) == 3  # each message its own link rows


def test_two_rows_of_one_candidate_are_capped_one_after_the_other(runtime: Runtime, sandbox: SandboxServer) -> None:
    with_spec(runtime, caps=(CapSpec(name="one_a_day", max=1, per=timedelta(days=1)),))
    rows = queue(runtime, 2)
    email_0, sms_0 = (m.id for m in rows["c-0"])
    email_1 = rows["c-1"][0].id
    outcomes = deliver_group(runtime, [sms_0, email_1, email_0], now=NOON)
    assert outcomes[email_1].status == "sent"
    # The candidate's rows are counted in id order: the first goes, the second finds the cap used up.
    first, second = sorted((email_0, sms_0))
    assert (outcomes[first].status, outcomes[second].status) == ("sent", "held")
    held = statuses(runtime)[second]
    assert (held.rule, held.sent_at, held.lease_until) == ("cap:one_a_day", None, None)
    assert held.not_before > NOON
    assert received(sandbox) == Counter({first: 1, email_1: 1})


def test_every_rule_refuses_its_own_row_and_the_others_go(runtime: Runtime, sandbox: SandboxServer) -> None:
    rows = queue(runtime, 5)  # written under the open policy: every row pending
    # Then SMS only 20:00-21:00 in the candidate's timezone: at noon every SMS is held until the evening.
    with_spec(
        runtime,
        quiet_hours=QuietHoursSpec(sms=Window.parse("20:00-21:00"), email=runtime.policy.spec.quiet_hours.email),
    )
    with Session(runtime.engine) as session, session.begin():
        session.add(Suppression(channel="email", address="c-1@example.org", reason="unsubscribed"))
        session.add(Suppression(channel="email", address="c-2@example.org", reason="opted out by reply"))
        session.execute(
            update(Enrollment)
            .where(Enrollment.candidate_id == rows["c-3"][0].candidate_id)
            .values(status="exited", exit_reason="stage changed to offer")
        )
        # A nurture email to a candidate who never agreed to nurture messages (or took it back).
        nurture = OutboundMessage(
            candidate_id=rows["c-0"][0].candidate_id,
            campaign="quarterly_nurture",
            step=0,
            channel="email",
            template="quarterly_nurture",
            category="nurture",
            not_before=T0,
        )
        session.add(nurture)
        session.flush()
        nurture_id = nurture.id
    group = [*emails(rows), rows["c-4"][1].id, nurture_id]
    outcomes = deliver_group(runtime, group, now=NOON)
    assert outcomes[nurture_id].status == "suppressed"
    assert outcomes[rows["c-0"][0].id].status == "sent"
    assert outcomes[rows["c-4"][0].id].status == "sent"
    assert outcomes[rows["c-1"][0].id].status == "suppressed"
    assert outcomes[rows["c-2"][0].id].status == "suppressed"
    assert outcomes[rows["c-3"][0].id].status == "cancelled"
    assert outcomes[rows["c-4"][1].id].status == "held"
    after = statuses(runtime)
    assert (after[rows["c-1"][0].id].rule, after[rows["c-1"][0].id].reason) == (
        "suppression",
        "address suppressed: unsubscribed",
    )
    assert after[rows["c-3"][0].id].rule == "exit"
    assert after[nurture_id].rule == "consent"
    assert after[rows["c-4"][1].id].rule == "quiet_hours"
    for row in after.values():
        assert row.status != "sending" and row.rule != CLAIMED_RULE
    assert received(sandbox) == Counter({rows["c-0"][0].id: 1, rows["c-4"][0].id: 1})


def test_overlapping_groups_on_two_threads_send_each_row_once(runtime: Runtime, sandbox: SandboxServer) -> None:
    ids = emails(queue(runtime, 20))
    barrier = threading.Barrier(2)
    results: list[dict[str, Any]] = []
    errors: list[BaseException] = []

    def worker(part: list[str]) -> None:
        try:
            barrier.wait()
            results.append(deliver_group(runtime, part))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(ids[:15],)), threading.Thread(target=worker, args=(ids[5:],))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors
    sent = Counter(i for result in results for i, outcome in result.items() if outcome.status == "sent")
    assert sent == Counter(dict.fromkeys(ids, 1))
    assert received(sandbox) == Counter(dict.fromkeys(ids, 1))
    assert {row.status for row in statuses(runtime).values() if row.id in ids} == {"sent"}


def test_one_row_the_provider_turns_away_is_retried_alone(runtime: Runtime, sandbox: SandboxServer) -> None:
    ids = emails(queue(runtime, 4))
    sandbox.fail("sendgrid", "500")
    outcomes = deliver_group(runtime, ids)
    busy = [i for i, outcome in outcomes.items() if outcome.status == "pending"]
    assert len(busy) == 1 and outcomes[busy[0]].retry_in is not None
    assert sorted(o.status for o in outcomes.values()) == ["pending", "sent", "sent", "sent"]
    row = statuses(runtime)[busy[0]]
    assert (row.status, row.error_code, row.attempts, row.rule) == ("pending", "500", 1, None)
    # Too early for it; then due: sent, and only it.
    assert {o.status for o in deliver_group(runtime, ids).values()} == {"not-pending"}
    later = deliver_group(runtime, ids, now=row.not_before + timedelta(milliseconds=1))
    assert [i for i, o in later.items() if o.status == "sent"] == busy
    assert received(sandbox) == Counter(dict.fromkeys(ids, 1))
    assert statuses(runtime)[busy[0]].attempts == 2


def test_rate_limited_group_waits_for_the_reset_together(runtime: Runtime, sandbox: SandboxServer) -> None:
    ids = emails(queue(runtime, 4))
    sandbox.fail("sendgrid", "429", reset_after=2)
    requests = sandbox.stats()["sendgrid"]["requests"]
    outcomes = deliver_group(runtime, ids)
    assert {o.status for o in outcomes.values()} == {"pending"}
    assert all(o.retry_in is not None and 0.5 <= o.retry_in <= 3.5 for o in outcomes.values())
    # The rest were not offered to a rate-limited account.
    assert sandbox.stats()["sendgrid"]["requests"] == requests + 1
    rows = statuses(runtime)
    assert sorted(rows[i].attempts for i in ids) == [0, 0, 0, 1]
    assert {(rows[i].status, rows[i].rule) for i in ids} == {("pending", None)}
    due = max(rows[i].not_before for i in ids) + timedelta(milliseconds=1)
    assert {o.status for o in deliver_group(runtime, ids, now=due).values()} == {"sent"}
    assert received(sandbox) == Counter(dict.fromkeys(ids, 1))


def test_a_lost_answer_leaves_its_row_uncertain_and_the_others_sent(runtime: Runtime, sandbox: SandboxServer) -> None:
    ids = emails(queue(runtime, 3))
    sandbox.fail("sendgrid", "accept_reset")
    outcomes = deliver_group(runtime, ids)
    assert sorted(o.status for o in outcomes.values()) == ["sent", "sent", "uncertain"]
    lost = next(i for i, o in outcomes.items() if o.status == "uncertain")
    row = statuses(runtime)[lost]
    assert (row.rule, row.attempts, row.lease_until) == ("ambiguous", 1, None)
    assert deliver_group(runtime, ids, now=utcnow() + timedelta(hours=1))[lost].status == "not-pending"
    assert received(sandbox) == Counter(dict.fromkeys(ids, 1))  # the uncertain one did arrive, once


def test_an_unsubscribed_number_fails_and_is_suppressed_the_others_sent(
    runtime: Runtime, sandbox: SandboxServer
) -> None:
    rows = queue(runtime, 3)
    ids = texts(rows)
    sandbox.fail("twilio", "21610")
    outcomes = deliver_group(runtime, ids)
    assert sorted(o.status for o in outcomes.values()) == ["failed", "sent", "sent"]
    refused = next(i for i, o in outcomes.items() if o.status == "failed")
    row = statuses(runtime)[refused]
    assert (row.rule, row.error_code, row.provider) == ("provider", "21610", "twilio")
    index = next(external_id for external_id, ms in rows.items() if refused in {m.id for m in ms})
    with Session(runtime.engine) as session:
        suppressed = session.scalars(select(Suppression)).one()
    assert (suppressed.channel, suppressed.address) == ("sms", f"+86138001380{int(index[2:]):02d}")
    assert sum(received(sandbox).values()) == 2


def test_a_template_error_fails_its_row_and_the_others_go(runtime: Runtime, sandbox: SandboxServer) -> None:
    ids = emails(queue(runtime, 3))
    with Session(runtime.engine) as session, session.begin():
        session.execute(update(OutboundMessage).where(OutboundMessage.id == ids[1]).values(template="no_such"))
    outcomes = deliver_group(runtime, ids)
    assert [outcomes[i].status for i in ids] == ["sent", "failed", "sent"]
    row = statuses(runtime)[ids[1]]
    assert (row.status, row.rule, row.error_code, row.attempts, row.sent_at) == (
        "failed",
        "template",
        "template",
        0,
        None,
    )
    assert received(sandbox) == Counter({ids[0]: 1, ids[2]: 1})


class _BrokenPacer:
    """A pacer whose store is gone (Redis down) the first ``failures`` times it is asked."""

    def __init__(self, failures: int) -> None:
        self.failures = failures

    def book(self, key: str, spec: RateLimitSpec, cost: float = 1.0, max_wait: float = 5.0) -> Any:
        from outreach.policy.pacing import Booking

        if self.failures:
            self.failures -= 1
            raise ConnectionError("pacer store unreachable")
        return Booking(True, 0.0)


def test_an_error_after_the_claim_gives_the_rows_back_then_each_is_sent_once(
    runtime: Runtime, sandbox: SandboxServer
) -> None:
    ids = emails(queue(runtime, 4))
    with_spec(runtime, rate_limits={"sendgrid": RateLimitSpec(per_second=1000, burst=1000)})
    runtime.pacer = _BrokenPacer(failures=1)  # type: ignore[assignment]
    with pytest.raises(ConnectionError):
        deliver_group(runtime, ids)
    rows = statuses(runtime)
    assert {(rows[i].status, rows[i].rule, rows[i].attempts, rows[i].sent_at) for i in ids} == {
        ("pending", None, 0, None)
    }
    assert sandbox.messages() == []
    assert {o.status for o in deliver_group(runtime, ids).values()} == {"sent"}
    assert received(sandbox) == Counter(dict.fromkeys(ids, 1))


def test_a_worker_that_died_after_the_claim_leaves_rows_the_sweeper_returns(
    runtime: Runtime, sandbox: SandboxServer
) -> None:
    from outreach.pipeline import outbox

    ids = emails(queue(runtime, 3))
    lease = timedelta(seconds=runtime.settings.lease_seconds)
    # The claiming transaction committed, then the worker was killed before any hand-off.
    with runtime.engine.connect() as connection, connection.begin():
        assert len(outbox.claim(connection, ids, utcnow(), lease)) == 3
    assert {o.status for o in deliver_group(runtime, ids).values()} == {"not-pending"}  # still claimed
    from outreach.pipeline.scheduler import TickResult

    result = TickResult()
    runtime.scheduler.sweep(utcnow() + lease + timedelta(seconds=1), result)
    assert set(ids) <= set(result.requeued) and result.uncertain == 0
    assert {(r.status, r.rule) for r in statuses(runtime).values() if r.id in ids} == {("pending", None)}
    assert {o.status for o in deliver_group(runtime, ids).values()} == {"sent"}
    assert received(sandbox) == Counter(dict.fromkeys(ids, 1))


def test_deliver_is_a_group_of_one_and_a_repeated_id_goes_once(runtime: Runtime, sandbox: SandboxServer) -> None:
    ids = emails(queue(runtime, 2))
    assert deliver(runtime, ids[0]).status == "sent"
    assert deliver(runtime, ids[0]).status == "not-pending"
    twice = deliver_group(runtime, [ids[1], ids[1]])
    assert list(twice) == [ids[1]] and twice[ids[1]].status == "sent"
    assert deliver_group(runtime, []) == {}
    assert received(sandbox) == Counter(dict.fromkeys(ids, 1))


def test_rows_of_one_candidate_in_concurrent_groups_respect_the_cap(
    pg_runtime: Runtime, sandbox: SandboxServer
) -> None:
    """Two workers, each with a group holding one row of the same candidate: the candidate lock serialises them,
    so the second sees the first's row and holds its own."""
    runtime = pg_runtime
    with_spec(runtime, caps=(CapSpec(name="one_a_day", max=1, per=timedelta(days=1)),))
    rows = queue(runtime, 3)
    email_0, sms_0 = (m.id for m in rows["c-0"])
    others = emails(rows)[1:]
    barrier = threading.Barrier(2)
    results: list[dict[str, Any]] = []

    def worker(group: list[str]) -> None:
        barrier.wait()
        results.append(deliver_group(runtime, group, now=NOON))

    threads = [
        threading.Thread(target=worker, args=([email_0, others[0]],)),
        threading.Thread(target=worker, args=([sms_0, others[1]],)),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    outcome = {i: o.status for result in results for i, o in result.items()}
    assert sorted((outcome[email_0], outcome[sms_0])) == ["held", "sent"]
    assert outcome[others[0]] == outcome[others[1]] == "sent"
    assert sum(received(sandbox).values()) == 3


def test_a_row_a_provider_event_moved_on_keeps_its_status_and_gains_the_send_facts(runtime: Runtime) -> None:
    """The record of a send may come after the provider's own event (it can, the moment the provider accepts):
    the row keeps the event's status; the send's facts are added. On PostgreSQL the record rides with the next
    row's hand-off."""
    from outreach.pipeline import outbox
    from outreach.pipeline.delivery import _Recorder

    ids = emails(queue(runtime, 2))
    now = utcnow()
    lease = timedelta(seconds=runtime.settings.lease_seconds)
    with runtime.engine.connect() as connection, connection.begin():
        assert len(outbox.claim(connection, ids, now, lease)) == 2
    with Session(runtime.engine) as session, session.begin():
        session.execute(
            update(OutboundMessage)
            .where(OutboundMessage.id == ids[0])
            .values(status="delivered", rule=None, attempts=1, delivered_at=now)
        )
    with runtime.engine.connect() as connection:
        connection.execution_options(isolation_level="AUTOCOMMIT")
        recorder = _Recorder(connection, now)
        recorder.rows.append(
            {
                "id": ids[0],
                "provider": "sendgrid",
                "provider_message_id": "pm-0",
                "locale": "en",
                "segments": None,
                "subject": "Subject",
                "body": "Body",
            }
        )
        assert recorder.hand_off(ids[1], now + lease, now) is not None
        assert recorder.hand_off(ids[1], now + lease, now) is None  # handed off once only
        recorder.flush()
    rows = statuses(runtime)
    first, second = rows[ids[0]], rows[ids[1]]
    assert (first.status, first.provider_message_id, first.subject, first.body) == (
        "delivered",
        "pm-0",
        "Subject",
        "Body",
    )
    assert (second.status, second.rule, second.attempts) == ("sending", None, 1)


def test_the_decision_hook_sees_every_row_of_a_group(runtime: Runtime, sandbox: SandboxServer) -> None:
    """The simulation records deferrals through the engine's decision hook: a group decided from its shared reads
    still shows the hook each row's decision (no special path for an engine that records)."""
    seen: list[tuple[str | None, bool]] = []
    runtime.policy = PolicyEngine(
        runtime.policy.spec,
        runtime.settings,
        on_decision=lambda subject, decision: seen.append((subject.message_id, decision.allowed)),
    )
    ids = emails(queue(runtime, 3))
    seen.clear()
    assert {o.status for o in deliver_group(runtime, ids).values()} == {"sent"}
    assert sorted(seen) == sorted((outbox_id, True) for outbox_id in ids)
    assert received(sandbox) == Counter(dict.fromkeys(ids, 1))
