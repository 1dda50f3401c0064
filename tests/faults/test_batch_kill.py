"""A worker SIGKILLed in the middle of a SendGrid batch: nothing lost, nothing sent twice.

One batch message carries the nurture emails of two renderings (English and Chinese: two SendGrid requests). The
sandbox hangs the first request and the worker process is SIGKILLed while it waits. The first request's rows were
handed off (the call may have reached SendGrid): the sweeper makes them ``uncertain`` after the lease, never
resent. The second request's rows were claimed and never offered to SendGrid: the sweeper puts them back to
``pending`` and a fresh worker sends each exactly once.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from datetime import timedelta

import pytest
from sqlalchemy import insert, select
from sqlalchemy.orm import Session

from outreach.core.clock import utcnow
from outreach.core.models import Candidate, OutboundMessage
from outreach.service.broker import build_broker, enqueue_batch
from tests.faults.conftest import Stack, count, outbox_id_of, scheduler_argv, wait_until, worker_argv

pytestmark = pytest.mark.timeout(120)

#: A nurture campaign whose cron never fires during a test (29 February, 03:00): the test writes the rows itself.
NURTURE_CAMPAIGN = """\
name: fault_intro
description: Fault tests - nurture email sent in SendGrid batches.
category: nurture
trigger:
  cron: "0 3 29 2 *"
  audience:
    stages: [talent_pool]
    require_nurture_consent: true
exit_on: []
steps:
  - channel: email
    template: quarterly_nurture
"""

PER_LOCALE = 6


def _seed(stack: Stack) -> list[str]:
    """``PER_LOCALE`` English and as many Chinese talent-pool candidates, each with a due nurture email row."""
    now = utcnow()
    people = [
        {
            "external_id": f"nb-{locale}-{i}",
            "name": f"Pat{i} Lee",
            "email": f"nb-{locale}-{i}@example.org",
            "locale": locale,
            "timezone": "Asia/Shanghai",
            "tags": [],
            "stage": "talent_pool",
            "nurture_consent": True,
            "data": {},
            "created_at": now,
            "updated_at": now,
        }
        for locale in ("en", "zh-CN")
        for i in range(PER_LOCALE)
    ]
    with Session(stack.runtime.engine, expire_on_commit=False) as session, session.begin():
        session.execute(insert(Candidate), people)
        candidates = session.scalars(select(Candidate).order_by(Candidate.id)).all()
        rows = [
            OutboundMessage(
                candidate_id=candidate.id,
                campaign="fault_intro",
                step=0,
                channel="email",
                template="quarterly_nurture",
                category="nurture",
                not_before=now - timedelta(minutes=1),
                enqueued_at=now,
            )
            for candidate in candidates
        ]
        session.add_all(rows)
        session.flush()
        return [row.id for row in rows]


def _rows(stack: Stack, ids: list[str]) -> dict[str, tuple[str, str | None]]:
    with stack.engine.connect() as connection:
        found = connection.execute(
            select(OutboundMessage.id, OutboundMessage.status, OutboundMessage.rule).where(OutboundMessage.id.in_(ids))
        )
        return {row_id: (status, rule) for row_id, status, rule in found}


def test_a_worker_killed_mid_batch_leaves_unsent_rows_pending_and_sends_each_once(
    make_stack: Callable[..., Stack],
) -> None:
    stack = make_stack(campaign=NURTURE_CAMPAIGN, webhooks=False, lease_seconds=3.0, provider_timeout=30.0)
    ids = _seed(stack)
    stack.sandbox.fail("sendgrid", "hang", delay=15.0)  # the first request hangs, then is dropped unaccepted
    worker = stack.spawn("workers-0", worker_argv(stack.settings.queue_name, 1, 2))
    enqueue_batch(ids, broker=build_broker(stack.settings), queue_name=stack.settings.queue_name)

    def hanging() -> bool:
        return int(stack.sandbox.stats()["sendgrid"]["faults_served"].get("hang", 0)) > 0

    wait_until(hanging, 60, "the first SendGrid request of the batch", interval=0.05, check=stack.check)
    worker.kill()

    at_kill = _rows(stack, ids)
    handed_off = sorted(i for i, (status, rule) in at_kill.items() if (status, rule) == ("sending", None))
    claimed = sorted(i for i, (status, rule) in at_kill.items() if (status, rule) == ("sending", "claimed"))
    # One rendering's request was handed off (it hangs), the other's rows are still only claimed.
    assert (len(handed_off), len(claimed)) == (PER_LOCALE, PER_LOCALE), at_kill
    assert stack.sandbox.messages() == []

    stack.spawn("scheduler", scheduler_argv())  # its sweeper returns the claimed rows once their lease ran out
    stack.spawn("workers-1", worker_argv(stack.settings.queue_name, 1, 2))

    def done() -> bool:
        rows = _rows(stack, ids)
        return all(rows[i][0] == "sent" for i in claimed) and all(rows[i][0] == "uncertain" for i in handed_off)

    wait_until(done, 60, "the claimed rows sent and the handed-off ones uncertain", check=stack.check)
    rows = _rows(stack, ids)
    received = Counter(outbox_id_of(record) for record in stack.sandbox.messages())
    counts = count(stack, only=ids, handed_off=len(handed_off), claimed=len(claimed))
    counts.show("batch kill")
    assert {rows[i] for i in handed_off} == {("uncertain", "lease")}
    assert {rows[i] for i in claimed} == {("sent", None)}
    assert received == Counter(dict.fromkeys(claimed, 1))  # each once; the uncertain ones never resent
    assert (counts.lost, counts.duplicated, counts.uncertain) == (0, 0, PER_LOCALE)
