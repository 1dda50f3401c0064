"""Click tracking: links rewritten into signed redirects at send time, named from the templates, and the
jd_intro reminder skipped once the candidate clicked the booking link."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session

from outreach.core.models import Candidate, OutboundMessage, TrackedLink
from outreach.domain.campaigns import Campaign, load_campaign_file
from outreach.ops.sandbox import SandboxMessage, SandboxServer
from outreach.pipeline.delivery import deliver
from outreach.pipeline.links import Link, known_names, link_id_from_token, rewrite_html, rewrite_text, strip_names
from outreach.policy.config import PolicySpec
from outreach.service.runtime import Runtime
from outreach.web import create_app
from tests.conftest import ROOT
from tests.helpers import add_candidate, add_job, fire

T0 = datetime(2026, 11, 25, 2, 0, tzinfo=UTC)  # a Wednesday, 10:00 in Shanghai
BOOKING = "https://book.example.com/backend"
REDIRECT = re.compile(r"http://127\.0\.0\.1:9/r/[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+")


def marked(link: Link) -> str:
    return f"<{link.name or '-'}>"


# --- finding links (no database) ---------------------------------------------------------------------------


def test_html_hrefs_are_rewritten_named_by_data_link_which_is_removed() -> None:
    document = (
        '<p><a href="https://x.example/a?b=1&amp;c=2" data-link="salary_range" style="color:red">pay</a>'
        "<a class='btn' href='https://book.example.com/backend'>book</a>"
        '<a href="mailto:hr@example.com">mail</a><a href="tel:+8621555">call</a>'
        '<area href="https://x.example/map" data-link=map_area>'
        "<abbr title=\"a href='https://no.example/'\">x</abbr></p>"
    )
    seen: list[Link] = []

    def replace_link(link: Link) -> str | None:
        seen.append(link)
        return None if link.url.startswith(("mailto:", "tel:")) else marked(link)

    out = rewrite_html(document, {BOOKING: "book_interview"}, replace_link)
    assert seen == [
        Link("https://x.example/a?b=1&c=2", "salary_range"),  # entities decoded: the stored URL is the real one
        Link(BOOKING, "book_interview"),  # a context link the template did not name
        Link("mailto:hr@example.com", None),
        Link("tel:+8621555", None),
        Link("https://x.example/map", "map_area"),
    ]
    assert out == (
        '<p><a href="&lt;salary_range&gt;" style="color:red">pay</a>'
        "<a class='btn' href=\"&lt;book_interview&gt;\">book</a>"
        '<a href="mailto:hr@example.com">mail</a><a href="tel:+8621555">call</a>'
        '<area href="&lt;map_area&gt;">'
        "<abbr title=\"a href='https://no.example/'\">x</abbr></p>"
    )
    assert "data-link" not in strip_names(document) and "https://x.example/a?b=1&amp;c=2" in strip_names(document)


def test_text_urls_are_rewritten_without_the_punctuation_around_them() -> None:
    text = (
        f"Book here: {BOOKING}.\n"
        "预约面试：https://book.example.com/zh?x=1，谢谢\n"
        "(see https://example.com/a_(b)) and https://example.com/p#salary-range!\n"
        "no link: mailto:hr@example.com ftp://example.com/f"
    )
    names = {BOOKING: "book_interview", "https://example.com/p#salary-range": "salary_range"}
    out = rewrite_text(text, names, marked)
    assert out == (
        "Book here: <book_interview>.\n"
        "预约面试：<->，谢谢\n"
        "(see <->) and <salary_range>!\n"
        "no link: mailto:hr@example.com ftp://example.com/f"
    )


def test_known_names_come_from_the_context_links() -> None:
    context = {"links": {"booking": BOOKING, "unsubscribe": "http://127.0.0.1:9/unsubscribe/x.y"}}
    assert known_names(context) == {BOOKING: "book_interview"}
    assert known_names({"links": {"booking": None, "unsubscribe": "u"}}) == {}


def test_tracking_is_on_by_default_for_nurture_only_and_the_seed_tracks_jd_intro(tmp_path: Path) -> None:
    base = "category: {category}\ntrigger: {{event: applied}}\nsteps: [{{channel: sms, template: jd_nudge}}]\n"
    for category, setting, expected in (
        ("nurture", "", True),
        ("transactional", "", False),
        ("nurture", "track_clicks: false\n", False),
        ("transactional", "track_clicks: true\n", True),
    ):
        path = tmp_path / "c.yaml"
        path.write_text(f"name: c\n{setting}" + base.format(category=category), encoding="utf-8")
        campaign, problems = load_campaign_file(path)
        assert problems == [] and campaign is not None and campaign.tracks_clicks is expected
    jd, _ = load_campaign_file(ROOT / "campaigns" / "jd_intro.yaml")
    assert isinstance(jd, Campaign) and jd.tracks_clicks
    assert jd.steps[2].unless_clicked == ("book_interview",)


def test_behaviours_are_validated_and_the_default_is_the_seed_rule(tmp_path: Path) -> None:
    from outreach.core.errors import CampaignError
    from outreach.policy.config import load_policies

    (rule,) = PolicySpec().behaviours
    assert (rule.when.clicked, rule.when.times, rule.add_tags) == ("salary_range", 2, ("intent:high",))
    (tmp_path / "policies.yaml").write_text(
        "behaviours:\n  - {when: {clicked: Salary Range, times: 0}, add_tags: ['bad tag']}\n", encoding="utf-8"
    )
    try:
        load_policies(tmp_path)
    except CampaignError as exc:
        fields = {problem.field for problem in exc.problems}
        assert fields == {"behaviours[0].when.clicked", "behaviours[0].when.times", "behaviours[0].add_tags"}
        assert all(problem.line == 2 for problem in exc.problems)
    else:
        raise AssertionError("invalid behaviours were accepted")


# --- at send time ------------------------------------------------------------------------------------------


def apply_for_jd(runtime: Runtime, **job: object) -> list[OutboundMessage]:
    """c-1 applies to j-1 at T0; returns the outbox rows the first tick wrote (the email)."""
    add_candidate(runtime)
    add_job(runtime, **{"salary_min": 35000, "salary_max": 50000, **job})  # type: ignore[arg-type]
    fire(runtime, "c-1", "applied", at=T0, job="j-1")
    runtime.scheduler.tick(T0)
    return outbox(runtime)


def outbox(runtime: Runtime) -> list[OutboundMessage]:
    with Session(runtime.engine) as session:
        return list(session.scalars(select(OutboundMessage).order_by(OutboundMessage.step)))


def links_of(runtime: Runtime, message_id: str | None = None) -> list[TrackedLink]:
    with Session(runtime.engine) as session:
        query = select(TrackedLink).order_by(TrackedLink.message_id, TrackedLink.position)
        if message_id is not None:
            query = query.where(TrackedLink.message_id == message_id)
        return list(session.scalars(query))


def tracked_paths(runtime: Runtime, text: str) -> dict[str | None, str]:
    """Link name → path of each tracked redirect in ``text``."""
    paths: dict[str | None, str] = {}
    with Session(runtime.engine) as session:
        for url in REDIRECT.findall(text):
            link_id = link_id_from_token(runtime.settings, url.rsplit("/", 1)[1])
            assert link_id is not None
            link = session.get(TrackedLink, link_id)
            assert link is not None
            paths[link.name] = url.removeprefix(runtime.settings.public_url)
    return paths


def send_jd_email(runtime: Runtime, sandbox: SandboxServer) -> SandboxMessage:
    (email,) = apply_for_jd(runtime)
    assert deliver(runtime, email.id).status == "sent"
    (mail,) = sandbox.wait_for(1, timeout=5)
    return mail


def test_jd_intro_email_links_become_named_redirects(runtime: Runtime, sandbox: SandboxServer) -> None:
    mail = send_jd_email(runtime, sandbox)
    assert "book.example.com" not in mail.html and "book.example.com" not in mail.text
    assert "data-link" not in mail.html
    (email,) = outbox(runtime)
    stored = links_of(runtime)
    assert [(link.position, link.name, link.url) for link in stored] == [
        (0, "salary_range", f"{BOOKING}#salary-range"),
        (1, "book_interview", BOOKING),
    ]
    assert {link.message_id for link in stored} == {email.id}
    # The text part uses the same links (named from the HTML) as the HTML part.
    assert tracked_paths(runtime, mail.html) == tracked_paths(runtime, mail.text)
    assert set(tracked_paths(runtime, mail.html)) == {"salary_range", "book_interview"}
    sent = outbox(runtime)[0]
    assert sent.body == mail.text  # the conversation view shows what went out


def test_sms_links_are_named_from_the_context(runtime: Runtime, sandbox: SandboxServer) -> None:
    apply_for_jd(runtime)
    runtime.scheduler.tick(T0 + timedelta(minutes=5))
    nudge = outbox(runtime)[1]
    assert (nudge.channel, nudge.template) == ("sms", "jd_nudge")
    assert deliver(runtime, nudge.id).status == "sent"
    (sms,) = sandbox.wait_for(1, timeout=5)
    assert BOOKING not in sms.body
    assert list(tracked_paths(runtime, sms.body)) == ["book_interview"]
    assert [(link.name, link.url) for link in links_of(runtime, nudge.id)] == [("book_interview", BOOKING)]


def test_unsubscribe_link_is_never_rewritten(runtime: Runtime, sandbox: SandboxServer) -> None:
    # job_reactivation is a nurture campaign: tracked by default, with an unsubscribe link in the footer.
    add_job(runtime, "j-9", tags=["stack:java"], booking_url="https://book.example.com/j9")
    add_candidate(runtime, "match", tags=["stack:java"], nurture_consent=True, stage="declined")
    fire(runtime, "match", "job_opened", at=T0, job="j-9")
    runtime.scheduler.tick(T0)
    (message,) = outbox(runtime)
    assert deliver(runtime, message.id).status == "sent"
    (mail,) = sandbox.wait_for(1, timeout=5)
    unsubscribe = re.search(r"http://127\.0\.0\.1:9/unsubscribe/[A-Za-z0-9_.-]+", mail.text)
    assert unsubscribe is not None
    assert f'href="{unsubscribe.group(0)}"' in mail.html
    assert mail.headers["List-Unsubscribe"] == f"<{unsubscribe.group(0)}>"
    assert "book.example.com" not in mail.html + mail.text
    assert [(link.name, link.url) for link in links_of(runtime)] == [("book_interview", "https://book.example.com/j9")]


def test_nothing_is_rewritten_when_tracking_is_off(runtime: Runtime, sandbox: SandboxServer, tmp_path: Path) -> None:
    (tmp_path / "jd_untracked.yaml").write_text(
        "name: jd_untracked\ncategory: transactional\ntrigger: {event: applied}\nexit_on: []\n"
        "track_clicks: false\nsteps:\n  - {channel: email, template: jd_intro}\n",
        encoding="utf-8",
    )
    rt = Runtime(runtime.settings.with_overrides(campaigns_dir=tmp_path), sandbox_url=runtime.sandbox_url)
    rt.policy = runtime.policy
    rt.enqueue_override = lambda ids: None
    (email,) = apply_for_jd(rt)
    assert deliver(rt, email.id).status == "sent"
    (mail,) = sandbox.wait_for(1, timeout=5)
    assert f'href="{BOOKING}"' in mail.html and f'href="{BOOKING}#salary-range"' in mail.html
    assert BOOKING in mail.text and "/r/" not in mail.html + mail.text
    assert "data-link" not in mail.html  # the names never reach the candidate
    assert links_of(rt) == []


def test_a_retried_send_reuses_its_links(runtime: Runtime, sandbox: SandboxServer) -> None:
    (email,) = apply_for_jd(runtime)
    sandbox.fail("sendgrid", "500")
    first = deliver(runtime, email.id)
    assert first.status == "pending" and first.retry_in is not None
    stored = links_of(runtime)
    assert len(stored) == 2
    retry_at = outbox(runtime)[0].not_before + timedelta(milliseconds=1)
    assert deliver(runtime, email.id, now=retry_at).status == "sent"
    assert [(link.id, link.position) for link in links_of(runtime)] == [(link.id, link.position) for link in stored]
    (mail,) = [m for m in sandbox.messages() if m.channel == "email"]
    assert {link_id_from_token(runtime.settings, url.rsplit("/", 1)[1]) for url in REDIRECT.findall(mail.html)} == {
        link.id for link in stored
    }


# --- end to end: a click on book_interview skips the reminder ----------------------------------------------


def reminder_after_two_days(runtime: Runtime) -> OutboundMessage:
    runtime.scheduler.tick(T0 + timedelta(minutes=5))
    runtime.scheduler.tick(T0 + timedelta(days=2, minutes=5))
    rows = outbox(runtime)
    assert [(row.step, row.template) for row in rows] == [(0, "jd_intro"), (1, "jd_nudge"), (2, "jd_reminder")]
    return rows[2]


def test_a_click_on_book_interview_skips_the_reminder(runtime: Runtime, sandbox: SandboxServer) -> None:
    mail = send_jd_email(runtime, sandbox)
    path = tracked_paths(runtime, mail.html)["book_interview"]
    client = TestClient(create_app(runtime))
    response = client.get(path, follow_redirects=False)
    assert (response.status_code, response.headers["location"]) == (302, BOOKING)
    reminder = reminder_after_two_days(runtime)
    assert (reminder.status, reminder.rule) == ("skipped", "unless_clicked:book_interview")
    assert reminder.reason == "candidate clicked the book_interview link of this campaign"
    assert reminder.id not in runtime.queued  # type: ignore[attr-defined]


def test_without_the_click_the_reminder_is_sent(runtime: Runtime, sandbox: SandboxServer) -> None:
    mail = send_jd_email(runtime, sandbox)
    # A click on another link of the email does not count as booking.
    client = TestClient(create_app(runtime))
    assert client.get(tracked_paths(runtime, mail.html)["salary_range"], follow_redirects=False).status_code == 302
    reminder = reminder_after_two_days(runtime)
    assert (reminder.status, reminder.rule) == ("pending", None)
    assert reminder.id in runtime.queued  # type: ignore[attr-defined]
    assert deliver(runtime, reminder.id).status == "sent"
    texts = [m for m in sandbox.messages() if m.channel == "sms"]
    assert len(texts) == 1 and list(tracked_paths(runtime, texts[0].body)) == ["book_interview"]


def test_a_click_in_another_enrollment_does_not_skip_this_reminder(runtime: Runtime, sandbox: SandboxServer) -> None:
    mail = send_jd_email(runtime, sandbox)
    path = tracked_paths(runtime, mail.html)["book_interview"]
    # The same candidate applies to a second job later: that enrollment's reminder is its own business.
    add_job(runtime, "j-2", booking_url="https://book.example.com/other")
    fire(runtime, "c-1", "applied", at=T0 + timedelta(days=1), job="j-2")
    assert TestClient(create_app(runtime)).get(path, follow_redirects=False).status_code == 302
    runtime.scheduler.tick(T0 + timedelta(days=3, minutes=10))
    with Session(runtime.engine) as session:
        reminders = {
            row.enrollment_id: (row.status, row.rule)
            for row in session.scalars(select(OutboundMessage).where(OutboundMessage.template == "jd_reminder"))
        }
        assert session.scalars(select(Candidate.last_click_at)).one() is not None
    assert sorted(reminders.values(), key=str) == [("pending", None), ("skipped", "unless_clicked:book_interview")]
