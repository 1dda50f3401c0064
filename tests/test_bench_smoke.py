"""The benchmarks' smoke run, as CI runs it: every benchmark runs at tiny sizes, nothing is lost or duplicated.

It fails when a benchmark breaks or a correctness check fails — never because a figure is slow (smoke sizes say
nothing about speed, and goals are judged only on full runs).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.__main__ import BENCHMARKS
from tests.conftest import POSTGRES_URL, ROOT, require_server

#: Seconds for the smoke of every benchmark together (each takes seconds to tens of seconds on 2 cores).
SMOKE_TIMEOUT = 600


def bench_environment() -> dict[str, str]:
    env = dict(os.environ)
    # The suite's servers, when pointed elsewhere, are the benchmarks' too (each makes and drops its own database
    # and uses queue names of its own, so sharing them with the tests is safe).
    if "OUTREACH_TEST_POSTGRES_URL" in os.environ:
        env.setdefault("OUTREACH_BENCH_POSTGRES_URL", os.environ["OUTREACH_TEST_POSTGRES_URL"])
    if "OUTREACH_TEST_REDIS_URL" in os.environ:
        env.setdefault("OUTREACH_BENCH_REDIS_URL", os.environ["OUTREACH_TEST_REDIS_URL"])
    return env


def run_bench(args: list[str], env: dict[str, str]) -> tuple[int, str, str]:
    process = subprocess.Popen(
        [sys.executable, "-m", "bench", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=SMOKE_TIMEOUT)
    except subprocess.TimeoutExpired:
        # SIGTERM first: the benchmark then stops its child processes and drops its databases.
        process.terminate()
        try:
            stdout, stderr = process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            stdout, stderr = process.communicate()
        pytest.fail(f"the smoke benchmarks took more than {SMOKE_TIMEOUT}s\n{stdout}\n{stderr}")
    return process.returncode, stdout, stderr


@pytest.mark.slow
def test_bench_smoke_runs_every_benchmark_and_loses_nothing(tmp_path: Path) -> None:
    require_server("PostgreSQL", POSTGRES_URL, 5432)
    env = bench_environment()
    require_server("Redis", env.get("OUTREACH_BENCH_REDIS_URL", "redis://127.0.0.1:6379/14"), 6379)
    output = tmp_path / "bench.json"

    returncode, stdout, stderr = run_bench(["--smoke", "--output", str(output)], env)

    assert returncode == 0, f"exit {returncode}\n{stdout}\n{stderr}"
    report = json.loads(output.read_text())
    assert report["ok"] is True and report["smoke"] is True
    assert [outcome["name"] for outcome in report["benchmarks"]] == list(BENCHMARKS)
    for outcome in report["benchmarks"]:
        if outcome["status"] == "missing":
            # Only while a benchmark's module is still being written (it must then not exist at all).
            assert not (ROOT / "bench" / f"{outcome['name']}.py").exists(), outcome
            continue
        assert outcome["status"] == "ok", outcome
        assert outcome["figures"], outcome["name"]
        for figure in outcome["figures"]:
            assert figure["ok"] is True, figure
            assert isinstance(figure["value"], int | float) and figure["value"] >= 0, figure
            assert figure["unit"], figure
            assert figure["met"] is None, "smoke sizes must not judge goals"
            assert not any(figure["checks"].values()), figure
            assert figure["name"] in stdout
            if figure["baseline_value"]:
                assert figure["ratio"] == pytest.approx(figure["value"] / figure["baseline_value"], rel=0.01)
    for name in ("python", "dramatiq", "redis", "SQLAlchemy", "sendgrid", "twilio"):
        assert report["versions"][name] and report["versions"][name] != "not installed"
    for server in ("PostgreSQL server", "Redis server"):
        assert not report["versions"][server].startswith("unknown"), report["versions"]
    assert report["machine"]["cpu_count"] >= 1
    assert f"{report['machine']['cpu_count']} cores" in stdout


def test_bench_rejects_an_unknown_benchmark_name() -> None:
    returncode, _, stderr = run_bench(["--only", "e2e,nonsense"], bench_environment())
    assert returncode == 2
    assert "nonsense" in stderr
