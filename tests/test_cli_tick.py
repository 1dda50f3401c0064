"""`outreach tick --now` as a time machine, with a broker and a worker process running beside it.

Every pass is judged at its ``--now``: due steps, quiet hours in the candidate's own timezone (across a DST
switch), the daily SMS cap and the business calendar's public holidays. The instants lie both before and after
the day the suite runs. After each pass the printed summary must equal what the outbox says of the rows the pass
wrote or moved, and nothing may be left for the workers (they would judge the sends at their own time).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

import pytest
import redis
from sqlalchemy import select
from sqlalchemy.orm import Session

from outreach.core.models import MessageStatus, OutboundMessage
from outreach.ops.sandbox import SandboxServer
from outreach.service.runtime import Runtime
from tests.conftest import REDIS_URL, ROOT, make_settings, worker_env
from tests.helpers import add_candidate, add_job, fire

pytestmark = [pytest.mark.clock, pytest.mark.slow]

Snapshot = dict[str, tuple[str, str | None, datetime]]


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


class TimeMachine:
    """The service's database, a Redis broker with a ``dramatiq workers.main`` process on it, and the CLI."""

    def __init__(self, database_url: str, sandbox: SandboxServer, queue: str) -> None:
        self.runtime = Runtime(make_settings(database_url), sandbox_url=sandbox.url)
        self.sandbox = sandbox
        self.queue = queue
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("OUTREACH_", "SENDGRID_", "TWILIO_"))},
            "OUTREACH_DATABASE_URL": database_url,
            "OUTREACH_BROKER_URL": REDIS_URL,
            "OUTREACH_QUEUE": queue,
            "OUTREACH_SANDBOX_URL": sandbox.url,
            "OUTREACH_LOG_LEVEL": "WARNING",
            "NO_PROXY": "127.0.0.1,localhost",
        }

    def outbox(self) -> Snapshot:
        with Session(self.runtime.engine) as session:
            found = session.execute(
                select(OutboundMessage.id, OutboundMessage.status, OutboundMessage.rule, OutboundMessage.updated_at)
            )
            return {row.id: (row.status, row.rule, row.updated_at) for row in found}

    def row(self, candidate_external_id: str, template: str) -> OutboundMessage:
        from outreach.core.models import Candidate

        with Session(self.runtime.engine, expire_on_commit=False) as session:
            return session.scalars(
                select(OutboundMessage)
                .join(Candidate, Candidate.id == OutboundMessage.candidate_id)
                .where(Candidate.external_id == candidate_external_id, OutboundMessage.template == template)
                .order_by(OutboundMessage.created_at.desc())
            ).first()  # type: ignore[return-value]

    def tick(self, now: str) -> dict[str, Any]:
        """``outreach tick --now``; checks the summary against the outbox rows the pass wrote or moved."""
        before = self.outbox()
        done = subprocess.run(
            [sys.executable, "-m", "outreach", "tick", "--now", now],
            cwd=ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
        summary: dict[str, Any] = json.loads(done.stdout)
        after = self.outbox()
        touched = {i: state for i, state in after.items() if before.get(i) != state}
        statuses = Counter(status for status, _, _ in touched.values())
        rules = Counter(
            f"{status}:{rule}"
            for status, rule, _ in touched.values()
            if rule and status not in {"sent", "delivered", "pending", "sending"}
        )
        assert summary["messages"] == dict(statuses), (now, summary, touched)
        assert summary["rules"] == dict(rules), (now, summary, touched)
        assert summary["left_for_workers"] == 0
        return summary


@pytest.fixture
def machine(pg_database_url: str, sandbox: SandboxServer) -> Iterator[TimeMachine]:
    queue = f"outreach_tick_{uuid.uuid4().hex[:8]}"
    machine = TimeMachine(pg_database_url, sandbox, queue)
    worker = subprocess.Popen(
        [sys.executable, "-m", "dramatiq", "workers.main", "--processes", "1", "--threads", "2", "--queues", queue],
        cwd=ROOT,
        env=worker_env(pg_database_url, queue, sandbox.url),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield machine
        assert worker.poll() is None, "the worker process died"
        # Nothing reached the broker: every send of every pass was judged (and made) at its --now.
        assert redis.Redis.from_url(REDIS_URL).llen(f"dramatiq:{queue}") == 0
    finally:
        worker.terminate()
        worker.wait(timeout=30)


def test_tick_now_judges_every_send_at_its_instant(machine: TimeMachine) -> None:
    runtime = machine.runtime
    add_job(runtime, "j-1")
    add_job(runtime, "j-2", title="Data Engineer")
    add_candidate(runtime, "c-sh", timezone="Asia/Shanghai", phone="+8613800138000")
    add_candidate(runtime, "c-ny", timezone="America/New_York", phone="+12125550123")
    add_candidate(runtime, "c-pool", timezone="Asia/Shanghai", phone="+8613900139000", nurture_consent=True)
    fire(runtime, "c-pool", "final_interview_failed", at=utc("2026-09-01T02:00:00Z"))
    machine.tick("2026-09-01T02:00:30Z")  # the thank-you note

    # A Shanghai candidate applies at 21:55 on a Tuesday (a time before the suite's own date).
    fire(runtime, "c-sh", "applied", at=utc("2026-09-29T13:55:00Z"), job="j-1")
    assert machine.tick("2026-09-29T13:55:30Z")["messages"] == {"sent": 1}  # the email: any hour
    night = machine.tick("2026-09-29T14:01:00Z")  # the SMS nudge falls due at 22:00 in Shanghai
    assert night["messages"] == {"held": 1} and night["rules"] == {"held:quiet_hours": 1}
    nudge = machine.row("c-sh", "jd_nudge")
    assert utc("2026-09-30T00:00:00Z") <= nudge.not_before <= utc("2026-09-30T00:10:00Z")  # 08:00 + spread
    morning = machine.tick("2026-09-30T00:20:00Z")
    assert morning["messages"] == {"sent": 1} and morning["requeued"] == 1

    # The same candidate applies for a second job at 09:00: the second nudge meets the daily SMS cap.
    fire(runtime, "c-sh", "applied", at=utc("2026-09-30T01:00:00Z"), job="j-2")
    machine.tick("2026-09-30T01:00:30Z")
    capped = machine.tick("2026-09-30T01:06:00Z")
    assert capped["rules"] == {"held:cap:sms_daily": 1}
    second = machine.row("c-sh", "jd_nudge")
    assert second.id != nudge.id and second.not_before >= utc("2026-10-01T00:20:00Z")

    # National Day (1 October, a public holiday in China): the quarterly nurture fires at 10:00 and waits for
    # the first working day; the capped nudge is free again and goes.
    holiday = machine.tick("2026-10-01T02:00:30Z")
    assert "quarterly_nurture" in holiday["fired"]
    assert holiday["messages"] == {"held": 1, "sent": 1}
    nurture = machine.row("c-pool", "quarterly_nurture")
    assert nurture.status == MessageStatus.HELD.value and nurture.rule == "quiet_hours"
    assert nurture.not_before >= utc("2026-10-08T01:00:00Z")  # after the Golden Week, 09:00 in Shanghai

    # New York, on the night its clocks spring forward (a time after the suite's own date): the nudge due at
    # 01:55 EST waits for 08:00 EDT, which is 12:00 UTC, not 13:00.
    fire(runtime, "c-ny", "applied", at=utc("2027-03-14T06:50:00Z"), job="j-1")
    machine.tick("2027-03-14T06:50:30Z")
    dst = machine.tick("2027-03-14T06:59:00Z")
    assert dst["rules"] == {"held:quiet_hours": 1}
    held = machine.row("c-ny", "jd_nudge")
    assert utc("2027-03-14T12:00:00Z") <= held.not_before <= utc("2027-03-14T12:10:00Z")
    assert machine.tick("2027-03-14T12:15:00Z")["messages"] == {"sent": 1}

    sent = Counter(m.to for m in machine.sandbox.messages())
    # Both nudges, then the 2 October reminders the 2027 passes caught up with; the New York nudge.
    assert sent["+8613800138000"] >= 2 and sent["+12125550123"] == 1
    assert sent["c-pool@example.org"] == 1  # the thank-you; the nurture mail still waits for a working day


def test_tick_now_refuses_a_malformed_instant(machine: TimeMachine) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "outreach", "tick", "--now", "next tuesday"],
        cwd=ROOT,
        env=machine.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "--now" in done.stderr and "Traceback" not in done.stderr


def test_summary_counts_follow_the_outbox_not_the_plan(machine: TimeMachine) -> None:
    """A held row released and sent in one later pass is one ``sent``, not a ``queued`` that went nowhere."""
    add_job(machine.runtime, "j-1")
    add_candidate(machine.runtime, "c-1", timezone="Asia/Shanghai")
    at = utc("2026-11-24T14:00:00Z")  # 22:00 in Shanghai
    fire(machine.runtime, "c-1", "applied", at=at, job="j-1")
    machine.tick((at + timedelta(seconds=30)).isoformat())
    assert machine.tick((at + timedelta(minutes=6)).isoformat())["rules"] == {"held:quiet_hours": 1}
    morning = machine.tick((at + timedelta(hours=10, minutes=20)).isoformat())
    assert morning["messages"] == {"sent": 1}
    assert machine.row("c-1", "jd_nudge").status == MessageStatus.SENT.value
