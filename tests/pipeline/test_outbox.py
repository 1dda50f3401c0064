"""The outbox state machine (outreach.pipeline.outbox): the single path and the batch path make the same transitions.

Both claim with the marker, hand off right before the provider call (counting the attempt there), record, give back
and mark uncertain through the same functions; so a batch worker that stops after its claim leaves rows the sweeper
puts back to ``pending``, exactly as a single send's.
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest

from outreach.core.clock import utcnow
from outreach.ops.sandbox import SandboxServer
from outreach.pipeline import batch, delivery, outbox
from outreach.pipeline.batch import deliver_batch
from outreach.pipeline.delivery import deliver_group
from outreach.service.runtime import Runtime
from tests.pipeline.test_batch import _pool, _rows, _schedule
from tests.pipeline.test_delivery_group import emails, queue, received

#: The transitions both paths must share.
SHARED = ("claim", "hand_off", "record_sent", "give_back")


def _spy(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """Wrap the transitions in ``outreach.pipeline.outbox``; returns the (function, calling module) of every call."""
    calls: list[tuple[str, str]] = []

    def wrap(name: str, real: Callable[..., Any]) -> Callable[..., Any]:
        def recording(*args: Any, **kwargs: Any) -> Any:
            calls.append((name, sys._getframe(1).f_globals["__name__"]))
            return real(*args, **kwargs)

        return recording

    for name in (*SHARED, "fail", "uncertain", "refuse"):
        monkeypatch.setattr(outbox, name, wrap(name, getattr(outbox, name)))
    return calls


def test_both_paths_use_the_outbox_module_and_its_names() -> None:
    assert delivery.outbox is outbox and batch.outbox is outbox
    # What other modules import from delivery is the outbox's own.
    assert delivery.pending_again is outbox.pending_again
    assert delivery.refused is outbox.refused
    assert delivery.STOP_REFUSED is outbox.STOP_REFUSED


def test_batch_and_single_sends_claim_hand_off_record_and_give_back_through_the_same_functions(
    runtime: Runtime, sandbox: SandboxServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = _spy(monkeypatch)
    later = utcnow() + timedelta(hours=1)

    _pool(runtime, 3, zh_every=1000)
    [ids] = _schedule(runtime)
    sandbox.fail("sendgrid", "500")  # transient: the request's rows are given back, their attempt counted
    assert deliver_batch(runtime, ids).retry_in is not None
    assert {(m.status, m.rule, m.attempts) for m in _rows(runtime).values()} == {("pending", None, 1)}
    assert deliver_batch(runtime, ids, now=later).sent == 3
    by_batch = {name for name, caller in calls if caller == "outreach.pipeline.batch"}

    calls.clear()
    singles = [i for i in emails(queue(runtime, 1)) if i not in ids]  # the jd_intro email
    sandbox.fail("sendgrid", "500")
    assert {o.status for o in deliver_group(runtime, singles).values()} == {"pending"}
    assert {o.status for o in deliver_group(runtime, singles, now=later).values()} == {"sent"}
    by_single = {name for name, caller in calls if caller == "outreach.pipeline.delivery"}

    assert set(SHARED) <= by_batch, by_batch
    assert set(SHARED) <= by_single, by_single
    assert received(sandbox) == Counter(dict.fromkeys([*ids, *singles], 1))


def test_a_batch_worker_that_died_after_its_claim_leaves_rows_the_sweeper_returns_to_pending(
    runtime: Runtime, sandbox: SandboxServer
) -> None:
    _pool(runtime, 4, zh_every=1000)
    [ids] = _schedule(runtime)
    now = utcnow()
    # The batch path's claim step commits; the worker is killed before any request (no cleanup runs).
    recipients, stopped = batch._claim_and_check(runtime, ids, now)
    assert (len(recipients), stopped) == (4, 0)
    assert {(m.status, m.rule, m.attempts) for m in _rows(runtime).values()} == {("sending", "claimed", 0)}
    assert deliver_batch(runtime, ids).claimed == 0  # still claimed: a retried message sends nothing

    requeued: list[str] = []
    runtime.enqueue_override = requeued.extend
    lease = timedelta(seconds=runtime.settings.lease_seconds)
    result = runtime.scheduler.tick(now + lease + timedelta(seconds=1))
    assert result.uncertain == 0 and set(ids) <= set(requeued)
    assert {(m.status, m.rule, m.attempts) for m in _rows(runtime).values()} == {("pending", None, 0)}

    outcome = deliver_batch(runtime, ids, now=now + lease + timedelta(seconds=2))
    assert (outcome.sent, outcome.requests) == (4, 1)
    assert deliver_batch(runtime, ids, now=now + 2 * lease).claimed == 0
    assert received(sandbox) == Counter(dict.fromkeys(ids, 1))
    assert {(m.status, m.attempts) for m in _rows(runtime).values()} == {("sent", 1)}


def test_a_batch_stopped_during_a_request_leaves_that_request_uncertain_and_the_rest_pending(
    runtime: Runtime, sandbox: SandboxServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two requests; the worker stops inside the first SendGrid call. Its rows were handed off (they may have
    gone out): ``uncertain`` after the lease, never resent. The second request's rows were never offered: back to
    ``pending`` and sent once."""
    monkeypatch.setattr(batch, "MAX_PERSONALIZATIONS", 2)
    _pool(runtime, 4, zh_every=1000)
    [ids] = _schedule(runtime)
    provider = runtime.providers.email
    posted: list[list[str]] = []

    def stop(payload: dict[str, Any]) -> Any:
        posted.append([p["custom_args"]["outreach_id"] for p in payload["personalizations"]])
        raise SystemExit("worker stopped")

    monkeypatch.setattr(provider, "post", stop)
    now = utcnow()
    with pytest.raises(SystemExit):
        deliver_batch(runtime, ids, now=now)
    [first] = posted
    rest = sorted(set(ids) - set(first))
    assert len(first) == len(rest) == 2
    rows = _rows(runtime)
    assert {(rows[i].status, rows[i].rule, rows[i].attempts) for i in first} == {("sending", None, 1)}
    assert {(rows[i].status, rows[i].rule, rows[i].attempts) for i in rest} == {("pending", None, 0)}
    monkeypatch.undo()

    runtime.enqueue_override = lambda _ids: None
    lease = timedelta(seconds=runtime.settings.lease_seconds)
    result = runtime.scheduler.tick(now + lease + timedelta(seconds=1))
    assert result.uncertain == 2
    outcome = deliver_batch(runtime, ids, now=now + lease + timedelta(seconds=2))
    assert (outcome.claimed, outcome.sent) == (2, 2)
    rows = _rows(runtime)
    assert {(rows[i].status, rows[i].rule) for i in first} == {("uncertain", "lease")}
    assert {rows[i].status for i in rest} == {"sent"}
    assert received(sandbox) == Counter(dict.fromkeys(rest, 1))
