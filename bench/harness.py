"""What both sides of the benchmark share: settings, child processes, the Redis queue and the stopwatch.

Both sides are measured the same way. Worker processes start on an empty queue; every message of the run is
written to the queue's message hash up front, where workers cannot see it yet; a small warm-up batch is then
released and processed (which proves the workers are up and warms their caches), and the moment it is done the
measured batch is released with one ``RPUSH``. The clock runs from that ``RPUSH`` until the last message is
done, so enqueueing is not part of the window and neither is worker start-up.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from types import TracebackType
from typing import Any, TextIO

import redis
from dramatiq import Message

ROOT = Path(__file__).resolve().parent.parent
NAMESPACE = "dramatiq"  # RedisBroker's default key prefix, which the service's broker uses too

#: Inherited variables with these prefixes are dropped so the machine's own settings cannot leak into a run.
_SCRUBBED_PREFIXES = ("OUTREACH_", "SENDGRID_", "TWILIO_", "dramatiq_")


class BenchmarkError(RuntimeError):
    """The run could not be measured, or lost or duplicated messages: the benchmark must fail."""


@dataclass(frozen=True)
class Options:
    """What ``python -m bench`` hands to every benchmark module's ``run(options) -> list[Figure]``.

    ``sizes`` holds overrides from ``--size name=N`` (e.g. ``webhooks.events=20000``); a benchmark asks for its
    sizes with :meth:`size`, giving its full and smoke defaults, so one command line can shrink any of them.
    """

    smoke: bool = False
    redis_url: str = "redis://127.0.0.1:6379/14"
    postgres_url: str = "postgresql://postgres@127.0.0.1:5432/test"
    processes: int = 2
    threads: int = 8
    timeout: float = 900.0
    sizes: Mapping[str, int] = field(default_factory=dict)
    token: str = field(default_factory=lambda: uuid.uuid4().hex[:10])

    def size(self, name: str, full: int, smoke: int) -> int:
        """The size called ``name`` (``<benchmark>.<what>``): an override if given, else the smoke or full one."""
        if name in self.sizes:
            return self.sizes[name]
        return smoke if self.smoke else full

    def queue_name(self, side: str) -> str:
        # Unique per run and per side, so concurrent runs on one Redis never touch each other's keys.
        return f"bench-{side}-{self.token}"


@dataclass
class Figure:
    """One line of the table: a measured value, its baseline from the same run, the ratio and the goal.

    ``met`` is None when the figure has no goal (or the goal cannot be judged, e.g. in a smoke run where sizes are
    too small to mean anything). ``checks`` are correctness counts (``lost``, ``duplicated``, ...; None where not
    observable); ``ok`` is False when any check failed or the benchmark broke: that, never ``met``, fails CI.
    """

    name: str
    value: float | None
    unit: str
    baseline_name: str | None = None
    baseline_value: float | None = None
    ratio: float | None = None
    goal: str = ""
    met: bool | None = None
    checks: dict[str, int | None] = field(default_factory=dict)
    ok: bool = True
    details: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.ratio is None and self.value is not None and self.baseline_value:
            self.ratio = self.value / self.baseline_value
        if any(count for count in self.checks.values()):
            self.ok = False

    def to_dict(self) -> dict[str, Any]:
        def rounded(number: float | None) -> float | None:
            # Significant digits, not decimals: a 4 ms baseline kept to 4 decimals lost 1-2% of its value.
            return None if number is None else float(f"{number:.6g}")

        return {
            "name": self.name,
            "value": rounded(self.value),
            "unit": self.unit,
            "baseline_name": self.baseline_name,
            "baseline_value": rounded(self.baseline_value),
            "ratio": rounded(self.ratio),
            "goal": self.goal,
            "met": self.met,
            "checks": dict(self.checks),
            "ok": self.ok,
            "details": self.details,
        }


def at_least(value: float | None, goal: float, options: Options) -> bool | None:
    """``value >= goal``; None when there is no value or in a smoke run (smoke sizes say nothing about speed)."""
    if value is None or options.smoke:
        return None
    return value >= goal


def at_most(value: float | None, goal: float, options: Options) -> bool | None:
    """``value <= goal``; None when there is no value or in a smoke run."""
    if value is None or options.smoke:
        return None
    return value <= goal


@dataclass(frozen=True)
class Config:
    messages: int
    warmup: int
    processes: int
    threads: int
    redis_url: str
    postgres_url: str
    timeout: float
    smoke: bool
    token: str = field(default_factory=lambda: uuid.uuid4().hex[:10])

    def queue_name(self, side: str) -> str:
        # Unique per run and per side, so concurrent runs on one Redis never touch each other's keys.
        return f"bench-{side}-{self.token}"

    @classmethod
    def of(cls, options: Options, messages: int = 0, warmup: int = 0) -> Config:
        """One side of a comparison: ``messages`` measured after ``warmup`` untimed ones, the rest from ``options``."""
        return cls(
            messages=messages,
            warmup=warmup,
            processes=options.processes,
            threads=options.threads,
            redis_url=options.redis_url,
            postgres_url=options.postgres_url,
            timeout=options.timeout,
            smoke=options.smoke,
            token=options.token,
        )


@dataclass
class Measurement:
    """One side's figures. ``lost`` and ``duplicated`` are None where they cannot be observed."""

    name: str
    messages: int
    seconds: float
    lost: int | None = 0
    duplicated: int | None = 0
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.messages / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "messages": self.messages,
            "seconds": round(self.seconds, 4),
            "rate": round(self.rate, 2),
            "lost": self.lost,
            "duplicated": self.duplicated,
            **self.details,
        }


# -- environment -------------------------------------------------------------------------------------------


def clean_environment(extra: Mapping[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(_SCRUBBED_PREFIXES)}
    env.update({"NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost", "PYTHONUNBUFFERED": "1"})
    env.update(extra)
    return env


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in ("dramatiq", "sendgrid", "twilio", "SQLAlchemy", "redis", "psycopg"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def machine() -> dict[str, Any]:
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu_count": os.cpu_count(),
        "usable_cpus": usable,
        "platform": platform.platform(),
        "python_implementation": platform.python_implementation(),
    }


def progress(message: str) -> None:
    """A line on stderr, so stdout stays the table alone."""
    print(f"  {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def get_json(url: str, timeout: float = 30.0) -> Any:
    with _opener.open(url, timeout=timeout) as response:
        return json.loads(response.read())


def install_signal_handlers() -> None:
    """Turn SIGTERM/SIGHUP into SystemExit so every ``finally`` (processes, database, keys) still runs."""

    def stop(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, stop)


# -- child processes ---------------------------------------------------------------------------------------


class Service:
    """A child process in its own process group, logging to a file; stopped with SIGTERM, then SIGKILL."""

    def __init__(self, name: str, argv: Sequence[str], env: Mapping[str, str], log_dir: Path) -> None:
        self.name = name
        self.argv = list(argv)
        self.env = dict(env)
        self.log_path = log_dir / f"{name}.log"
        self._log: TextIO | None = None
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> Service:
        self._log = self.log_path.open("w")
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

    def __enter__(self) -> Service:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def check(self) -> None:
        """Raise if the process has exited (a worker that dies mid-run must stop the benchmark)."""
        if self.process is not None and self.process.poll() is not None:
            raise BenchmarkError(
                f"{self.name} exited with code {self.process.returncode}; its log ends with:\n{self.tail()}"
            )

    def stop(self, grace: float = 10.0) -> None:
        process, self.process = self.process, None
        if process is not None:
            group = process.pid  # start_new_session makes the child the leader of its own group
            if process.poll() is None:
                self._signal(group, signal.SIGTERM)
                try:
                    process.wait(timeout=grace)
                except subprocess.TimeoutExpired:
                    self._signal(group, signal.SIGKILL)
                    process.wait(timeout=grace)
            # Worker processes forked by a master that is gone would otherwise linger.
            self._signal(group, signal.SIGKILL)
        if self._log is not None:
            self._log.close()
            self._log = None

    @staticmethod
    def _signal(group: int, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(group, sig)

    def cpu_seconds(self) -> float | None:
        """User + system CPU time of every live process in this service's group (Linux; None elsewhere)."""
        if self.process is None or not Path("/proc/self/stat").exists():
            return None
        tick = os.sysconf("SC_CLK_TCK")
        total = 0
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue  # gone in the meantime
            if int(fields[2]) == self.process.pid:  # the process group
                total += int(fields[11]) + int(fields[12])
        return total / tick

    def tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:]) or "(empty log)"


def dramatiq_workers(
    name: str, module: str, queue: str, config: Config, env: Mapping[str, str], log_dir: Path
) -> Service:
    argv = [
        sys.executable,
        "-m",
        "dramatiq",
        module,
        "--processes",
        str(config.processes),
        "--threads",
        str(config.threads),
        "--queues",
        queue,
    ]
    return Service(name, argv, env, log_dir)


# -- the queue ---------------------------------------------------------------------------------------------


class RedisQueue:
    """One Dramatiq queue on Redis, written to directly with the layout ``dramatiq/brokers/redis/dispatch.lua``
    uses: message bodies in the hash ``<ns>:<queue>.msgs``, their ids in the list ``<ns>:<queue>``."""

    def __init__(self, url: str, name: str) -> None:
        self.client: redis.Redis = redis.Redis.from_url(url)
        self.name = name
        self.list_key = f"{NAMESPACE}:{name}"
        self.hash_key = f"{NAMESPACE}:{name}.msgs"
        self.delay_hash_key = f"{NAMESPACE}:{name}.DQ.msgs"
        self.dead_key = f"{NAMESPACE}:{name}.XQ"

    def stage(self, actor_name: str, args: Iterable[tuple[Any, ...]], chunk: int = 1000) -> list[str]:
        """Store the message bodies (invisible to workers until released); returns their Redis ids in order."""
        ids: list[str] = []
        batch: dict[str, bytes] = {}
        pipe = self.client.pipeline(transaction=False)
        for arguments in args:
            redis_id = str(uuid.uuid4())
            message: Message[Any] = Message(
                queue_name=self.name,
                actor_name=actor_name,
                args=arguments,
                kwargs={},
                options={"redis_message_id": redis_id},
            )
            batch[redis_id] = message.encode()
            ids.append(redis_id)
            if len(batch) >= chunk:
                pipe.hset(self.hash_key, mapping=batch)  # type: ignore[arg-type]
                batch = {}
        if batch:
            pipe.hset(self.hash_key, mapping=batch)  # type: ignore[arg-type]
        pipe.execute()
        return ids

    def release(self, ids: Sequence[str]) -> None:
        """Make the staged messages visible to the workers, all at once (one command)."""
        if ids:
            self.client.rpush(self.list_key, *ids)

    def counts(self) -> tuple[int, int, int]:
        """(ids waiting in the list, bodies not yet acked, bodies in the delay queue)."""
        pipe = self.client.pipeline(transaction=False)
        pipe.llen(self.list_key)
        pipe.hlen(self.hash_key)
        pipe.hlen(self.delay_hash_key)
        waiting, bodies, delayed = pipe.execute()
        return int(waiting), int(bodies), int(delayed)

    def dead(self) -> int:
        return int(self.client.zcard(self.dead_key))

    def cleanup(self) -> None:
        """Delete every key of this queue (its list, hashes, delay and dead-letter queues, ack sets)."""
        keys = list(self.client.scan_iter(match=f"{NAMESPACE}:*{self.name}*", count=1000))
        if keys:
            self.client.delete(*keys)

    def close(self) -> None:
        self.client.close()


@contextlib.contextmanager
def fresh_queue(url: str, name: str) -> Iterator[RedisQueue]:
    """The queue called ``name``, rid of anything a killed run left behind, and deleted (every key) afterwards."""
    queue = RedisQueue(url, name)
    try:
        queue.cleanup()
        yield queue
    finally:
        queue.cleanup()
        queue.close()


def wait_drained(
    queue: RedisQueue,
    *,
    timeout: float,
    interval: float,
    check: Callable[[], None] | None,
    what: str = "the queue to drain",
) -> float:
    """Until every message is acked (none waiting, unacked or delayed: nothing left that could run twice);
    returns the ``perf_counter`` at which that first held (:func:`wait_until`)."""
    return wait_until(lambda: queue.counts() == (0, 0, 0), timeout=timeout, interval=interval, what=what, check=check)


# -- databases ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def scratch_database(server_url: str, prefix: str = "outreach_bench") -> Iterator[str]:
    """A new database on the PostgreSQL server, migrated to head; dropped afterwards whatever happened.

    Yields its SQLAlchemy URL (psycopg driver)."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    from outreach.core.db import dispose_engines, normalise_url, upgrade

    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    admin = create_engine(normalise_url(server_url), isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{name}"'))
        try:
            url = make_url(normalise_url(server_url)).set(database=name).render_as_string(hide_password=False)
            upgrade(url)
            yield url
        finally:
            dispose_engines()
            with admin.connect() as connection:
                connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        admin.dispose()


# -- the stopwatch -----------------------------------------------------------------------------------------


def cpu_per_message(before: float | None, after: float | None, messages: int) -> float | None:
    """Milliseconds of CPU per message between two :meth:`Service.cpu_seconds` readings."""
    if before is None or after is None or messages <= 0:
        return None
    return round((after - before) * 1000 / messages, 3)


def wait_until(
    done: Callable[[], bool],
    *,
    timeout: float,
    interval: float,
    what: str,
    check: Callable[[], None] | None = None,
) -> float:
    """Poll ``done`` every ``interval`` seconds; returns the ``perf_counter`` at which it first held."""
    deadline = time.perf_counter() + timeout
    while True:
        if done():
            return time.perf_counter()
        if check is not None:
            check()
        if time.perf_counter() > deadline:
            raise BenchmarkError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)
