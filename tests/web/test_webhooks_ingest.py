"""The SendGrid event webhook under load and failure: what a request leaves behind, and what it holds up."""

from __future__ import annotations

import http.client
import json
import threading
import time
from typing import Any
from urllib.parse import urlparse

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import event as sa_event
from sqlalchemy import select
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from outreach.core.models import DeliveryEvent, OutboundMessage
from outreach.service.runtime import Runtime
from outreach.web import create_app
from outreach.web.webhooks import WebhookSettings, shallow_events
from tests.helpers import Signer, add_candidate, wait_until_a_session_waits_for_a_lock
from tests.web.test_webhooks import EVENTS_PATH, LiveServer, add_message, batch_for, count, row


def fail_when(runtime: Runtime, prefix: str) -> Any:
    """A listener that breaks the connection when a statement starting with ``prefix`` is about to run."""

    def breaks(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if statement.lstrip().startswith(prefix):
            raise OperationalError(statement[:40], {}, ConnectionError("server closed the connection"))

    sa_event.listen(runtime.engine, "before_cursor_execute", breaks)
    return breaks


def test_a_batch_failing_half_way_stores_nothing_and_its_retry_stores_it_once(runtime: Runtime, signer: Signer) -> None:
    client = TestClient(create_app(runtime, WebhookSettings(sendgrid_public_key=signer.public_key)))
    outbox_id = add_message(runtime, add_candidate(runtime))
    body = batch_for(outbox_id)
    # The events are inserted, then the connection goes while the outbox row is being moved.
    breaks = fail_when(runtime, "UPDATE outbound_messages")
    try:
        answer = client.post(EVENTS_PATH, content=body, headers=signer.headers(body))
    finally:
        sa_event.remove(runtime.engine, "before_cursor_execute", breaks)
    assert answer.status_code == 503  # SendGrid keeps the batch and posts it again
    assert count(runtime, DeliveryEvent) == 0
    assert row(runtime, outbox_id).status == "sent"

    retry = client.post(EVENTS_PATH, content=body, headers=signer.headers(body))
    assert (retry.status_code, retry.json()["stored"], retry.json()["duplicates"]) == (200, 2, 0)
    assert (count(runtime, DeliveryEvent), row(runtime, outbox_id).status) == (2, "delivered")


def post(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict[str, Any]]:
    parsed = urlparse(url)
    connection = http.client.HTTPConnection(parsed.hostname or "127.0.0.1", parsed.port, timeout=30)
    try:
        connection.request("POST", EVENTS_PATH, body=body, headers=headers)
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def test_a_batch_waiting_for_a_row_does_not_hold_up_other_batches(pg_runtime: Runtime, signer: Signer) -> None:
    runtime = pg_runtime
    blocked_id = add_message(runtime, add_candidate(runtime, "c-1"))
    free_id = add_message(runtime, add_candidate(runtime, "c-2"))
    app = create_app(runtime, WebhookSettings(sendgrid_public_key=signer.public_key))
    answers: list[tuple[int, dict[str, Any]]] = []
    with LiveServer(app) as server, Session(runtime.engine) as other, other.begin():
        # Another transaction is moving the first batch's row: that batch must wait for it …
        other.execute(
            select(OutboundMessage.id).where(OutboundMessage.id == blocked_id).with_for_update(key_share=True)
        ).all()
        first = batch_for(blocked_id)
        waiting = threading.Thread(target=lambda: answers.append(post(server.url, first, signer.headers(first))))
        waiting.start()
        wait_until_a_session_waits_for_a_lock(runtime.engine)
        # … while a batch for other messages is verified, parsed, stored and answered meanwhile.
        second = batch_for(free_id, email="c-2@example.org").replace(b"cHJvY2Vzc2Vk", b"b3RoZXIgcHJvY2Vzc2Vk")
        second = second.replace(b"ZGVsaXZlcmVk", b"b3RoZXIgZGVsaXZlcmVk")
        began = time.monotonic()
        status, summary = post(server.url, second, signer.headers(second))
        assert (status, summary["stored"], summary["updated"]) == (200, 2, 1)
        assert time.monotonic() - began < 10
        assert answers == [] and waiting.is_alive()
        assert row(runtime, free_id).status == "delivered"
        other.commit()
        waiting.join(timeout=30)
    assert answers and answers[0][0] == 200 and answers[0][1]["stored"] == 2
    assert row(runtime, blocked_id).status == "delivered"


def test_a_lone_surrogate_in_a_genuine_batch_is_stored_as_a_replacement_character(
    pg_runtime: Runtime, signer: Signer
) -> None:
    """PostgreSQL cannot hold a lone surrogate; refusing the batch would only make SendGrid post it for days."""
    runtime = pg_runtime
    client = TestClient(create_app(runtime, WebhookSettings(sendgrid_public_key=signer.public_key)))
    outbox_id = add_message(runtime, add_candidate(runtime))
    events = json.loads(batch_for(outbox_id))
    events[1]["response"] = "250 OK \ud800 queued"
    events[1]["\udfff"] = "odd key"
    body = json.dumps(events).encode()  # ASCII escapes: \ud800, as SendGrid's JSON would carry it
    assert b"\\ud800" in body
    answer = client.post(EVENTS_PATH, content=body, headers=signer.headers(body))
    assert (answer.status_code, answer.json()["stored"]) == (200, 2), answer.text
    assert row(runtime, outbox_id).status == "delivered"
    with Session(runtime.engine) as session:
        stored = session.scalars(select(DeliveryEvent).where(DeliveryEvent.type == "delivered")).one()
    assert stored.raw["response"] == "250 OK \ufffd queued"
    assert stored.raw["\ufffd"] == "odd key"
    # A paired surrogate (an emoji written as two escapes) is one character and stays as it is.
    assert json.loads('"\\ud83d\\ude00"') == "\U0001f600"


def signed_post(client: TestClient, signer: Signer, body: bytes) -> Any:
    return client.post(EVENTS_PATH, content=body, headers=signer.headers(body))


def test_nul_anywhere_in_a_genuine_batch_is_stored_as_a_replacement_character(
    runtime: Runtime, client: TestClient, signer: Signer
) -> None:
    """PostgreSQL stores no NUL in text or JSON: a signed batch with one was a 500, which SendGrid retries."""
    outbox_id = add_message(runtime, add_candidate(runtime))
    events = json.loads(batch_for(outbox_id))
    events[0]["sg_event_id"] = "cHJv\x00"
    events[1].update({"response": "250 OK\x00", "a\x00b": "odd key", "useragent": ["x\x00"]})
    events.append({**events[1], "event": "open", "sg_event_id": "b3Blbg", "email": "c-1@example.org\x00"})
    body = json.dumps(events).encode()
    assert b"\\u0000" in body
    answer = signed_post(client, signer, body)
    assert (answer.status_code, answer.json()["stored"]) == (200, 3), answer.text
    assert row(runtime, outbox_id).status == "delivered"
    with Session(runtime.engine) as session:
        stored = {e.type: e for e in session.scalars(select(DeliveryEvent))}
    assert stored["delivered"].raw["response"] == "250 OK\ufffd"
    assert stored["delivered"].raw["a\ufffdb"] == "odd key"
    assert stored["sent"].provider_event_id == "cHJv\ufffd"


@pytest.mark.parametrize("depth", [100_000, 2_000])
def test_an_event_nested_too_deeply_is_left_out_and_the_rest_stored(
    runtime: Runtime, client: TestClient, signer: Signer, depth: int
) -> None:
    """Nesting the parser cannot follow was a 500 (RecursionError): SendGrid would post the batch again forever."""
    outbox_id = add_message(runtime, add_candidate(runtime))
    deep = "[" * depth + '"x"' + "]" * depth
    body = batch_for(outbox_id)[:-1] + b', {"event": "open", "timestamp": 1, "x": ' + deep.encode() + b"}]"
    answer = signed_post(client, signer, body)
    assert answer.status_code == 200, answer.text
    assert (answer.json()["stored"], answer.json()["dropped"]) == (2, 1)
    assert row(runtime, outbox_id).status == "delivered"


def test_a_batch_that_is_all_nesting_stores_nothing_and_is_not_a_server_error(
    runtime: Runtime, client: TestClient, signer: Signer
) -> None:
    for body, status in [
        (b"[" * 100_000 + b"]" * 100_000, 200),  # one element, nested away: nothing to store
        (b'{"a":' * 100_000 + b"1" + b"}" * 100_000, 400),  # not an array
        (b"[" * 100_000, 400),  # never closed
        (b"[" * 100_000 + b"]" * 100_000 + b"]", 400),  # something after the array
    ]:
        answer = signed_post(client, signer, body)
        assert answer.status_code == status, (body[:10], answer.text)
    assert count(runtime, DeliveryEvent) == 0


def test_shallow_events_splits_on_the_top_level_only() -> None:
    body = b' [ {"a": "x,]}[\\"", "b": [1, {"c": 2}]} , "s", 3, [[[[1]]]] ] '
    assert shallow_events(body, limit=3) == ([{"a": 'x,]}["', "b": [1, {"c": 2}]}, "s", 3], 1)
    assert shallow_events(b"[]") == ([], 0)
