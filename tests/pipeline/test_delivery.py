"""Delivery through the real SDKs to the sandbox: idempotent claims, retries, permanent failures."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from outreach.core.clock import utcnow
from outreach.core.models import OutboundMessage, Suppression
from outreach.ops.sandbox import SandboxServer
from outreach.pipeline.delivery import deliver
from outreach.service.runtime import Runtime
from tests.helpers import add_candidate, add_job, fire, resolved_links

T0 = datetime(2026, 11, 25, 2, 0, tzinfo=UTC)


def queue_jd_intro(runtime: Runtime, **candidate: object) -> list[OutboundMessage]:
    add_candidate(runtime, **candidate)  # type: ignore[arg-type]
    add_job(runtime)
    fire(runtime, "c-1", "applied", at=T0, job="j-1")
    runtime.scheduler.tick(T0 + timedelta(hours=1))
    with Session(runtime.engine) as session:
        return list(session.scalars(select(OutboundMessage).order_by(OutboundMessage.step)))


def status_of(runtime: Runtime, outbox_id: str) -> OutboundMessage:
    with Session(runtime.engine) as session:
        row = session.get(OutboundMessage, outbox_id)
        assert row is not None
        return row


def test_email_and_sms_reach_the_sandbox_with_opaque_ids_only(runtime: Runtime, sandbox: SandboxServer) -> None:
    email, sms = queue_jd_intro(runtime)
    assert deliver(runtime, email.id).status == "sent"
    assert deliver(runtime, sms.id).status == "sent"
    received = sandbox.wait_for(2, timeout=5)
    by_channel = {m.channel: m for m in received}
    mail = by_channel["email"]
    assert mail.to == "c-1@example.org"
    assert mail.custom_args == {"outreach_id": email.id}
    assert "Backend Engineer" in mail.subject + mail.text
    # jd_intro tracks clicks: the booking link goes through our signed redirect to the real page.
    assert 'href="http://127.0.0.1:9/r/' in mail.html
    assert "https://book.example.com/backend" in resolved_links(runtime, mail.html)
    assert set(mail.categories) <= {"jd_intro"}
    text = by_channel["sms"]
    assert text.to == "+8613800138000"
    assert text.status_callback and text.status_callback.endswith(f"outreach_id={sms.id}")
    row = status_of(runtime, email.id)
    assert (row.status, row.provider, row.locale) == ("sent", "sendgrid", "en")
    assert row.provider_message_id == mail.id
    assert status_of(runtime, sms.id).segments and status_of(runtime, sms.id).provider == "twilio"


def test_same_outbox_id_five_times_at_once_is_one_provider_call(runtime: Runtime, sandbox: SandboxServer) -> None:
    email, _ = queue_jd_intro(runtime)
    barrier = threading.Barrier(5)
    outcomes: list[str] = []

    def go() -> None:
        barrier.wait()
        outcomes.append(deliver(runtime, email.id).status)

    threads = [threading.Thread(target=go) for _ in range(5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes) == ["not-pending"] * 4 + ["sent"]  # every call returned: nothing is still in flight
    assert len([m for m in sandbox.messages() if m.channel == "email"]) == 1


def test_rate_limited_then_sent_once_after_reset(runtime: Runtime, sandbox: SandboxServer) -> None:
    email, _ = queue_jd_intro(runtime)
    sandbox.fail("sendgrid", "429", reset_after=2)
    outcome = deliver(runtime, email.id)
    assert outcome.status == "pending"
    assert outcome.retry_in is not None and 0.5 <= outcome.retry_in <= 3.5
    row = status_of(runtime, email.id)
    assert (row.status, row.error_code) == ("pending", "429")
    assert row.not_before > utcnow()
    assert deliver(runtime, email.id).status == "not-pending"  # too early: the reset has not passed
    assert deliver(runtime, email.id, now=row.not_before + timedelta(milliseconds=1)).status == "sent"
    assert len([m for m in sandbox.messages() if m.channel == "email"]) == 1
    assert status_of(runtime, email.id).attempts == 2


def test_server_error_is_retried_with_backoff(runtime: Runtime, sandbox: SandboxServer) -> None:
    email, _ = queue_jd_intro(runtime)
    sandbox.fail("sendgrid", "500")
    outcome = deliver(runtime, email.id)
    assert outcome.status == "pending" and outcome.retry_in is not None
    assert status_of(runtime, email.id).error_code == "500"


def test_answer_lost_after_sending_ends_uncertain_and_is_not_retried(runtime: Runtime, sandbox: SandboxServer) -> None:
    # The sandbox read the SMS and reset the connection: Twilio may or may not have it.
    _, sms = queue_jd_intro(runtime)
    sandbox.fail("twilio", "accept_reset")
    outcome = deliver(runtime, sms.id)
    assert (outcome.status, outcome.retry_in) == ("uncertain", None)
    row = status_of(runtime, sms.id)
    assert (row.status, row.rule, row.provider, row.attempts) == ("uncertain", "ambiguous", "twilio", 1)
    assert row.reason and "do not resend" in row.reason and "+86" not in row.reason
    assert row.provider_message_id is None and row.lease_until is None
    assert deliver(runtime, sms.id, now=utcnow() + timedelta(hours=1)).status == "not-pending"


def test_retries_are_capped(runtime: Runtime, sandbox: SandboxServer) -> None:
    runtime.settings = runtime.settings.with_overrides(max_retries=2)
    email, _ = queue_jd_intro(runtime)
    sandbox.fail("sendgrid", "500", times=5)
    first = deliver(runtime, email.id)
    second = deliver(runtime, email.id, now=utcnow() + timedelta(seconds=first.retry_in or 0) + timedelta(seconds=1))
    assert second.status == "failed"
    assert status_of(runtime, email.id).rule == "retries"


def test_unsubscribed_number_fails_and_is_suppressed(runtime: Runtime, sandbox: SandboxServer) -> None:
    _, sms = queue_jd_intro(runtime)
    sandbox.fail("twilio", "21610")
    assert deliver(runtime, sms.id).status == "failed"
    row = status_of(runtime, sms.id)
    assert (row.error_code, row.rule, row.provider) == ("21610", "provider", "twilio")
    with Session(runtime.engine) as session:
        suppression = session.scalars(select(Suppression)).one()
        assert (suppression.channel, suppression.address) == ("sms", "+8613800138000")


def test_invalid_number_fails_without_retry(runtime: Runtime, sandbox: SandboxServer) -> None:
    _, sms = queue_jd_intro(runtime)
    sandbox.fail("twilio", "21211")
    outcome = deliver(runtime, sms.id)
    assert (outcome.status, outcome.retry_in) == ("failed", None)
    assert status_of(runtime, sms.id).error_code == "21211"
    with Session(runtime.engine) as session:
        assert session.scalars(select(Suppression)).all() == []


def test_suppressed_address_is_not_sent(runtime: Runtime, sandbox: SandboxServer) -> None:
    email, _ = queue_jd_intro(runtime)
    with Session(runtime.engine) as session, session.begin():
        session.add(Suppression(channel="email", address="c-1@example.org", reason="unsubscribed"))
    assert deliver(runtime, email.id).status == "suppressed"
    row = status_of(runtime, email.id)
    assert (row.rule, row.reason) == ("suppression", "address suppressed: unsubscribed")
    assert sandbox.messages() == []


def test_missing_phone_fails_with_reason(runtime: Runtime, sandbox: SandboxServer) -> None:
    _, sms = queue_jd_intro(runtime, phone=None)
    row = status_of(runtime, sms.id)  # caught when the step was scheduled: never queued
    assert (row.status, row.rule, row.reason) == ("skipped", "address", "candidate has no phone")
    assert deliver(runtime, sms.id).status == "not-pending"
    assert sandbox.messages() == []


def test_exited_enrollment_cancels_a_queued_message(runtime: Runtime, sandbox: SandboxServer) -> None:
    email, _ = queue_jd_intro(runtime)
    from outreach.core.models import Enrollment

    with Session(runtime.engine) as session, session.begin():
        session.execute(update(Enrollment).values(status="exited", exit_reason="stage changed to offer"))
    assert deliver(runtime, email.id).status == "cancelled"
    assert sandbox.messages() == []


def test_chinese_candidate_gets_chinese_messages(runtime: Runtime, sandbox: SandboxServer) -> None:
    email, sms = queue_jd_intro(runtime, name="张伟", locale="zh-CN")
    deliver(runtime, email.id)
    deliver(runtime, sms.id)
    received = {m.channel: m for m in sandbox.wait_for(2, timeout=5)}
    assert "张伟" in received["email"].text
    assert status_of(runtime, email.id).locale == "zh-CN"
    assert status_of(runtime, sms.id).segments is not None


def test_one_send_is_one_transaction_and_two_statements_on_one_connection(
    runtime: Runtime, sandbox: SandboxServer
) -> None:
    """The hot path's shape for a group of one: one pooled connection, the claiming transaction (claim, candidate
    lock with its enrollment and job, rules, tracked links) committed before the provider call, then the hand-off
    and the record, one autocommit update each."""
    from sqlalchemy import event

    email, _ = queue_jd_intro(runtime)
    statements: list[str] = []
    checkouts: list[object] = []
    commits: list[object] = []

    def on_execute(conn: object, cursor: object, statement: str, *args: object) -> None:
        statements.append(statement.split(None, 1)[0].upper())

    def on_checkout(*args: object) -> None:
        checkouts.append(args)

    def on_commit(conn: object) -> None:
        commits.append(conn)

    engine = runtime.engine
    listeners = [(engine, "before_cursor_execute", on_execute), (engine.pool, "checkout", on_checkout)]
    listeners.append((engine, "commit", on_commit))
    for target, name, function in listeners:
        event.listen(target, name, function)
    try:
        assert deliver(runtime, email.id).status == "sent"
    finally:
        for target, name, function in listeners:
            event.remove(target, name, function)
    assert len(checkouts) == 1
    assert len(commits) == 1
    # claim, lock (+ enrollment, job), suppression, caps, tracked links (read + insert), hand-off, the outcome.
    assert statements.count("UPDATE") == 3
    assert len(statements) <= 8, statements
    row = status_of(runtime, email.id)
    assert (row.status, row.rule, row.attempts, row.lease_until) == ("sent", None, 1, None)
    assert sandbox.wait_for(1, timeout=5)[0].custom_args == {"outreach_id": email.id}
