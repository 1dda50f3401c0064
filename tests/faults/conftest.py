"""Process helpers for the fault-injection tests: real workers, schedulers, Redis and PostgreSQL.

The service runs as it does in production: ``dramatiq workers.main`` and ``outreach scheduler`` subprocesses on
the real PostgreSQL and Redis, sending through the provider sandbox (in this process, so a test can read the
sandbox's own record and queue faults) and receiving its signed webhooks on the FastAPI app (uvicorn in a
thread of this process). Every test ends by comparing the sandbox's record with the outbox and printing the
counts (:class:`Counts`), so a regression shows as a number.

Sizes can be raised for a longer soak with environment variables (see ``tests/faults/README.md``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import parse_qs, urlsplit

import pytest
import redis
import uvicorn
from sqlalchemy import Engine, Table, func, insert, select
from sqlalchemy.orm import Session

from outreach.core.clock import utcnow
from outreach.core.config import Secret, Settings
from outreach.core.db import get_engine
from outreach.core.models import Base, MessageStatus, OutboundMessage
from outreach.domain.candidates import CandidateIn, JobIn, upsert_candidate, upsert_job
from outreach.ops.sandbox import SandboxMessage, SandboxServer
from outreach.pipeline.enrollment import EventIn, record_event
from outreach.service.runtime import Runtime
from outreach.web import create_app
from outreach.web.webhooks import WebhookSettings
from tests.conftest import REDIS_URL, ROOT, make_settings

TWILIO_TOKEN = "fault-token"
SMS_FROM = "+15005550006"

#: One transactional campaign with an email and an SMS due at once after ``applied``, on the real templates.
MIXED_CAMPAIGN = """\
name: fault_intro
description: Fault tests - the job description by email and an SMS nudge, both at once.
category: transactional
trigger:
  event: applied
exit_on: [stage_changed]
steps:
  - channel: email
    template: jd_intro
  - channel: sms
    template: jd_nudge
"""

EMAIL_CAMPAIGN = """\
name: fault_intro
description: Fault tests - the job description by email at once.
category: transactional
trigger:
  event: applied
exit_on: [stage_changed]
steps:
  - channel: email
    template: jd_intro
"""

#: The real rules with SMS allowed around the clock (the tests run at any hour) and no provider pacing (a long
#: code's 1 SMS a second would make a 1,000-message run take minutes); caps stay as shipped.
POLICIES = """\
quiet_hours:
  sms: "00:00-24:00"
  email:
    nurture: {hours: any}
    transactional: {hours: any}
rate_limits: {}
"""

TERMINAL_OK = (MessageStatus.SENT.value, MessageStatus.DELIVERED.value)
UNFINISHED = (MessageStatus.PENDING.value, MessageStatus.SENDING.value, MessageStatus.HELD.value)


def size(name: str, default: int) -> int:
    """A test size, raised for a soak with ``OUTREACH_FAULTS_<NAME>``."""
    return int(os.environ.get(f"OUTREACH_FAULTS_{name.upper()}", default))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(
    predicate: Callable[[], bool],
    timeout: float,
    what: str,
    *,
    interval: float = 0.2,
    check: Callable[[], None] = lambda: None,
) -> float:
    """Poll ``predicate`` until true; returns the seconds waited. ``check`` raises when a process died."""
    started = time.monotonic()
    while True:
        if predicate():
            return time.monotonic() - started
        check()
        if time.monotonic() - started > timeout:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


# -- campaigns ---------------------------------------------------------------------------------------------


def campaign_dir(path: Path, campaign: str = MIXED_CAMPAIGN) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "fault_intro.yaml").write_text(campaign)
    (path / "policies.yaml").write_text(POLICIES)
    return path


# -- seeding -----------------------------------------------------------------------------------------------

JOB: dict[str, Any] = {
    "external_id": "fault-job",
    "title": "Backend Engineer",
    "department": "Platform",
    "location": "Shanghai",
    "description": "Build the services our recruiters rely on.",
    "booking_url": "https://book.example.com/backend",
    "tags": ["stack:python"],
}
EXEMPLARS: tuple[dict[str, Any], ...] = (
    {"name": "Alex Morgan", "locale": "en", "timezone": "Europe/Berlin"},
    {"name": "Li Wei", "locale": "zh-CN", "timezone": "Asia/Shanghai"},
)


def _phone(index: int) -> str:
    return f"+8613{index:09d}"


def seed_enrollments(runtime: Runtime, count: int) -> None:
    """``count`` candidates, each with an ``applied`` event and a due ``fault_intro`` enrollment (no outbox row).

    Two exemplars go through the real path (upsert, event, enrollment); the rest are bulk copies of their rows,
    so a 10,000-candidate seed takes seconds. The scheduler under test writes the outbox rows.
    """
    settings = runtime.settings
    engine = runtime.engine
    event = EventIn.model_validate(
        {"type": "applied", "job_id": JOB["external_id"], "occurred_at": utcnow() - timedelta(seconds=1)}
    )
    ids: list[int] = []
    with Session(engine, expire_on_commit=False) as session, session.begin():
        upsert_job(session, JobIn.model_validate(JOB))
        for index, fields in enumerate(EXEMPLARS[:count]):
            data = {"external_id": f"f-{index:06d}", "email": f"f-{index:06d}@example.org", "phone": _phone(index)}
            candidate = upsert_candidate(session, CandidateIn.model_validate({**data, **fields}), settings)
            _, enrolled = record_event(
                session, runtime.campaigns, candidate.external_id, event, company_tz=settings.company_timezone
            )
            assert len(enrolled) == 1, "the fault_intro campaign did not enroll the exemplar"
            ids.append(candidate.id)
    tables = {name: Base.metadata.tables[name] for name in ("candidates", "candidate_events", "enrollments")}

    def rows(session: Session, table: Table, column: str) -> dict[Any, dict[str, Any]]:
        found = session.execute(select(table).where(table.c[column].in_(ids))).mappings()
        return {row[column]: {k: v for k, v in row.items() if k != "id"} for row in found}

    def add(session: Session, table: Table, values: list[dict[str, Any]]) -> list[int]:
        statement = insert(table).returning(table.c.id, sort_by_parameter_order=True)
        return list(session.execute(statement, values).scalars())

    with Session(engine) as session, session.begin():
        people = rows(session, tables["candidates"], "id")
        happened = rows(session, tables["candidate_events"], "candidate_id")
        enrolled_rows = rows(session, tables["enrollments"], "candidate_id")
        for start in range(len(EXEMPLARS), count, 5000):
            indexes = range(start, min(count, start + 5000))
            models = [ids[i % len(ids)] for i in indexes]
            new_people = add(
                session,
                tables["candidates"],
                [
                    {**people[m], "external_id": f"f-{i:06d}", "email": f"f-{i:06d}@example.org", "phone": _phone(i)}
                    for i, m in zip(indexes, models, strict=True)
                ],
            )
            new_events = add(
                session,
                tables["candidate_events"],
                [{**happened[m], "candidate_id": c} for m, c in zip(models, new_people, strict=True)],
            )
            add(
                session,
                tables["enrollments"],
                [
                    {**enrolled_rows[m], "candidate_id": c, "event_id": e}
                    for m, c, e in zip(models, new_people, new_events, strict=True)
                ],
            )


# -- processes ---------------------------------------------------------------------------------------------


class Proc:
    """A child process in its own process group, logging to a file; SIGKILLed as a group."""

    def __init__(self, name: str, argv: Sequence[str], env: Mapping[str, str], log_dir: Path) -> None:
        self.name = name
        self.argv = list(argv)
        self.env = dict(env)
        self.log_dir = log_dir
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self._log: TextIO | None = None

    def start(self) -> Proc:
        self.starts += 1
        self._log = (self.log_dir / f"{self.name}.{self.starts}.log").open("w")
        self.process = subprocess.Popen(
            self.argv,
            cwd=ROOT,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        return self

    def kill(self) -> None:
        """SIGKILL the whole group (the dramatiq master and its worker processes) and reap it."""
        process, self.process = self.process, None
        if process is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)
        if self._log is not None:
            self._log.close()
            self._log = None

    def stop(self) -> None:
        """SIGTERM, a short grace period, then SIGKILL."""
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.process.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=10)
        self.kill()

    def check(self) -> None:
        if self.process is not None and self.process.poll() is not None:
            raise AssertionError(f"{self.name} exited with code {self.process.returncode}:\n{self.tail()}")

    def tail(self, lines: int = 40) -> str:
        logs = sorted(self.log_dir.glob(f"{self.name}.*.log"))
        if not logs:
            return "(no log)"
        return "\n".join(logs[-1].read_text(errors="replace").splitlines()[-lines:])


def worker_argv(queue: str, processes: int = 1, threads: int = 4) -> list[str]:
    return [
        sys.executable,
        "-m",
        "dramatiq",
        "workers.main",
        "--processes",
        str(processes),
        "--threads",
        str(threads),
        "--queues",
        queue,
    ]


def scheduler_argv() -> list[str]:
    return [sys.executable, "-m", "outreach", "scheduler"]


def service_env(settings: Settings, sandbox_url: str, **extra: str) -> dict[str, str]:
    """The environment of a worker or scheduler process for ``settings`` (only what the service reads)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OUTREACH_", "SENDGRID_", "TWILIO_", "dramatiq_"))}
    env.update(
        {
            "OUTREACH_DATABASE_URL": settings.database_url,
            "OUTREACH_BROKER_URL": settings.broker_url,
            "OUTREACH_QUEUE": settings.queue_name,
            "OUTREACH_CAMPAIGNS_DIR": str(settings.campaigns_dir),
            "OUTREACH_TEMPLATES_DIR": str(settings.templates_dir),
            "OUTREACH_PUBLIC_URL": settings.public_url,
            "OUTREACH_SECRET_KEY": "fault-tests-secret",
            "SENDGRID_API_KEY": "SG.fault",
            "OUTREACH_SENDGRID_HOST": sandbox_url,
            "TWILIO_ACCOUNT_SID": "AC" + "0" * 32,
            "TWILIO_AUTH_TOKEN": TWILIO_TOKEN,
            "OUTREACH_TWILIO_BASE_URL": sandbox_url,
            "OUTREACH_SMS_FROM": SMS_FROM,
            "OUTREACH_LEASE_SECONDS": str(settings.lease_seconds),
            "OUTREACH_PROVIDER_TIMEOUT": str(settings.provider_timeout),
            "OUTREACH_MAX_RETRIES": str(settings.max_retries),
            "OUTREACH_TICK_INTERVAL": str(settings.tick_interval),
            "OUTREACH_LOG_LEVEL": "WARNING",
            "NO_PROXY": "127.0.0.1,localhost",
            "no_proxy": "127.0.0.1,localhost",
        }
    )
    env.update(extra)
    return env


class WebhookApp:
    """The FastAPI app under uvicorn in a thread: the sandbox posts its signed webhooks here."""

    def __init__(self, runtime: Runtime, sandbox: SandboxServer, port: int) -> None:
        hooks = WebhookSettings(sendgrid_public_key=sandbox.sendgrid_public_key, twilio_auth_token=Secret(TWILIO_TOKEN))
        app = create_app(runtime, hooks)
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False, lifespan="off")
        )
        self.url = f"http://127.0.0.1:{port}"
        self.thread = threading.Thread(target=self.server.run, name="webhook-app", daemon=True)

    def start(self) -> WebhookApp:
        self.thread.start()
        wait_until(lambda: self.server.started, 20, "the webhook app to start", interval=0.05)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


# -- the whole set-up --------------------------------------------------------------------------------------


@dataclass
class Stack:
    """Settings, database, sandbox, webhook app and the processes of one fault test."""

    settings: Settings
    runtime: Runtime
    sandbox: SandboxServer
    log_dir: Path
    app: WebhookApp | None = None
    procs: list[Proc] = field(default_factory=list)
    #: The database as the test sees it, when the service reaches it another way (through a proxy).
    observer_url: str | None = None

    @property
    def engine(self) -> Engine:
        return get_engine(self.observer_url) if self.observer_url else self.runtime.engine

    def env(self, **extra: str) -> dict[str, str]:
        return service_env(self.settings, self.sandbox.url, **extra)

    def spawn(self, name: str, argv: Sequence[str], env: Mapping[str, str] | None = None) -> Proc:
        proc = Proc(name, argv, env or self.env(), self.log_dir).start()
        self.procs.append(proc)
        return proc

    def check(self) -> None:
        for proc in self.procs:
            proc.check()

    def statuses(self) -> Counter[str]:
        with self.engine.connect() as connection:
            rows = connection.execute(select(OutboundMessage.status, func.count()).group_by(OutboundMessage.status))
            return Counter({status: int(n) for status, n in rows})

    def unfinished(self) -> int:
        statuses = self.statuses()
        return sum(statuses[s] for s in UNFINISHED)

    def outbox_rows(self) -> int:
        return sum(self.statuses().values())


def _drop_queue(url: str, queue: str) -> None:
    client = redis.Redis.from_url(url)
    try:
        keys = list(client.scan_iter(match=f"dramatiq:{queue}*"))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


@pytest.fixture
def make_stack(pg_database_url: str, tmp_path: Path) -> Iterator[Callable[..., Stack]]:
    """Build the stack: ``make_stack(campaign=…, webhooks=True, provider_latency=0.0, broker_url=…, **settings)``."""
    made: list[Stack] = []
    queues: list[tuple[str, str]] = []

    def build(
        *,
        campaign: str = MIXED_CAMPAIGN,
        webhooks: bool = True,
        database_url: str | None = None,
        provider_latency: float = 0.0,
        **overrides: Any,
    ) -> Stack:
        app_port = free_port()
        queue = f"faults-{uuid.uuid4().hex[:8]}"
        values: dict[str, Any] = {
            "campaigns_dir": campaign_dir(tmp_path / "campaigns", campaign),
            "public_url": f"http://127.0.0.1:{app_port}",
            "broker_url": REDIS_URL,
            "queue_name": queue,
            "lease_seconds": 5.0,
            "provider_timeout": 10.0,
            "tick_interval": 0.5,
        }
        known = {f.name for f in dataclasses.fields(Settings)}
        if "public_rate_limit" in known:
            values["public_rate_limit"] = 0.0  # the sandbox's webhooks all come from 127.0.0.1
        values.update(overrides)
        settings = make_settings(database_url or pg_database_url, **values)
        queues.append((settings.broker_url, queue))
        sandbox = SandboxServer(
            "127.0.0.1", 0, twilio_auth_token=TWILIO_TOKEN, webhook_retry_for=90.0, latency=provider_latency
        ).start()
        runtime = Runtime(settings, sandbox_url=sandbox.url)
        runtime.enqueue_override = lambda ids: None  # the scheduler processes enqueue; this process never does
        log_dir = tmp_path / f"logs-{len(made)}"
        log_dir.mkdir()
        stack = Stack(settings, runtime, sandbox, log_dir, observer_url=pg_database_url if database_url else None)
        made.append(stack)
        if webhooks:
            stack.app = WebhookApp(runtime, sandbox, app_port).start()
            sandbox.sendgrid_event_url = f"{stack.app.url}/webhooks/sendgrid/events"
        return stack

    yield build
    for stack in made:
        for proc in stack.procs:
            proc.kill()  # what they were doing is over; a graceful dramatiq shutdown only costs time
        stack.sandbox.stop()
        if stack.app is not None:
            stack.app.stop()
    for url, queue in queues:
        with contextlib.suppress(redis.RedisError):
            _drop_queue(url, queue)


# -- counting ----------------------------------------------------------------------------------------------


def outbox_id_of(record: SandboxMessage) -> str | None:
    """Our outbox id in what the provider received: SendGrid custom args, or the Twilio status callback URL."""
    if record.channel == "email":
        return record.custom_args.get("outreach_id")
    if record.status_callback:
        found = parse_qs(urlsplit(record.status_callback).query).get("outreach_id")
        return found[0] if found else None
    return None


@dataclass
class Counts:
    """What the sandbox received against what the outbox says; ``show`` prints it for the CI log."""

    expected: int  # outbox rows that should reach the provider
    sent: int  # distinct outbox ids the sandbox accepted
    lost: int  # expected, never accepted by the sandbox, and neither uncertain nor failed
    failed: int  # ended failed (provider refused, retries exhausted): recorded with the rule and code
    duplicated: int  # extra acceptances of an id the sandbox already had
    uncertain: int  # rows ending ``uncertain`` (worker died mid-send; never resent)
    reconciled: int  # rows the sweeper marked uncertain that provider events then moved on
    unreconciled: int  # rows the sandbox accepted whose status is still not sent/delivered
    statuses: dict[str, int] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def show(self, name: str) -> None:
        figures = {k: v for k, v in dataclasses.asdict(self).items() if k not in {"statuses", "extra"}}
        print(f"\n[faults] {name}: " + " ".join(f"{k}={v}" for k, v in figures.items()))
        print(f"[faults] {name}: statuses={dict(sorted(self.statuses.items()))} {self.extra}")


FAILED = (MessageStatus.FAILED.value, MessageStatus.BOUNCED.value, MessageStatus.UNDELIVERED.value)


def count(stack: Stack, only: Sequence[str] | None = None, **extra: Any) -> Counts:
    """The counts over every outbox row, or over the rows ``only`` names (what a test tried to send)."""
    received = Counter(outbox_id_of(record) for record in stack.sandbox.messages())
    query = select(OutboundMessage.id, OutboundMessage.status, OutboundMessage.rule)
    if only is not None:
        query = query.where(OutboundMessage.id.in_(list(only)))
    with stack.engine.connect() as connection:
        rows = connection.execute(query).all()
    status = {row_id: row_status for row_id, row_status, _ in rows}
    expected = {row_id for row_id, row_status, _ in rows if row_status not in ("skipped", "cancelled", "suppressed")}
    uncertain = {row_id for row_id, row_status, _ in rows if row_status == MessageStatus.UNCERTAIN.value}
    failed = {row_id for row_id, row_status, _ in rows if row_status in FAILED}
    if only is not None:
        received = Counter({i: n for i, n in received.items() if i in status})
    return Counts(
        expected=len(expected),
        sent=len(expected & received.keys()),
        lost=len(expected - received.keys() - uncertain - failed),
        failed=len(failed),
        duplicated=sum(n - 1 for n in received.values() if n > 1)
        + sum(n for i, n in received.items() if i not in status),
        uncertain=len(uncertain),
        reconciled=sum(1 for _, row_status, rule in rows if rule == "lease" and row_status in TERMINAL_OK),
        unreconciled=sum(1 for i in received if i in status and status[i] not in TERMINAL_OK),
        statuses=dict(Counter(status.values())),
        extra=extra,
    )


def settled(stack: Stack) -> Callable[[], bool]:
    """Nothing left to send, and every message the sandbox accepted is recorded as sent or delivered."""

    def done() -> bool:
        if stack.unfinished():
            return False
        received = {outbox_id_of(record) for record in stack.sandbox.messages()}
        with stack.engine.connect() as connection:
            open_rows = set(
                connection.execute(
                    select(OutboundMessage.id).where(OutboundMessage.status.not_in(TERMINAL_OK))
                ).scalars()
            )
        return not (received & open_rows)

    return done


def jitter(low: float, high: float) -> float:
    return random.uniform(low, high)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The fault tests run the service as separate processes (workers, schedulers) that read the machine's clock,
    and compare leases and enqueue times across them: they all run on the wall clock (``wall_clock``)."""
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.path)).parents:
            item.add_marker(pytest.mark.wall_clock)
