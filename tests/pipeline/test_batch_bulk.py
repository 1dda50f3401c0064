"""The batch path's bulk work, on both databases: the shared rule reads decide exactly as the engine does one
message at a time, a batch costs a constant number of statements, and each row stores the text its recipient got."""

from __future__ import annotations

import html
import json
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple

import pytest
from sqlalchemy import event, insert, select
from sqlalchemy.orm import Session

from outreach.core.clock import utcnow
from outreach.core.models import Candidate, Enrollment, EnrollmentStatus, MessageStatus, OutboundMessage, Suppression
from outreach.ops.sandbox import SandboxServer
from outreach.pipeline.batch import _Person, _personalization_bytes, _Recipient, deliver_batch
from outreach.policy.base import Decision, Stage
from outreach.policy.bulk import PolicyReads
from outreach.policy.config import load_policies
from outreach.policy.consent import address_hash
from outreach.policy.engine import PolicyEngine
from outreach.service.runtime import Runtime
from tests.conftest import ROOT
from tests.helpers import past_nurture_send

ZONES = ("Asia/Shanghai", "America/New_York", "Europe/Berlin", "Pacific/Auckland", None)


class Facts(NamedTuple):
    """A candidate as a plain row, the way the batch sender reads them."""

    id: int
    email: str | None
    phone: str | None
    timezone: str | None
    nurture_consent: bool


def _population(runtime: Runtime, now: datetime) -> list[Candidate]:
    """Candidates of every kind the rules tell apart, in several timezones."""
    rows = []
    for i in range(40):
        rows.append(
            {
                "external_id": f"mix-{i:03d}",
                "name": f"Mixed {i}",
                "email": None if i % 13 == 5 else f"Mix-{i:03d}@Example.org",
                "phone": f"+861380013{i:04d}" if i % 2 else f"+1202555{i:04d}",
                "locale": "en",
                "timezone": ZONES[i % len(ZONES)],
                "tags": [],
                "stage": "talent_pool",
                "nurture_consent": i % 7 != 3,
                "data": {},
                "created_at": now,
                "updated_at": now,
            }
        )
    with Session(runtime.engine, expire_on_commit=False) as session, session.begin():
        session.execute(insert(Candidate), rows)
        people = list(session.scalars(select(Candidate).order_by(Candidate.id)))
        key = runtime.settings.signing_key
        for i, person in enumerate(people):
            if person.email and i % 5 == 1:  # suppressed in clear (as providers report: lowercased)
                session.add(Suppression(channel="email", address=person.email.lower(), reason="bounce"))
            if person.email and i % 5 == 2:  # suppressed under the hash an erasure leaves
                session.add(Suppression(channel="email", address=address_hash(key, "email", person.email), reason="x"))
            if i % 5 == 3:
                session.add(Suppression(channel="sms", address=person.phone or "", reason="STOP"))
            if i % 4 == 0:  # sent lately: the 60-day nurture cap is reached
                session.add(past_nurture_send(person.id, now - timedelta(days=3)))
            if i % 6 == 0:  # two lately: the 7-day cap too
                session.add(past_nurture_send(person.id, now - timedelta(days=1)))
                session.add(past_nurture_send(person.id, now - timedelta(hours=2), status=MessageStatus.SENT.value))
    return people


@pytest.mark.parametrize(
    "now",
    [
        datetime(2027, 3, 3, 2, 30, tzinfo=UTC),  # Wednesday: working hours in Shanghai, night in New York
        datetime(2027, 3, 3, 15, 0, tzinfo=UTC),  # Wednesday: working hours in New York and Berlin
        datetime(2027, 3, 6, 12, 0, tzinfo=UTC),  # Saturday everywhere
    ],
)
def test_bulk_decisions_are_the_engines_one_message_at_a_time(runtime: Runtime, now: datetime) -> None:
    engine = PolicyEngine(load_policies(ROOT / "campaigns"), runtime.settings)
    people = _population(runtime, now)
    facts = [Facts(p.id, p.email, p.phone, p.timezone, p.nurture_consent) for p in people]
    states: list[tuple[str, str | None] | None] = [
        None,
        (EnrollmentStatus.ACTIVE.value, None),
        (EnrollmentStatus.EXITED.value, "stage changed to hired"),
    ]
    kinds = [("email", "nurture"), ("email", "transactional"), ("sms", "nurture"), ("email", "auto_reply")]
    compared: list[Decision] = []
    with Session(runtime.engine) as session:
        reads = PolicyReads.load(session, engine, facts, {"email", "sms"}, now)
        for n, (person, fact) in enumerate(zip(people, facts, strict=True)):
            for k, (channel, category) in enumerate(kinds):
                state = states[(n + k) % len(states)]
                message_id = f"m-{n}-{k}"
                common: dict[str, Any] = {
                    "channel": channel,
                    "category": category,
                    "campaign": "quarterly_nurture",
                    "now": now,
                    "stage": Stage.SEND,
                    "message_id": message_id,
                }
                single = engine.evaluate(
                    session,
                    engine.subject(person, enrollment_state=state, **common),
                    enrollment_id=None if state is None else 1,
                ).decision
                bulk = reads.evaluate(session, engine.subject(fact, **common), fact, state)
                assert bulk == single, (n, channel, category, state)
                compared.append(bulk)
    # The population reaches every rule, so the comparison covers them all.
    assert {d.rule for d in compared} >= {
        "",
        "exit",
        "address",
        "suppression",
        "consent",
        "quiet_hours",
        "cap:nurture_60d",  # the first of the nurture caps to be reached (at most 1 in 60 days)
    }


def _outbox(runtime: Runtime, people: list[Candidate], now: datetime) -> list[str]:
    """One pending quarterly_nurture email row per candidate, with its enrollment, as the scheduler writes them."""
    with Session(runtime.engine, expire_on_commit=False) as session, session.begin():
        ids = []
        for person in people:
            enrollment = Enrollment(
                candidate_id=person.id,
                campaign="quarterly_nurture",
                dedupe_key="cron:test",
                stage_at_start="talent_pool",
                current_step=1,
                status=EnrollmentStatus.COMPLETED.value,
                anchor_at=now,
                context={},
            )
            session.add(enrollment)
            session.flush()
            row = OutboundMessage(
                enrollment_id=enrollment.id,
                candidate_id=person.id,
                campaign="quarterly_nurture",
                step=0,
                channel="email",
                template="quarterly_nurture",
                category="nurture",
                not_before=now - timedelta(minutes=1),
            )
            session.add(row)
            session.flush()
            ids.append(row.id)
        return ids


def _people(runtime: Runtime, count: int, start: int = 0, name: str = "Pat{i} Lee") -> list[Candidate]:
    now = utcnow()
    rows = [
        {
            "external_id": f"pool-{i:05d}",
            "name": name.format(i=i),
            "email": f"pool-{i:05d}@example.org",
            "locale": "en",
            "timezone": "Asia/Shanghai",
            "tags": [],
            "stage": "talent_pool",
            "nurture_consent": True,
            "data": {},
            "created_at": now,
            "updated_at": now,
        }
        for i in range(start, start + count)
    ]
    with Session(runtime.engine, expire_on_commit=False) as session, session.begin():
        session.execute(insert(Candidate), rows)
        return list(
            session.scalars(select(Candidate).where(Candidate.external_id.in_([r["external_id"] for r in rows])))
        )


@contextmanager
def _statements(runtime: Runtime) -> Iterator[list[str]]:
    seen: list[str] = []

    def count(*args: Any) -> None:
        seen.append(args[2])

    event.listen(runtime.engine, "before_cursor_execute", count)
    try:
        yield seen
    finally:
        event.remove(runtime.engine, "before_cursor_execute", count)


def test_a_batch_costs_the_same_few_statements_for_50_or_500_recipients(
    runtime: Runtime, sandbox: SandboxServer
) -> None:
    now = utcnow()
    small = _outbox(runtime, _people(runtime, 50), now)
    large = _outbox(runtime, _people(runtime, 500, start=50), now)
    deliver_batch(runtime, small[:5])  # templates compiled, connections open
    counts = []
    for ids in (small[5:], large):
        with _statements(runtime) as seen:
            outcome = deliver_batch(runtime, ids, now=now)
        assert (outcome.sent, outcome.requests) == (len(ids), 1)
        counts.append(len(seen))
    assert counts[0] == counts[1]
    # Claim (+ enrollments on SQLite), candidates, suppressions, recent sends, the exemplar's candidate, sent rows.
    assert counts[1] <= 8


def test_each_row_keeps_the_text_its_recipient_got(runtime: Runtime, sandbox: SandboxServer) -> None:
    now = utcnow()
    plain = _people(runtime, 30)
    odd = _people(runtime, 3, start=100, name="%%o:first_name:h%%-{i} Lee")  # a value holding a tag
    for people in (plain, odd):
        ids = _outbox(runtime, people, now)
        outcome = deliver_batch(runtime, ids, now=now)
        assert outcome.sent == len(ids)
        got = {m.custom_args["outreach_id"]: m for m in sandbox.messages()}
        with Session(runtime.engine) as session:
            rows = session.scalars(select(OutboundMessage).where(OutboundMessage.id.in_(ids))).all()
        for row in rows:
            assert row.status == MessageStatus.SENT.value
            assert (row.subject, row.body) == (got[row.id].subject, got[row.id].text)
        assert all(row.body and "%%o:" not in row.body for row in rows if row.candidate_id in {p.id for p in plain})


@pytest.mark.parametrize(
    "name", ["Ana", 'Quote " and \\ backslash', "控制\x01\x1f字符", "林小明 " * 200, "\u2028 emoji \U0001f600 " * 300]
)
def test_the_personalization_size_is_never_under_counted(name: str) -> None:
    # The cheap bound decides whether a recipient fits in a batch; it may only over-count SendGrid's figure.
    substitutions = {"%%o:name%%": name, "%%o:name:h%%": html.escape(name), "%%o:unsubscribe%%": "https://x/u/a.b"}
    headers = {"List-Unsubscribe": "<https://x/u/a.b>", "List-Unsubscribe-Post": "List-Unsubscribe=One-Click"}
    recipient = _Recipient(
        id="0" * 32,
        candidate=_Person(1, name, "a@example.org", None, "en", None, True),
        enrollment_id=None,
        campaign="quarterly_nurture",
        step=0,
        template="quarterly_nurture",
        category="nurture",
        channel="email",
        attempts=1,
        created_at=utcnow(),
        not_before=utcnow(),
        substitutions=substitutions,
        headers=headers,
    )
    exact = {"substitutions": substitutions, "custom_args": {"outreach_id": recipient.id}, "headers": headers}
    assert _personalization_bytes(recipient) >= len(json.dumps(exact, ensure_ascii=False).encode("utf-8"))
