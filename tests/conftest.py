"""Shared fixtures: real PostgreSQL and SQLite databases, the provider sandbox, and brokers.

PostgreSQL and Redis are the running servers (``OUTREACH_TEST_POSTGRES_URL``, ``OUTREACH_TEST_REDIS_URL``,
``OUTREACH_TEST_RABBITMQ_URL`` override the local defaults). A server that cannot be reached stops the run with
a message naming it: tests never skip silently.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlparse

import pytest
from dramatiq import Broker
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from outreach.core.clock import TravelClock, set_clock, utcnow
from outreach.core.config import Secret, Settings, set_settings
from outreach.core.db import dispose_engines, get_engine, normalise_url, upgrade
from outreach.core.models import Base
from outreach.domain.campaigns import Category
from outreach.ops.sandbox import SandboxServer
from outreach.policy.config import EmailWindow, PolicySpec, QuietHoursSpec, Window
from outreach.policy.engine import PolicyEngine
from outreach.service.broker import install_broker
from outreach.service.runtime import Runtime, set_runtime
from outreach.web import create_app
from outreach.web.webhooks import WebhookSettings
from tests.helpers import INBOUND_TOKEN, PUBLIC_URL, Signer, api_client

ROOT = Path(__file__).resolve().parent.parent
POSTGRES_URL = os.environ.get("OUTREACH_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("OUTREACH_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
RABBITMQ_URL = os.environ.get("OUTREACH_TEST_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")

os.environ.setdefault("NO_PROXY", "127.0.0.1,localhost")
os.environ.setdefault("no_proxy", "127.0.0.1,localhost")


#: Where every test's clock starts unless the test sets its own: Wednesday 14 November 2029, 10:00 in Shanghai
#: (21:00 the evening before in New York), an ordinary working day far from any holiday or DST switch, and after
#: every instant the tests write down (2026-2028), so a step a test schedules "at T0" is due by the time it
#: delivers. The clock runs on from there at real speed, so leases, timeouts and waits behave as usual, and no
#: test depends on the day it runs.
DEFAULT_NOW = datetime(2029, 11, 14, 2, 0, tzinfo=UTC)


@pytest.fixture(autouse=True)
def service_clock(request: pytest.FixtureRequest) -> Iterator[TravelClock | None]:
    """The service's clock for this test (:mod:`outreach.core.clock`): a :class:`TravelClock` at :data:`DEFAULT_NOW`.

    A test marked ``wall_clock`` runs on the machine's clock instead (processes of its own that must agree with
    it without being told); a test may still set any clock it likes.
    """
    if request.node.get_closest_marker("wall_clock"):
        set_clock(None)
        yield None
    else:
        clock = TravelClock(DEFAULT_NOW)
        set_clock(clock)
        yield clock
    set_clock(None)


def install_workers(broker: Broker) -> Broker:
    """``broker`` as this process's, with the worker actors declared on it (as ``outreach up`` does). Installed
    first, so importing the ``workers`` package finds it and does not build one from the environment."""
    install_broker(broker)
    from workers.actors import install

    return install(broker)


def worker_env(database_url: str, queue: str, sandbox_url: str, **extra: str) -> dict[str, str]:
    """The environment of a ``dramatiq workers.main`` process on ``database_url`` and Redis ``queue``, sending to the
    sandbox through the real SDKs, on this test's clock: none of this process's own settings leak in."""
    inherited = {k: v for k, v in os.environ.items() if not k.startswith(("OUTREACH_", "SENDGRID_", "TWILIO_"))}
    return {
        **inherited,
        "OUTREACH_DATABASE_URL": database_url,
        "OUTREACH_BROKER_URL": REDIS_URL,
        "OUTREACH_QUEUE": queue,
        "SENDGRID_API_KEY": "SG.test",
        "OUTREACH_SENDGRID_HOST": sandbox_url,
        "TWILIO_ACCOUNT_SID": "AC" + "0" * 32,
        "TWILIO_AUTH_TOKEN": "test-token",
        "OUTREACH_TWILIO_BASE_URL": sandbox_url,
        "OUTREACH_SMS_FROM": "+15005550006",
        "OUTREACH_LOG_LEVEL": "WARNING",
        **clock_env(),
        **extra,
    }


def clock_env() -> dict[str, str]:
    """Environment that starts a child process's clock where this test's clock is now (``OUTREACH_CLOCK_START``)."""
    return {"OUTREACH_CLOCK_START": utcnow().isoformat()}


def require_server(name: str, url: str, default_port: int) -> None:
    parsed = urlparse(url)
    host, port = parsed.hostname or "127.0.0.1", parsed.port or default_port
    try:
        socket.create_connection((host, port), timeout=3).close()
    except OSError as exc:
        pytest.exit(
            f"{name} is not reachable at {host}:{port} ({exc}). Start it (see README, 'Running the tests') or "
            f"point the matching OUTREACH_TEST_* variable at one.",
            returncode=3,
        )


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A throw-away database on the PostgreSQL server, migrated once for the whole session."""
    require_server("PostgreSQL", POSTGRES_URL, 5432)
    name = f"outreach_test_{uuid.uuid4().hex[:10]}"
    admin = create_engine(normalise_url(POSTGRES_URL), isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    url = make_url(normalise_url(POSTGRES_URL)).set(database=name).render_as_string(hide_password=False)
    upgrade(url)
    yield url
    dispose_engines()
    with admin.connect() as connection:
        connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(scope="session")
def sqlite_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    url = f"sqlite:///{tmp_path_factory.mktemp('db') / 'outreach.db'}"
    upgrade(url)
    return url


def empty_tables(url: str) -> None:
    engine = get_engine(url)
    with engine.begin() as connection:
        if engine.dialect.name == "postgresql":
            names = ", ".join(f'"{t.name}"' for t in Base.metadata.sorted_tables)
            connection.execute(text(f"TRUNCATE {names} RESTART IDENTITY CASCADE"))
        else:
            for table in reversed(Base.metadata.sorted_tables):
                connection.execute(table.delete())


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest) -> str:
    """Each database test runs on both SQLite and PostgreSQL, starting from empty tables."""
    url: str = request.getfixturevalue(f"{request.param}_url")
    empty_tables(url)
    return url


@pytest.fixture
def pg_database_url(postgres_url: str) -> str:
    empty_tables(postgres_url)
    return postgres_url


@pytest.fixture(scope="session")
def sandbox_server() -> Iterator[SandboxServer]:
    server = SandboxServer("127.0.0.1", 0, twilio_auth_token="test-token").start()
    yield server
    server.stop()


@pytest.fixture
def sandbox(sandbox_server: SandboxServer) -> SandboxServer:
    sandbox_server.clear()
    return sandbox_server


def make_settings(database_url: str, **overrides: object) -> Settings:
    base = Settings(
        database_url=database_url,
        campaigns_dir=ROOT / "campaigns",
        templates_dir=ROOT / "templates",
        public_url="http://127.0.0.1:9",
        sendgrid_api_key=Secret("SG.test"),
        twilio_account_sid="AC" + "0" * 32,
        twilio_auth_token=Secret("test-token"),
        sms_from="+15005550006",
        provider_timeout=5.0,
        lease_seconds=30.0,
    )
    return base.with_overrides(**overrides)


@pytest.fixture
def settings(database_url: str) -> Settings:
    return make_settings(database_url)


def open_policy(settings: Settings) -> PolicyEngine:
    """Policies that never get in the way: no quiet hours, caps or pacing (their own tests use the real ones)."""
    always = Window.parse("00:00-24:00")
    spec = PolicySpec(
        caps=(),
        rate_limits={},
        quiet_hours=QuietHoursSpec(
            sms=always,
            email={Category.NURTURE: EmailWindow(), Category.TRANSACTIONAL: EmailWindow()},
        ),
    )
    return PolicyEngine(spec, settings)


@pytest.fixture
def runtime(settings: Settings, sandbox: SandboxServer) -> Iterator[Runtime]:
    """Wiring on the test database and the sandbox; enqueued ids are collected, not delivered."""
    rt = Runtime(settings, sandbox_url=sandbox.url)
    rt.policy = open_policy(settings)
    queued: list[str] = []
    rt.enqueue_override = queued.extend
    rt.queued = queued  # type: ignore[attr-defined]
    set_settings(settings)
    set_runtime(rt)
    yield rt
    set_runtime(None)
    set_settings(None)


@pytest.fixture
def pg_runtime(pg_database_url: str, sandbox: SandboxServer) -> Iterator[Runtime]:
    """Like ``runtime``, on PostgreSQL only (row locks and SKIP LOCKED behave for real there)."""
    settings = make_settings(pg_database_url)
    rt = Runtime(settings, sandbox_url=sandbox.url)
    rt.policy = open_policy(settings)
    rt.enqueue_override = lambda ids: None
    set_settings(settings)
    set_runtime(rt)
    yield rt
    set_runtime(None)
    set_settings(None)


#: The modules whose tests read or move the clock: dates, windows, holidays, caps, leases, signatures and
#: processes that must agree on the time. They carry the ``clock`` mark, and CI runs them a second time with
#: the whole machine's clock moved (``make test``; ``make time-travel`` runs the whole suite at four instants).
CLOCK_SENSITIVE = frozenset(
    {
        "policy/",
        "faults/",
        "ops/test_analytics.py",
        "inbound/test_autoreply.py",
        "pipeline/test_batch.py",
        "test_bench_smoke.py",
        "policy/test_calendar.py",
        "test_cli.py",
        "test_cli_tick.py",
        "core/test_clock.py",
        "inbound/test_conversation.py",
        "pipeline/test_delivery.py",
        "pipeline/test_delivery_group.py",
        "test_e2e.py",
        "inbound/test_sms.py",
        "domain/test_intent.py",
        "pipeline/test_links.py",
        "ops/test_sandbox.py",
        "pipeline/test_scheduler.py",
        "domain/test_seed_campaigns.py",
        "domain/test_tokens.py",
        "pipeline/test_uncertain.py",
        "workers/test_workers.py",
        "workers/test_workers_group.py",
        "security/test_tokens.py",
        "security/test_webhook_attacks.py",
        "web/test_inbound_parse.py",
        "web/test_metrics_api.py",
        "web/test_unsubscribe.py",
        "web/test_webhooks.py",
        "web/test_webhooks_ingest.py",
    }
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    tests = Path(__file__).parent
    for item in items:
        relative = Path(str(item.path)).relative_to(tests).as_posix()
        if any(relative == name or relative.startswith(name) for name in CLOCK_SENSITIVE if name):
            item.add_marker(pytest.mark.clock)


@pytest.fixture(scope="session")
def signer() -> Signer:
    """Signs SendGrid event batches; the ``client`` fixture's app holds its public key."""
    return Signer()


@pytest.fixture
def client(runtime: Runtime, signer: Signer) -> Iterator[TestClient]:
    """The app on ``runtime`` as a browser or a provider reaches it: no key, redirects not followed, server errors
    answered (as 500) rather than raised; public at :data:`PUBLIC_URL`, SendGrid events signed by ``signer``, the
    inbound token :data:`INBOUND_TOKEN`, and no rate limit (tests of the limit build an app of their own)."""
    runtime.settings = runtime.settings.with_overrides(public_url=PUBLIC_URL, public_rate_limit=0.0)
    hooks = WebhookSettings(sendgrid_public_key=signer.public_key, inbound_token=Secret(INBOUND_TOKEN))
    with TestClient(create_app(runtime, hooks), raise_server_exceptions=False, follow_redirects=False) as test:
        yield test


@pytest.fixture
def hr(runtime: Runtime) -> Iterator[TestClient]:
    """The API as HR calls it: a new ``hr`` key on every request; server errors answered (as 500), not raised."""
    with api_client(runtime, raise_server_exceptions=False) as test:
        yield test
