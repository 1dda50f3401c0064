"""Provider webhooks: signed SendGrid batches and Twilio callbacks in, nothing stored for anything forged."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode

import pytest
import uvicorn
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session
from twilio.request_validator import RequestValidator

from outreach.core.clock import utcnow
from outreach.core.config import Secret
from outreach.core.errors import ConfigurationError
from outreach.core.models import Candidate, DeliveryEvent, InboundMessage, OutboundMessage, Suppression
from outreach.inbound import events
from outreach.inbound.events import IngestResult
from outreach.inbound.provider_events import NormalizedEvent
from outreach.ops.sandbox import SandboxServer
from outreach.pipeline.delivery import deliver
from outreach.service.runtime import Runtime
from outreach.web import create_app, webhooks
from outreach.web.webhooks import WebhookSettings, twiml
from tests.helpers import PUBLIC_URL, Signer, add_candidate, add_job, fire

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
EVENTS_PATH = "/webhooks/sendgrid/events"
TOKEN = "test-token"  # the auth token tests/conftest.py gives Twilio
SID = "SM1f0e8ae6ade43cb3c0ce4525424e404f"


def count(runtime: Runtime, model: type[Any]) -> int:
    with Session(runtime.engine) as session:
        return int(session.scalar(select(func.count()).select_from(model)) or 0)


def add_message(runtime: Runtime, candidate: Candidate, *, channel: str = "email", status: str = "sent") -> str:
    with Session(runtime.engine, expire_on_commit=False) as session, session.begin():
        message = OutboundMessage(
            candidate_id=candidate.id,
            campaign="jd_intro",
            step=1,
            channel=channel,
            template="jd_intro",
            category="transactional",
            status=status,
        )
        session.add(message)
    return message.id


def row(runtime: Runtime, outbox_id: str) -> OutboundMessage:
    with Session(runtime.engine) as session:
        message = session.get(OutboundMessage, outbox_id)
        assert message is not None
        return message


def batch_for(outbox_id: str, email: str = "c-1@example.org") -> bytes:
    now = int(utcnow().timestamp())
    events = [
        {
            "email": email,
            "timestamp": now - 5,
            "event": "processed",
            "category": "jd_intro",
            "sg_event_id": "cHJvY2Vzc2Vk",
            "sg_message_id": "XMSG.filter0001.16648.5515E0B88.0",
            "outreach_id": outbox_id,
        },
        {
            "email": email,
            "timestamp": now,
            "event": "delivered",
            "category": ["jd_intro", "jd_intro_en"],
            "sg_event_id": "ZGVsaXZlcmVk",
            "sg_message_id": "XMSG.filter0001.16648.5515E0B88.0",
            "response": "250 OK",
            "outreach_id": outbox_id,
        },
    ]
    return json.dumps(events).encode()


# -- SendGrid --------------------------------------------------------------------------------------------


def test_signed_batch_is_stored_and_applied(runtime: Runtime, client: TestClient, signer: Signer) -> None:
    outbox_id = add_message(runtime, add_candidate(runtime))
    body = batch_for(outbox_id)
    answer = client.post(EVENTS_PATH, content=body, headers=signer.headers(body))
    assert answer.status_code == 200, answer.text
    assert answer.json()["stored"] == 2
    assert row(runtime, outbox_id).status == "delivered"
    assert count(runtime, DeliveryEvent) == 2
    again = client.post(EVENTS_PATH, content=body, headers=signer.headers(body))
    assert (again.status_code, again.json()["duplicates"], count(runtime, DeliveryEvent)) == (200, 2, 2)


def test_documented_fixture_batch_passes(runtime: Runtime, client: TestClient, signer: Signer) -> None:
    body = (FIXTURES / "sendgrid" / "event_webhook_batch.json").read_bytes()
    answer = client.post(EVENTS_PATH, content=body, headers=signer.headers(body))
    assert answer.status_code == 200, answer.text
    assert answer.json()["stored"] == 19 and answer.json()["unmatched"] == 19
    assert count(runtime, Suppression) == 5


def test_a_hard_bounce_blocks_all_email_even_after_a_nurture_unsubscribe(
    runtime: Runtime, client: TestClient, signer: Signer
) -> None:
    candidate = add_candidate(runtime)
    with Session(runtime.engine) as session, session.begin():
        session.add(Suppression(channel="email", address="c-1@example.org", reason="unsubscribed", scope="nurture"))
    sent_id = add_message(runtime, candidate)
    queued_id = add_message(runtime, candidate, status="pending")  # transactional, not yet sent
    bounce = {
        "email": "c-1@example.org",
        "timestamp": int(utcnow().timestamp()),
        "event": "bounce",
        "type": "bounce",
        "reason": "550 5.1.1 no such user",
        "status": "5.1.1",
        "sg_event_id": "Ym91bmNl",
        "sg_message_id": "XMSG.filter0001.16648.5515E0B88.0",
        "outreach_id": sent_id,
    }
    body = json.dumps([bounce]).encode()
    assert client.post(EVENTS_PATH, content=body, headers=signer.headers(body)).status_code == 200
    with Session(runtime.engine) as session:
        [suppression] = session.scalars(select(Suppression)).all()
        assert (suppression.scope, suppression.reason, suppression.source) == ("provider", "bounced", "sendgrid")
    queued = row(runtime, queued_id)
    assert (queued.status, queued.rule, queued.reason) == ("suppressed", "suppression", "address suppressed: bounced")


def forged_requests(signer: Signer, body: bytes) -> Iterator[tuple[str, bytes, dict[str, str]]]:
    good = signer.headers(body)
    tampered = bytearray(body)
    tampered[body.index(b"delivered")] ^= 0x01
    yield "one changed byte", bytes(tampered), good
    yield "wrong key", body, Signer().headers(body)
    yield "no headers", body, {"Content-Type": "application/json"}
    yield "no signature", body, {k: v for k, v in good.items() if not k.endswith("Signature")}
    yield "no timestamp", body, {k: v for k, v in good.items() if not k.endswith("Timestamp")}
    yield "stale", body, signer.headers(body, int(utcnow().timestamp()) - 301)
    # Ahead by more than five minutes when the service checks it, however long the request takes to get there (a
    # whole second late, +301 would be exactly 300 ahead, and accepted).
    yield "from the future", body, signer.headers(body, int(utcnow().timestamp()) + 330)
    earlier = str(int(good["X-Twilio-Email-Event-Webhook-Timestamp"]) - 1)
    yield "timestamp swapped", body, {**good, "X-Twilio-Email-Event-Webhook-Timestamp": earlier}
    yield "garbage signature", body, {**good, "X-Twilio-Email-Event-Webhook-Signature": "bm90IGEgc2lnbmF0dXJl"}
    yield "not base64", body, {**good, "X-Twilio-Email-Event-Webhook-Signature": "%%%"}


def test_forged_unsigned_or_stale_batches_store_nothing(runtime: Runtime, client: TestClient, signer: Signer) -> None:
    outbox_id = add_message(runtime, add_candidate(runtime))
    body = batch_for(outbox_id)
    for case, content, headers in forged_requests(signer, body):
        answer = client.post(EVENTS_PATH, content=content, headers=headers)
        assert answer.status_code == 403, case
        assert "delivered" not in answer.text and "c-1@example.org" not in answer.text
    assert count(runtime, DeliveryEvent) == 0
    assert row(runtime, outbox_id).status == "sent"


def test_malformed_signed_bodies_are_400(runtime: Runtime, client: TestClient, signer: Signer) -> None:
    for body in (b"[{not json", b'{"event": "delivered"}', b'[{"event": "delivered"}]', b'["x"]', b""):
        answer = client.post(EVENTS_PATH, content=body, headers=signer.headers(body))
        assert answer.status_code == 400, body
    # Unsigned garbage is refused before it is parsed.
    assert client.post(EVENTS_PATH, content=b"[{not json").status_code == 403
    assert count(runtime, DeliveryEvent) == 0


def test_oversized_body_is_413(runtime: Runtime, signer: Signer) -> None:
    small = WebhookSettings(sendgrid_public_key=signer.public_key, max_body_bytes=1024)
    client = TestClient(create_app(runtime, small))
    body = json.dumps([{"event": "open", "timestamp": 1, "sg_event_id": str(n)} for n in range(100)]).encode()
    assert client.post(EVENTS_PATH, content=body, headers=signer.headers(body)).status_code == 413

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit holds while reading
        yield body[:1000]
        yield body[1000:]

    assert client.post(EVENTS_PATH, content=chunks(), headers=signer.headers(body)).status_code == 413
    assert count(runtime, DeliveryEvent) == 0


def test_without_a_public_key_the_hook_is_unavailable(runtime: Runtime, signer: Signer) -> None:
    client = TestClient(create_app(runtime, WebhookSettings()))
    body = b"[]"
    answer = client.post(EVENTS_PATH, content=body, headers=signer.headers(body))
    assert answer.status_code == 503


def test_database_failure_is_503_and_writes_nothing(
    runtime: Runtime, client: TestClient, signer: Signer, monkeypatch: pytest.MonkeyPatch
) -> None:
    outbox_id = add_message(runtime, add_candidate(runtime))
    real_ingest = events.ingest

    def ingest_then_fail(session: Session, events: list[NormalizedEvent]) -> IngestResult:
        real_ingest(session, events)  # everything written … then the connection goes
        raise OperationalError("COMMIT", {}, ConnectionError("server closed the connection"))

    monkeypatch.setattr(webhooks, "ingest", ingest_then_fail)
    body = batch_for(outbox_id)
    answer = client.post(EVENTS_PATH, content=body, headers=signer.headers(body))
    assert answer.status_code == 503
    assert count(runtime, DeliveryEvent) == 0
    assert row(runtime, outbox_id).status == "sent"


def test_settings_from_the_environment(signer: Signer) -> None:
    hooks = WebhookSettings.from_env(
        {"OUTREACH_SENDGRID_WEBHOOK_PUBLIC_KEY": f" {signer.public_key}\n", "OUTREACH_INBOUND_TOKEN": "s3cret"}
    )
    assert hooks.sendgrid_verifier is not None
    assert hooks.inbound_token_matches("s3cret") and not hooks.inbound_token_matches("s3cre")
    assert "s3cret" not in repr(hooks)
    assert not WebhookSettings.from_env({}).inbound_token_matches("")
    with pytest.raises(ConfigurationError):
        WebhookSettings.from_env({"OUTREACH_SENDGRID_WEBHOOK_PUBLIC_KEY": "bm90IGEga2V5"})


# -- Twilio ----------------------------------------------------------------------------------------------


def fixture_form(name: str) -> dict[str, str]:
    return dict(parse_qsl((FIXTURES / "twilio" / name).read_text(), keep_blank_values=True))


def twilio_post(
    client: TestClient, path: str, params: dict[str, str], *, sign_url: str | None = None, token: str = TOKEN
) -> Any:
    url = sign_url if sign_url is not None else PUBLIC_URL + path
    signature = RequestValidator(token).compute_signature(url, params)
    return client.post(
        path,
        content=urlencode(params).encode(),
        headers={"Content-Type": "application/x-www-form-urlencoded", "X-Twilio-Signature": signature},
    )


def test_signed_status_callback_for_the_public_url_is_applied(runtime: Runtime, client: TestClient) -> None:
    # The test client calls http://testserver, as a proxy would forward; Twilio signed the public URL.
    outbox_id = add_message(runtime, add_candidate(runtime), channel="sms")
    path = f"/webhooks/twilio/status?outreach_id={outbox_id}"
    answer = twilio_post(client, path, fixture_form("status_callback_delivered.form"))
    assert answer.status_code == 200, answer.text
    message = row(runtime, outbox_id)
    assert (message.status, message.provider_message_id) == ("delivered", SID)
    assert twilio_post(client, path, fixture_form("status_callback_sent.form")).status_code == 200
    assert row(runtime, outbox_id).status == "delivered"
    assert count(runtime, DeliveryEvent) == 2


def test_unknown_extra_params_still_pass(runtime: Runtime, client: TestClient) -> None:
    outbox_id = add_message(runtime, add_candidate(runtime), channel="sms")
    params = {**fixture_form("status_callback_sent.form"), "SomethingTwilioAddsLater": "1", "Empty": ""}
    answer = twilio_post(client, f"/webhooks/twilio/status?outreach_id={outbox_id}", params)
    assert answer.status_code == 200, answer.text
    assert row(runtime, outbox_id).status == "sent"


def test_bad_twilio_signatures_store_nothing(runtime: Runtime, client: TestClient) -> None:
    outbox_id = add_message(runtime, add_candidate(runtime), channel="sms")
    path = f"/webhooks/twilio/status?outreach_id={outbox_id}"
    params = fixture_form("status_callback_delivered.form")
    signature = RequestValidator(TOKEN).compute_signature(PUBLIC_URL + path, params)
    headers = {"Content-Type": "application/x-www-form-urlencoded", "X-Twilio-Signature": signature}
    tampered = urlencode({**params, "MessageStatus": "failed"}).encode()
    assert client.post(path, content=tampered, headers=headers).status_code == 403
    other_row = path.replace(outbox_id, "f" * 32)
    assert client.post(other_row, content=urlencode(params).encode(), headers=headers).status_code == 403
    # Signed for the address the request arrived at, not the public one.
    assert twilio_post(client, path, params, sign_url="http://testserver" + path).status_code == 403
    assert twilio_post(client, path, params, token="another-token").status_code == 403
    unsigned = {"Content-Type": "application/x-www-form-urlencoded"}
    assert client.post(path, content=urlencode(params).encode(), headers=unsigned).status_code == 403
    assert count(runtime, DeliveryEvent) == 0
    assert row(runtime, outbox_id).status == "sent"


def test_signed_but_incomplete_or_inbound_statuses(runtime: Runtime, client: TestClient) -> None:
    path = "/webhooks/twilio/status?outreach_id=x"
    assert twilio_post(client, path, {"MessageStatus": "sent"}).status_code == 400
    ignored = twilio_post(client, path, {"MessageSid": SID, "MessageStatus": "received"})
    assert (ignored.status_code, ignored.json()) == (200, {"ignored": 1})
    assert count(runtime, DeliveryEvent) == 0


def test_inbound_reply_answers_empty_twiml(runtime: Runtime, client: TestClient) -> None:
    add_candidate(runtime)  # phone +8613800138000, the fixture's sender
    answer = twilio_post(client, "/webhooks/twilio/inbound", fixture_form("inbound_sms.form"))
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"].startswith("text/xml")
    assert answer.text.endswith("<Response/>")
    with Session(runtime.engine) as session:
        stored = session.scalars(select(InboundMessage)).one()
        assert (stored.kind, stored.provider_message_id) == ("reply", "SM9b2e4c6a8d0f1e3a5c7b9d1f3a5c7e9b")


def test_inbound_stop_is_confirmed_in_twiml(runtime: Runtime, client: TestClient) -> None:
    add_candidate(runtime)
    params = {**fixture_form("inbound_sms.form"), "Body": "STOP"}
    answer = twilio_post(client, "/webhooks/twilio/inbound", params)
    assert answer.status_code == 200, answer.text
    assert "<Response><Message>" in answer.text and answer.text.endswith("</Message></Response>")
    with Session(runtime.engine) as session:
        assert session.scalars(select(Suppression.address)).all() == ["+8613800138000"]


def test_inbound_forged_is_refused(runtime: Runtime, client: TestClient) -> None:
    answer = twilio_post(client, "/webhooks/twilio/inbound", fixture_form("inbound_sms.form"), token="nope")
    assert answer.status_code == 403
    assert count(runtime, InboundMessage) == 0


def test_twiml_escapes_the_reply() -> None:
    assert twiml(None) == '<?xml version="1.0" encoding="UTF-8"?><Response/>'
    assert twiml("Reply <STOP> & go") == (
        '<?xml version="1.0" encoding="UTF-8"?><Response><Message>Reply &lt;STOP&gt; &amp; go</Message></Response>'
    )


# -- end to end: real SDKs → sandbox → signed webhooks → a live server ------------------------------------


class LiveServer:
    def __init__(self, app: FastAPI) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline, "the app server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *_: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=5)
        self.sock.close()


def wait_for_status(runtime: Runtime, outbox_ids: list[str], wanted: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        statuses = [row(runtime, outbox_id).status for outbox_id in outbox_ids]
        if all(status == wanted for status in statuses):
            return
        assert time.monotonic() < deadline, f"statuses {statuses}, expected {wanted}"
        time.sleep(0.05)


def test_sends_through_the_sandbox_end_delivered(runtime: Runtime) -> None:
    # The app first: its URL is the public URL the status callbacks and the event webhook are posted to.
    sandbox = SandboxServer("127.0.0.1", 0, twilio_auth_token=TOKEN)
    hooks = WebhookSettings(sendgrid_public_key=sandbox.sendgrid_public_key)
    app = create_app(runtime, hooks)
    with LiveServer(app) as server:
        runtime.settings = runtime.settings.with_overrides(public_url=server.url)
        sandbox.sendgrid_event_url = server.url + EVENTS_PATH
        with sandbox:
            runtime.sandbox_url = sandbox.url
            add_candidate(runtime)
            add_job(runtime)
            start = datetime.now(UTC) - timedelta(hours=1)
            fire(runtime, "c-1", "applied", at=start, job="j-1")
            runtime.scheduler.tick(datetime.now(UTC))
            with Session(runtime.engine) as session:
                outbox = list(session.scalars(select(OutboundMessage.id).order_by(OutboundMessage.step)))
            assert len(outbox) == 2
            for outbox_id in outbox:
                assert deliver(runtime, outbox_id).status == "sent"
            wait_for_status(runtime, outbox, "delivered")
    by_channel = {row(runtime, outbox_id).channel: row(runtime, outbox_id) for outbox_id in outbox}
    assert by_channel["email"].delivered_at is not None and by_channel["sms"].delivered_at is not None
    with Session(runtime.engine) as session:
        types = sorted(session.scalars(select(DeliveryEvent.type)))
    assert types == ["delivered", "delivered", "sent", "sent"]


def test_secret_settings_do_not_print() -> None:
    hooks = WebhookSettings(inbound_token=Secret("abc"), twilio_auth_token=Secret("def"))
    assert "abc" not in repr(hooks) and "def" not in repr(hooks)
