"""Every command's way of failing: one line naming what to set or fix, exit code 2, no traceback, nothing written.

Most run in this process through click's CliRunner; the last ones as real processes (``python -m outreach``), whose
stderr is read whole.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from sqlalchemy import create_engine, func, inspect, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from outreach.cli import main
from outreach.core.config import set_settings
from outreach.core.db import upgrade
from outreach.core.errors import ConfigurationError
from outreach.core.models import ApiKey, CandidateEvent, OutboundMessage
from outreach.service.runtime import set_runtime
from tests.conftest import REDIS_URL, ROOT, clock_env

#: Nothing listens here: a PostgreSQL server that cannot be reached (connection refused at once).
UNREACHABLE = "postgresql://outreach:s3cret@127.0.0.1:1/outreach"


@pytest.fixture(autouse=True)
def _fresh_process_state() -> Iterator[None]:
    yield
    set_runtime(None)
    set_settings(None)


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str | None]:
    """A migrated SQLite database in a folder of its own (so no sandbox is recorded for it), no credentials."""
    url = f"sqlite:///{tmp_path / 'outreach.db'}"
    upgrade(url)
    cleared: dict[str, str | None] = {
        k: None for k in os.environ if k.startswith(("OUTREACH_", "SENDGRID_", "TWILIO_"))
    }
    return {
        **cleared,
        "OUTREACH_DATABASE_URL": url,
        "OUTREACH_CAMPAIGNS_DIR": str(ROOT / "campaigns"),
        "OUTREACH_TEMPLATES_DIR": str(ROOT / "templates"),
        "OUTREACH_LOG_LEVEL": "WARNING",
        "NO_PROXY": "127.0.0.1,localhost",
        **clock_env(),
    }


def invoke(env: dict[str, str | None], *args: str) -> Result:
    return CliRunner().invoke(main, list(args), env=env)


def refused(result: Result, *needles: str) -> str:
    """The one line a refused command printed (exit 2, no traceback), checked to contain ``needles``."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def count(url: str, model: type) -> int:
    with Session(create_engine(url)) as session:
        return int(session.scalar(select(func.count()).select_from(model)) or 0)


def seed(url: str) -> None:
    from outreach.domain.candidates import CandidateIn, JobIn, upsert_candidate, upsert_job

    with Session(create_engine(url)) as session, session.begin():
        upsert_job(session, JobIn.model_validate({"external_id": "be-1", "title": "Backend Engineer"}))
        upsert_candidate(session, CandidateIn.model_validate({"external_id": "imp-2", "email": "imp2@example.org"}))


def taken_port() -> socket.socket:
    listener = socket.create_server(("127.0.0.1", 0))
    return listener


# -- commands that send ------------------------------------------------------------------------------------


def test_event_without_credentials_or_sandbox_writes_nothing(env: dict[str, str | None]) -> None:
    url = str(env["OUTREACH_DATABASE_URL"])
    seed(url)
    line = refused(
        invoke(env, "event", "imp-2", "applied", "--job", "be-1"),
        "cannot send: SENDGRID_API_KEY is not set",
        "no `outreach up` or `outreach sandbox` is running for",
        "OUTREACH_SANDBOX_URL",
    )
    assert "imp2@example.org" not in line
    assert count(url, CandidateEvent) == 0 and count(url, OutboundMessage) == 0


def test_a_sandbox_url_that_does_not_answer_is_named(env: dict[str, str | None]) -> None:
    url = str(env["OUTREACH_DATABASE_URL"])
    seed(url)
    with taken_port() as listener:  # listening but never answering would hang; a closed port refuses at once
        port = listener.getsockname()[1]
    env = {**env, "OUTREACH_SANDBOX_URL": f"http://127.0.0.1:{port}"}
    refused(invoke(env, "event", "imp-2", "applied"), f"the sandbox at http://127.0.0.1:{port}", "does not answer")
    assert count(url, CandidateEvent) == 0


@pytest.mark.parametrize("args", [("tick",), ("tick", "--now", "2029-11-20T02:00:00Z"), ("scheduler",)])
def test_passes_without_credentials_or_sandbox_write_nothing(env: dict[str, str | None], args: tuple[str, ...]) -> None:
    refused(invoke(env, *args), "cannot send: SENDGRID_API_KEY is not set")
    assert count(str(env["OUTREACH_DATABASE_URL"]), OutboundMessage) == 0


def test_serve_without_a_broker_must_be_able_to_send(env: dict[str, str | None]) -> None:
    refused(invoke(env, "serve", "--port", "1"), "cannot send: SENDGRID_API_KEY is not set")


def test_worker_needs_a_broker_and_a_way_to_send(env: dict[str, str | None]) -> None:
    refused(invoke(env, "worker"), "OUTREACH_BROKER_URL must point at Redis or RabbitMQ")
    refused(invoke({**env, "OUTREACH_BROKER_URL": REDIS_URL}, "worker"), "cannot send: SENDGRID_API_KEY is not set")


def test_up_and_sandbox_name_a_taken_port_before_writing(env: dict[str, str | None], tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'fresh' / 'outreach.db'}"
    (tmp_path / "fresh").mkdir()
    with taken_port() as listener:
        port = str(listener.getsockname()[1])
        refused(
            invoke({**env, "OUTREACH_DATABASE_URL": url}, "up", "--port", port), f"cannot listen on 127.0.0.1:{port}"
        )
        line = refused(
            invoke({**env, "OUTREACH_DATABASE_URL": url, "OUTREACH_SANDBOX_PORT": port}, "up", "--port", "0"),
            f"the provider sandbox cannot listen on 127.0.0.1:{port}",
            "OUTREACH_SANDBOX_PORT",
        )
        assert "another `outreach up` or `outreach sandbox` may be running" in line
        refused(invoke(env, "sandbox", "--port", port), f"cannot listen on 127.0.0.1:{port}", "--port")
    # Neither migrated the database nor created the first API key.
    assert not (tmp_path / "fresh" / "outreach.db").exists() or not inspect(create_engine(url)).get_table_names()


# -- the database ------------------------------------------------------------------------------------------


def test_a_database_without_tables_asks_for_the_upgrade(env: dict[str, str | None], tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'empty.db'}"
    people = tmp_path / "people.csv"
    people.write_text("external_id,email\nc-1,alex@example.org\n", encoding="utf-8")
    empty = {**env, "OUTREACH_DATABASE_URL": url}
    for args in (("candidates", "import", str(people)), ("apikey", "list"), ("report",)):
        refused(invoke(empty, *args), f"the database {url} has no outreach tables", "run `outreach db upgrade`")
    assert inspect(create_engine(url)).get_table_names() == []


@pytest.mark.parametrize(
    "args",
    [
        ("apikey", "create", "--role", "hr"),
        ("apikey", "list"),
        ("apikey", "revoke", "1"),
        ("report", "--bucket", "month"),
        ("db", "upgrade"),
        ("candidates", "import", "PEOPLE"),
        ("event", "c-1", "applied"),
        ("tick",),
    ],
)
def test_an_unreachable_database_is_named_without_the_drivers_text(
    env: dict[str, str | None], tmp_path: Path, args: tuple[str, ...]
) -> None:
    people = tmp_path / "people.csv"
    people.write_text("external_id,email\nc-1,alex@example.org\n", encoding="utf-8")
    args = tuple(str(people) if a == "PEOPLE" else a for a in args)
    # Credentials set, so the commands that send get as far as the database.
    creds = {"SENDGRID_API_KEY": "SG.x", "TWILIO_ACCOUNT_SID": "AC" + "0" * 32, "TWILIO_AUTH_TOKEN": "t"}
    creds |= {"OUTREACH_SENDGRID_HOST": "http://127.0.0.1:1", "OUTREACH_TWILIO_BASE_URL": "http://127.0.0.1:1"}
    creds |= {"OUTREACH_SMS_FROM": "+15005550006"}
    line = refused(
        invoke({**env, **creds, "OUTREACH_DATABASE_URL": UNREACHABLE}, *args),
        "cannot use the database postgresql://outreach:***@127.0.0.1:1/outreach (OperationalError)",
        "check OUTREACH_DATABASE_URL",
    )
    assert "s3cret" not in line and "connection refused" not in line.lower()  # the driver's words stay out


def test_a_bad_database_url_or_revision(env: dict[str, str | None]) -> None:
    refused(invoke({**env, "OUTREACH_DATABASE_URL": "db at the office"}, "apikey", "list"), "OUTREACH_DATABASE_URL")
    refused(invoke(env, "db", "upgrade", "nonsense"), "cannot upgrade to 'nonsense'")


def test_a_drivers_message_never_reaches_the_screen(
    env: dict[str, str | None], monkeypatch: pytest.MonkeyPatch
) -> None:
    import outreach.domain.auth as auth

    def refuse(*args: object, **kwargs: object) -> None:
        raise IntegrityError("INSERT …", {}, Exception("Key (email)=(alex@example.org) already exists"))

    monkeypatch.setattr(auth, "list_keys", refuse)
    line = refused(invoke(env, "apikey", "list"), "refused the command (Exception)", "may quote personal data")
    assert "alex@example.org" not in line


# -- settings and surprises --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ("campaigns", "validate"),
        ("campaigns", "preview", "jd_intro"),
        ("campaigns", "simulate", "--candidates", "1", "--days", "1"),
        ("report",),
        ("apikey", "list"),
        ("sandbox",),
        ("up",),
    ],
)
def test_a_wrong_setting_is_named(env: dict[str, str | None], args: tuple[str, ...]) -> None:
    refused(invoke({**env, "OUTREACH_COMPANY_TIMEZONE": "Mars/Base"}, *args), "OUTREACH_COMPANY_TIMEZONE")


def test_the_projects_errors_become_one_line(env: dict[str, str | None], monkeypatch: pytest.MonkeyPatch) -> None:
    import outreach.domain.auth as auth

    def unconfigured(*args: object, **kwargs: object) -> None:
        raise ConfigurationError("OUTREACH_SOMETHING is not set")

    monkeypatch.setattr(auth, "list_keys", unconfigured)
    assert refused(invoke(env, "apikey", "list")) == "Error: OUTREACH_SOMETHING is not set"


def test_an_unexpected_error_is_named_by_type_and_place_only(
    env: dict[str, str | None], monkeypatch: pytest.MonkeyPatch
) -> None:
    import outreach.domain.auth as auth

    def broken(*args: object, **kwargs: object) -> None:
        raise KeyError("alex@example.org")

    monkeypatch.setattr(auth, "list_keys", broken)
    line = refused(invoke(env, "apikey", "list"), "`outreach apikey` stopped on an unexpected KeyError at")
    assert "alex@example.org" not in line and "please report it" in line


def test_an_invalid_event_names_fields_not_values(env: dict[str, str | None]) -> None:
    result = invoke(env, "event", "imp-2", "applied", "--data", '{"x": 1')
    assert result.exit_code == 2 and "--data" in result.output and "not a JSON object" in result.output
    result = invoke(env, "event", "imp-2", "hired", "--reason", "x" * 600)
    assert result.exit_code == 1 and "reason: String should have at most 500 characters" in result.output
    assert "xxxxxxxx" not in result.output
    assert count(str(env["OUTREACH_DATABASE_URL"]), CandidateEvent) == 0


# -- real processes ----------------------------------------------------------------------------------------


def run(env: dict[str, str | None], *args: str) -> subprocess.CompletedProcess[str]:
    child = {k: v for k, v in {**os.environ, **env}.items() if v is not None}
    return subprocess.run(
        [sys.executable, "-m", "outreach", *args], cwd=ROOT, env=child, capture_output=True, text=True, timeout=120
    )


def test_real_processes_print_one_line_and_no_traceback(env: dict[str, str | None]) -> None:
    url = str(env["OUTREACH_DATABASE_URL"])
    seed(url)
    for args, extra, needle in (
        (("event", "imp-2", "applied", "--job", "be-1"), {}, "cannot send: SENDGRID_API_KEY is not set"),
        (("tick", "--now", "2029-11-20T02:00:00Z"), {}, "cannot send: SENDGRID_API_KEY is not set"),
        (("apikey", "list"), {"OUTREACH_DATABASE_URL": UNREACHABLE}, "cannot use the database"),
        (("report",), {"OUTREACH_COMPANY_TIMEZONE": "Mars/Base"}, "OUTREACH_COMPANY_TIMEZONE"),
    ):
        done = run({**env, **extra}, *args)
        assert done.returncode == 2, done.stderr
        assert "Traceback" not in done.stderr
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and needle in lines[0], done.stderr
    assert count(url, CandidateEvent) == 0 and count(url, OutboundMessage) == 0 and count(url, ApiKey) == 0
