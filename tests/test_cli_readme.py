"""The README's command table, true: every command run in another process beside a live ``outreach up``.

A fresh ``outreach up`` runs on free ports against the test PostgreSQL, in a folder of its own, exactly as ``make up``
runs it; then each row of the README's "Command line" table is run from that folder with nothing but the
database's address (and the campaign folders) set. Each one works, or explains itself in one line with exit code
2; none prints a traceback. The commands that send use ``up``'s sandbox without being told where it is, and what they
send is delivered (``up``'s API hears the sandbox's signed events).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import httpx
import pytest

from outreach.core.clock import utcnow
from outreach.ops.sandbox.discovery import STATE_FOLDER, read_state
from tests.conftest import ROOT, clock_env
from tests.test_cli import free_port

#: About twenty processes start one after another (two or three minutes on a quiet machine; far more on a busy one).
pytestmark = [pytest.mark.slow, pytest.mark.clock, pytest.mark.timeout(900)]

#: What runs for each row of the table (its first command, as the README writes it). Long-running commands are
#: started, checked while they run, and stopped.
ROWS: dict[str, list[tuple[str, ...]]] = {
    "outreach up [--host H] [--port P]": [("up", "--port", "{api_port}")],  # a second one, on the same ports
    "outreach serve [--host H] [--port P]": [("serve", "--port", "{free_port}")],
    "outreach worker [--processes N] [--threads N]": [("worker", "--processes", "1")],
    "outreach scheduler": [("scheduler",)],
    "outreach tick [--now ISO]": [("tick",), ("tick", "--now", "{in_three_days}")],
    "outreach db upgrade": [("db", "upgrade")],
    "outreach campaigns validate": [
        ("campaigns", "validate"),
        ("campaigns", "preview", "jd_intro", "--locale", "zh-CN"),
    ],
    "outreach campaigns simulate [NAME…] --candidates N --days D": [
        ("campaigns", "simulate", "jd_intro", "--candidates", "20", "--days", "14")
    ],
    "outreach candidates import FILE.csv": [("candidates", "import", "{csv}")],
    "outreach event EXTERNAL_ID TYPE [--job ID] [--reason TEXT] [--at ISO] [--data JSON]": [
        ("event", "imp-2", "applied", "--job", "be-1"),
        ("event", "imp-3", "offer_accepted", "--job", "be-1", "--data", "{offer}"),
        ("event", "imp-3", "offer_declined", "--reason", "other_offer", "--at", "{now}"),
    ],
    "outreach sandbox [--port P] [--events-to URL]": [("sandbox", "--port", "{free_port}")],
    "outreach apikey create --role hr\\|ops [--name N]": [
        ("apikey", "create", "--role", "ops", "--name", "monitoring"),
        ("apikey", "list"),
        ("apikey", "revoke", "2"),
    ],
    "outreach report [--since 30d\\|ISO] [--until …]"
    " [--by campaign\\|step\\|channel\\|template\\|locale\\|source\\|period]"
    " [--bucket day\\|week\\|month] [--format table\\|json\\|csv]": [
        ("report",),
        ("report", "--by", "period", "--bucket", "month", "--format", "json"),
        ("report", "--by", "campaign", "--bucket", "week", "--format", "csv"),
    ],
}
#: Commands that run until stopped: how long they must keep running to count as working.
LONG_RUNNING = {"serve", "scheduler", "sandbox"}
OFFER = {
    "start_date": "2030-01-07",
    "start_place": "上海市浦东新区世纪大道1000号18楼",
    "hr_contact": {"name": "李娜", "phone": "021-5555 0123"},
}


def readme_commands() -> list[str]:
    """The first command of each row of the README's "Command line" table."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## Command line", 1)[1].split("\n## ", 1)[0]
    table = section.split("\n\n", 2)[1]
    return [re.match(r"\| `([^`]+)`", row).group(1) for row in table.splitlines()[2:]]  # type: ignore[union-attr]


class Up:
    """``outreach up`` in ``folder``, its output in a file."""

    def __init__(self, folder: Path, env: dict[str, str]) -> None:
        self.folder = folder
        self.env = env
        self.api_port = free_port()
        self.sandbox_port = free_port()
        self.api = f"http://127.0.0.1:{self.api_port}"
        self.sandbox = f"http://127.0.0.1:{self.sandbox_port}"
        self.log = folder / "up.log"
        with self.log.open("w", encoding="utf-8") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "outreach", "up", "--port", str(self.api_port)],
                cwd=folder,
                env={**env, "OUTREACH_SANDBOX_PORT": str(self.sandbox_port)},
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def output(self) -> str:
        return self.log.read_text(encoding="utf-8")

    def wait_until(self, predicate: Callable[[], bool], what: str, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            assert self.process.poll() is None, f"outreach up stopped:\n{self.output()}"
            assert time.monotonic() < deadline, f"timed out waiting for {what}:\n{self.output()}"
            time.sleep(0.1)

    def healthy(self) -> bool:
        try:
            return httpx.get(f"{self.api}/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def key(self) -> str:
        return next(line.strip() for line in self.output().splitlines() if line.startswith("ork_"))

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()


@pytest.fixture
def up(pg_database_url: str, tmp_path: Path) -> Iterator[Up]:
    inherited = {k: v for k, v in os.environ.items() if not k.startswith(("OUTREACH_", "SENDGRID_", "TWILIO_"))}
    env = {
        **inherited,
        # Only the database (and where the campaigns are, since the folder is not the checkout): what make up has.
        "OUTREACH_DATABASE_URL": pg_database_url,
        "OUTREACH_CAMPAIGNS_DIR": str(ROOT / "campaigns"),
        "OUTREACH_TEMPLATES_DIR": str(ROOT / "templates"),
        "OUTREACH_LOG_LEVEL": "WARNING",
        "NO_PROXY": "127.0.0.1,localhost",
        **clock_env(),
    }
    running = Up(tmp_path, env)
    try:
        running.wait_until(running.healthy, "outreach up to answer /healthz", timeout=300)
        yield running
    finally:
        running.stop()


def check_output(args: tuple[str, ...], code: int | None, stdout: str, stderr: str) -> None:
    """Works (0, or still running) or explains itself: exit 2 and one line. Never a traceback."""
    shown = f"outreach {' '.join(args)} -> {code}\nstdout:\n{stdout}\nstderr:\n{stderr}"
    assert "Traceback" not in stdout + stderr, shown
    assert code in (None, 0, 2), shown
    if code == 2:
        lines = [line for line in stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("Error: "), shown


def test_every_command_of_the_readme_works_beside_a_live_up(up: Up, tmp_path: Path) -> None:
    assert readme_commands() == list(ROWS), "the README's command table changed: run the new rows here too"
    up.wait_until(lambda: "ork_" in up.output(), "the first-start key")
    auth = {"Authorization": f"Bearer {up.key()}"}
    job = {"external_id": "be-1", "title": "Backend Engineer", "booking_url": "https://cal.example.com/be"}
    httpx.post(f"{up.api}/api/v1/jobs", json=job, headers=auth).raise_for_status()
    recorded = read_state(tmp_path)
    assert recorded is not None and recorded.url == up.sandbox and recorded.owner == "up"
    people = tmp_path / "people.csv"
    people.write_text(
        "external_id,name,email,phone,locale,timezone\n"
        "imp-2,王芳,wangfang@example.cn,+8613900139000,zh-CN,Asia/Shanghai\n"
        "imp-3,Alex Morgan,alex@example.org,+8613800138000,en,Asia/Shanghai\n",
        encoding="utf-8",
    )
    values = {
        "api_port": str(up.api_port),
        "csv": str(people),
        "offer": json.dumps(OFFER, ensure_ascii=False),
        "now": utcnow().isoformat(),
        "in_three_days": (utcnow() + timedelta(days=3)).isoformat(),
    }
    outcomes: dict[tuple[str, ...], int | None] = {}
    # Import first: the events need the candidates.
    order = sorted((args for runs in ROWS.values() for args in runs), key=lambda a: a[:2] != ("candidates", "import"))
    for template in order:
        args = tuple(part.format(**values, free_port=free_port()) for part in template)
        if args[0] in LONG_RUNNING:
            outcomes[template] = run_for_a_while(args, up, tmp_path)
        else:
            done = subprocess.run(
                [sys.executable, "-m", "outreach", *args],
                cwd=tmp_path,
                env=up.env,
                capture_output=True,
                text=True,
                timeout=180,
            )
            check_output(args, done.returncode, done.stdout, done.stderr)
            outcomes[template] = done.returncode

    # What should work did; what cannot here said why in one line.
    assert outcomes[("up", "--port", "{api_port}")] == 2  # the ports are up's own
    assert outcomes[("worker", "--processes", "1")] == 2  # separate workers need a broker
    assert all(code in (None, 0) for args, code in outcomes.items() if args[0] not in {"up", "worker"}), outcomes
    # The events' messages went to up's sandbox, and up's API heard back from it: delivered.
    received = httpx.get(f"{up.sandbox}/_sandbox/messages").json()
    assert {m["to"] for m in received if m["channel"] == "email"} >= {"wangfang@example.cn", "alex@example.org"}

    def delivered() -> bool:
        items = httpx.get(f"{up.api}/api/v1/messages", params={"candidate": "imp-2"}, headers=auth).json()["items"]
        return any(i["channel"] == "email" and i["status"] == "delivered" for i in items)

    up.wait_until(delivered, "imp-2's email to be delivered")
    # The second sandbox left up's record alone, and up still owns it.
    assert read_state(tmp_path) == recorded
    assert (tmp_path / STATE_FOLDER / "sandbox.json").exists()
    assert "Traceback" not in up.output(), up.output()


def run_for_a_while(args: tuple[str, ...], up: Up, folder: Path, seconds: float = 2.0) -> int | None:
    """Start a command that runs until stopped; it works if it is still running (and answering) after a while."""
    log = folder / f"{args[0]}.log"
    with log.open("w", encoding="utf-8") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "outreach", *args],
            cwd=folder,
            env=up.env,
            stdout=out,
            stderr=subprocess.PIPE,
            text=True,
        )
    try:
        deadline = time.monotonic() + 180  # generous: a loaded machine starts Python slowly
        ready = False
        while time.monotonic() < deadline and process.poll() is None and not ready:
            ready = _ready(args, log)
            time.sleep(0.2)
        if process.poll() is None:
            assert ready, f"outreach {' '.join(args)} did not become ready:\n{log.read_text(encoding='utf-8')}"
            time.sleep(seconds)
        code = process.poll()
    finally:
        process.terminate()
        try:
            _, stderr = process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            _, stderr = process.communicate()
    check_output(args, code, log.read_text(encoding="utf-8"), stderr)
    return code


def _ready(args: tuple[str, ...], log: Path) -> bool:
    text = log.read_text(encoding="utf-8")
    if args[0] == "serve":
        port = args[args.index("--port") + 1]
        try:
            return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False
    if args[0] == "sandbox":
        return "provider sandbox on" in text
    return "scheduler ticking" in text
