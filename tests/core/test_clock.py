"""The one clock: its kinds, overrides that stay in their thread, and no other read of the time in the code base."""

from __future__ import annotations

import ast
import re
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from outreach.core import clock
from outreach.core.clock import FixedClock, TravelClock, WallClock, check_instant, set_clock, travel, using, utcnow
from outreach.core.config import Settings
from outreach.core.errors import ConfigurationError
from tests.conftest import DEFAULT_NOW, ROOT

pytestmark = pytest.mark.clock

AT = datetime(2028, 2, 29, 23, 59, tzinfo=UTC)


def test_the_suite_starts_every_test_at_the_default_instant() -> None:
    assert timedelta(0) <= utcnow() - DEFAULT_NOW < timedelta(minutes=5)


@pytest.mark.wall_clock
def test_a_wall_clock_test_reads_the_machine() -> None:
    assert isinstance(clock.current(), WallClock)
    assert abs(utcnow().timestamp() - time.time()) < 5


def test_travel_clock_runs_on_from_its_start() -> None:
    travelling = TravelClock(AT)
    first = travelling.now()
    time.sleep(0.02)
    assert AT <= first < travelling.now() < AT + timedelta(seconds=5)


def test_fixed_clock_stands_still_until_moved() -> None:
    fixed = FixedClock(AT)
    set_clock(fixed)
    assert utcnow() == AT == utcnow()
    fixed.advance(timedelta(days=1))
    assert utcnow() == AT + timedelta(days=1)
    fixed.set(DEFAULT_NOW)
    assert utcnow() == DEFAULT_NOW


def test_clocks_refuse_naive_instants() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        TravelClock(datetime(2026, 1, 1))


def test_plain_functions_are_clocks_too() -> None:
    set_clock(lambda: AT)
    assert utcnow() == AT


def test_an_override_stays_in_its_own_thread() -> None:
    seen: list[datetime] = []
    with using(FixedClock(AT)):
        assert utcnow() == AT
        worker = threading.Thread(target=lambda: seen.append(utcnow()))
        worker.start()
        worker.join()
    assert seen[0] != AT  # the other thread kept the process's clock
    assert utcnow() != AT


def test_travel_none_leaves_the_clock_alone() -> None:
    set_clock(FixedClock(AT))
    with travel(None):
        assert utcnow() == AT
    with travel(DEFAULT_NOW):
        assert DEFAULT_NOW <= utcnow() < DEFAULT_NOW + timedelta(seconds=5)
    assert utcnow() == AT


def test_clock_start_setting() -> None:
    settings = Settings.from_env({"OUTREACH_CLOCK_START": "2027-03-14T06:59:00Z"})
    assert settings.clock_start == datetime(2027, 3, 14, 6, 59, tzinfo=UTC)
    with pytest.raises(ConfigurationError, match="OUTREACH_CLOCK_START needs a timezone"):
        Settings.from_env({"OUTREACH_CLOCK_START": "2027-03-14T06:59:00"})
    with pytest.raises(ConfigurationError, match="OUTREACH_CLOCK_START must be an ISO-8601"):
        Settings.from_env({"OUTREACH_CLOCK_START": "next tuesday"})
    with pytest.raises(ConfigurationError, match="never with the real SendGrid"):
        Settings.from_env(
            {
                "OUTREACH_CLOCK_START": "2027-03-14T06:59:00Z",
                "SENDGRID_API_KEY": "SG.real",
                "OUTREACH_SECRET_KEY": "k" * 40,
            }
        )


@pytest.mark.parametrize(
    "instant",
    ["9999-12-31T23:59:59-12:00", "0001-01-01T00:00:00+14:00", "1969-12-31T23:59:59Z", "3000-01-01T00:00:00Z"],
)
def test_time_travel_refuses_instants_out_of_range_by_name(instant: str) -> None:
    from click.testing import CliRunner

    from outreach.cli import main

    result = CliRunner().invoke(main, ["tick", "--now", instant])
    assert result.exit_code == 2 and "--now" in result.output and "must lie between" in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    with pytest.raises(ConfigurationError, match="OUTREACH_CLOCK_START must lie between"):
        Settings.from_env({"OUTREACH_CLOCK_START": instant})
    with pytest.raises(ValueError, match="must lie between"):
        TravelClock(datetime.fromisoformat(instant))


def test_the_edges_of_the_range_are_instants_like_any_other() -> None:
    assert check_instant(datetime(1970, 1, 1, tzinfo=UTC)) == datetime(1970, 1, 1, tzinfo=UTC)
    far = TravelClock(datetime(2999, 12, 31, 23, 0, tzinfo=UTC))
    set_clock(far)
    assert utcnow().year == 2999


# -- nothing else reads the time -------------------------------------------------------------------------------

#: Calls that read the time of day. Durations (time.monotonic, time.perf_counter) are not business time.
_WALL_READS = {
    "datetime.now",
    "datetime.utcnow",
    "datetime.today",
    "date.today",
    "time.time",
    "time.time_ns",
    "time.localtime",
    "time.gmtime",
    "time.ctime",
    "time.asctime",
    "time.strftime",
    "func.now",
    "func.current_timestamp",
    "func.localtimestamp",
    "formatdate",
    "utils.formatdate",
}
#: Reading the time with no argument; with one, these only convert a given instant.
_NO_ARGUMENT_ONLY = {"time.localtime", "time.gmtime", "time.ctime", "time.asctime", "formatdate", "utils.formatdate"}
_SQL_NOW = re.compile(r"\bnow\s*\(\s*\)|\b(current_timestamp|localtimestamp|current_date|statement_timestamp)\b", re.I)
_ALLOWED = {Path("outreach/core/clock.py")}


def _dotted(node: ast.expr) -> str:
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    return ".".join(reversed(parts))


def wall_clock_reads(source: str) -> list[str]:
    """The lines of ``source`` that read the time of day or ask the database for it."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call):
            name = _dotted(node.func)
            tail = ".".join(name.split(".")[-2:])
            if tail in _WALL_READS or name in _WALL_READS:
                if (tail in _NO_ARGUMENT_ONLY or name in _NO_ARGUMENT_ONLY) and (node.args or node.keywords):
                    continue
                found.append((node.lineno, f"{name}()"))
        elif isinstance(node, ast.ImportFrom) and node.module == "time":
            for alias in node.names:
                if alias.name in {"time", "time_ns", "localtime", "gmtime", "ctime"}:
                    found.append((node.lineno, f"from time import {alias.name}"))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and _SQL_NOW.search(node.value):
            found.append((node.lineno, f"SQL reads the database's clock: {node.value.strip()[:60]!r}"))
    return [f"{line}: {what}" for line, what in sorted(found)]


def test_the_scanner_finds_each_kind_of_read() -> None:
    source = (
        "import time\nfrom datetime import date, datetime\nfrom email.utils import formatdate\n"
        "a = datetime.now()\nb = time.time()\nc = date.today()\nd = formatdate()\ne = formatdate(0)\n"
        "f = time.gmtime(0)\ng = time.monotonic()\nh = 'UPDATE t SET x = now()'\ni = sa.func.now()\n"
    )
    assert [line.split(":")[0] for line in wall_clock_reads(source)] == ["4", "5", "6", "7", "11", "12"]


def test_nothing_but_the_clock_module_reads_the_wall_clock() -> None:
    offenders: list[str] = []
    for folder in ("outreach", "workers"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            relative = path.relative_to(ROOT)
            if relative in _ALLOWED:
                continue
            offenders += [f"{relative}:{line}" for line in wall_clock_reads(path.read_text(encoding="utf-8"))]
    assert offenders == [], "read the time through outreach.core.clock instead:\n" + "\n".join(offenders)
