"""One way to suppress an address: keyed alike from every source, written once (widened, never narrowed), and what
is queued for it that its scope stops ended."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from outreach.core.clock import utcnow
from outreach.core.models import MessageStatus, OutboundMessage, Suppression
from outreach.pipeline.suppression import Suppress, suppress
from outreach.service.runtime import Runtime
from tests.helpers import add_candidate


def queued(runtime: Runtime, candidate_id: int, channel: str, status: str, category: str = "transactional") -> str:
    with Session(runtime.engine) as session, session.begin():
        row = OutboundMessage(
            candidate_id=candidate_id,
            campaign="jd_intro",
            step=0,
            channel=channel,
            template="jd_intro",
            category=category,
            status=status,
        )
        session.add(row)
        session.flush()
        return row.id


def test_every_source_keys_an_address_the_same_way_and_writes_it_once(runtime: Runtime) -> None:
    with Session(runtime.engine) as session, session.begin():
        first = suppress(
            session, [Suppress("email", " Alex@Example.org ", "bounced", "sendgrid", "provider")], utcnow()
        )
        again = suppress(
            session,
            [
                Suppress("email", "alex@example.org", "unsubscribed", "link", "email"),
                Suppress("sms", "", "x", "y", "sms"),
            ],
            utcnow(),
            cancel=False,
        )
    assert (first.written, again.written) == (1, 0)
    with Session(runtime.engine) as session:
        assert session.execute(select(Suppression.address, Suppression.reason)).all() == [
            ("alex@example.org", "bounced")
        ]


def test_queued_messages_to_the_address_end_suppressed_and_nothing_else_moves(runtime: Runtime) -> None:
    alex = add_candidate(runtime, "c-1", email="Alex@Example.org", phone="+8613800138000")
    other = add_candidate(runtime, "c-2", email="other@example.org", phone="+8613800138001")
    pending = queued(runtime, alex.id, "email", MessageStatus.PENDING.value)
    held = queued(runtime, alex.id, "email", MessageStatus.HELD.value)
    sent = queued(runtime, alex.id, "email", MessageStatus.SENT.value)
    sms = queued(runtime, alex.id, "sms", MessageStatus.PENDING.value)
    someone_else = queued(runtime, other.id, "email", MessageStatus.PENDING.value)
    with Session(runtime.engine) as session, session.begin():
        done = suppress(
            session, [Suppress("email", "alex@example.org", "complained", "sendgrid", "provider")], utcnow()
        )
    assert sorted(done.cancelled) == sorted([pending, held])
    with Session(runtime.engine) as session:
        rows = {row.id: row for row in session.scalars(select(OutboundMessage))}
    assert (rows[pending].status, rows[pending].rule, rows[pending].reason) == (
        "suppressed",
        "suppression",
        "address suppressed: complained",
    )
    assert rows[sent].status == "sent" and rows[sms].status == "pending" and rows[someone_else].status == "pending"


def test_recording_only_leaves_the_queue_to_the_send_time_rules(runtime: Runtime) -> None:
    alex = add_candidate(runtime, "c-1")
    pending = queued(runtime, alex.id, "sms", MessageStatus.PENDING.value)
    with Session(runtime.engine) as session, session.begin():
        done = suppress(
            session, [Suppress("sms", alex.phone or "", "twilio 21610", "provider", "provider")], utcnow(), cancel=False
        )
    assert done.written == 1 and done.cancelled == []
    with Session(runtime.engine) as session:
        assert session.get(OutboundMessage, pending).status == "pending"  # type: ignore[union-attr]


def stored(runtime: Runtime) -> list[tuple[str, str, str, str]]:
    with Session(runtime.engine) as session:
        return [
            (s.address, s.scope, s.reason, s.source)
            for s in session.scalars(select(Suppression).order_by(Suppression.channel, Suppression.address))
        ]


def test_a_nurture_scope_ends_only_queued_nurture(runtime: Runtime) -> None:
    alex = add_candidate(runtime, "c-1")
    nurture = queued(runtime, alex.id, "email", MessageStatus.PENDING.value, category="nurture")
    transactional = queued(runtime, alex.id, "email", MessageStatus.PENDING.value)
    with Session(runtime.engine) as session, session.begin():
        done = suppress(session, [Suppress("email", "c-1@example.org", "unsubscribed", "link", "nurture")], utcnow())
    assert (done.written, done.cancelled) == (1, [nurture])
    with Session(runtime.engine) as session:
        ended = session.get(OutboundMessage, nurture)
        assert ended is not None
        assert (ended.status, ended.rule, ended.reason) == (
            "suppressed",
            "suppression",
            "address suppressed for nurture: unsubscribed",
        )
        assert session.get(OutboundMessage, transactional).status == "pending"  # type: ignore[union-attr]


def test_a_wider_scope_replaces_nurture_and_nothing_narrows_one(runtime: Runtime) -> None:
    alex = add_candidate(runtime, "c-1")
    transactional = queued(runtime, alex.id, "email", MessageStatus.PENDING.value)
    with Session(runtime.engine) as session, session.begin():
        nurture = suppress(session, [Suppress("email", "c-1@example.org", "unsubscribed", "link", "nurture")], utcnow())
    with Session(runtime.engine) as session, session.begin():
        bounce = suppress(session, [Suppress("email", "C-1@example.org", "bounced", "sendgrid", "provider")], utcnow())
    assert (nurture.written, bounce.written, bounce.cancelled) == (1, 1, [transactional])
    assert stored(runtime) == [("c-1@example.org", "provider", "bounced", "sendgrid")]
    with Session(runtime.engine) as session, session.begin():
        again = suppress(
            session,
            [
                Suppress("email", "c-1@example.org", "unsubscribed", "link", "nurture"),
                Suppress("email", "c-1@example.org", "unsubscribed", "link", "email"),
            ],
            utcnow(),
        )
    assert again.written == 0  # already stopped for everything: neither narrowed nor rewritten
    assert stored(runtime) == [("c-1@example.org", "provider", "bounced", "sendgrid")]


def test_in_one_call_the_widest_entry_for_an_address_wins(runtime: Runtime) -> None:
    with Session(runtime.engine) as session, session.begin():
        done = suppress(
            session,
            [
                Suppress("email", "kim@example.org", "unsubscribed", "link", "nurture"),
                Suppress("email", "Kim@example.org", "complained", "sendgrid", "provider"),
                Suppress("email", "kim@example.org", "bounced", "sendgrid", "provider"),
                Suppress("sms", "+8613800138000", "opt_out", "keyword", "sms"),
                Suppress("sms", "+8613800138000", "unsubscribed", "link", "nurture"),
            ],
            utcnow(),
        )
    assert done.written == 2
    assert stored(runtime) == [
        ("kim@example.org", "provider", "complained", "sendgrid"),
        ("+8613800138000", "sms", "opt_out", "keyword"),
    ]
