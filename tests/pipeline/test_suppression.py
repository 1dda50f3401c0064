"""One way to suppress an address: keyed alike from every source, written once, and what is queued for it ended."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from outreach.core.clock import utcnow
from outreach.core.models import MessageStatus, OutboundMessage, Suppression
from outreach.pipeline.suppression import Suppress, suppress
from outreach.service.runtime import Runtime
from tests.helpers import add_candidate


def queued(runtime: Runtime, candidate_id: int, channel: str, status: str) -> str:
    with Session(runtime.engine) as session, session.begin():
        row = OutboundMessage(
            candidate_id=candidate_id,
            campaign="jd_intro",
            step=0,
            channel=channel,
            template="jd_intro",
            category="transactional",
            status=status,
        )
        session.add(row)
        session.flush()
        return row.id


def test_every_source_keys_an_address_the_same_way_and_writes_it_once(runtime: Runtime) -> None:
    with Session(runtime.engine) as session, session.begin():
        first = suppress(session, [Suppress("email", " Alex@Example.org ", "bounced", "sendgrid")], utcnow())
        again = suppress(
            session,
            [Suppress("email", "alex@example.org", "unsubscribed", "link"), Suppress("sms", "", "x", "y")],
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
        done = suppress(session, [Suppress("email", "alex@example.org", "complained", "sendgrid")], utcnow())
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
            session, [Suppress("sms", alex.phone or "", "twilio 21610", "provider")], utcnow(), cancel=False
        )
    assert done.written == 1 and done.cancelled == []
    with Session(runtime.engine) as session:
        assert session.get(OutboundMessage, pending).status == "pending"  # type: ignore[union-attr]
