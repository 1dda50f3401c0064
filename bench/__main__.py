"""``python -m bench [--smoke] [--only name[,name]]``: run every benchmark, print one table, write it as JSON.

Every benchmark is a module ``bench.<name>`` with ``run(options: Options) -> list[Figure]``. A module that is not
there (yet) is reported as missing; one that raises is reported as broken and the others still run. The exit
status is 1 when a benchmark broke or a figure failed a correctness check (lost, duplicated, ...) — never
because a goal was not met: these machines are noisy, and CI runs the smoke sizes, which say nothing about speed.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import socket
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from bench import DEFAULT_POSTGRES_URL, DEFAULT_REDIS_URL
from bench.harness import (
    ROOT,
    BenchmarkError,
    Figure,
    Options,
    install_signal_handlers,
    machine,
    versions,
)

#: Every benchmark, in the order they run (and appear in the table).
BENCHMARKS = ("e2e", "nurture", "scheduler", "webhooks", "latency", "memory")
DEFAULT_OUTPUT = ROOT / "bench" / "results" / "latest.json"

Runner = Callable[[Options], list[Figure]]


@dataclass
class Outcome:
    """What one benchmark module gave: figures, or why there are none."""

    name: str
    #: "ok", "failed" (a check failed), "broken" (raised), "missing" (no module or no run()), "interrupted"
    status: str
    seconds: float = 0.0
    figures: list[Figure] = field(default_factory=list)
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "status": self.status,
            "seconds": round(self.seconds, 1),
            "error": self.error,
            "figures": [figure.to_dict() for figure in self.figures],
        }


# -- the command line --------------------------------------------------------------------------------------


def _size(text: str) -> tuple[str, int]:
    name, sep, value = text.partition("=")
    if not sep or "." not in name:
        raise argparse.ArgumentTypeError(f"--size wants <benchmark>.<what>=N, got {text!r}")
    try:
        number = int(value.replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--size {name}: {value!r} is not a whole number") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"--size {name}: must be positive")
    return name.strip(), number


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Every benchmark of the service, each next to a baseline measured in the same run; "
        "one table on stdout, the same as JSON.",
    )
    parser.add_argument("--smoke", action="store_true", help="seconds-long sizes (what CI runs)")
    parser.add_argument("--only", help=f"comma-separated benchmarks to run (default: all of {', '.join(BENCHMARKS)})")
    parser.add_argument(
        "--size",
        type=_size,
        action="append",
        default=[],
        metavar="BENCH.WHAT=N",
        help="override one size, e.g. --size e2e.messages=5000 (repeatable; see bench/README.md for names)",
    )
    parser.add_argument("--processes", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument("--threads", type=int, default=8, help="threads per worker process (default 8)")
    parser.add_argument(
        "--redis-url",
        default=os.environ.get("OUTREACH_BENCH_REDIS_URL", DEFAULT_REDIS_URL),
        help=f"Redis for the broker (default $OUTREACH_BENCH_REDIS_URL or {DEFAULT_REDIS_URL})",
    )
    parser.add_argument(
        "--postgres-url",
        default=os.environ.get("OUTREACH_BENCH_POSTGRES_URL", DEFAULT_POSTGRES_URL),
        help="PostgreSQL server; each benchmark creates a scratch database on it and drops it "
        f"(default $OUTREACH_BENCH_POSTGRES_URL or {DEFAULT_POSTGRES_URL})",
    )
    parser.add_argument("--timeout", type=float, help="seconds allowed per measured step (default 900, smoke 180)")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="JSON results file")
    args = parser.parse_args(argv)
    if args.only:
        args.only = [name.strip() for name in args.only.split(",") if name.strip()]
        unknown = [name for name in args.only if name not in BENCHMARKS]
        if unknown:
            parser.error(f"--only: unknown benchmark(s) {', '.join(unknown)}; known: {', '.join(BENCHMARKS)}")
    else:
        args.only = list(BENCHMARKS)
    if args.timeout is None:
        args.timeout = 180.0 if args.smoke else 900.0
    if args.processes < 1 or args.threads < 1 or args.timeout <= 0:
        parser.error("--processes, --threads and --timeout must be positive")
    return args


# -- servers and versions ----------------------------------------------------------------------------------


def require(name: str, url: str, default_port: int) -> None:
    parsed = urlparse(url)
    host, port = parsed.hostname or "127.0.0.1", parsed.port or default_port
    try:
        socket.create_connection((host, port), timeout=3).close()
    except OSError as exc:
        raise BenchmarkError(f"{name} is not reachable at {host}:{port} ({exc}); `make services` starts one") from None


def server_versions(options: Options) -> dict[str, str]:
    """The PostgreSQL and Redis servers' own versions (the client libraries' are in :func:`versions`)."""
    found: dict[str, str] = {}
    try:
        import psycopg

        with psycopg.connect(options.postgres_url, connect_timeout=5) as connection:
            row = connection.execute("SHOW server_version").fetchone()
            found["PostgreSQL server"] = str(row[0]).split()[0] if row else "unknown"
    except Exception as exc:  # a version is worth a line, not a failed run
        found["PostgreSQL server"] = f"unknown ({type(exc).__name__})"
    try:
        import redis

        client = redis.Redis.from_url(options.redis_url, socket_timeout=5)
        try:
            found["Redis server"] = str(client.info("server").get("redis_version", "unknown"))
        finally:
            client.close()
    except Exception as exc:
        found["Redis server"] = f"unknown ({type(exc).__name__})"
    return found


# -- running -----------------------------------------------------------------------------------------------


def find(name: str) -> Runner | None:
    """The module's ``run``, or None when the module (or its ``run``) is not there."""
    try:
        module = importlib.import_module(f"bench.{name}")
    except ModuleNotFoundError as exc:
        if exc.name == f"bench.{name}":
            return None
        raise
    runner = getattr(module, "run", None)
    return runner if callable(runner) else None


def run_one(name: str, options: Options) -> Outcome:
    started = time.perf_counter()
    try:
        runner = find(name)
        if runner is None:
            return Outcome(name, "missing", error=f"bench/{name}.py has no run(options) yet")
        figures = runner(options)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BenchmarkError as exc:
        return Outcome(name, "broken", time.perf_counter() - started, error=str(exc))
    except Exception as exc:
        detail = "".join(traceback.format_exception(exc)[-6:])
        return Outcome(name, "broken", time.perf_counter() - started, error=f"{type(exc).__name__}: {exc}\n{detail}")
    seconds = time.perf_counter() - started
    if not figures:
        return Outcome(name, "broken", seconds, error="run() returned no figures")
    status = "ok" if all(figure.ok for figure in figures) else "failed"
    return Outcome(name, status, seconds, figures)


# -- the table ---------------------------------------------------------------------------------------------


def _number(value: float | None) -> str:
    if value is None:
        return "n/a"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}"


def _met(met: bool | None) -> str:
    return {True: "met", False: "NOT MET", None: "-"}[met]


def _checks(figure: Figure) -> str:
    parts = [f"{key} {'n/a' if value is None else value}" for key, value in figure.checks.items()]
    return ("" if figure.ok else "FAILED ") + ", ".join(parts)


def table_rows(outcomes: Sequence[Outcome]) -> list[list[str]]:
    rows: list[list[str]] = []
    for outcome in outcomes:
        if not outcome.figures:
            rows.append([outcome.name, outcome.status.upper(), "", "", "", "", "", "", ""])
            continue
        for figure in outcome.figures:
            baseline = "" if figure.baseline_value is None else f"{_number(figure.baseline_value)} {figure.unit}"
            if figure.baseline_name:
                baseline = f"{baseline} ({figure.baseline_name})".strip()
            rows.append(
                [
                    figure.name,
                    _number(figure.value),
                    figure.unit,
                    baseline,
                    "" if figure.ratio is None else f"{figure.ratio:.3g}×",
                    figure.goal,
                    _met(figure.met),
                    _checks(figure),
                    f"{outcome.seconds:.0f}",
                ]
            )
    return rows


def render(report: dict[str, Any], outcomes: Sequence[Outcome]) -> str:
    host, found = report["machine"], report["versions"]
    header = ["figure", "value", "unit", "baseline", "ratio", "goal", "goal met", "checks", "run s"]
    rows = table_rows(outcomes)
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    right = {1, 4, 8}

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            cell.rjust(widths[i]) if i in right else cell.ljust(widths[i]) for i, cell in enumerate(cells)
        ).rstrip()

    settings = report["settings"]
    lines = [
        f"outreach benchmarks{' (smoke sizes: figures say nothing about speed)' if report['smoke'] else ''}, "
        f"{report['finished_at']}",
        f"machine: {host['cpu_count']} cores ({host['usable_cpus']} usable), {host['platform']}",
        f"workers: {settings['processes']} processes × {settings['threads']} threads on Redis",
        "versions: " + ", ".join(f"{name} {version}" for name, version in found.items()),
        "",
        line(header),
        line(["-" * width for width in widths]),
        *(line(row) for row in rows),
    ]
    for outcome in outcomes:
        if outcome.error:
            first = outcome.error.strip().splitlines()[0]
            lines.append(f"{outcome.name}: {outcome.status}: {first}")
    lines.append(f"total {report['seconds']:.0f} s")
    return "\n".join(lines)


def markdown(report: dict[str, Any], outcomes: Sequence[Outcome]) -> str:
    """The table as Markdown, for the README's performance section (written next to the JSON)."""
    host, found = report["machine"], report["versions"]
    lines = [
        f"{host['cpu_count']} cores; "
        + ", ".join(f"{name} {version}" for name, version in found.items())
        + f"; {report['finished_at'][:10]}{' (smoke sizes)' if report['smoke'] else ''}",
        "",
        "| figure | value | baseline (same run) | ratio | goal | met |",
        "| --- | ---: | ---: | ---: | --- | --- |",
    ]
    for row in table_rows(outcomes):
        name, value, unit, baseline, ratio, goal, met, checks, _ = row
        if checks.startswith("FAILED"):
            met = f"{met}; {checks}"
        shown = f"{value} {unit}".strip()
        lines.append(f"| {name} | {shown} | {baseline} | {ratio} | {goal} | {met} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    install_signal_handlers()
    options = Options(
        smoke=args.smoke,
        redis_url=args.redis_url,
        postgres_url=args.postgres_url,
        processes=args.processes,
        threads=args.threads,
        timeout=args.timeout,
        sizes=dict(args.size),
    )
    try:
        require("Redis", options.redis_url, 6379)
        require("PostgreSQL", options.postgres_url, 5432)
    except BenchmarkError as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        return 1
    started = time.perf_counter()
    outcomes: list[Outcome] = []
    interrupted: BaseException | None = None
    for name in args.only:
        print(f"{name} ...", file=sys.stderr, flush=True)
        began = time.perf_counter()
        try:
            outcome = run_one(name, options)
        except (KeyboardInterrupt, SystemExit) as exc:
            # Still print and write what was measured; the benchmark's own clean-up has run.
            elapsed = time.perf_counter() - began
            outcomes.append(Outcome(name, "interrupted", elapsed, error="interrupted (SIGINT/SIGTERM)"))
            interrupted = exc
            break
        print(f"{name}: {outcome.status} in {outcome.seconds:.1f} s", file=sys.stderr, flush=True)
        if outcome.status == "broken" and outcome.error:
            print(outcome.error, file=sys.stderr, flush=True)
        outcomes.append(outcome)
    report = {
        "ok": all(outcome.status in ("ok", "missing") for outcome in outcomes),
        "smoke": options.smoke,
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "seconds": round(time.perf_counter() - started, 1),
        "machine": machine(),
        "versions": {**versions(), **server_versions(options)},
        "settings": {
            "processes": options.processes,
            "threads": options.threads,
            "sizes": dict(options.sizes),
            "only": args.only,
        },
        "missing": [outcome.name for outcome in outcomes if outcome.status == "missing"],
        "benchmarks": [outcome.to_dict() for outcome in outcomes],
    }
    print(render(report, outcomes))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    args.output.with_suffix(".md").write_text(markdown(report, outcomes))
    print(f"results: {args.output} (and {args.output.with_suffix('.md').name}, for the README)", file=sys.stderr)
    if interrupted is not None:
        print("benchmark interrupted", file=sys.stderr)
        return 130 if isinstance(interrupted, KeyboardInterrupt) else int(getattr(interrupted, "code", 1) or 1)
    if not report["ok"]:
        bad = [f"{outcome.name} ({outcome.status})" for outcome in outcomes if outcome.status not in ("ok", "missing")]
        print(f"benchmark failed: {', '.join(bad)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
