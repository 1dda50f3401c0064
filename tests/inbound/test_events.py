"""Provider events applied to the outbox: idempotent ingest, forward-only status, suppressions, clicks."""

from __future__ import annotations

import json
import random
import threading
import time
from typing import Any

import pytest
from sqlalchemy import event as sa_event
from sqlalchemy import select, text
from sqlalchemy.orm import Session

from outreach.core.models import Candidate, DeliveryEvent, OutboundMessage, Suppression
from outreach.inbound.events import IngestResult, implied_status, ingest
from outreach.inbound.provider_events import (
    FAILURE_TYPES,
    SENDGRID_EVENTS,
    TWILIO_STATUSES,
    EventType,
    NormalizedEvent,
    parse_sendgrid_batch,
    parse_twilio_status,
)
from outreach.service.runtime import Runtime
from tests.helpers import add_candidate
from tests.inbound.test_provider_events import (
    ANA,
    BATCH,
    BO,
    CHEN,
    DANA,
    ELI,
    FAY,
    GUS,
    HUA,
    TWILIO_SID,
    at,
    twilio_form,
)


def add_message(
    runtime: Runtime,
    candidate: Candidate,
    outbox_id: str | None = None,
    *,
    channel: str = "email",
    status: str = "sent",
    provider: str | None = None,
    provider_message_id: str | None = None,
    step: int = 1,
) -> str:
    values: dict[str, Any] = {
        "candidate_id": candidate.id,
        "campaign": "jd_intro",
        "step": step,
        "channel": channel,
        "template": "jd_intro",
        "category": "transactional",
        "status": status,
        "provider": provider,
        "provider_message_id": provider_message_id,
    }
    if outbox_id is not None:
        values["id"] = outbox_id
    if status == "sent":
        values["sent_at"] = at(1764107990)
    with Session(runtime.engine, expire_on_commit=False) as session, session.begin():
        message = OutboundMessage(**values)
        session.add(message)
    return message.id


def run(runtime: Runtime, events: list[NormalizedEvent]) -> IngestResult:
    with Session(runtime.engine, expire_on_commit=False) as session, session.begin():
        return ingest(session, events)


def row(runtime: Runtime, outbox_id: str) -> OutboundMessage:
    with Session(runtime.engine) as session:
        message = session.get(OutboundMessage, outbox_id)
        assert message is not None
        return message


def status(runtime: Runtime, outbox_id: str) -> str:
    return row(runtime, outbox_id).status


def suppressions(runtime: Runtime) -> set[tuple[str, str, str]]:
    with Session(runtime.engine) as session:
        return {(s.channel, s.address, s.reason) for s in session.scalars(select(Suppression))}


def snapshot(runtime: Runtime) -> dict[str, Any]:
    """Everything ingest may change, without ``updated_at`` (a clock, not state)."""
    with Session(runtime.engine) as session:
        messages = {
            m.id: (
                m.status,
                m.provider,
                m.provider_message_id,
                m.sent_at,
                m.delivered_at,
                m.error_code,
                m.error_detail,
                m.rule,
                m.reason,
            )
            for m in session.scalars(select(OutboundMessage))
        }
        events = {
            (e.provider, e.provider_event_id): (e.message_id, e.type, e.occurred_at, json.dumps(e.raw, sort_keys=True))
            for e in session.scalars(select(DeliveryEvent))
        }
        candidates = {
            c.external_id: (c.last_click_at, c.last_reply_at, c.nurture_consent)
            for c in session.scalars(select(Candidate))
        }
        suppressed = {
            (s.channel, s.address): (s.reason, s.source, s.created_at) for s in session.scalars(select(Suppression))
        }
    return {"messages": messages, "events": events, "candidates": candidates, "suppressions": suppressed}


# -- the status each event implies ---------------------------------------------------------------------


def test_every_mapped_type_implies_an_outbox_status() -> None:
    assert {implied_status(t).value for t in EventType} <= {"sent", "delivered", "failed", "bounced", "undelivered"}
    # Every type but ``replied`` (inbound replies are recorded by their own module) comes from a provider table.
    assert set(SENDGRID_EVENTS.values()) | set(TWILIO_STATUSES.values()) == set(EventType) - {EventType.REPLIED}


def test_the_parsers_failures_are_the_events_that_imply_a_failed_status() -> None:
    # The parsers keep an error code and the provider's reason for these; the status machine ends the row with them.
    failed = {"failed", "bounced", "undelivered"}
    assert {t for t in EventType if implied_status(t).value in failed} == FAILURE_TYPES


# -- ingesting a batch -----------------------------------------------------------------------------------


def seed_batch_world(runtime: Runtime) -> dict[str, str]:
    """Outbox rows for the fixture's messages, and queued messages to some of the same people."""
    people = {
        name: add_candidate(runtime, name, email=f"{name}@{'example.cn' if name in {'chen', 'hua'} else 'example.org'}")
        for name in ("ana", "bo", "chen", "dana", "eli", "fay", "gus", "hua")
    }
    for name in ("dana", "eli", "fay"):
        with Session(runtime.engine) as session, session.begin():
            candidate = session.get(Candidate, people[name].id)
            assert candidate is not None
            candidate.nurture_consent = True
    for outbox_id, name in ((ANA, "ana"), (BO, "bo"), (CHEN, "chen"), (DANA, "dana"), (ELI, "eli"), (FAY, "fay")):
        add_message(runtime, people[name], outbox_id, provider="sendgrid", provider_message_id=f"{name.title()}X")
    add_message(runtime, people["gus"], GUS, status="uncertain")
    add_message(runtime, people["hua"], HUA, provider="sendgrid", provider_message_id="HuaXMsgId0000000000008")
    return {
        "bo_pending": add_message(runtime, people["bo"], status="pending", step=2),
        "bo_held": add_message(runtime, people["bo"], status="held", step=3),
        "bo_sms": add_message(runtime, people["bo"], channel="sms", status="pending", step=2),
        "bo_sending": add_message(runtime, people["bo"], status="sending", step=4),
        "chen_pending": add_message(runtime, people["chen"], status="pending", step=2),
        "dana_pending": add_message(runtime, people["dana"], status="pending", step=2),
        "eli_pending": add_message(runtime, people["eli"], status="pending", step=2),
        "fay_pending": add_message(runtime, people["fay"], status="held", step=2),
        "gus_pending": add_message(runtime, people["gus"], status="pending", step=2),
        "ana_pending": add_message(runtime, people["ana"], status="pending", step=2),
    }


def shuffled(seed: int) -> list[dict[str, Any]]:
    copy = [dict(item) for item in BATCH]
    random.Random(seed).shuffle(copy)
    return copy


def test_batch_replayed_three_times_shuffled_is_the_same_as_once(runtime: Runtime) -> None:
    queued = seed_batch_world(runtime)
    first = run(runtime, parse_sendgrid_batch(shuffled(1)))
    assert (first.received, first.stored, first.duplicates, first.unmatched) == (19, 19, 0, 1)
    assert first.suppressed == 5
    once = snapshot(runtime)

    for seed in (2, 3):
        again = run(runtime, parse_sendgrid_batch(shuffled(seed)))
        assert (again.stored, again.duplicates, again.updated, again.suppressed, again.cancelled) == (0, 19, 0, 0, 0)
    assert snapshot(runtime) == once

    # What the batch says, message by message.
    ana = row(runtime, ANA)
    assert (ana.status, ana.delivered_at, ana.error_code) == ("delivered", at(1764108090), None)
    bo = row(runtime, BO)
    assert (bo.status, bo.error_code, bo.delivered_at) == ("bounced", "5.1.1", None)
    assert bo.error_detail is not None and "bo@example.org" not in bo.error_detail
    assert (status(runtime, CHEN), row(runtime, CHEN).error_code) == ("failed", "5.7.1")
    assert status(runtime, DANA) == status(runtime, ELI) == status(runtime, FAY) == "delivered"
    gus = row(runtime, GUS)  # uncertain, reconciled by the drop
    assert (gus.status, gus.provider, gus.error_code, gus.sent_at) == ("failed", "sendgrid", "5.0.0", at(1764108005))
    assert (status(runtime, HUA), row(runtime, HUA).delivered_at) == ("delivered", at(1764108066))

    assert suppressions(runtime) == {
        ("email", "bo@example.org", "bounced"),
        ("email", "dana@example.org", "complained"),
        ("email", "eli@example.org", "unsubscribed"),
        ("email", "fay@example.org", "unsubscribed"),
        ("email", "gus@example.org", "bounced"),
    }
    for key in ("bo_pending", "bo_held", "dana_pending", "eli_pending", "fay_pending", "gus_pending"):
        queued_row = row(runtime, queued[key])
        assert queued_row.status == "suppressed", key
        assert queued_row.rule == "suppression"
        assert queued_row.reason is not None and queued_row.reason.startswith("address suppressed: ")
    assert row(runtime, queued["bo_pending"]).reason == "address suppressed: bounced"
    assert row(runtime, queued["dana_pending"]).reason == "address suppressed: complained"
    for key, expected in (("bo_sms", "pending"), ("bo_sending", "sending"), ("chen_pending", "pending")):
        assert status(runtime, queued[key]) == expected, key
    assert status(runtime, queued["ana_pending"]) == "pending"

    people = snapshot(runtime)["candidates"]
    assert people["ana"][0] == at(1764115200)  # the later of the two clicks
    assert people["bo"][0] is None
    assert [people[name][2] for name in ("dana", "eli", "fay")] == [False, False, False]

    with Session(runtime.engine) as session:
        [stranger] = session.scalars(select(DeliveryEvent).where(DeliveryEvent.message_id.is_(None))).all()
        assert stranger.raw["email"] == "stranger@example.net"
        assert {e.message_id for e in session.scalars(select(DeliveryEvent))} == {
            ANA,
            BO,
            CHEN,
            DANA,
            ELI,
            FAY,
            GUS,
            HUA,
            None,
        }


def test_duplicates_inside_one_batch_count_once(runtime: Runtime) -> None:
    seed_batch_world(runtime)
    events = parse_sendgrid_batch(BATCH[:3] + BATCH[:3])
    result = run(runtime, events)
    assert (result.received, result.stored, result.duplicates) == (6, 3, 3)


# -- forward only ----------------------------------------------------------------------------------------


def sendgrid(name: str, outbox_id: str, seconds: int, event_id: str, **extra: Any) -> NormalizedEvent:
    item = {
        "event": name,
        "timestamp": seconds,
        "sg_event_id": event_id,
        "email": "c-1@example.org",
        "outreach_id": outbox_id,
        "sg_message_id": "XMSG.filter0001.1.2.0",
        **extra,
    }
    [event] = parse_sendgrid_batch([item])
    return event


def test_late_sent_never_overwrites_delivered(runtime: Runtime) -> None:
    outbox_id = add_message(runtime, add_candidate(runtime), provider="sendgrid", provider_message_id="XMSG")
    assert run(runtime, [sendgrid("delivered", outbox_id, 1764108060, "d")]).updated == 1
    assert run(runtime, [sendgrid("processed", outbox_id, 1764108000, "p")]).updated == 0
    assert run(runtime, [sendgrid("deferred", outbox_id, 1764108030, "f")]).updated == 0
    message = row(runtime, outbox_id)
    assert (message.status, message.delivered_at) == ("delivered", at(1764108060))


def test_async_bounce_after_delivery_wins_and_the_first_terminal_stays(runtime: Runtime) -> None:
    candidate = add_candidate(runtime)
    outbox_id = add_message(runtime, candidate, provider="sendgrid", provider_message_id="XMSG")
    run(runtime, [sendgrid("delivered", outbox_id, 1764108060, "d")])
    run(runtime, [sendgrid("bounce", outbox_id, 1764109000, "b", type="bounce", status="5.1.1", reason="gone")])
    message = row(runtime, outbox_id)
    assert (message.status, message.delivered_at, message.error_code) == ("bounced", at(1764108060), "5.1.1")
    # Nothing moves it on: not a later delivery, not another failure.
    run(runtime, [sendgrid("delivered", outbox_id, 1764109100, "d2")])
    run(runtime, [sendgrid("bounce", outbox_id, 1764109200, "b2", type="blocked", status="5.7.1")])
    message = row(runtime, outbox_id)
    assert (message.status, message.error_code) == ("bounced", "5.1.1")
    assert suppressions(runtime) == {("email", "c-1@example.org", "bounced")}


def test_never_touches_our_own_decisions(runtime: Runtime) -> None:
    candidate = add_candidate(runtime)
    rows = {
        state: add_message(runtime, candidate, status=state, step=step)
        for step, state in enumerate(("suppressed", "skipped", "cancelled"), start=1)
    }
    run(runtime, [sendgrid("delivered", outbox_id, 1764108060, f"d-{s}") for s, outbox_id in rows.items()])
    assert {s: status(runtime, outbox_id) for s, outbox_id in rows.items()} == {s: s for s in rows}


def test_twilio_callbacks_in_reverse_order_end_delivered(runtime: Runtime) -> None:
    outbox_id = add_message(runtime, add_candidate(runtime), channel="sms", provider="twilio", provider_message_id=None)
    for name in ("status_callback_delivered.form", "status_callback_sent.form", "status_callback_queued.form"):
        run(runtime, [parse_twilio_status(twilio_form(name), outbox_id)])
    message = row(runtime, outbox_id)
    assert (message.status, message.provider_message_id) == ("delivered", TWILIO_SID)
    assert message.delivered_at is not None
    replay = run(runtime, [parse_twilio_status(twilio_form("status_callback_delivered.form"), outbox_id)])
    assert (replay.stored, replay.duplicates) == (0, 1)
    with Session(runtime.engine) as session:
        stored = sorted(session.scalars(select(DeliveryEvent.provider_event_id)))
    assert stored == [f"{TWILIO_SID}:{s}" for s in ("delivered", "queued", "sent")]


def test_twilio_undelivered_and_stop(runtime: Runtime) -> None:
    candidate = add_candidate(runtime)
    outbox_id = add_message(runtime, candidate, channel="sms", provider="twilio", provider_message_id=TWILIO_SID)
    later = add_message(runtime, candidate, channel="sms", status="pending", step=2)
    email = add_message(runtime, candidate, channel="email", status="pending", step=3)
    run(runtime, [parse_twilio_status(twilio_form("status_callback_undelivered.form"), None)])  # linked by sid
    assert (status(runtime, outbox_id), row(runtime, outbox_id).error_code) == ("undelivered", "30003")
    assert suppressions(runtime) == set()
    stop = {"MessageSid": "SM" + "2" * 32, "MessageStatus": "failed", "ErrorCode": "21610", "To": candidate.phone or ""}
    other = add_message(runtime, candidate, channel="sms", provider="twilio", provider_message_id=stop["MessageSid"])
    run(runtime, [parse_twilio_status(stop, other)])
    assert suppressions(runtime) == {("sms", "+8613800138000", "unsubscribed")}
    assert (status(runtime, other), status(runtime, later), status(runtime, email)) == (
        "failed",
        "suppressed",
        "pending",
    )


# -- side effects ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "extra", "reason"),
    [
        ("unsubscribe", {}, "unsubscribed"),
        ("spamreport", {}, "complained"),
        ("bounce", {"type": "bounce", "status": "5.1.1"}, "bounced"),
        ("dropped", {"reason": "Unsubscribed Address"}, "unsubscribed"),
    ],
)
def test_suppressing_events_end_queued_messages(
    runtime: Runtime, name: str, extra: dict[str, Any], reason: str
) -> None:
    candidate = add_candidate(runtime, email="Kim.Lee@example.org")
    outbox_id = add_message(runtime, candidate, provider="sendgrid", provider_message_id="XMSG")
    pending = add_message(runtime, candidate, status="pending", step=2)
    held = add_message(runtime, candidate, status="held", step=3)
    sms = add_message(runtime, candidate, channel="sms", status="pending", step=2)
    event = sendgrid(name, outbox_id, 1764108060, "e1", **extra)
    event.recipient = "KIM.LEE@example.org"
    result = run(runtime, [event])
    assert (result.suppressed, result.cancelled) == (1, 2)
    assert suppressions(runtime) == {("email", "kim.lee@example.org", reason)}
    for queued in (pending, held):
        message = row(runtime, queued)
        assert (message.status, message.rule, message.reason) == (
            "suppressed",
            "suppression",
            f"address suppressed: {reason}",
        )
    assert status(runtime, sms) == "pending"


def test_blocked_bounce_suppresses_nothing(runtime: Runtime) -> None:
    candidate = add_candidate(runtime)
    outbox_id = add_message(runtime, candidate, provider="sendgrid", provider_message_id="XMSG")
    pending = add_message(runtime, candidate, status="pending", step=2)
    run(runtime, [sendgrid("bounce", outbox_id, 1764108060, "b", type="blocked", status="5.7.1")])
    assert (status(runtime, outbox_id), status(runtime, pending)) == ("failed", "pending")
    assert suppressions(runtime) == set()


def test_uncertain_row_is_reconciled_from_its_events(runtime: Runtime) -> None:
    candidate = add_candidate(runtime)
    email = add_message(runtime, candidate, status="uncertain")
    sms = add_message(runtime, candidate, channel="sms", status="uncertain", step=2)
    run(runtime, [sendgrid("processed", email, 1764108000, "p")])
    message = row(runtime, email)
    assert (message.status, message.provider, message.provider_message_id) == ("sent", "sendgrid", "XMSG")
    assert message.sent_at == at(1764108000) and message.lease_until is None
    run(runtime, [parse_twilio_status({"MessageSid": TWILIO_SID, "MessageStatus": "delivered"}, sms)])
    message = row(runtime, sms)
    assert (message.status, message.provider, message.provider_message_id) == ("delivered", "twilio", TWILIO_SID)


def test_pending_row_the_provider_already_has_is_not_sent_again(runtime: Runtime) -> None:
    # A send that timed out on our side went back to pending; the provider's events say it arrived.
    outbox_id = add_message(runtime, add_candidate(runtime), status="pending")
    run(runtime, [sendgrid("delivered", outbox_id, 1764108060, "d")])
    assert status(runtime, outbox_id) == "delivered"


def test_click_sets_last_click_at_to_the_latest(runtime: Runtime) -> None:
    candidate = add_candidate(runtime)
    outbox_id = add_message(runtime, candidate, provider="sendgrid", provider_message_id="XMSG")
    run(runtime, [sendgrid("click", outbox_id, 1764120000, "c2", url="https://book.example.com/x")])
    run(runtime, [sendgrid("click", outbox_id, 1764110000, "c1", url="https://book.example.com/x")])
    run(runtime, [sendgrid("open", outbox_id, 1764130000, "o1")])
    with Session(runtime.engine) as session:
        refreshed = session.get(Candidate, candidate.id)
        assert refreshed is not None and refreshed.last_click_at == at(1764120000)
    assert status(runtime, outbox_id) == "delivered"  # a click proves the mail arrived


def test_events_naming_no_known_message_are_kept_unlinked(runtime: Runtime) -> None:
    result = run(runtime, [sendgrid("delivered", "f" * 32, 1764108060, "d")])
    assert (result.stored, result.unmatched, result.updated) == (1, 1, 0)


def test_non_ascii_and_escaped_text_is_stored_as_received(runtime: Runtime) -> None:
    # On PostgreSQL a batch travels as one JSON document (json_to_recordset): text must survive the round trip.
    odd = 'Zoë "quoted" \\ back\tslash ☃ 😀'
    result = run(
        runtime,
        [sendgrid("bounce", "f" * 32, 1764108060, "é-1", email="Zoë@Exämple.org", type="bounce", reason=odd)],
    )
    assert (result.stored, result.suppressed) == (1, 1)
    with Session(runtime.engine) as session:
        stored = session.scalars(select(DeliveryEvent)).one()
        assert stored.provider_event_id == "é-1" and stored.raw["reason"] == odd
        assert stored.occurred_at == at(1764108060)
        assert session.scalars(select(Suppression.address)).one() == "zoë@exämple.org"


def test_a_large_batch_is_set_based(runtime: Runtime) -> None:
    candidate = add_candidate(runtime)
    ids = [f"{n:032x}" for n in range(1000)]
    with Session(runtime.engine) as session, session.begin():
        for n, outbox_id in enumerate(ids):
            session.add(
                OutboundMessage(
                    id=outbox_id,
                    candidate_id=candidate.id,
                    campaign="bulk",
                    step=n,
                    channel="email",
                    template="t",
                    category="nurture",
                    status="sent",
                    provider="sendgrid",
                    provider_message_id=f"X{n}",
                )
            )
    payload = []
    for n, outbox_id in enumerate(ids):
        for kind, offset in (("processed", 0), ("delivered", 5), ("open", 60), ("click", 90), ("open", 120)):
            payload.append(
                {
                    "event": kind,
                    "timestamp": 1764108000 + n + offset,
                    "sg_event_id": f"{kind}-{offset}-{n}",
                    "sg_message_id": f"X{n}.filter0001.1.2.0",
                    "email": "c-1@example.org",
                    "outreach_id": outbox_id,
                }
            )
    started = time.perf_counter()
    result = run(runtime, parse_sendgrid_batch(payload))
    elapsed = time.perf_counter() - started
    assert (result.stored, result.updated) == (5000, 1000)
    with Session(runtime.engine) as session:
        assert set(session.scalars(select(OutboundMessage.status))) == {"delivered"}
    assert elapsed < 20, f"5000 events took {elapsed:.1f}s"


def test_an_event_naming_a_row_of_the_other_channel_is_not_linked(runtime: Runtime) -> None:
    sms = add_message(runtime, add_candidate(runtime), channel="sms", status="sent")
    result = run(runtime, [sendgrid("bounce", sms, 1764108060, "b", type="bounce")])
    assert (result.unmatched, status(runtime, sms)) == (1, "sent")


def test_the_same_batch_arriving_in_parallel_is_applied_once(runtime: Runtime) -> None:
    seed_batch_world(runtime)
    barrier = threading.Barrier(4)
    results: list[IngestResult] = []
    errors: list[BaseException] = []

    def deliver_batch(seed: int) -> None:
        events = parse_sendgrid_batch(shuffled(seed))
        barrier.wait()
        try:
            results.append(run(runtime, events))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=deliver_batch, args=(seed,)) for seed in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert sum(r.stored for r in results) == 19 and sum(r.suppressed for r in results) == 5
    assert status(runtime, ANA) == "delivered" and status(runtime, BO) == "bounced"


# -- how a batch is stored: statements, locks, concurrency ---------------------------------------------


def add_messages(runtime: Runtime, first: int, count: int, candidates: list[Candidate]) -> list[str]:
    """``count`` sent email rows spread over ``candidates``, with ids and provider ids numbered from ``first``."""
    ids = [f"{n:032x}" for n in range(first, first + count)]
    with Session(runtime.engine) as session, session.begin():
        for n, outbox_id in enumerate(ids, start=first):
            session.add(
                OutboundMessage(
                    id=outbox_id,
                    candidate_id=candidates[n % len(candidates)].id,
                    campaign="bulk",
                    step=n,
                    channel="email",
                    template="t",
                    category="nurture",
                    status="sent",
                    provider="sendgrid",
                    provider_message_id=f"M{n}",
                )
            )
    return ids


def item(kind: str, outbox_id: str, seconds: int, event_id: str, **extra: Any) -> dict[str, Any]:
    return {
        "event": kind,
        "timestamp": seconds,
        "sg_event_id": event_id,
        "email": f"{outbox_id}@example.org",
        "outreach_id": outbox_id,
        **extra,
    }


def full_history(ids: list[str], tag: str) -> list[dict[str, Any]]:
    """processed, then delivered (a hard bounce for every tenth message), open and click for each message."""
    payload = []
    for n, outbox_id in enumerate(ids):
        payload.append(item("processed", outbox_id, 1764108000 + n, f"{tag}-p-{n}"))
        if n % 10 == 9:
            payload.append(item("bounce", outbox_id, 1764108060 + n, f"{tag}-b-{n}", type="bounce", status="5.1.1"))
        else:
            payload.append(item("delivered", outbox_id, 1764108060 + n, f"{tag}-d-{n}"))
            payload.append(item("open", outbox_id, 1764111600 + n, f"{tag}-o-{n}"))
            payload.append(item("click", outbox_id, 1764111660 + n, f"{tag}-c-{n}"))
    return payload


def statements_while(runtime: Runtime, events: list[NormalizedEvent]) -> tuple[IngestResult, list[str]]:
    seen: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        seen.append(" ".join(statement.split()[:3]))

    sa_event.listen(runtime.engine, "before_cursor_execute", record)
    try:
        result = run(runtime, events)
    finally:
        sa_event.remove(runtime.engine, "before_cursor_execute", record)
    return result, seen


def test_a_batch_costs_the_same_few_statements_whatever_its_size(runtime: Runtime) -> None:
    candidates = [add_candidate(runtime, f"c-{n}") for n in range(3)]
    small_ids = add_messages(runtime, 0, 20, candidates)
    large_ids = add_messages(runtime, 20, 400, candidates)
    small, small_statements = statements_while(runtime, parse_sendgrid_batch(full_history(small_ids, "s")))
    large, large_statements = statements_while(runtime, parse_sendgrid_batch(full_history(large_ids, "l")))
    assert (small.stored, small.updated) == (76, 20)
    assert (large.stored, large.updated) == (1520, 400)
    assert small.suppressed == 2 and large.suppressed == 40
    # Rows found, events inserted, rows locked and moved, suppressions, queued mail ended, clicks recorded.
    assert len(large_statements) <= 10, large_statements
    if runtime.engine.dialect.name == "postgresql":
        assert small_statements == large_statements
    else:  # SQLAlchemy sends an executemany with RETURNING as multi-row INSERTs of up to 1,000 rows
        assert len(large_statements) <= len(small_statements) + 1, (small_statements, large_statements)


def test_payload_values_orjson_cannot_write_are_stored_as_received(runtime: Runtime) -> None:
    # An integer beyond 64 bits is valid JSON that the fast encoder refuses: such a batch goes through the
    # standard library's encoder instead, and the value is stored exactly.
    outbox_id = add_message(runtime, add_candidate(runtime), provider="sendgrid", provider_message_id="XMSG")
    odd = {"useragent": "Zoë ☃", "attempt": 2**70, "negative": -(2**70)}
    result = run(runtime, parse_sendgrid_batch([item("open", outbox_id, 1764108060, "o-1", **odd)]))
    assert (result.stored, result.updated) == (1, 1)
    with Session(runtime.engine) as session:
        stored = session.scalars(select(DeliveryEvent)).one()
        assert {key: stored.raw[key] for key in odd} == odd
        assert isinstance(stored.raw["attempt"], int)
    assert status(runtime, outbox_id) == "delivered"


def test_overlapping_batches_in_parallel_are_all_applied_without_deadlocks(pg_runtime: Runtime) -> None:
    # Four batches at once, each with new events for every one of the same 40 messages (to 4 candidates): the
    # rows (and candidates) each one moves overlap with every other's, in every order.
    runtime = pg_runtime
    candidates = [add_candidate(runtime, f"c-{n}") for n in range(4)]
    ids = add_messages(runtime, 0, 40, candidates)
    kinds = [("processed", 0), ("delivered", 60), ("open", 3600), ("click", 3660)]
    batches = []
    for k, (kind, offset) in enumerate(kinds):
        payload = [item(kind, outbox_id, 1764108000 + n + offset, f"{kind}-{n}") for n, outbox_id in enumerate(ids)]
        payload += [
            item("bounce", outbox_id, 1764108100 + n, f"bounce-{n}", type="bounce")
            for n, outbox_id in enumerate(ids)
            if n % 10 == 3 and k == 2
        ]
        random.Random(k).shuffle(payload)
        batches.append(parse_sendgrid_batch(payload))
    barrier = threading.Barrier(len(batches))
    results: list[IngestResult] = []
    errors: list[BaseException] = []

    def post(events: list[NormalizedEvent]) -> None:
        barrier.wait()
        try:
            results.append(run(runtime, events))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=post, args=(batch,)) for batch in batches]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert sum(r.stored for r in results) == 4 * 40 + 4
    with Session(runtime.engine) as session:
        statuses = dict(session.execute(select(OutboundMessage.id, OutboundMessage.status)).all())
        clicks = {c.id: c.last_click_at for c in session.scalars(select(Candidate))}
    assert statuses == {outbox_id: "bounced" if n % 10 == 3 else "delivered" for n, outbox_id in enumerate(ids)}
    assert clicks == {c.id: at(1764108000 + 36 + c_index + 3660) for c_index, c in enumerate(candidates)}


def test_a_batch_naming_a_row_being_moved_stores_its_events_and_waits_only_for_the_move(
    pg_runtime: Runtime,
) -> None:
    runtime = pg_runtime
    outbox_id = add_message(runtime, add_candidate(runtime), provider="sendgrid", provider_message_id="XMSG")
    results: list[IngestResult] = []
    with Session(runtime.engine) as other, other.begin():
        # What another batch holds while it moves this row (the lock an UPDATE takes anyway).
        other.execute(
            select(OutboundMessage.id).where(OutboundMessage.id == outbox_id).with_for_update(key_share=True)
        ).all()
        holder = other.execute(text("SELECT txid_current()::text")).scalar_one()
        thread = threading.Thread(
            target=lambda: results.append(run(runtime, [sendgrid("delivered", outbox_id, 1764108060, "d")]))
        )
        thread.start()
        with runtime.engine.connect() as watcher:
            deadline = time.monotonic() + 10
            while not (
                waiting := watcher.execute(
                    text(
                        "SELECT l.pid FROM pg_locks l JOIN pg_stat_activity a USING (pid) "
                        "WHERE a.datname = current_database() AND l.locktype = 'transactionid' "
                        "AND NOT l.granted AND l.transactionid::text = :holder"
                    ),
                    {"holder": holder},
                )
                .scalars()
                .all()
            ):
                assert time.monotonic() < deadline, "the batch never waited for the row"
                time.sleep(0.02)
            # Its events are already in (the foreign-key check's FOR KEY SHARE does not conflict with the
            # move's lock): it waits only to move the row.
            inserted = watcher.execute(
                text(
                    "SELECT count(*) FROM pg_locks WHERE pid = :pid AND granted AND mode = 'RowExclusiveLock' "
                    "AND relation = 'delivery_events'::regclass"
                ),
                {"pid": waiting[0]},
            ).scalar_one()
        assert (len(waiting), inserted, results) == (1, 1, [])
    thread.join(timeout=10)
    assert results and (results[0].stored, results[0].updated) == (1, 1)
    assert status(runtime, outbox_id) == "delivered"
