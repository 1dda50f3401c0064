"""Issue 7, item 3: PostgreSQL unreachable for 30 seconds in the middle of a run.

The workers, the scheduler and the webhook app reach PostgreSQL through a TCP proxy the test controls
(:mod:`tests.faults.proxy`); the test itself reads the database directly. While the path is cut:

- no provider call is made without a durable hand-off: every message the sandbox accepts during the cut belongs
  to a row already committed as ``sending`` and handed off (not merely claimed in a group) before it;
- the webhooks answer 5xx (SendGrid and Twilio then retry; the sandbox does, like them), and store nothing.

After the path is back nothing is lost and nothing is sent twice; sends whose result could not be recorded
during the cut are reconciled from the providers' retried events.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable, Iterator
from urllib.parse import urlencode

import httpx
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy import func, or_, select
from sqlalchemy.engine import make_url
from twilio.request_validator import RequestValidator

from outreach.core.models import CLAIMED_RULE, DeliveryEvent, MessageStatus, OutboundMessage
from tests.faults.conftest import (
    MIXED_CAMPAIGN,
    TERMINAL_OK,
    TWILIO_TOKEN,
    Stack,
    count,
    outbox_id_of,
    scheduler_argv,
    seed_enrollments,
    settled,
    size,
    wait_until,
    worker_argv,
)
from tests.faults.proxy import TcpProxy

pytestmark = pytest.mark.timeout(240)

OUTAGE_SECONDS = 30.0


@pytest.fixture
def proxy(pg_database_url: str) -> Iterator[TcpProxy]:
    url = make_url(pg_database_url)
    proxy = TcpProxy(url.host or "127.0.0.1", url.port or 5432).start()
    yield proxy
    proxy.cut()


def sendgrid_batch(stack: Stack, outbox_id: str) -> tuple[bytes, dict[str, str]]:
    """A signed SendGrid event batch naming ``outbox_id``, as the sandbox would post it."""
    now = str(int(time.time()))
    body = json.dumps(
        [
            {
                "event": "delivered",
                "email": "probe@example.org",
                "timestamp": int(now),
                "sg_event_id": f"probe-{outbox_id}",
                "sg_message_id": "probe.filter0001",
                "outreach_id": outbox_id,
            }
        ]
    ).encode()
    signature = stack.sandbox._signing_key.sign(now.encode() + body, ec.ECDSA(hashes.SHA256()))
    return body, {
        "Content-Type": "application/json",
        "X-Twilio-Email-Event-Webhook-Signature": base64.b64encode(signature).decode(),
        "X-Twilio-Email-Event-Webhook-Timestamp": now,
    }


def twilio_callback(stack: Stack, outbox_id: str) -> tuple[str, bytes, dict[str, str]]:
    assert stack.app is not None
    url = f"{stack.settings.public_url}/webhooks/twilio/status?outreach_id={outbox_id}"
    params = {"MessageSid": "SMprobe" + outbox_id[:20], "MessageStatus": "delivered", "To": "+8613000000000"}
    signature = RequestValidator(TWILIO_TOKEN).compute_signature(url, params)
    return (
        f"{stack.app.url}/webhooks/twilio/status?outreach_id={outbox_id}",
        urlencode(params).encode(),
        {"Content-Type": "application/x-www-form-urlencoded", "X-Twilio-Signature": str(signature)},
    )


def post_webhooks(stack: Stack, email_id: str, sms_id: str) -> list[int]:
    assert stack.app is not None
    body, headers = sendgrid_batch(stack, email_id)
    url, form, form_headers = twilio_callback(stack, sms_id)
    with httpx.Client(timeout=30) as client:
        return [
            client.post(f"{stack.app.url}/webhooks/sendgrid/events", content=body, headers=headers).status_code,
            client.post(url, content=form, headers=form_headers).status_code,
        ]


def test_postgres_unreachable_for_30_seconds(
    make_stack: Callable[..., Stack], proxy: TcpProxy, pg_database_url: str
) -> None:
    messages = size("outage_messages", 240)
    proxied = make_url(pg_database_url).set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
    stack = make_stack(campaign=MIXED_CAMPAIGN, database_url=proxied, lease_seconds=5.0, provider_timeout=5.0)
    seed_enrollments(stack.runtime, messages // 2)
    stack.spawn("scheduler", scheduler_argv())
    wait_until(lambda: stack.outbox_rows() >= messages, 90, "the scheduler to write the outbox", check=stack.check)
    stack.spawn("workers", worker_argv(stack.settings.queue_name, processes=1, threads=4))
    # Polled finely: on a quiet machine the workers send hundreds a second, and a coarse poll could find every
    # email already sent, leaving no SendGrid call for the slow fault below.
    wait_until(
        lambda: len(stack.sandbox.messages()) >= messages // 4,
        90,
        "a quarter of the sends",
        check=stack.check,
        interval=0.005,
    )

    # One provider call certainly in flight at the cut: the sandbox holds it 3 s, then accepts it.
    stack.sandbox.fail("sendgrid", "slow", delay=3.0)
    wait_until(
        lambda: stack.sandbox.stats()["sendgrid"]["faults_served"].get("slow", 0) > 0,
        30,
        "the slow call",
        interval=0.02,
    )
    proxy.cut()
    cut_at = time.monotonic()
    accepted_before = len(stack.sandbox.messages())
    # A COMMIT the proxy forwarded just before the cut may still be applied by the server: let it land before
    # reading what the database held at the cut.
    time.sleep(0.5)
    # What was durably handed to a provider when the path went down (the test reads the database directly): rows
    # past pending/held, except those a worker claimed in a group but had not handed off yet.
    with stack.engine.connect() as connection:
        claimed = set(
            connection.execute(
                select(OutboundMessage.id).where(
                    OutboundMessage.status.not_in([MessageStatus.PENDING.value, MessageStatus.HELD.value]),
                    or_(
                        OutboundMessage.status != MessageStatus.SENDING.value,
                        OutboundMessage.rule.is_(None),
                        OutboundMessage.rule != CLAIMED_RULE,
                    ),
                )
            ).scalars()
        )
        events_before = connection.execute(select(func.count()).select_from(DeliveryEvent)).scalar_one()
        email_id, sms_id = (
            connection.execute(
                select(func.min(OutboundMessage.id)).where(OutboundMessage.channel == channel)
            ).scalar_one()
            for channel in ("email", "sms")
        )
    answers: list[int] = []
    while time.monotonic() - cut_at < OUTAGE_SECONDS:
        answers += post_webhooks(stack, email_id, sms_id)
        stack.check()
        time.sleep(3.0)
    during = [outbox_id_of(record) for record in stack.sandbox.messages()[accepted_before:]]
    with stack.engine.connect() as connection:
        events_during = connection.execute(select(func.count()).select_from(DeliveryEvent)).scalar_one()
    proxy.restore()
    outage = time.monotonic() - cut_at

    wait_until(settled(stack), 150, "every message to be sent after the outage", check=stack.check)
    time.sleep(1.0)
    # The probes after the outage report deliveries that are stored: they name messages the provider really
    # accepted (a row cut before its send, left uncertain, must not be marked delivered by a probe).
    accepted = stack.sandbox.messages()
    after = post_webhooks(
        stack,
        next(str(outbox_id_of(r)) for r in accepted if r.channel == "email"),
        next(str(outbox_id_of(r)) for r in accepted if r.channel == "sms"),
    )
    counts = count(
        stack,
        outage_seconds=round(outage, 1),
        accepted_during_outage=len(during),
        webhook_answers_during=sorted(set(answers)),
        webhook_answers_after=after,
    )
    counts.show("postgres unreachable 30 s")

    without_durable_row = [i for i in during if i not in claimed]
    assert during, "no provider call was in flight during the cut"
    assert without_durable_row == [], "a provider call was made for a row that was not durably 'sending'"
    assert answers and all(code >= 500 for code in answers), f"webhooks answered {sorted(set(answers))} during the cut"
    assert events_during == events_before, "a webhook stored something while the database was unreachable"
    assert after == [200, 200] or all(code < 300 for code in after), after
    assert counts.expected == messages
    assert counts.duplicated == 0
    assert counts.lost == 0
    assert counts.failed == 0
    assert counts.unreconciled == 0
    # The calls in flight at the cut could not record their results while the database was away; the provider's
    # events bring each to sent/delivered (through ``uncertain`` when the sweeper marks it first). A call that died
    # before reaching the provider also ends uncertain (alerted, never resent), which ``unreconciled`` allows.
    with stack.engine.connect() as connection:
        in_flight = dict(
            connection.execute(
                select(OutboundMessage.id, OutboundMessage.status).where(OutboundMessage.id.in_(during))
            ).all()
        )
    assert all(in_flight.get(i) in TERMINAL_OK for i in during), f"in flight at the cut: {in_flight}"
