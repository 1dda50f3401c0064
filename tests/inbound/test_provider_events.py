"""Provider payloads in one vocabulary: SendGrid batches and Twilio status callbacks turned into events."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import pytest

from outreach.inbound.provider_events import EventType, UnsupportedEventError, parse_sendgrid_batch, parse_twilio_status

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
BATCH: list[dict[str, Any]] = json.loads((FIXTURES / "sendgrid" / "event_webhook_batch.json").read_text())
TWILIO_SID = "SM1f0e8ae6ade43cb3c0ce4525424e404f"

ANA, BO, CHEN, DANA, ELI, FAY, GUS, HUA = (
    "a0000000000000000000000000000001",
    "b0000000000000000000000000000002",
    "c0000000000000000000000000000003",
    "d0000000000000000000000000000004",
    "e0000000000000000000000000000005",
    "f0000000000000000000000000000006",
    "70000000000000000000000000000007",
    "80000000000000000000000000000008",
)


def at(seconds: int) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


def twilio_form(name: str) -> dict[str, str]:
    return dict(parse_qsl((FIXTURES / "twilio" / name).read_text(), keep_blank_values=True))


# -- the mapping tables --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "extra", "expected"),
    [
        ("processed", {}, EventType.SENT),
        ("deferred", {}, EventType.DEFERRED),
        ("delivered", {}, EventType.DELIVERED),
        ("bounce", {"type": "bounce"}, EventType.BOUNCED),
        ("bounce", {"type": "blocked"}, EventType.FAILED),
        ("bounce", {}, EventType.BOUNCED),
        ("dropped", {"reason": "Invalid"}, EventType.DROPPED),
        ("open", {}, EventType.OPENED),
        ("click", {}, EventType.CLICKED),
        ("unsubscribe", {}, EventType.UNSUBSCRIBED),
        ("group_unsubscribe", {"asm_group_id": 1}, EventType.UNSUBSCRIBED),
        ("spamreport", {}, EventType.COMPLAINED),
    ],
)
def test_sendgrid_event_mapping(name: str, extra: dict[str, Any], expected: EventType) -> None:
    [event] = parse_sendgrid_batch([{"event": name, "timestamp": 1764108000, "sg_event_id": "x", **extra}])
    assert event.type is expected
    assert event.provider == "sendgrid" and event.channel == "email"


@pytest.mark.parametrize(
    ("twilio_status", "expected"),
    [
        ("accepted", EventType.QUEUED),
        ("scheduled", EventType.QUEUED),
        ("queued", EventType.QUEUED),
        ("sending", EventType.SENT),
        ("sent", EventType.SENT),
        ("delivered", EventType.DELIVERED),
        ("read", EventType.DELIVERED),
        ("undelivered", EventType.UNDELIVERED),
        ("failed", EventType.FAILED),
        ("canceled", EventType.FAILED),
    ],
)
def test_twilio_status_mapping(twilio_status: str, expected: EventType) -> None:
    event = parse_twilio_status({"MessageSid": TWILIO_SID, "MessageStatus": twilio_status}, "abc")
    assert event.type is expected
    assert event.provider_event_id == f"{TWILIO_SID}:{twilio_status}"
    assert (event.outbox_id, event.provider_message_id, event.channel) == ("abc", TWILIO_SID, "sms")


def test_twilio_inbound_and_unknown_statuses_are_not_delivery_events() -> None:
    for value in ("received", "receiving", "something-new"):
        with pytest.raises(UnsupportedEventError):
            parse_twilio_status({"MessageSid": TWILIO_SID, "MessageStatus": value}, None)
    with pytest.raises(ValueError):
        parse_twilio_status({"MessageStatus": "sent"}, None)


def test_twilio_fixture_callbacks_parse() -> None:
    delivered = parse_twilio_status(twilio_form("status_callback_delivered.form"), "x")
    undelivered = parse_twilio_status(twilio_form("status_callback_undelivered.form"), "x")
    assert delivered.type is EventType.DELIVERED and delivered.error_code is None
    assert (undelivered.type, undelivered.error_code) == (EventType.UNDELIVERED, "30003")
    assert undelivered.recipient == "+14155550100" and undelivered.suppress_reason is None
    stop = parse_twilio_status({"MessageSid": TWILIO_SID, "MessageStatus": "failed", "ErrorCode": "21610"}, None)
    assert stop.suppress_reason == "unsubscribed"


# -- parsing SendGrid batches ----------------------------------------------------------------------------


def test_sendgrid_batch_parses_the_documented_shapes() -> None:
    events = parse_sendgrid_batch(BATCH)
    assert len(events) == len(BATCH) - 1  # group_resubscribe is not ours to act on
    by_id = {e.provider_event_id: e for e in events}
    processed = by_id["cHJvY2Vzc2VkLWFuYS0wMDAx"]
    assert processed.type is EventType.SENT
    assert processed.outbox_id == ANA
    assert processed.provider_message_id == "AnaXMsgId0000000000001"
    assert processed.occurred_at == at(1764108000) and processed.occurred_at.tzinfo is UTC
    assert processed.categories == ("jd_intro", "jd_intro_en")
    assert by_id["cHJvY2Vzc2VkLWJvLTAwMDI="].categories == ("jd_intro",)
    bounce = by_id["Ym91bmNlLWJvLTAwMDI="]
    assert (bounce.type, bounce.error_code, bounce.suppress_reason) == (EventType.BOUNCED, "5.1.1", "bounced")
    assert bounce.detail is not None and "bo@example.org" not in bounce.detail
    blocked = by_id["YmxvY2tlZC1jaGVuLTAwMDM="]
    assert (blocked.type, blocked.suppress_reason) == (EventType.FAILED, None)
    [dropped] = [e for e in events if e.type is EventType.DROPPED]
    assert dropped.provider_event_id.startswith("sha256:")
    assert (dropped.provider_message_id, dropped.outbox_id, dropped.suppress_reason) == (None, GUS, "bounced")
    assert dropped.raw == next(item for item in BATCH if item["event"] == "dropped")


def test_synthetic_ids_are_stable_and_distinct() -> None:
    drop = {"email": "x@example.org", "timestamp": 1764108000, "event": "dropped", "reason": "Invalid"}
    first = parse_sendgrid_batch([drop])[0].provider_event_id
    assert parse_sendgrid_batch([dict(reversed(list(drop.items())))])[0].provider_event_id == first
    assert parse_sendgrid_batch([{**drop, "timestamp": 1764108001}])[0].provider_event_id != first


@pytest.mark.parametrize(
    "payload",
    [
        ["not an object"],
        [{"timestamp": 1764108000}],
        [{"event": "delivered"}],
        [{"event": "delivered", "timestamp": "yesterday"}],
        [{"event": "delivered", "timestamp": True}],
    ],
)
def test_malformed_sendgrid_entries_raise(payload: list[Any]) -> None:
    with pytest.raises(ValueError):
        parse_sendgrid_batch(payload)


def test_dropped_reasons_decide_the_suppression() -> None:
    def reason(text: str) -> str | None:
        item = {"event": "dropped", "timestamp": 1764108000, "email": "x@example.org", "reason": text}
        return parse_sendgrid_batch([item])[0].suppress_reason

    assert reason("Bounced Address") == "bounced"
    assert reason("Unsubscribed Address") == "unsubscribed"
    assert reason("Spam Reporting Address") == "complained"
    assert reason("Invalid") is None
    assert reason("Invalid SMTPAPI header") is None
