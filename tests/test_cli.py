"""The command line as HR and operators use it: real processes, the embedded default, the sandbox."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from tests.conftest import REDIS_URL, ROOT, clock_env


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def outreach(*args: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "outreach", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("OUTREACH_", "SENDGRID_", "TWILIO_"))}
    base.update(
        {
            "OUTREACH_DATABASE_URL": f"sqlite:///{tmp_path / 'cli.db'}",
            "NO_PROXY": "127.0.0.1,localhost",
            "OUTREACH_LOG_LEVEL": "WARNING",
            **clock_env(),  # the commands' clock starts where this test's does
        }
    )
    return base


def test_validate_accepts_the_seed_campaigns(env: dict[str, str]) -> None:
    result = outreach("campaigns", "validate", env=env)
    assert result.returncode == 0, result.stderr
    assert "8 campaign(s) valid" in result.stdout


def test_validate_names_file_line_and_field_and_exits_nonzero(env: dict[str, str], tmp_path: Path) -> None:
    campaigns = tmp_path / "campaigns"
    shutil.copytree(ROOT / "campaigns", campaigns)
    broken = campaigns / "jd_intro.yaml"
    lines = broken.read_text(encoding="utf-8").splitlines()
    index = next(i for i, line in enumerate(lines) if "channel: sms" in line)
    lines[index] = lines[index].replace("channel: sms", "channel: fax")
    broken.write_text("\n".join(lines) + "\n", encoding="utf-8")
    result = outreach("campaigns", "validate", env={**env, "OUTREACH_CAMPAIGNS_DIR": str(campaigns)})
    assert result.returncode == 1
    assert f"{broken}:{index + 1}: steps[" in result.stderr
    assert ".channel: Input should be 'email' or 'sms'" in result.stderr


def test_service_refuses_to_start_on_an_invalid_campaign(env: dict[str, str], tmp_path: Path) -> None:
    campaigns = tmp_path / "campaigns"
    shutil.copytree(ROOT / "campaigns", campaigns)
    (campaigns / "broken.yaml").write_text("name: broken\ncategory: sometimes\n", encoding="utf-8")
    result = outreach("tick", env={**env, "OUTREACH_CAMPAIGNS_DIR": str(campaigns)})
    assert result.returncode != 0
    assert "broken.yaml:2: category:" in result.stderr


def test_import_event_and_tick_with_the_sandbox(env: dict[str, str], tmp_path: Path) -> None:
    from outreach.ops.sandbox import SandboxServer

    assert outreach("db", "upgrade", env=env).returncode == 0
    csv_file = tmp_path / "people.csv"
    csv_file.write_text(
        "external_id,name,email,phone,locale,timezone,source,tags,nurture_consent\n"
        "c-1,Alex Morgan,alex@example.org,+8613800138000,en,Asia/Shanghai,referral,stack:java;concern:pay,yes\n"
        "c-2,王芳,wangfang@example.cn,13900139000,zh-CN,,campus,,no\n",
        encoding="utf-8",
    )
    imported = outreach("candidates", "import", str(csv_file), env=env)
    assert imported.returncode == 0, imported.stderr
    assert "imported 2 candidate(s)" in imported.stdout
    with SandboxServer("127.0.0.1", 0).start() as sandbox:
        # The commands run on a clock that starts just after the offer, so the follow-up is due three days on.
        run_env = {**env, "OUTREACH_SANDBOX_URL": sandbox.url, "OUTREACH_CLOCK_START": "2026-11-25T02:00:30Z"}
        data = json.dumps(
            {
                "start_date": "2027-01-04",
                "start_place": "Shanghai office",
                "hr_contact": {"name": "Li Na", "email": "hr@example.com", "phone": "+862100000000"},
            }
        )
        fired = outreach("event", "c-2", "offer_extended", "--at", "2026-11-25T10:00:00+08:00", env=run_env)
        assert fired.returncode == 0, fired.stderr
        assert json.loads(fired.stdout)["enrolled"] == ["offer_followup"]
        ticked = outreach("tick", "--now", "2026-11-28T10:00:00+08:00", env=run_env)
        assert ticked.returncode == 0, ticked.stderr
        summary = json.loads(ticked.stdout)
        assert summary["queued"] == 1 and summary["messages"] == {"sent": 1} and summary["left_for_workers"] == 0
        accepted = outreach("event", "c-1", "offer_accepted", "--data", data, env=run_env)
        assert accepted.returncode == 0, accepted.stderr
        received = sandbox.wait_for(2, timeout=10)
    followup = next(m for m in received if m.to == "wangfang@example.cn")
    assert any("\u4e00" <= ch <= "\u9fff" for ch in followup.subject)  # zh-CN copy
    letter = next(m for m in received if m.to == "alex@example.org")
    assert "Li Na" in letter.text and "Shanghai office" in letter.text


def test_import_rejects_the_whole_file_on_a_bad_row(env: dict[str, str], tmp_path: Path) -> None:
    assert outreach("db", "upgrade", env=env).returncode == 0
    csv_file = tmp_path / "people.csv"
    csv_file.write_text(
        "external_id,email,phone,timezone\nok-1,ok@example.org,,\nbad-1,not-an-email,,\nbad-2,,,Mars/Base\n",
        encoding="utf-8",
    )
    result = outreach("candidates", "import", str(csv_file), env=env)
    assert result.returncode == 1
    assert f"{csv_file}:3: email:" in result.stderr
    assert f"{csv_file}:4: timezone: unknown IANA timezone" in result.stderr
    assert "not-an-email" not in result.stderr  # values are personal data; fields are named instead
    assert "nothing was imported" in result.stderr


def test_import_reports_values_the_database_cannot_hold_per_row(
    env: dict[str, str], tmp_path: Path, pg_database_url: str
) -> None:
    """On PostgreSQL, which stores no NUL: the row is reported like any bad row, not a traceback."""
    csv_file = tmp_path / "people.csv"
    csv_file.write_text(
        "external_id,name,email,tags\nok-1,Ann,ok@example.org,stack:java\nbad-1,Bo,bo@example.org,stack:ja\x00va\n",
        encoding="utf-8",
    )
    result = outreach("candidates", "import", str(csv_file), env={**env, "OUTREACH_DATABASE_URL": pg_database_url})
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert f"{csv_file}:3: tags: must not contain NUL characters" in result.stderr
    assert "nothing was imported" in result.stderr


def test_event_names_the_bad_field_without_its_value(env: dict[str, str]) -> None:
    assert outreach("db", "upgrade", env=env).returncode == 0
    result = outreach("event", "c-1", "applied", "--data", json.dumps({"note": "Quillon\u0000"}), env=env)
    assert result.returncode == 1
    assert "data: must not contain NUL characters" in result.stderr
    assert "Quillon" not in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_up_answers_healthz_and_sends_the_jd_mail_within_five_seconds(env: dict[str, str]) -> None:
    port, sandbox_port = free_port(), free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "outreach", "up", "--port", str(port)],
        cwd=ROOT,
        env={**env, "OUTREACH_SANDBOX_PORT": str(sandbox_port)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    api = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{api}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert process.poll() is None, process.stdout.read() if process.stdout else ""
            assert time.monotonic() < deadline, "outreach up did not answer /healthz within 60 s"
            time.sleep(0.2)
        # The first start prints an hr key (alone on its line) before the server starts listening.
        assert process.stdout is not None
        key = next(line.strip() for line in process.stdout if line.startswith("ork_"))
        auth = {"Authorization": f"Bearer {key}"}
        assert httpx.get(f"{api}/api/v1/messages").status_code == 401
        httpx.post(
            f"{api}/api/v1/jobs",
            json={"external_id": "j-1", "title": "QA Engineer", "booking_url": "https://book.example.com/qa"},
            headers=auth,
        ).raise_for_status()
        httpx.post(
            f"{api}/api/v1/candidates",
            json={"external_id": "c-1", "name": "Sam Lee", "email": "sam@example.org"},
            headers=auth,
        ).raise_for_status()
        started = time.monotonic()
        response = httpx.post(
            f"{api}/api/v1/candidates/c-1/events", json={"type": "applied", "job_id": "j-1"}, headers=auth
        )
        assert response.status_code == 202
        while time.monotonic() - started < 5:
            messages = httpx.get(f"http://127.0.0.1:{sandbox_port}/_sandbox/messages").json()
            if any(m["channel"] == "email" and m["to"] == "sam@example.org" for m in messages):
                break
            time.sleep(0.05)
        else:
            raise AssertionError("the JD email did not reach the sandbox within 5 s")
        # The sandbox posts signed SendGrid events back to the webhook: the message ends delivered.
        deadline = time.monotonic() + 10
        status = ""
        while time.monotonic() < deadline and status != "delivered":
            items = httpx.get(f"{api}/api/v1/messages", params={"candidate": "c-1"}, headers=auth).json()["items"]
            status = next((i["status"] for i in items if i["channel"] == "email"), "")
            time.sleep(0.1)
        assert status == "delivered"
    finally:
        process.terminate()
        process.wait(timeout=20)


@contextmanager
def serving(env: dict[str, str]) -> Iterator[str]:
    """``outreach serve`` on a free loopback port (uvicorn as in production), once it answers; yields its URL."""
    migrated = outreach("db", "upgrade", env=env)
    assert migrated.returncode == 0, migrated.stderr
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "outreach", "serve", "--port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    api = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{api}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert process.poll() is None, process.stdout.read() if process.stdout else ""
            assert time.monotonic() < deadline, "outreach serve did not answer /healthz within 60 s"
            time.sleep(0.2)
        yield api
    finally:
        process.terminate()
        process.wait(timeout=20)


#: The login form's bucket: 100 tries per address, then one per 100 s (no refill while a test runs).
#: A tight login limit; with a broker the API only enqueues, so it starts without providers or a sandbox.
LOGIN_LIMIT = {
    "OUTREACH_PUBLIC_RATE_LIMIT": "0.01",
    "OUTREACH_PUBLIC_RATE_BURST": "100",
    "OUTREACH_BROKER_URL": REDIS_URL,
    "OUTREACH_QUEUE": "cli-proxy-test",
}
WRONG_KEY = "ork_" + "x" * 43


def wrong_logins(api: str, forwarded_for: list[str]) -> list[int]:
    """One wrong-key login per address, each claiming to come from that address in X-Forwarded-For."""
    with httpx.Client(base_url=api, timeout=10) as client:
        return [
            client.post("/dashboard/login", data={"key": WRONG_KEY}, headers={"X-Forwarded-For": ip}).status_code
            for ip in forwarded_for
        ]


def fresh_addresses(count: int, network: int = 0) -> list[str]:
    return [f"10.{network}.{i // 200}.{i % 200 + 1}" for i in range(count)]


@pytest.mark.slow
def test_serve_ignores_x_forwarded_for_by_default(env: dict[str, str]) -> None:
    # uvicorn's own default believes X-Forwarded-For from 127.0.0.1, i.e. from anyone on this host: a fresh
    # address per request would have been a fresh bucket per request, and no login ever limited.
    with serving({**env, **LOGIN_LIMIT}) as api:
        answers = wrong_logins(api, fresh_addresses(300))
    print(f"wrong-key logins: {len(answers)}, 401: {answers.count(401)}, 429: {answers.count(429)}")
    assert set(answers) == {401, 429}
    assert answers.count(429) >= 190 and answers[:100] == [401] * 100


@pytest.mark.slow
def test_serve_takes_the_client_address_from_a_trusted_proxy_only(env: dict[str, str]) -> None:
    with serving({**env, **LOGIN_LIMIT, "OUTREACH_TRUSTED_PROXIES": "192.0.2.0/24, 127.0.0.1"}) as api:
        # Through the trusted proxy (127.0.0.1 here), each forwarded address has a bucket of its own ...
        assert wrong_logins(api, fresh_addresses(300)) == [401] * 300
        # ... and that address is what counts: one of them over its budget is limited, another is not.
        assert wrong_logins(api, ["203.0.113.7"] * 101)[-1] == 429
        # A client cannot escape its bucket by writing a made-up address in front of its own: the proxy appends
        # the address it saw, and the nearest address that is not a trusted proxy counts.
        assert wrong_logins(api, ["198.51.100.1, 203.0.113.7", "203.0.113.8"]) == [429, 401]
