"""``/r/{token}``: a click is recorded and redirected to the stored link; anything else leads nowhere."""

from __future__ import annotations

from fastapi.testclient import TestClient
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from outreach.core.config import Secret
from outreach.core.models import Candidate, LinkClick, TrackedLink
from outreach.domain.tokens import sign
from outreach.ops.sandbox import SandboxServer
from outreach.pipeline.links import redirect_url
from outreach.service.runtime import Runtime
from outreach.web import create_app
from tests.pipeline.test_links import BOOKING, send_jd_email, tracked_paths

BROWSER = {"user-agent": "Mozilla/5.0 (iPhone; CPU iPhone OS 17_0 like Mac OS X) AppleWebKit/605.1.15 Mobile/15E148"}


def clicks(runtime: Runtime) -> list[tuple[str | None, int]]:
    with Session(runtime.engine) as session:
        return [(c.name, c.candidate_id) for c in session.scalars(select(LinkClick).order_by(LinkClick.id))]


def candidate(runtime: Runtime) -> Candidate:
    with Session(runtime.engine) as session:
        return session.scalars(select(Candidate)).one()


def setup(runtime: Runtime, sandbox: SandboxServer) -> tuple[TestClient, dict[str | None, str]]:
    mail = send_jd_email(runtime, sandbox)
    return TestClient(create_app(runtime), headers=BROWSER), tracked_paths(runtime, mail.html)


def test_a_click_is_recorded_and_redirected_to_the_original(runtime: Runtime, sandbox: SandboxServer) -> None:
    client, paths = setup(runtime, sandbox)
    assert candidate(runtime).last_click_at is None
    response = client.get(paths["book_interview"], follow_redirects=False)
    assert response.status_code == 302
    assert response.headers["location"] == BOOKING
    assert response.headers["cache-control"] == "no-store"
    person = candidate(runtime)
    assert clicks(runtime) == [("book_interview", person.id)]
    assert person.last_click_at is not None
    salary = client.get(paths["salary_range"], follow_redirects=False)
    assert salary.headers["location"] == f"{BOOKING}#salary-range"
    assert clicks(runtime) == [("book_interview", person.id), ("salary_range", person.id)]


def test_forged_or_modified_tokens_lead_nowhere(runtime: Runtime, sandbox: SandboxServer) -> None:
    client, paths = setup(runtime, sandbox)
    token = paths["book_interview"].rsplit("/", 1)[1]
    body, mac = token.split(".")
    other_id = sign(runtime.settings, "r", "1").split(".")[0]
    changed = ("B" if mac.startswith("A") else "A") + mac[1:]  # never the mac itself (a first character counts whole)
    for bad in (f"{body}.{changed}", f"{other_id}.{mac}", f"{body}x.{mac}", "garbage", ".", f"{body}.{mac}="):
        response = client.get(f"/r/{bad}", follow_redirects=False)
        assert response.status_code == 404, bad
        assert "location" not in response.headers
    # A token of the right shape for another purpose (an unsubscribe token) is not a redirect token.
    assert client.get(f"/r/{sign(runtime.settings, 'unsubscribe', '1')}", follow_redirects=False).status_code == 404
    assert clicks(runtime) == []
    assert candidate(runtime).last_click_at is None


def test_a_token_minted_with_another_key_leads_nowhere(runtime: Runtime, sandbox: SandboxServer) -> None:
    client, _ = setup(runtime, sandbox)
    with Session(runtime.engine) as session:
        link_ids = list(session.scalars(select(TrackedLink.id)))
    assert link_ids
    other = runtime.settings.with_overrides(secret_key=Secret("another deployment's key"))
    for link_id in link_ids:
        path = redirect_url(other, link_id).removeprefix(runtime.settings.public_url)
        assert client.get(path, follow_redirects=False).status_code == 404
    assert clicks(runtime) == []


def test_no_open_redirect_only_links_of_sent_messages(runtime: Runtime, sandbox: SandboxServer) -> None:
    client, _ = setup(runtime, sandbox)
    with Session(runtime.engine) as session:
        highest = max(session.scalars(select(TrackedLink.id)))
    # Correctly signed, but for ids no message ever carried.
    for made_up in (highest + 1, 0, 10**12):
        path = redirect_url(runtime.settings, made_up).removeprefix(runtime.settings.public_url)
        assert client.get(path, follow_redirects=False).status_code == 404
    # A stored target that is not a web address is never followed (defence in depth).
    with Session(runtime.engine) as session, session.begin():
        session.execute(update(TrackedLink).where(TrackedLink.id == highest).values(url="javascript:alert(1)"))
    path = redirect_url(runtime.settings, highest).removeprefix(runtime.settings.public_url)
    assert client.get(path, follow_redirects=False).status_code == 404
    assert clicks(runtime) == []


def test_head_and_scanners_are_redirected_without_a_click(runtime: Runtime, sandbox: SandboxServer) -> None:
    client, paths = setup(runtime, sandbox)
    head = client.head(paths["book_interview"], follow_redirects=False)
    assert (head.status_code, head.headers["location"]) == (302, BOOKING)
    assert client.head("/r/garbage", follow_redirects=False).status_code == 404
    for agent in ("Mozilla/5.0 (compatible; Googlebot/2.1)", "facebookexternalhit/1.1", "Slackbot-LinkExpanding 1.0"):
        scanned = client.get(paths["book_interview"], headers={"user-agent": agent}, follow_redirects=False)
        assert (scanned.status_code, scanned.headers["location"]) == (302, BOOKING)
    assert clicks(runtime) == []
    assert candidate(runtime).last_click_at is None


def test_two_salary_range_clicks_tag_intent_high_once(runtime: Runtime, sandbox: SandboxServer) -> None:
    client, paths = setup(runtime, sandbox)
    client.get(paths["salary_range"], follow_redirects=False)
    client.get(paths["book_interview"], follow_redirects=False)  # other links do not count towards the rule
    assert "intent:high" not in candidate(runtime).tags
    client.get(paths["salary_range"], follow_redirects=False)
    assert candidate(runtime).tags == ["stack:python", "intent:high"]
    client.get(paths["salary_range"], follow_redirects=False)
    assert candidate(runtime).tags == ["stack:python", "intent:high"]
    assert [name for name, _ in clicks(runtime)].count("salary_range") == 3


def test_no_rules_no_tags(runtime: Runtime, sandbox: SandboxServer) -> None:
    from outreach.policy.engine import PolicyEngine

    runtime.policy = PolicyEngine(runtime.policy.spec.model_copy(update={"behaviours": ()}), runtime.settings)
    client, paths = setup(runtime, sandbox)
    for _ in range(3):
        client.get(paths["salary_range"], follow_redirects=False)
    assert candidate(runtime).tags == ["stack:python"]
