"""The benchmark's smoke run, as CI runs it: both sides measured, nothing lost, nothing sent twice."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import POSTGRES_URL, ROOT, require_server

SMOKE_TIMEOUT = 180


@pytest.mark.slow
def test_bench_smoke_measures_both_sides_and_loses_nothing(tmp_path: Path) -> None:
    require_server("PostgreSQL", POSTGRES_URL, 5432)
    env = dict(os.environ)
    # The suite's servers, when pointed elsewhere, are the benchmark's too (it makes and drops its own database
    # and uses queue names of its own, so sharing them with the tests is safe).
    if "OUTREACH_TEST_POSTGRES_URL" in os.environ:
        env.setdefault("OUTREACH_BENCH_POSTGRES_URL", os.environ["OUTREACH_TEST_POSTGRES_URL"])
    if "OUTREACH_TEST_REDIS_URL" in os.environ:
        env.setdefault("OUTREACH_BENCH_REDIS_URL", os.environ["OUTREACH_TEST_REDIS_URL"])
    require_server("Redis", env.get("OUTREACH_BENCH_REDIS_URL", "redis://127.0.0.1:6379/14"), 6379)
    output = tmp_path / "bench.json"

    process = subprocess.Popen(
        [sys.executable, "-m", "bench", "--smoke", "--output", str(output)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=SMOKE_TIMEOUT)
    except subprocess.TimeoutExpired:
        # SIGTERM first: the benchmark then stops its workers and the sandbox and drops its database.
        process.terminate()
        try:
            stdout, stderr = process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            stdout, stderr = process.communicate()
        pytest.fail(f"the smoke benchmark took more than {SMOKE_TIMEOUT}s\n{stdout}\n{stderr}")

    assert process.returncode == 0, f"exit {process.returncode}\n{stdout}\n{stderr}"
    assert "ratio e2e / bare" in stdout
    report = json.loads(output.read_text())
    bare, e2e = report["bare"], report["e2e"]
    assert bare["rate"] > 0 and e2e["rate"] > 0
    assert isinstance(report["ratio"], float) and report["ratio"] > 0
    assert report["ratio"] == pytest.approx(e2e["rate"] / bare["rate"], rel=0.01)
    assert bare["messages"] == e2e["messages"] == report["settings"]["messages"]
    assert (report["ok"], report["lost"], report["duplicated"]) == (True, 0, 0)
    assert (bare["lost"], e2e["lost"], e2e["duplicated"]) == (0, 0, 0)
    assert e2e["sandbox_messages"] == e2e["messages"] + e2e["warmup"]
    for name in ("python", "dramatiq", "sendgrid", "twilio", "SQLAlchemy"):
        assert report["versions"][name]
    assert report["machine"]["cpu_count"] >= 1
