"""The processes run separately against the standalone sandbox, with the README's environment and nothing more.

``outreach sandbox`` posts signed SendGrid events and Twilio status callbacks exactly as under ``outreach up``;
``outreach serve`` verifies them with the sandbox's key and token, which it takes from the sandbox it finds for the
data folder; ``outreach worker`` and ``outreach tick`` send to that sandbox without being told where it is.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import IO

import httpx
import pytest
from dramatiq.brokers.redis import RedisBroker
from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session

from outreach.core.clock import utcnow
from outreach.core.models import DeliveryEvent, OutboundMessage
from outreach.ops.sandbox.discovery import STATE_FOLDER
from tests.conftest import REDIS_URL, ROOT, clock_env
from tests.test_cli import free_port

pytestmark = [pytest.mark.slow, pytest.mark.clock, pytest.mark.timeout(600)]


class Processes:
    """Long-running ``python -m outreach`` processes, their output in files; all stopped at the end."""

    def __init__(self, folder: Path, env: dict[str, str]) -> None:
        self.folder = folder
        self.env = env
        self.running: list[tuple[str, subprocess.Popen[str], IO[str]]] = []

    def start(self, name: str, *args: str) -> subprocess.Popen[str]:
        log = (self.folder / f"{name}.log").open("w", encoding="utf-8")
        process = subprocess.Popen(
            [sys.executable, "-m", "outreach", *args], cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT
        )
        self.running.append((name, process, log))  # type: ignore[arg-type]
        return process  # type: ignore[return-value]

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [sys.executable, "-m", "outreach", *args],
            cwd=ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
        assert "Traceback" not in done.stderr
        return done

    def check(self) -> None:
        for name, process, _ in self.running:
            assert process.poll() is None, f"{name} stopped:\n{self.output(name)}"

    def output(self, name: str) -> str:
        return (self.folder / f"{name}.log").read_text(encoding="utf-8")

    def wait_until(self, predicate: Callable[[], bool], what: str, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            self.check()
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.1)

    def stop(self) -> None:
        for _, process, _ in reversed(self.running):
            process.terminate()
        for _, process, log in self.running:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=30)
            if process.poll() is None:
                process.kill()
            log.close()


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    queue = f"outreach_test_{uuid.uuid4().hex[:8]}"
    api_port, sandbox_port = free_port(), free_port()
    inherited = {k: v for k, v in os.environ.items() if not k.startswith(("OUTREACH_", "SENDGRID_", "TWILIO_"))}
    # The README's environment for the separate processes, the same in every terminal.
    env = {
        **inherited,
        "OUTREACH_DATABASE_URL": f"sqlite:///{tmp_path / 'outreach.db'}",
        "OUTREACH_BROKER_URL": REDIS_URL,
        "OUTREACH_QUEUE": queue,
        "OUTREACH_PUBLIC_URL": f"http://127.0.0.1:{api_port}",
        "OUTREACH_SANDBOX_PORT": str(sandbox_port),
        "OUTREACH_LOG_LEVEL": "WARNING",
        "NO_PROXY": "127.0.0.1,localhost",
        **clock_env(),
    }
    running = Processes(tmp_path, env)
    try:
        yield running
    finally:
        running.stop()
        broker = RedisBroker(url=REDIS_URL)  # type: ignore[no-untyped-call]
        broker.declare_queue(queue)
        broker.flush_all()
        broker.close()


def statuses(url: str) -> dict[str, str]:
    with Session(create_engine(url)) as session:
        return {
            channel: status
            for channel, status in session.execute(select(OutboundMessage.channel, OutboundMessage.status))
        }


def test_standalone_sandbox_serve_and_worker_deliver_and_hear_back(processes: Processes, tmp_path: Path) -> None:
    env = processes.env
    url = env["OUTREACH_DATABASE_URL"]
    processes.run("db", "upgrade")
    people = tmp_path / "people.csv"
    people.write_text(
        "external_id,name,email,phone,locale,timezone\nimp-2,王芳,wangfang@example.cn,+8613900139000,zh-CN,Asia/Shanghai\n",
        encoding="utf-8",
    )
    processes.run("candidates", "import", str(people))

    state = tmp_path / STATE_FOLDER / "sandbox.json"
    processes.start("sandbox", "sandbox")
    processes.wait_until(state.exists, "the sandbox to record itself")
    sandbox_url = json.loads(state.read_text(encoding="utf-8"))["url"]
    assert sandbox_url == f"http://127.0.0.1:{env['OUTREACH_SANDBOX_PORT']}"
    api = env["OUTREACH_PUBLIC_URL"]
    processes.start("api", "serve", "--port", api.rsplit(":", 1)[1])
    processes.start("worker", "worker", "--processes", "1", "--threads", "2")

    def healthy() -> bool:
        try:
            return httpx.get(f"{api}/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    processes.wait_until(healthy, "the API")
    key = processes.run("apikey", "create", "--role", "hr").stdout.strip().splitlines()[-1]
    job = {"external_id": "be-1", "title": "Backend Engineer", "booking_url": "https://cal.example.com/be"}
    httpx.post(f"{api}/api/v1/jobs", json=job, headers={"Authorization": f"Bearer {key}"}).raise_for_status()

    # The event is handed to the worker, which sends to the sandbox; the sandbox's signed SendGrid events reach the
    # API, which checks them with the sandbox's key: the email ends delivered.
    processes.run("event", "imp-2", "applied", "--job", "be-1")
    processes.wait_until(lambda: statuses(url).get("email") == "delivered", "the email to be delivered")
    # The SMS nudge is due five minutes on: a time-machine tick sends it in its own process, to the same sandbox;
    # its Twilio status callbacks, signed with the sandbox's token, reach the API.
    later = (utcnow() + timedelta(minutes=10)).isoformat()
    summary = json.loads(processes.run("tick", "--now", later).stdout)
    assert summary["queued"] == 1 and summary["messages"] in (
        {"sent": 1},
        {"delivered": 1},
    )  # the callback may be quick
    processes.wait_until(lambda: statuses(url).get("sms") == "delivered", "the SMS to be delivered")

    received = httpx.get(f"{sandbox_url}/_sandbox/messages").json()
    assert sorted(m["channel"] for m in received) == ["email", "sms"]
    with Session(create_engine(url)) as session:
        providers = set(session.scalars(select(DeliveryEvent.provider)))
    assert providers == {"sendgrid", "twilio"}

    processes.stop()
    assert not state.exists()  # the sandbox took its record with it
    for name in ("sandbox", "api", "worker"):
        assert "Traceback" not in processes.output(name), processes.output(name)
