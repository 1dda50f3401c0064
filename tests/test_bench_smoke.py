"""The benchmarks' smoke run, as CI runs it: every benchmark runs at tiny sizes, nothing is lost or duplicated.

It fails when a benchmark breaks or a correctness check fails — never because a figure is slow (smoke sizes say
nothing about speed, and goals are judged only on full runs).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
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
@pytest.mark.timeout(SMOKE_TIMEOUT + 60)
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


def _module(monkeypatch: pytest.MonkeyPatch, name: str, run: object) -> None:
    module = types.ModuleType(f"bench.{name}")
    module.run = run  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, f"bench.{name}", module)


def test_runner_reports_missing_broken_and_failed_benchmarks_and_never_judges_speed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from bench.__main__ import markdown, run_one
    from bench.harness import BenchmarkError, Figure, Options

    def slow(options: Options) -> list[Figure]:
        return [Figure("slow.rate", 1.0, "msg/s", "bare", 100.0, goal="≥ 0.5× bare", met=False)]

    def lossy(options: Options) -> list[Figure]:
        return [Figure("lossy.rate", 50.0, "msg/s", checks={"lost": 1, "duplicated": 0})]

    def broken(options: Options) -> list[Figure]:
        raise BenchmarkError("the workers died")

    for name, run in (("slow", slow), ("lossy", lossy), ("broken", broken)):
        _module(monkeypatch, name, run)
    options = Options(smoke=True)

    assert run_one("not_written_yet", options).status == "missing"
    outcome = run_one("slow", options)
    assert outcome.status == "ok"  # a goal not met is reported, not a failure
    assert outcome.figures[0].ratio == pytest.approx(0.01)
    lossy_outcome = run_one("lossy", options)
    assert lossy_outcome.status == "failed" and not lossy_outcome.figures[0].ok
    broken_outcome = run_one("broken", options)
    assert broken_outcome.status == "broken" and broken_outcome.error == "the workers died"

    report = {
        "machine": {"cpu_count": 2},
        "versions": {"python": "3"},
        "finished_at": "2026-01-01T00:00:00+00:00",
        "smoke": True,
    }
    table = markdown(report, [outcome, lossy_outcome, broken_outcome])
    assert "| slow.rate | 1 msg/s | 100 msg/s (bare) | 0.01× | ≥ 0.5× bare | NOT MET |" in table
    assert "FAILED lost 1" in table and "| broken | BROKEN |" in table


def test_options_sizes_follow_smoke_and_overrides() -> None:
    from bench.harness import Options, at_least, at_most

    assert Options().size("webhooks.events", 100, 3) == 100
    assert Options(smoke=True).size("webhooks.events", 100, 3) == 3
    assert Options(smoke=True, sizes={"webhooks.events": 7}).size("webhooks.events", 100, 3) == 7
    assert at_least(4.0, 5.0, Options()) is False and at_most(4.0, 5.0, Options()) is True
    assert at_least(4.0, 5.0, Options(smoke=True)) is None
