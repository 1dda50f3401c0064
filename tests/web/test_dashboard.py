"""The dashboard without a browser: login and logout, redirects, CSRF checks, what each role sees, the search."""

from __future__ import annotations

import re
from datetime import timedelta

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from outreach.core.clock import FixedClock, set_clock, utcnow
from outreach.core.models import DashboardSession, OutboundMessage
from outreach.domain.auth import hash_key, revoke_key
from outreach.service.runtime import Runtime
from outreach.web.auth import COOKIE, LEGACY_COOKIE
from outreach.web.dashboard.charts import Series, line_chart
from tests.helpers import PUBLIC_URL, api_key
from tests.web.dashboard_data import CANARIES, CANARY_ERROR, CANARY_NAME, Expected, seed

PAGES = (
    "/dashboard",
    "/dashboard/funnel",
    "/dashboard/sla",
    "/dashboard/messages",
    "/dashboard/queue",
    "/dashboard/inbox",
)
SITE = "https://testserver"


@pytest.fixture
def client(client: TestClient) -> TestClient:
    """The shared client, over https like its public URL (``tests.helpers.PUBLIC_URL``): the cookie is Secure."""
    client.base_url = httpx.URL(SITE)
    return client


def login(client: TestClient, key: str, next_page: str = "") -> None:
    answer = client.post("/dashboard/login", data={"key": key, "next": next_page}, headers={"Origin": SITE})
    assert answer.status_code == 303, answer.text


def session_cookie(client: TestClient) -> str:
    value = client.cookies.get(COOKIE)
    assert value, "no session cookie"
    return value


@pytest.mark.parametrize("page", PAGES)
def test_without_a_key_every_page_redirects_to_the_login_form(client: TestClient, page: str) -> None:
    answer = client.get(page, params={"status": "sent"} if page.endswith("messages") else None)
    assert answer.status_code == 303
    location = answer.headers["location"]
    assert location.startswith("/dashboard/login?next=%2Fdashboard")
    if page.endswith("messages"):
        assert location.endswith("%3Fstatus%3Dsent")
    assert client.get(location).status_code == 200


def test_login_sets_a_strict_httponly_cookie_and_returns_to_the_page_asked_for(
    client: TestClient, runtime: Runtime
) -> None:
    key = api_key(runtime, "ops", name="night-shift")
    answer = client.post("/dashboard/login", data={"key": key, "next": "/dashboard/queue"}, headers={"Origin": SITE})
    assert answer.status_code == 303
    assert answer.headers["location"] == "/dashboard/queue"
    cookie = answer.headers["set-cookie"]
    assert cookie.startswith(f"{COOKIE}=")
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/dashboard" in cookie
    page = client.get("/dashboard/queue")
    assert page.status_code == 200
    assert "night-shift" in page.text and 'data-role="ops"' in page.text
    assert page.headers["cache-control"] == "no-store" and page.headers["x-frame-options"] == "DENY"


def test_a_wrong_key_is_refused_and_never_echoed(client: TestClient) -> None:
    wrong = "ork_" + "x" * 43
    answer = client.post("/dashboard/login", data={"key": wrong}, headers={"Origin": SITE})
    assert answer.status_code == 401
    assert "Unknown or revoked key" in answer.text and wrong not in answer.text
    assert "set-cookie" not in answer.headers
    assert client.post("/dashboard/login", data={"key": ""}).status_code == 401


def test_login_from_another_site_is_refused(client: TestClient, runtime: Runtime) -> None:
    key = api_key(runtime, "hr")
    for headers in ({"Origin": "https://evil.example"}, {"Origin": "null"}, {"Referer": "https://evil.example/x"}):
        answer = client.post("/dashboard/login", data={"key": key}, headers=headers)
        assert answer.status_code == 403, headers
        assert "set-cookie" not in answer.headers
    login(client, key)
    assert client.post("/dashboard/logout", headers={"Origin": "https://evil.example"}).status_code == 403


@pytest.mark.parametrize(
    "target", ["https://evil.example/", "//evil.example/dashboard", "/api/v1/messages", "/\\evil.example"]
)
def test_next_never_leaves_the_dashboard(client: TestClient, runtime: Runtime, target: str) -> None:
    answer = client.post(
        "/dashboard/login", data={"key": api_key(runtime, "hr"), "next": target}, headers={"Origin": SITE}
    )
    assert answer.headers["location"] == "/dashboard"


def test_logout_forgets_the_cookie_and_a_revoked_key_logs_out(client: TestClient, runtime: Runtime) -> None:
    key = api_key(runtime, "hr", name="to-revoke")
    login(client, key)
    assert client.get("/dashboard").status_code == 200
    answer = client.post("/dashboard/logout", headers={"Origin": SITE})
    assert answer.status_code == 303 and answer.headers["location"] == "/dashboard/login"
    assert client.get("/dashboard").status_code == 303
    login(client, key)
    with Session(runtime.engine) as session, session.begin():
        revoke_key(session, key[:12])
    assert client.get("/dashboard").status_code == 303


# -- sessions -------------------------------------------------------------------------------------------------


def test_the_cookie_holds_a_random_session_id_stored_only_as_its_hash(client: TestClient, runtime: Runtime) -> None:
    key = api_key(runtime, "ops", name="night-shift")
    answer = client.post("/dashboard/login", data={"key": key}, headers={"Origin": SITE})
    assert key not in answer.headers["set-cookie"]
    token = session_cookie(client)
    assert token != key and not token.startswith("ork_") and len(token) >= 43
    with Session(runtime.engine) as session:
        row = session.scalars(select(DashboardSession)).one()
        stored = [str(getattr(row, column.key)) for column in DashboardSession.__table__.columns]
    assert row.session_hash == hash_key(token) and row.role == "ops"
    assert not any(token in value or key in value for value in stored)
    assert row.expires_at - row.created_at == timedelta(days=7)


def test_a_cookie_copied_before_logout_is_worthless_after_it(client: TestClient, runtime: Runtime) -> None:
    login(client, api_key(runtime, "hr"))
    copied = session_cookie(client)
    assert client.post("/dashboard/logout", headers={"Origin": SITE}).status_code == 303
    with Session(runtime.engine) as session:
        assert session.scalars(select(DashboardSession)).all() == []
    client.cookies.set(COOKIE, copied)
    answer = client.get("/dashboard/queue")
    assert answer.status_code == 303 and answer.headers["location"].startswith("/dashboard/login?next=")


def test_two_sessions_of_one_key_are_independent(client: TestClient, runtime: Runtime) -> None:
    key = api_key(runtime, "hr")
    other = TestClient(client.app, base_url=SITE, follow_redirects=False)
    login(client, key)
    login(other, key)
    assert session_cookie(client) != session_cookie(other)
    assert client.post("/dashboard/logout", headers={"Origin": SITE}).status_code == 303
    assert client.get("/dashboard").status_code == 303
    assert other.get("/dashboard").status_code == 200


def test_revoking_the_key_ends_every_session_at_once(client: TestClient, runtime: Runtime) -> None:
    key = api_key(runtime, "ops")
    other = TestClient(client.app, base_url=SITE, follow_redirects=False)
    login(client, key)
    login(other, key)
    copied = session_cookie(client)
    with Session(runtime.engine) as session, session.begin():
        revoke_key(session, key[:12])
    assert client.get("/dashboard").status_code == 303
    assert other.get("/dashboard").status_code == 303
    client.cookies.set(COOKIE, copied)
    assert client.get("/dashboard").status_code == 303


def test_a_session_ends_after_12_idle_hours_and_7_days_in_any_case(client: TestClient, runtime: Runtime) -> None:
    clock = FixedClock(utcnow())
    set_clock(clock)  # the app runs in another thread: the process's clock, not a thread's override
    key = api_key(runtime, "hr")
    login(client, key)
    # Busy: a page every 11 hours keeps it alive, but not past 7 days after the login.
    for _ in range(15):
        clock.advance(timedelta(hours=11))
        assert client.get("/dashboard/queue").status_code == 200, clock.now()
    clock.advance(timedelta(hours=3))  # 7 days and 8 hours after the login, 3 hours after the last page
    assert client.get("/dashboard/queue").status_code == 303
    # Idle: 12 hours without a page.
    login(client, key)
    clock.advance(timedelta(hours=11, minutes=59))
    assert client.get("/dashboard/queue").status_code == 200
    clock.advance(timedelta(hours=12))
    assert client.get("/dashboard/queue").status_code == 303


def test_the_cookie_is_secure_whenever_the_public_url_is_https(client: TestClient, runtime: Runtime) -> None:
    key = api_key(runtime, "hr")
    # Behind a TLS proxy the request may arrive as plain http; the public URL (https) decides.
    public = {"Origin": PUBLIC_URL}
    over_http = client.post("http://testserver/dashboard/login", data={"key": key}, headers=public)
    assert over_http.status_code == 303
    assert "Secure" in over_http.headers["set-cookie"]
    runtime.settings = runtime.settings.with_overrides(public_url="http://127.0.0.1:8000")
    own = {"Origin": "http://testserver"}
    plain = client.post("http://testserver/dashboard/login", data={"key": key}, headers=own)
    assert plain.status_code == 303
    cookie = plain.headers["set-cookie"]
    assert "Secure" not in cookie and "HttpOnly" in cookie and "SameSite=strict" in cookie


def test_an_old_cookie_holding_the_key_itself_is_refused_and_cleared(client: TestClient, runtime: Runtime) -> None:
    key = api_key(runtime, "hr")
    client.cookies.set(LEGACY_COOKIE, key)
    client.cookies.set(COOKIE, key)  # nor is a key in the new cookie a session
    answer = client.get("/dashboard")
    assert answer.status_code == 303 and answer.headers["location"].startswith("/dashboard/login")
    form = client.get(answer.headers["location"])
    assert form.status_code == 200
    cleared = form.headers.get_list("set-cookie")
    assert any(c.startswith(f"{LEGACY_COOKIE}=") and "Max-Age=0" in c for c in cleared), cleared
    assert any(c.startswith(f"{COOKIE}=") and "Max-Age=0" in c for c in cleared), cleared


def test_a_bearer_header_works_too(client: TestClient, runtime: Runtime) -> None:
    headers = {"Authorization": f"Bearer {api_key(runtime, 'ops')}"}
    assert client.get("/dashboard/funnel", headers=headers).status_code == 200


def _figure(text: str, name: str) -> str:
    found = re.search(rf'data-figure="{re.escape(name)}">([^<]*)<', text)
    assert found, name
    return found.group(1).strip()


@pytest.fixture
def seeded(runtime: Runtime) -> Expected:
    """The history plus two messages really sent to the sandbox (for the inbox)."""
    return seed(runtime, utcnow())


@pytest.fixture
def history(runtime: Runtime) -> Expected:
    """The history alone (quicker: no scheduler pass, nothing sent)."""
    return seed(runtime, utcnow(), pipeline=False)


def test_ops_sees_no_personal_data_on_any_page(client: TestClient, runtime: Runtime, seeded: Expected) -> None:
    login(client, api_key(runtime, "ops"))
    pages = [*PAGES, "/dashboard?bucket=week", "/dashboard/messages?candidate=cand-01"]
    pages += [f"/dashboard/messages/{mid}" for mid in (seeded.held_id, seeded.bounced_id, *seeded.pipeline_ids)]
    pages += ["/dashboard/messages/" + seeded.suppressed_id]
    for page in pages:
        answer = client.get(page)
        assert answer.status_code == 200, page
        for canary in CANARIES:
            assert canary not in answer.text, (page, canary)
    inbox = client.get("/dashboard/inbox").text
    assert _figure(inbox, "inbox-count") == str(len(seeded.pipeline_ids))
    assert seeded.pipeline_ids[0] in inbox  # outbox ids are not personal data: they link to the message


def test_hr_sees_the_candidate_and_the_content(client: TestClient, runtime: Runtime, seeded: Expected) -> None:
    login(client, api_key(runtime, "hr"))
    bounced = client.get(f"/dashboard/messages/{seeded.bounced_id}").text
    assert CANARY_NAME in bounced and CANARY_ERROR in bounced
    inbox = client.get("/dashboard/inbox").text
    assert "canary-mail.example" in inbox


def test_pages_show_the_figures_of_the_history(client: TestClient, runtime: Runtime, history: Expected) -> None:
    login(client, api_key(runtime, "ops"))
    overview = client.get("/dashboard").text
    assert _figure(overview, "messages") == str(history.messages)
    assert _figure(overview, "delivery_rate") == history.delivery_rate
    assert _figure(overview, "bounce_rate") == history.bounce_rate
    assert _figure(overview, "reply_rate") == history.reply_rate
    assert _figure(overview, "due-pending") == str(history.due_pending)
    assert _figure(overview, "held") == str(history.held)
    assert _figure(overview, "open-alerts") == str(history.open_alerts)
    assert '<svg class="chart"' in overview and "<title" in overview
    assert 'id="by-step"' in client.get("/dashboard", params={"by": "step", "bucket": "week"}).text
    assert 'data-field="by"' in client.get("/dashboard", params={"by": "shoe_size"}).text
    assert 'data-field="days"' in client.get("/dashboard", params={"days": "-3"}).text
    sla = client.get("/dashboard/sla").text
    row = re.search(r'data-sla="first_contact">(.*?)</tr>', sla, re.S)
    assert row
    assert f'data-col="breached">{history.first_contact_breached}<' in row.group(1)
    assert f'data-col="met">{history.first_contact_met}<' in row.group(1)
    queue = client.get("/dashboard/queue").text
    assert _figure(queue, "due-pending") == str(history.due_pending)
    lag = float(_figure(queue, "queue-lag-seconds"))
    assert 600 <= lag < 900


def test_message_detail_names_the_rule_that_held_it_and_its_history(
    client: TestClient, runtime: Runtime, history: Expected
) -> None:
    login(client, api_key(runtime, "ops"))
    held = client.get(f"/dashboard/messages/{history.held_id}").text
    assert "Held by quiet_hours" in held and 'data-field="rule">quiet_hours<' in held
    suppressed = client.get(f"/dashboard/messages/{history.suppressed_id}").text
    assert "Dropped (suppressed) by consent: address suppressed: unsubscribed" in suppressed
    bounced = client.get(f"/dashboard/messages/{history.bounced_id}").text
    history = bounced.split('id="history"', 1)[1]
    assert history.index("created") < history.index("sent") < history.index("bounced")
    assert client.get("/dashboard/messages/nope").status_code == 404


def test_search_filters_and_names_a_bad_field(client: TestClient, runtime: Runtime, history: Expected) -> None:
    login(client, api_key(runtime, "ops"))
    held = client.get("/dashboard/messages", params={"status": "held"}).text
    assert _figure(held, "message-count") == str(history.held)
    one = client.get("/dashboard/messages", params={"candidate": "cand-03", "channel": "email"}).text
    assert _figure(one, "message-count") == "2"
    bad = client.get("/dashboard/messages", params={"date_from": "yesterday", "status": "lost"})
    assert bad.status_code == 200
    assert 'data-field="date_from"' in bad.text and 'data-field="status"' in bad.text
    messages = " ".join(re.findall(r'<p class="error"[^>]*>([^<]*)</p>', bad.text))
    assert "date_from: not a date" in messages and "yesterday" not in messages


def test_line_chart_is_labelled_and_leaves_gaps() -> None:
    svg = str(
        line_chart(
            "Rates per day",
            ["11-01", "11-02", "11-03"],
            [Series("delivery", [0.5, None, 1.0])],
            x_label="day",
            y_label="rate",
        )
    )
    assert "<title" in svg and 'role="img"' in svg and ">rate<" in svg and ">day<" in svg
    assert "delivery, 11-03: 100.0%" in svg
    assert "<polyline" not in svg  # two points separated by a gap: no line drawn between them


@pytest.mark.parametrize(
    ("status", "rule", "pill", "words"),
    [
        ("failed", "template", "failed", "Not delivered (failed by template, code template): the template could not"),
        ("failed", "provider", "failed", "Not delivered (failed by provider, code 400)"),
        ("uncertain", "ambiguous", "uncertain", "May or may not have been sent (ambiguous)"),
        ("sent", "quiet_hours", "passed", "Held earlier by quiet_hours"),
    ],
)
def test_a_message_that_did_not_go_out_is_never_called_passed(
    client: TestClient, runtime: Runtime, history: Expected, status: str, rule: str, pill: str, words: str
) -> None:
    """Found by an operator: a failed offer letter said "passed — held earlier by template ()"."""
    codes = {"template": "template", "provider": "400"}
    with Session(runtime.engine) as session, session.begin():
        session.execute(
            update(OutboundMessage)
            .where(OutboundMessage.id == history.held_id)
            .values(
                status=status,
                rule=rule,
                reason="the template could not be rendered: x" if rule == "template" else None,
                error_code=codes.get(rule),
                error_detail="Does not contain a valid address." if rule == "provider" else None,
            )
        )
    login(client, api_key(runtime, "ops"))
    page = client.get(f"/dashboard/messages/{history.held_id}").text
    decision = page.split('id="decision"', 1)[1].split("</section>", 1)[0]
    assert f'class="pill {pill}"' in decision and words in decision
    if pill != "passed":
        assert "passed" not in decision
