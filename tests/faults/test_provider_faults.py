"""Issue 7, item 4: provider faults from the sandbox, through the real SDKs.

429 with a reset time, 500, a 30-second hang (longer than the provider timeout), a connection reset before and
after the provider accepted the message, a refused connection, and Twilio's permanent 21211 and 21610. A failure
after the request went out (a read timeout, a reset while waiting for the answer) is ambiguous: the row ends
``uncertain``, is never resent, and is reconciled from the provider's events or alerted to a person. Retries
follow the declared policy: :func:`workers.actors.should_retry` on the actor, the provider's reset time or
:func:`outreach.pipeline.delivery.backoff` for the delay, ``max_retries`` attempts at most; 21610 suppresses the number.

Deliveries run in this process (``deliver`` and the actor's function, one attempt at a time, each retry at the
time the previous attempt asked for); the sandbox and the webhook app are real servers.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator
from datetime import timedelta

import dramatiq
import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from outreach.core.clock import utcnow
from outreach.core.config import Secret, Settings
from outreach.core.models import Alert, MessageStatus, OutboundMessage, Suppression
from outreach.pipeline.delivery import Outcome, deliver
from outreach.pipeline.message_alerts import ALERT_UNCERTAIN
from outreach.pipeline.scheduler import TickResult
from outreach.providers.sendgrid import SendGridProvider
from outreach.service.broker import build_broker, install_broker, installed_broker
from outreach.service.runtime import set_runtime
from tests.faults.conftest import MIXED_CAMPAIGN, Stack, count, seed_enrollments, wait_until

# The actors' module wants a broker installed first (the workers package builds one from the environment).
if installed_broker() is None:
    install_broker(build_broker(Settings()))
from workers.actors import MAX_UNEXPECTED_RETRIES, deliver_message, should_retry

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def stack(make_stack: Callable[..., Stack]) -> Iterator[Stack]:
    stack = make_stack(campaign=MIXED_CAMPAIGN, provider_timeout=2.0, max_retries=3, lease_seconds=30.0)
    set_runtime(stack.runtime)  # the actor function reads the process runtime
    yield stack
    set_runtime(None)


def rows(stack: Stack, candidates: int = 1) -> dict[str, str]:
    """Seed ``candidates`` and run one scheduler pass: {outbox id: channel} of the due email and SMS rows."""
    seed_enrollments(stack.runtime, candidates)
    queued: list[str] = []
    stack.runtime.enqueue_override = queued.extend
    stack.runtime.scheduler.tick()
    stack.runtime.enqueue_override = lambda ids: None
    with Session(stack.engine) as session:
        found = session.execute(select(OutboundMessage.id, OutboundMessage.channel)).all()
    assert sorted(queued) == sorted(i for i, _ in found)
    return {outbox_id: channel for outbox_id, channel in found}


def first(ids: dict[str, str], channel: str) -> str:
    return next(i for i, c in ids.items() if c == channel)


def row(stack: Stack, outbox_id: str) -> OutboundMessage:
    with Session(stack.engine, expire_on_commit=False) as session:
        found = session.get(OutboundMessage, outbox_id)
        assert found is not None
        return found


def retry_when_asked(stack: Stack, outbox_id: str, outcome: Outcome) -> Outcome:
    """Wait until the row's ``not_before`` (the retry time delivery chose) and attempt again."""
    assert outcome.retry_in is not None
    wait = (row(stack, outbox_id).not_before - utcnow()).total_seconds()
    time.sleep(max(wait, 0) + 0.05)
    return deliver(stack.runtime, outbox_id)


@pytest.mark.parametrize("provider", ["sendgrid", "twilio"])
def test_429_waits_for_the_reset_then_sends_once(stack: Stack, provider: str) -> None:
    ids = rows(stack)
    outbox_id = first(ids, "email" if provider == "sendgrid" else "sms")
    stack.sandbox.fail(provider, "429", reset_after=2.0)  # type: ignore[arg-type]

    # The actor turns the provider's wait into dramatiq's Retry, which its retry policy accepts.
    with pytest.raises(dramatiq.Retry) as raised:
        deliver_message(outbox_id)
    delay_ms = raised.value.delay
    assert delay_ms is not None
    assert should_retry(0, raised.value)
    waiting = row(stack, outbox_id)
    assert waiting.status == MessageStatus.PENDING.value and waiting.error_code in {"429", "20429"}
    if provider == "sendgrid":
        # SendGrid's X-RateLimit-Reset (a unix time ~2 s ahead, rounded up) is the wait, not our backoff.
        assert 1000 <= delay_ms <= 3100
    else:
        # Twilio's 20429 carries no reset time: the backoff for the first attempt, 2 s ± 20 %.
        assert 1600 <= delay_ms <= 2400
    # Too early, the row is not claimable: a duplicate wake-up sends nothing.
    assert deliver(stack.runtime, outbox_id).status == "not-pending"
    time.sleep(delay_ms / 1000 + 0.1)
    assert deliver(stack.runtime, outbox_id).status == MessageStatus.SENT.value

    counts = count(stack, [outbox_id], provider=provider, fault="429")
    counts.show(f"429 {provider}")
    assert (counts.sent, counts.duplicated, counts.lost) == (1, 0, 0)


def test_500_is_retried_with_backoff_until_max_retries(stack: Stack) -> None:
    ids = rows(stack)
    outbox_id = first(ids, "email")
    max_retries = stack.settings.max_retries
    stack.sandbox.fail("sendgrid", "500", times=max_retries)

    outcome = deliver(stack.runtime, outbox_id)
    delays = []
    for attempt in range(1, max_retries):
        assert outcome.status == MessageStatus.PENDING.value and outcome.retry_in is not None
        # delivery.backoff: 2^attempt seconds ± 20 %
        assert 0.8 * 2**attempt <= outcome.retry_in <= 1.2 * 2**attempt
        delays.append(round(outcome.retry_in, 2))
        outcome = retry_when_asked(stack, outbox_id, outcome)
    # The last attempt allowed ends the row: failed, with the rule and the provider's status, never sent.
    assert outcome.status == MessageStatus.FAILED.value
    failed = row(stack, outbox_id)
    assert (failed.rule, failed.error_code, failed.attempts) == ("retries", "500", max_retries)
    # The actor's declared policy: provider retries within max_retries (+ margin), database errors 5, others 2.
    assert should_retry(max_retries + MAX_UNEXPECTED_RETRIES - 1, dramatiq.Retry("x"))
    assert not should_retry(max_retries + MAX_UNEXPECTED_RETRIES, dramatiq.Retry("x"))
    assert not should_retry(2, RuntimeError("x"))

    counts = count(stack, [outbox_id], fault="500", delays=delays)
    counts.show("500 until max_retries")
    assert (counts.sent, counts.duplicated, counts.lost, counts.failed) == (0, 0, 0, 1)
    assert stack.sandbox.stats()["sendgrid"]["faults_served"] == {"500": max_retries}


def test_a_30_second_hang_times_out_and_ends_uncertain_not_resent(stack: Stack) -> None:
    """The provider hangs for 30 s (and in the end drops the request). From our side that is a read timeout after
    the request went out, which a provider still working on it looks like too: the timeout ends the wait, the row
    ends ``uncertain`` (never resent) and, with no provider event, the sweep alerts a person once."""
    ids = rows(stack)
    outbox_id = first(ids, "sms")
    stack.sandbox.fail("twilio", "hang", delay=30.0)
    started = time.monotonic()
    outcome = deliver(stack.runtime, outbox_id)
    waited = time.monotonic() - started
    assert outcome == Outcome(MessageStatus.UNCERTAIN.value)
    assert waited < stack.settings.provider_timeout + 3, "the provider timeout did not bound the call"
    uncertain = row(stack, outbox_id)
    assert (uncertain.rule, uncertain.attempts, uncertain.error_code) == ("ambiguous", 1, "ambiguous")
    assert "timed out" in (uncertain.reason or "")
    assert deliver(stack.runtime, outbox_id).status == "not-pending"
    # Let the hung request finish its 30 s: the sandbox accepted nothing, and nothing was sent again.
    wait_until(lambda: time.monotonic() - started > 31, 40, "the hang to end", interval=0.5)
    counts = count(stack, [outbox_id], fault="hang 30 s", first_call_seconds=round(waited, 1))
    counts.show("30 s hang")
    assert (counts.sent, counts.duplicated, counts.lost, counts.uncertain) == (0, 0, 0, 1)


def test_reset_after_the_request_was_sent_ends_uncertain_not_resent(stack: Stack) -> None:
    """The sandbox reads the request and resets the connection without accepting it. The client cannot tell
    that from a reset after accepting (the next test): both rows end ``uncertain``, never resent."""
    ids = rows(stack)
    email, sms = first(ids, "email"), first(ids, "sms")
    stack.sandbox.fail("sendgrid", "reset")
    stack.sandbox.fail("twilio", "reset")
    for outbox_id in (email, sms):
        assert deliver(stack.runtime, outbox_id) == Outcome(MessageStatus.UNCERTAIN.value)
        assert deliver(stack.runtime, outbox_id).status == "not-pending"
    counts = count(stack, fault="reset before accepting")
    counts.show("reset before accepting")
    assert (counts.sent, counts.duplicated, counts.lost, counts.uncertain) == (0, 0, 0, 2)


def test_refused_connection_is_retried_and_sent_once(stack: Stack) -> None:
    """Nothing was sent when the connection could not be opened: that failure alone is retried."""
    ids = rows(stack)
    outbox_id = first(ids, "email")
    reachable = stack.runtime.providers.email
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    stack.runtime.providers.email = SendGridProvider(
        stack.settings.with_overrides(sendgrid_api_key=Secret("SG.faults"), sendgrid_host=f"http://127.0.0.1:{port}")
    )
    outcome = deliver(stack.runtime, outbox_id)
    assert outcome.status == MessageStatus.PENDING.value and outcome.retry_in is not None
    stack.runtime.providers.email = reachable
    assert retry_when_asked(stack, outbox_id, outcome).status == MessageStatus.SENT.value
    counts = count(stack, [outbox_id], fault="connection refused")
    counts.show("connection refused")
    assert (counts.sent, counts.duplicated, counts.lost) == (1, 0, 0)


def test_reset_after_accepting_is_reconciled_from_events_not_resent(stack: Stack) -> None:
    """The provider accepted the message and the connection broke before its answer. The row ends ``uncertain``
    without the provider's message id; the events name our id (SendGrid custom args, the Twilio status callback
    URL) and reconcile it to sent, with the provider's id filled in. Nothing is sent again."""
    ids = rows(stack)
    email, sms = first(ids, "email"), first(ids, "sms")
    stack.sandbox.fail("sendgrid", "accept_reset")
    stack.sandbox.fail("twilio", "accept_reset")
    for outbox_id in (email, sms):
        outcome = deliver(stack.runtime, outbox_id)
        assert outcome == Outcome(MessageStatus.UNCERTAIN.value)
        wait_until(
            lambda i=outbox_id: row(stack, i).status in {"sent", "delivered"},  # type: ignore[misc]
            10,
            "the provider's events",
            interval=0.05,
        )
        assert deliver(stack.runtime, outbox_id).status == "not-pending"
    counts = count(stack, fault="reset after accepting")
    counts.show("reset after accepting (events on time)")
    assert (counts.sent, counts.duplicated, counts.lost, counts.unreconciled) == (2, 0, 0, 0)
    assert all(row(stack, i).provider_message_id for i in (email, sms))
    # Reconciled before the alert window: no alert for a person.
    stack.runtime.scheduler.sweep(utcnow() + timedelta(hours=1), TickResult())
    with Session(stack.engine) as session:
        assert session.scalars(select(Alert).where(Alert.kind == ALERT_UNCERTAIN)).all() == []


@pytest.mark.parametrize("fault", ["slow", "accept_reset"])
def test_ambiguous_failure_is_not_resent_when_events_are_late(make_stack: Callable[..., Stack], fault: str) -> None:
    """As above, but the provider's events are late (or the webhook is down): the retry must still not send
    the message a second time. ``slow`` accepts after 6 s, past the 2 s timeout."""
    stack = make_stack(campaign=MIXED_CAMPAIGN, provider_timeout=2.0, webhooks=False, lease_seconds=30.0)
    ids = rows(stack)
    outbox_id = first(ids, "email")
    stack.sandbox.fail("sendgrid", fault, delay=6.0)
    started = time.monotonic()
    outcome = deliver(stack.runtime, outbox_id)
    if outcome.retry_in is not None:
        retry_when_asked(stack, outbox_id, outcome)
    wait_until(lambda: time.monotonic() - started > 7, 10, "the slow call to end", interval=0.5)
    assert outcome == Outcome(MessageStatus.UNCERTAIN.value)
    assert deliver(stack.runtime, outbox_id).status == "not-pending"
    counts = count(stack, [outbox_id], fault=fault)
    counts.show(f"{fault}, events late")
    assert (counts.sent, counts.duplicated, counts.uncertain) == (1, 0, 1)
    # No event ever comes (the webhook is down): past the window the sweep alerts a person, once.
    later = utcnow() + timedelta(seconds=stack.settings.uncertain_alert_after + 1)
    for _ in range(2):
        stack.runtime.scheduler.sweep(later, TickResult())
    with Session(stack.engine) as session:
        (alert,) = session.scalars(select(Alert).where(Alert.kind == ALERT_UNCERTAIN)).all()
    assert alert.campaign == row(stack, outbox_id).campaign and alert.outbox_id == outbox_id
    assert row(stack, outbox_id).status == MessageStatus.UNCERTAIN.value


def test_twilio_21610_fails_and_suppresses_the_number_21211_does_not(stack: Stack) -> None:
    ids = rows(stack, candidates=3)
    sms_rows = [i for i, c in ids.items() if c == "sms"]
    stack.sandbox.fail("twilio", "21610")
    stack.sandbox.fail("twilio", "21211")
    unsubscribed, invalid, other = sms_rows
    assert deliver(stack.runtime, unsubscribed).status == MessageStatus.FAILED.value
    assert deliver(stack.runtime, invalid).status == MessageStatus.FAILED.value
    assert (row(stack, unsubscribed).rule, row(stack, unsubscribed).error_code) == ("provider", "21610")
    assert row(stack, invalid).error_code == "21211"
    with Session(stack.engine) as session:
        suppressed = session.scalars(select(Suppression.reason).where(Suppression.channel == "sms")).all()
    assert suppressed == ["twilio 21610"]
    # The suppression holds for what is queued next to that number (re-checked right before the provider call).
    again = _queue_again(stack, unsubscribed)
    assert deliver(stack.runtime, again).status == MessageStatus.SUPPRESSED.value
    assert deliver(stack.runtime, other).status == MessageStatus.SENT.value
    counts = count(stack, [unsubscribed, invalid, other, again], fault="21610/21211")
    counts.show("twilio permanent errors")
    assert (counts.sent, counts.duplicated, counts.lost, counts.failed) == (1, 0, 0, 2)


def _queue_again(stack: Stack, outbox_id: str) -> str:
    """A new pending SMS row to the same candidate (as a later step would be)."""
    original = row(stack, outbox_id)
    now = utcnow()
    with Session(stack.engine) as session, session.begin():
        copy = OutboundMessage(
            candidate_id=original.candidate_id,
            enrollment_id=original.enrollment_id,
            campaign=original.campaign,
            step=original.step + 1,
            channel=original.channel,
            template=original.template,
            category=original.category,
            status=MessageStatus.PENDING.value,
            not_before=now - timedelta(seconds=1),
            enqueued_at=now,
            attempts=0,
            created_at=now,
            updated_at=now,
        )
        session.add(copy)
        session.flush()
        return copy.id
