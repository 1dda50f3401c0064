"""The service's side of a benchmark, started one way: the provider sandbox, the workers' environment and settings.

:mod:`bench.e2e`, :mod:`bench.nurture`, :mod:`bench.latency` and :mod:`bench.memory` run the service's own
``dramatiq workers`` against a scratch database (:func:`bench.harness.scratch_database`), a queue of the run's
own (:func:`bench.harness.fresh_queue`) and the provider sandbox in a process of its own, and wait on them the
same way. What they share is here; what each one seeds and measures stays in its module.
"""

from __future__ import annotations

import contextlib
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

from bench.bare import WORKER_SETTINGS
from bench.harness import (
    ROOT,
    BenchmarkError,
    Service,
    clean_environment,
    free_port,
    get_json,
    wait_until,
)
from outreach.core.config import Settings, set_settings

#: The Twilio auth token the sandbox signs with and the workers' SDK is given.
SANDBOX_TOKEN = "sandbox-token"

#: ``python -m`` arguments that serve the shipped sandbox; the port is appended. No SendGrid events: the benchmarks
#: measure sending, and no service listens for them.
SANDBOX_COMMAND = ("outreach", "sandbox", "--host", "127.0.0.1", "--no-sendgrid-events", "--port")


# -- the sandbox -------------------------------------------------------------------------------------------


def launch_sandbox(
    stack: contextlib.ExitStack, logs: Path, *, name: str = "sandbox", command: Sequence[str] = SANDBOX_COMMAND
) -> tuple[Service, str]:
    """The provider sandbox in a process of its own (so it shares no GIL with the driver or a worker), started
    but not yet answering (:func:`wait_for_sandbox`); stopped when ``stack`` closes. Returns it and its URL.

    ``command`` is what follows ``python -m``, the port being appended (a benchmark may serve its own sandbox)."""
    port = free_port()
    sandbox_url = f"http://127.0.0.1:{port}"
    argv = [sys.executable, "-m", *command, str(port)]
    env = clean_environment({"TWILIO_AUTH_TOKEN": SANDBOX_TOKEN})
    sandbox = stack.enter_context(Service(name, argv, env, logs))
    return sandbox, sandbox_url


def wait_for_sandbox(sandbox: Service, sandbox_url: str) -> None:
    """Until the sandbox answers (failing at once if its process exits)."""
    wait_until(_answers(sandbox_url), timeout=60, interval=0.1, what="the sandbox to start", check=sandbox.check)


def start_sandbox(
    stack: contextlib.ExitStack, logs: Path, *, name: str = "sandbox", command: Sequence[str] = SANDBOX_COMMAND
) -> tuple[Service, str]:
    """:func:`launch_sandbox`, then :func:`wait_for_sandbox`: the sandbox, up."""
    sandbox, sandbox_url = launch_sandbox(stack, logs, name=name, command=command)
    wait_for_sandbox(sandbox, sandbox_url)
    return sandbox, sandbox_url


def _answers(sandbox_url: str) -> Callable[[], bool]:
    def up() -> bool:
        try:
            get_json(f"{sandbox_url}/_sandbox/stats", timeout=2)
        except OSError:
            return False
        return True

    return up


def sandbox_received(sandbox_url: str) -> Counter[str]:
    """How many times the sandbox received each outbox id (the ``outreach_id`` custom arg of what it accepted)."""
    return Counter(
        str(record.get("custom_args", {}).get("outreach_id"))
        for record in get_json(f"{sandbox_url}/_sandbox/messages", timeout=300)
    )


def count_duplicated(received: Counter[str], expected: set[str]) -> int:
    """Receptions beyond the first of each expected id, plus every reception of an id that was not expected."""
    return sum(n - 1 for n in received.values() if n > 1) + sum(
        n for outbox_id, n in received.items() if outbox_id not in expected
    )


# -- the workers -------------------------------------------------------------------------------------------


def worker_environment(database_url: str, redis_url: str, queue: str, sandbox_url: str, **extra: str) -> dict[str, str]:
    """The service's workers' environment: the scratch database, the run's queue, both SDKs at the sandbox, the
    worker settings every side of a comparison runs with (:data:`bench.bare.WORKER_SETTINGS`), then ``extra``."""
    return clean_environment(
        {
            "OUTREACH_DATABASE_URL": database_url,
            "OUTREACH_BROKER_URL": redis_url,
            "OUTREACH_QUEUE": queue,
            "SENDGRID_API_KEY": "SG.bench",
            "OUTREACH_SENDGRID_HOST": sandbox_url,
            "TWILIO_ACCOUNT_SID": "AC" + "0" * 32,
            "TWILIO_AUTH_TOKEN": SANDBOX_TOKEN,
            "OUTREACH_TWILIO_BASE_URL": sandbox_url,
            "OUTREACH_SMS_FROM": "+15005550006",
            "OUTREACH_LOG_LEVEL": "WARNING",
            **WORKER_SETTINGS,
            **extra,
        }
    )


def service_settings(stack: contextlib.ExitStack, database_url: str) -> Settings:
    """The service's settings on the scratch database with the shipped campaigns and templates, made this (the
    driver) process's settings until ``stack`` closes."""
    settings = Settings(database_url=database_url, campaigns_dir=ROOT / "campaigns", templates_dir=ROOT / "templates")
    set_settings(settings)
    stack.callback(set_settings, None)
    return settings


# -- waiting -----------------------------------------------------------------------------------------------


def alive(*services: Service) -> Callable[[], None]:
    """A ``check`` for :func:`bench.harness.wait_until`: raises as soon as one of ``services`` has exited."""

    def check() -> None:
        for service in services:
            service.check()

    return check


def failing_fast(
    done: Callable[[], bool], failures: Callable[[], str], what: str, every: int = 40
) -> Callable[[], bool]:
    """``done`` for :func:`bench.harness.wait_until` that also, every ``every`` polls (~2 s at 0.05 s), asks
    ``failures`` and raises if it names any: rows that ended other than sent must not wait out the timeout."""
    polls = 0

    def poll() -> bool:
        nonlocal polls
        polls += 1
        if polls % every == 0 and (failed := failures()):
            raise BenchmarkError(f"{what} ended other than sent: {failed}")
        return done()

    return poll
