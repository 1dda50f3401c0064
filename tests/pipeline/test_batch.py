"""Nurture email in SendGrid batches (outreach.pipeline.batch) on PostgreSQL, through the real SDK client to the
sandbox."""

from __future__ import annotations

import html
import json
import math
import shutil
import threading
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest
from sqlalchemy import insert, select, update
from sqlalchemy.orm import Session

from outreach.core.clock import utcnow
from outreach.core.models import Candidate, DeliveryEvent, MessageStatus, OutboundMessage, Suppression, TrackedLink
from outreach.domain.campaigns import Category
from outreach.domain.tokens import unsubscribe_message_id
from outreach.inbound.events import ingest
from outreach.inbound.provider_events import parse_sendgrid_batch
from outreach.ops.sandbox import SandboxServer
from outreach.pipeline.batch import deliver_batch
from outreach.pipeline.scheduler import TickResult
from outreach.policy.config import CapSpec
from outreach.policy.engine import PolicyEngine
from outreach.providers.sendgrid_payload import MAX_PERSONALIZATION_BYTES
from outreach.service.runtime import Runtime
from tests.conftest import ROOT, open_policy
from tests.helpers import add_candidate, add_job, fire, resolved_links

#: quarterly_nurture fires at 10:00 Shanghai on 1 January (02:00 UTC).
FIRE = datetime(2027, 1, 1, 2, 0, tzinfo=UTC)


def _pool(runtime: Runtime, count: int, *, zh_every: int = 3) -> list[Candidate]:
    """``count`` talent-pool candidates with nurture consent; every ``zh_every``-th one reads Chinese."""
    rows = []
    for i in range(count):
        zh = i % zh_every == zh_every - 1
        rows.append(
            {
                "external_id": f"tp-{i:04d}",
                "name": f"林{i} 小明" if zh else f"Ana&Bo{i} O'Neil",
                "email": f"tp-{i:04d}@example.org",
                "phone": None,
                "locale": "zh-CN" if zh else "en",
                "timezone": "Asia/Shanghai",
                "tags": [],
                "stage": "talent_pool",
                "nurture_consent": True,
                "data": {},
                "created_at": utcnow(),
                "updated_at": utcnow(),
            }
        )
    with Session(runtime.engine, expire_on_commit=False) as session, session.begin():
        session.execute(insert(Candidate), rows)
        return list(session.scalars(select(Candidate).order_by(Candidate.id)))


def _schedule(runtime: Runtime, batch_size: int = 1000, campaign: str = "quarterly_nurture") -> list[list[str]]:
    """Fire the quarterly campaign and run its step; returns the batches the scheduler enqueued."""
    batches: list[list[str]] = []
    singles: list[str] = []
    runtime.enqueue_override = singles.extend
    runtime.enqueue_batch_override = lambda ids: batches.append(list(ids))
    runtime.scheduler.batch_size = batch_size
    result = runtime.scheduler.tick(FIRE)
    assert result.fired == [campaign]
    assert singles == []
    return batches


def _rows(runtime: Runtime) -> dict[str, OutboundMessage]:
    with Session(runtime.engine) as session:
        return {m.id: m for m in session.scalars(select(OutboundMessage))}


def test_nurture_run_goes_out_in_batches_with_each_recipients_substitutions(
    pg_runtime: Runtime, sandbox: SandboxServer
) -> None:
    candidates = _pool(pg_runtime, 300)
    batches = _schedule(pg_runtime, batch_size=120)
    # Grouped by locale (100 zh-CN, 200 en), then cut at the batch size: 1 + 2 batches.
    assert sorted(len(b) for b in batches) == [80, 100, 120]
    before = sandbox.stats()["sendgrid"]["requests"]  # the session's sandbox counts every test's requests
    for batch in batches:
        outcome = deliver_batch(pg_runtime, batch)
        assert (outcome.sent, outcome.requests, outcome.single) == (len(batch), 1, 0)

    assert sandbox.stats()["sendgrid"]["requests"] - before == math.ceil(200 / 120) + math.ceil(100 / 120)
    records = {r.custom_args["outreach_id"]: r for r in sandbox.messages()}
    rows = _rows(pg_runtime)
    assert set(records) == set(rows) and len(sandbox.messages()) == 300
    by_id = {c.id: c for c in candidates}
    for outbox_id, row in rows.items():
        candidate = by_id[row.candidate_id]
        record = records[outbox_id]
        assert row.status == MessageStatus.SENT.value
        assert record.to == candidate.email
        assert row.provider_message_id == record.id  # the request's X-Message-Id, shared by its recipients
        first = candidate.name.split()[0]
        link = record.headers["List-Unsubscribe"].removeprefix("<").removesuffix(">")
        # Each recipient's own link, naming the message it came in (no candidate id).
        token = link.removeprefix(f"{pg_runtime.settings.public_url}/unsubscribe/")
        assert unsubscribe_message_id(pg_runtime.settings, token, utcnow()) == outbox_id
        greeting = f"{candidate.name}，" if candidate.locale == "zh-CN" else f"Hi {first},"
        assert greeting in record.text and greeting in (row.body or "")
        assert link in record.text and html.escape(link) in record.html
        assert html.escape(first) in record.html
        assert "%%o:" not in record.text + record.html + record.subject
        assert record.headers["List-Unsubscribe"] == f"<{link}>"
        assert set(record.custom_args) == {"outreach_id"}  # opaque ids only
    # The "&" in the name is escaped in the HTML part only.
    en = next(r for r in sandbox.messages() if "Ana&Bo" in r.text)
    assert "Ana&Bo" not in en.html and "Ana&amp;Bo" in en.html


def test_held_and_opted_out_recipients_are_left_out_of_the_request(pg_runtime: Runtime, sandbox: SandboxServer) -> None:
    candidates = _pool(pg_runtime, 40, zh_every=1000)
    spec = open_policy(pg_runtime.settings).spec
    cap = CapSpec(name="nurture", max=1, per=timedelta(days=60), categories=(Category.NURTURE,))
    pg_runtime.policy = PolicyEngine(spec.model_copy(update={"caps": (cap,)}), pg_runtime.settings)
    [batch] = _schedule(pg_runtime)
    suppressed, no_consent, capped = candidates[0:3], candidates[3:5], candidates[5:7]
    with Session(pg_runtime.engine) as session, session.begin():
        for c in suppressed:
            session.add(Suppression(channel="email", address=c.email, reason="unsubscribe", source="test"))
        session.execute(
            update(Candidate).where(Candidate.id.in_([c.id for c in no_consent])).values(nurture_consent=False)
        )
        for c in capped:  # a nurture email sent last week
            session.add(
                OutboundMessage(
                    candidate_id=c.id,
                    campaign="job_reactivation",
                    step=0,
                    channel="email",
                    template="job_reactivation",
                    category="nurture",
                    status="sent",
                    sent_at=utcnow() - timedelta(days=7),
                )
            )

    outcome = deliver_batch(pg_runtime, batch)
    assert (outcome.sent, outcome.stopped, outcome.requests) == (33, 7, 1)
    sent_to = {r.to for r in sandbox.messages()}
    assert len(sent_to) == 33
    assert not sent_to & {c.email for c in (*suppressed, *no_consent, *capped)}
    rows = {(m.candidate_id, m.campaign): m for m in _rows(pg_runtime).values()}
    for c in suppressed:
        row = rows[(c.id, "quarterly_nurture")]
        assert (row.status, row.rule, row.reason) == ("suppressed", "suppression", "address suppressed: unsubscribe")
    for c in no_consent:
        row = rows[(c.id, "quarterly_nurture")]
        assert (row.status, row.rule, row.reason) == ("suppressed", "consent", "no consent to nurture messages")
    for c in capped:
        row = rows[(c.id, "quarterly_nurture")]
        assert (row.status, row.rule) == ("held", "cap:nurture")
        assert row.not_before > utcnow() + timedelta(days=50)
        assert row.sent_at is None


def test_two_rows_of_one_candidate_in_a_batch_are_capped_like_two_single_sends(
    pg_runtime: Runtime, sandbox: SandboxServer
) -> None:
    [candidate] = _pool(pg_runtime, 1)
    spec = open_policy(pg_runtime.settings).spec
    cap = CapSpec(name="nurture", max=1, per=timedelta(days=60), categories=(Category.NURTURE,))
    pg_runtime.policy = PolicyEngine(spec.model_copy(update={"caps": (cap,)}), pg_runtime.settings)
    [batch] = _schedule(pg_runtime)
    add_job(pg_runtime, tags=[])
    with Session(pg_runtime.engine) as session, session.begin():
        extra = OutboundMessage(
            candidate_id=candidate.id,
            campaign="quarterly_nurture",
            step=0,
            channel="email",
            template="quarterly_nurture",
            category="nurture",
        )
        session.add(extra)
        session.flush()
        batch.append(extra.id)
    outcome = deliver_batch(pg_runtime, batch)
    assert (outcome.sent, outcome.stopped) == (1, 1)
    assert len(sandbox.messages()) == 1
    assert Counter(m.status for m in _rows(pg_runtime).values()) == {"sent": 1, "held": 1}


class _Collector(BaseHTTPRequestHandler):
    bodies: ClassVar[list[bytes]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        type(self).bodies.append(body)
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def event_sandbox() -> Iterator[tuple[SandboxServer, list[bytes]]]:
    """A sandbox that posts its signed SendGrid event batches to a collector."""
    bodies: ClassVar[list[bytes]] = []
    handler = type("Collector", (_Collector,), {"bodies": bodies})
    collector = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=collector.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{collector.server_address[1]}/webhooks/sendgrid/events"
    server = SandboxServer("127.0.0.1", 0, sendgrid_event_url=url).start()
    try:
        yield server, bodies
    finally:
        server.stop()
        collector.shutdown()
        collector.server_close()


def test_events_of_a_batch_map_back_to_each_recipients_row(
    pg_runtime: Runtime, event_sandbox: tuple[SandboxServer, list[bytes]]
) -> None:
    server, bodies = event_sandbox
    runtime = Runtime(pg_runtime.settings, sandbox_url=server.url)
    runtime.policy = pg_runtime.policy
    _pool(runtime, 25)
    [*batches] = _schedule(runtime)
    for batch in batches:
        deliver_batch(runtime, batch)
    deadline = utcnow() + timedelta(seconds=10)
    while len(bodies) < len(batches) and utcnow() < deadline:
        threading.Event().wait(0.05)
    events = [event for body in bodies for event in json.loads(body)]
    assert len(events) == 2 * 25  # processed and delivered for each recipient
    with Session(runtime.engine) as session, session.begin():
        ingest(session, parse_sendgrid_batch(events))
    rows = _rows(runtime)
    assert {m.status for m in rows.values()} == {MessageStatus.DELIVERED.value}
    with Session(runtime.engine) as session:
        per_row = Counter(session.scalars(select(DeliveryEvent.message_id)))
    assert per_row == dict.fromkeys(rows, 2)


def test_a_batch_retried_after_a_crash_does_not_resend(pg_runtime: Runtime, sandbox: SandboxServer) -> None:
    _pool(pg_runtime, 30)
    batches = _schedule(pg_runtime)
    ids = [i for b in batches for i in b]
    # The worker died after its request: the rows are committed `sending`, the provider has them.
    for batch in batches:
        deliver_batch(pg_runtime, batch)
    with Session(pg_runtime.engine) as session, session.begin():
        session.execute(
            update(OutboundMessage)
            .where(OutboundMessage.id.in_(ids))
            .values(status="sending", lease_until=utcnow() + timedelta(seconds=30), provider_message_id=None)
        )
    requests = sandbox.stats()["sendgrid"]["requests"]
    for batch in batches:  # Dramatiq delivers the batch message again
        outcome = deliver_batch(pg_runtime, batch)
        assert (outcome.claimed, outcome.sent, outcome.requests) == (0, 0, 0)
    assert sandbox.stats()["sendgrid"]["requests"] == requests
    # After the lease the sweeper marks them uncertain (reconciled from events, never resent).
    result = TickResult()
    pg_runtime.scheduler.sweep(utcnow() + timedelta(seconds=60), result)
    assert result.uncertain == 30 and result.requeued == []


def test_a_transient_failure_puts_the_batch_back_and_the_retry_sends_it_once(
    pg_runtime: Runtime, sandbox: SandboxServer
) -> None:
    _pool(pg_runtime, 20, zh_every=1000)
    [batch] = _schedule(pg_runtime)
    sandbox.fail("sendgrid", "500")
    first = deliver_batch(pg_runtime, batch)
    assert first.sent == 0 and first.retry_in is not None
    rows = _rows(pg_runtime)
    assert {m.status for m in rows.values()} == {"pending"}
    assert all(m.not_before > utcnow() for m in rows.values())
    assert deliver_batch(pg_runtime, batch).claimed == 0  # too early: nothing is due
    later = utcnow() + timedelta(seconds=first.retry_in + 1)
    second = deliver_batch(pg_runtime, batch, now=later)
    assert (second.sent, second.requests) == (20, 1)
    assert Counter(r.custom_args["outreach_id"] for r in sandbox.messages()) == dict.fromkeys(batch, 1)


def test_a_batch_whose_answer_is_lost_ends_uncertain_and_is_never_resent(
    pg_runtime: Runtime, sandbox: SandboxServer
) -> None:
    _pool(pg_runtime, 20, zh_every=1000)
    [batch] = _schedule(pg_runtime)
    sandbox.fail("sendgrid", "accept_reset")  # SendGrid takes the request, the connection breaks before the 202
    first = deliver_batch(pg_runtime, batch)
    assert first.sent == 0 and first.retry_in is None
    rows = _rows(pg_runtime)
    assert {(m.status, m.rule) for m in rows.values()} == {("uncertain", "ambiguous")}
    later = utcnow() + timedelta(hours=1)
    assert deliver_batch(pg_runtime, batch, now=later).claimed == 0  # nothing goes out twice
    assert Counter(r.custom_args["outreach_id"] for r in sandbox.messages()) == dict.fromkeys(batch, 1)


def test_a_refused_batch_is_sent_one_by_one(pg_runtime: Runtime, sandbox: SandboxServer) -> None:
    candidates = _pool(pg_runtime, 5, zh_every=1000)
    [batch] = _schedule(pg_runtime)
    singles: list[str] = []
    pg_runtime.enqueue_override = singles.extend
    with Session(pg_runtime.engine) as session, session.begin():
        session.execute(update(Candidate).where(Candidate.id == candidates[0].id).values(email="not-an-address"))
    outcome = deliver_batch(pg_runtime, batch)
    assert (outcome.sent, outcome.single) == (0, 5)
    assert sorted(singles) == sorted(batch)
    # The refused request was an attempt (counted at its hand-off, as a single send's): pending again, unmarked.
    assert {(m.status, m.rule, m.attempts) for m in _rows(pg_runtime).values()} == {("pending", None, 1)}


def test_tracked_links_get_a_redirect_per_recipient(pg_runtime: Runtime, sandbox: SandboxServer) -> None:
    booking = "https://book.example.com/j9"
    add_job(pg_runtime, "j-9", tags=["stack:java"], booking_url=booking)
    for i in range(4):
        add_candidate(pg_runtime, f"c-{i}", tags=["stack:java"], nurture_consent=True, stage="declined")
    batches: list[list[str]] = []
    pg_runtime.enqueue_override = lambda ids: pytest.fail("nurture rows must be batched") if ids else None
    pg_runtime.enqueue_batch_override = lambda ids: batches.append(list(ids))
    opened = utcnow() - timedelta(seconds=1)
    for i in range(4):  # the same opening: one rendering serves them all
        fire(pg_runtime, f"c-{i}", "job_opened", job="j-9", at=opened)
    pg_runtime.scheduler.tick()
    [batch] = batches
    assert len(batch) == 4
    outcome = deliver_batch(pg_runtime, batch)
    assert (outcome.sent, outcome.requests) == (4, 1)
    with Session(pg_runtime.engine) as session:
        links = session.execute(select(TrackedLink.message_id, TrackedLink.name, TrackedLink.url)).all()
    assert sorted(m for m, _, _ in links) == sorted(batch)  # one stored link per recipient
    assert {(name, url) for _, name, url in links} == {("book_interview", booking)}
    seen = set()
    for record in sandbox.messages():
        assert booking not in record.text + record.html
        tracked = resolved_links(pg_runtime, record.text)
        assert tracked == [booking]
        [token] = [part for part in record.text.split() if "/r/" in part]
        seen.add(token)
    assert len(seen) == 4  # a redirect of each recipient's own


def test_personalization_limit_is_the_sandboxs_too(sandbox: SandboxServer) -> None:
    from sendgrid import SendGridAPIClient

    client = SendGridAPIClient(api_key="SG.test", host=sandbox.url)
    payload = {
        "personalizations": [
            {"to": [{"email": "a@example.org"}], "substitutions": {"%%o:x%%": "y" * MAX_PERSONALIZATION_BYTES}}
        ],
        "from": {"email": "talent@example.com"},
        "subject": "s",
        "content": [{"type": "text/plain", "value": "%%o:x%%"}],
    }
    with pytest.raises(Exception) as error:
        client.client.mail.send.post(request_body=payload)
    assert "10000 bytes" in str(getattr(error.value, "body", b""))


@pytest.mark.parametrize(
    "greeting",
    [
        "Hi {{ candidate.first_name }}{% if 'vip' in candidate.tags %}, our VIP{% endif %},",  # reads tags
        "Hi {{ candidate.first_name|upper }},",  # reshapes a per-recipient value
    ],
)
def test_a_template_that_cannot_be_shared_goes_out_one_by_one(
    pg_runtime: Runtime, sandbox: SandboxServer, tmp_path: Path, greeting: str
) -> None:
    from outreach.pipeline.delivery import deliver

    templates, campaigns = tmp_path / "templates", tmp_path / "campaigns"
    shutil.copytree(ROOT / "templates", templates)
    campaigns.mkdir()
    shutil.copy(ROOT / "campaigns" / "policies.yaml", campaigns / "policies.yaml")
    (campaigns / "tagged_note.yaml").write_text(
        "name: tagged_note\ncategory: nurture\nexit_on: []\n"
        "trigger: {cron: '0 10 1 1,4,7,10 *', audience: {stages: [talent_pool], require_nurture_consent: true}}\n"
        "steps:\n  - {channel: email, template: tagged_note}\n",
        encoding="utf-8",
    )
    (templates / "email" / "tagged_note.en.subject.txt").write_text("News from {{ company.name }}\n", encoding="utf-8")
    (templates / "email" / "tagged_note.en.txt").write_text(
        greeting + "\nunsubscribe: {{ links.unsubscribe }}\n", encoding="utf-8"
    )
    (templates / "email" / "tagged_note.en.html").write_text(
        "<p>" + greeting + '</p><a href="{{ links.unsubscribe }}">unsubscribe</a>\n', encoding="utf-8"
    )
    settings = pg_runtime.settings.with_overrides(campaigns_dir=campaigns, templates_dir=templates)
    runtime = Runtime(settings, sandbox_url=sandbox.url)
    runtime.policy = open_policy(settings)
    _pool(runtime, 3, zh_every=1000)
    with Session(runtime.engine) as session, session.begin():
        session.execute(update(Candidate).where(Candidate.external_id == "tp-0001").values(tags=["vip"]))
    batches = _schedule(runtime, campaign="tagged_note")
    singles: list[str] = []
    runtime.enqueue_override = singles.extend
    [batch] = batches
    outcome = deliver_batch(runtime, batch)
    assert (outcome.sent, outcome.single, outcome.requests) == (0, 3, 0)
    assert sorted(singles) == sorted(batch)
    assert {(m.status, m.attempts) for m in _rows(runtime).values()} == {("pending", 0)}
    for outbox_id in singles:
        assert deliver(runtime, outbox_id).status == "sent"
    texts = sorted(record.text.splitlines()[0] for record in sandbox.messages())
    if "upper" in greeting:
        assert texts == ["Hi ANA&BO0,", "Hi ANA&BO1,", "Hi ANA&BO2,"]
    else:
        assert texts == ["Hi Ana&Bo0,", "Hi Ana&Bo1, our VIP,", "Hi Ana&Bo2,"]
