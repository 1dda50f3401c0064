"""``python -m bench [--smoke] [--messages N] [--output FILE]``: run the benchmark, print a table, write JSON."""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from bench import DEFAULT_POSTGRES_URL, DEFAULT_REDIS_URL
from bench.bare import run_bare
from bench.e2e import run_e2e
from bench.harness import ROOT, BenchmarkError, Config, Measurement, install_signal_handlers, machine, versions

FULL_MESSAGES = 20_000
SMOKE_MESSAGES = 200
DEFAULT_OUTPUT = ROOT / "bench" / "results" / "latest.json"


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Messages per second end to end (outbox → worker → SendGrid SDK → sandbox) next to a bare "
        "Dramatiq no-op actor on the same Redis broker and worker settings.",
    )
    parser.add_argument("--smoke", action="store_true", help=f"a seconds-long run ({SMOKE_MESSAGES} messages)")
    parser.add_argument(
        "--messages", type=int, help=f"messages per side (default {FULL_MESSAGES}, smoke {SMOKE_MESSAGES})"
    )
    parser.add_argument("--processes", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument("--threads", type=int, default=8, help="threads per worker process (default 8)")
    parser.add_argument("--warmup", type=int, help="untimed messages before each side (default processes×threads×4)")
    parser.add_argument(
        "--redis-url",
        default=os.environ.get("OUTREACH_BENCH_REDIS_URL", DEFAULT_REDIS_URL),
        help=f"Redis for the broker (default $OUTREACH_BENCH_REDIS_URL or {DEFAULT_REDIS_URL})",
    )
    parser.add_argument(
        "--postgres-url",
        default=os.environ.get("OUTREACH_BENCH_POSTGRES_URL", DEFAULT_POSTGRES_URL),
        help="PostgreSQL server; a scratch database is created on it and dropped "
        f"(default $OUTREACH_BENCH_POSTGRES_URL or {DEFAULT_POSTGRES_URL})",
    )
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds allowed per side (default 900)")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="JSON results file")
    args = parser.parse_args(argv)
    if args.messages is None:
        args.messages = SMOKE_MESSAGES if args.smoke else FULL_MESSAGES
    if args.warmup is None:
        args.warmup = args.processes * args.threads * 4
    if args.messages < 1 or args.warmup < 2 or args.processes < 1 or args.threads < 1:
        parser.error("--messages, --processes and --threads must be positive and --warmup at least 2")
    return args


def require(name: str, url: str, default_port: int) -> None:
    parsed = urlparse(url)
    host, port = parsed.hostname or "127.0.0.1", parsed.port or default_port
    try:
        socket.create_connection((host, port), timeout=3).close()
    except OSError as exc:
        raise BenchmarkError(f"{name} is not reachable at {host}:{port} ({exc}); `make services` starts one") from None


def build_report(config: Config, bare: Measurement, e2e: Measurement) -> dict[str, Any]:
    lost = (bare.lost or 0) + (e2e.lost or 0)
    duplicated = (bare.duplicated or 0) + (e2e.duplicated or 0)
    return {
        "benchmark": "e2e_vs_bare_dramatiq",
        "ok": lost == 0 and duplicated == 0,
        "smoke": config.smoke,
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "versions": versions(),
        "settings": {
            "broker": "redis",
            "processes": config.processes,
            "threads": config.threads,
            "messages": config.messages,
            "warmup": config.warmup,
        },
        "bare": bare.to_dict(),
        "e2e": e2e.to_dict(),
        "ratio": round(e2e.rate / bare.rate, 4) if bare.rate else None,
        "lost": lost,
        "duplicated": duplicated,
    }


def render(report: dict[str, Any]) -> str:
    settings, found, host = report["settings"], report["versions"], report["machine"]
    bare, e2e = report["bare"], report["e2e"]

    def count(value: int | None) -> str:
        return "n/a" if value is None else str(value)

    lines = [
        f"outreach benchmark{' (smoke)' if report['smoke'] else ''}: Redis broker, "
        f"{settings['processes']} worker processes x {settings['threads']} threads, "
        f"{settings['warmup']} warm-up messages per side (untimed)",
        f"machine: {host['cpu_count']} cores ({host['usable_cpus']} usable), {host['platform']}",
        "versions: " + ", ".join(f"{name} {version}" for name, version in found.items()),
        "",
        f"{'':28}{'messages':>10}{'seconds':>10}{'msg/s':>11}{'lost':>7}{'duplicated':>12}",
    ]
    for label, side in (("bare Dramatiq no-op", bare), ("end to end (email, SendGrid)", e2e)):
        lines.append(
            f"{label:28}{side['messages']:>10}{side['seconds']:>10.3f}{side['rate']:>11.1f}"
            f"{count(side['lost']):>7}{count(side['duplicated']):>12}"
        )
    ratio = report["ratio"]
    lines.append(f"{'ratio e2e / bare':28}{'':30}{'n/a' if ratio is None else f'{ratio:.4f}':>11}")
    if bare["worker_cpu_ms_per_message"] is not None and e2e["worker_cpu_ms_per_message"] is not None:
        lines.append(
            f"worker CPU per message: bare {bare['worker_cpu_ms_per_message']:.3f} ms, "
            f"end to end {e2e['worker_cpu_ms_per_message']:.3f} ms (sandbox {e2e['sandbox_cpu_ms_per_message']:.3f} ms)"
        )
    lines.append(
        f"end to end: {e2e['retried']} row(s) retried, sandbox received {e2e['sandbox_messages']} message(s) "
        f"in {e2e['sandbox_requests']} request(s) (warm-up included); set-up took {e2e['setup_seconds']} s"
    )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    install_signal_handlers()
    config = Config(
        messages=args.messages,
        warmup=args.warmup,
        processes=args.processes,
        threads=args.threads,
        redis_url=args.redis_url,
        postgres_url=args.postgres_url,
        timeout=args.timeout,
        smoke=args.smoke,
    )
    try:
        require("Redis", config.redis_url, 6379)
        require("PostgreSQL", config.postgres_url, 5432)
        print(f"bare Dramatiq no-op: {config.messages} messages ...", file=sys.stderr, flush=True)
        bare = run_bare(config)
        print(f"end to end: {config.messages} messages ...", file=sys.stderr, flush=True)
        e2e = run_e2e(config)
    except BenchmarkError as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        return 1
    report = build_report(config, bare, e2e)
    print(render(report))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"results: {args.output}", file=sys.stderr)
    if not report["ok"]:
        print(
            f"benchmark failed: {report['lost']} message(s) lost, {report['duplicated']} duplicated",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
