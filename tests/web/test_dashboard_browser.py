"""The dashboard in a real browser: headless Chromium (Debian's package) driven by Playwright.

The app runs under uvicorn on a PostgreSQL test database holding a known history (``dashboard_data``) and two
messages really sent to the provider sandbox. The test logs in through the form with an ``ops`` key, checks the
figures on every page against the ones counted from that history, checks that no canary personal data reaches
an ``ops`` page, then logs in as ``hr``. Screenshots of every page are kept in ``test-artifacts/dashboard/``
(``OUTREACH_TEST_ARTIFACTS`` moves it).

Chromium comes from ``OUTREACH_CHROMIUM`` or ``chromium`` on the PATH; ``scripts/test-browser`` (run by
``make test``) installs it. Playwright's own browser downloads are never used.
"""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn
from playwright import sync_api as playwright_sync

from outreach.core.clock import utcnow
from outreach.ops.analytics import FUNNEL_STAGES
from outreach.service.runtime import Runtime
from outreach.web import create_app
from tests.conftest import ROOT
from tests.helpers import api_key
from tests.web.dashboard_data import CANARIES, CANARY_NAME, SOURCES, Expected, seed

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

pytestmark = pytest.mark.slow


def chromium_path() -> str:
    path = os.environ.get("OUTREACH_CHROMIUM") or shutil.which("chromium")
    if not path:
        pytest.fail(
            "Chromium is not installed: run scripts/test-browser (make test does) or set OUTREACH_CHROMIUM",
            pytrace=False,
        )
    return path


def artifacts_dir() -> Path:
    folder = Path(os.environ.get("OUTREACH_TEST_ARTIFACTS") or ROOT / "test-artifacts") / "dashboard"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture
def served(pg_runtime: Runtime) -> Iterator[str]:
    """The real app under uvicorn on a free loopback port, in a thread; yields its base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(pg_runtime), log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            pytest.fail("uvicorn did not start")
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)
    sock.close()


def figure(page: object, name: str) -> str:
    return page.locator(f'[data-figure="{name}"]').first.inner_text().strip()  # type: ignore[attr-defined]


def no_canaries(page: object, where: str) -> None:
    content = page.content()  # type: ignore[attr-defined]
    for canary in CANARIES:
        assert canary not in content, f"{canary!r} on the ops view of {where}"


def test_dashboard_in_headless_chromium(
    pg_runtime: Runtime, served: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    expected: Expected = seed(pg_runtime, utcnow())
    ops_key, hr_key = api_key(pg_runtime, "ops", name="ops-browser"), api_key(pg_runtime, "hr", name="hr-browser")
    shots = artifacts_dir()
    with playwright_sync.sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path / "profile"),  # an empty profile every run
            executable_path=chromium_path(),
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1280, "height": 900},
        )
        try:
            page = context.new_page()
            page.set_default_timeout(15_000)

            # Not logged in: the login form, which brings us back to the page asked for.
            page.goto(f"{served}/dashboard/sla")
            assert "/dashboard/login" in page.url
            page.fill("#key", ops_key)
            page.click("button[type=submit]")
            page.wait_for_url(f"{served}/dashboard/sla")
            assert page.locator("[data-role]").inner_text() == "ops"

            # SLA and alerts.
            row = page.locator('tr[data-sla="first_contact"]')
            assert row.locator('[data-col="breached"]').inner_text() == str(expected.first_contact_breached)
            assert row.locator('[data-col="met"]').inner_text() == str(expected.first_contact_met)
            assert figure(page, "open-alerts") == str(expected.open_alerts)
            assert page.locator("#alerts tbody tr").count() == expected.open_alerts
            no_canaries(page, "sla")
            page.screenshot(path=str(shots / "sla.png"), full_page=True)

            # Overview: totals, the charts and the breakdowns.
            page.goto(f"{served}/dashboard")
            assert figure(page, "messages") == str(expected.messages)
            assert figure(page, "delivery_rate") == expected.delivery_rate
            assert figure(page, "open_rate") == expected.open_rate
            assert figure(page, "click_rate") == expected.click_rate
            assert figure(page, "reply_rate") == expected.reply_rate
            assert figure(page, "opt_out_rate") == expected.opt_out_rate
            assert figure(page, "bounce_rate") == expected.bounce_rate
            assert figure(page, "due-pending") == str(expected.due_pending)
            assert figure(page, "held") == str(expected.held)
            chart = page.locator("svg.chart").first
            box = chart.bounding_box()
            assert box is not None and box["width"] > 300 and box["height"] > 100
            assert chart.locator("g.series").count() == 6
            assert page.locator("#by-source tbody tr").count() == len(SOURCES) + 1  # and the pipeline's source
            no_canaries(page, "overview")
            page.screenshot(path=str(shots / "overview.png"), full_page=True)

            # Funnel per source.
            page.goto(f"{served}/dashboard/funnel")
            for source in SOURCES:
                table = page.locator(f'table.funnel[data-source="{source}"]')
                shown = [
                    int(table.locator(f'tr[data-stage="{stage}"] [data-col="reached"]').inner_text())
                    for stage in FUNNEL_STAGES
                ]
                assert shown == expected.funnel[source], source
            no_canaries(page, "funnel")
            page.screenshot(path=str(shots / "funnel.png"), full_page=True)

            # Queue.
            page.goto(f"{served}/dashboard/queue")
            assert figure(page, "due-pending") == str(expected.due_pending)
            assert page.locator('tr[data-status="held"] td.num').inner_text() == str(expected.held)
            page.screenshot(path=str(shots / "queue.png"), full_page=True)

            # Search for held messages, open one: the rule that held it and its history.
            page.goto(f"{served}/dashboard/messages")
            page.select_option("select[name=status]", "held")
            page.click("form.search button[type=submit]")
            page.wait_for_url("**/dashboard/messages?*status=held*")
            assert figure(page, "message-count") == str(expected.held)
            no_canaries(page, "message search")
            page.screenshot(path=str(shots / "messages.png"), full_page=True)
            page.locator("#messages tbody tr a").first.click()
            page.wait_for_url("**/dashboard/messages/*")
            assert page.locator('[data-field="rule"]').inner_text() == "quiet_hours"
            assert "Held by quiet_hours" in page.locator("#decision").inner_text()
            no_canaries(page, "message detail")
            page.goto(f"{served}/dashboard/messages/{expected.bounced_id}")
            assert "bounced" in page.locator("#history").inner_text()
            no_canaries(page, "bounced message detail")
            page.screenshot(path=str(shots / "message.png"), full_page=True)

            # The sandbox inbox: the two messages really sent, addresses hidden from ops.
            page.goto(f"{served}/dashboard/inbox")
            assert figure(page, "inbox-count") == str(len(expected.pipeline_ids))
            no_canaries(page, "sandbox inbox")
            page.screenshot(path=str(shots / "inbox-ops.png"), full_page=True)

            # Log out; hr sees the candidate behind a message.
            page.click("header button[type=submit]")
            page.wait_for_url("**/dashboard/login")
            page.goto(f"{served}/dashboard/messages/{expected.bounced_id}")
            page.fill("#key", hr_key)
            page.click("button[type=submit]")
            page.wait_for_url(f"**/dashboard/messages/{expected.bounced_id}")
            assert CANARY_NAME in page.content()
            page.screenshot(path=str(shots / "message-hr.png"), full_page=True)
        finally:
            context.close()
    with capsys.disabled():
        print(f"\ndashboard screenshots: {shots}")
