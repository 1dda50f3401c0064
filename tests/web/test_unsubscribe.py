"""Unsubscribe links: a one-click POST withdraws nurture only, "stop everything" is a separate explicit choice, and
a forged, edited, truncated, old or expired token changes nothing."""

from __future__ import annotations

import base64
import random
import re
from datetime import timedelta

from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session

from outreach.core.clock import TravelClock, set_clock, utcnow
from outreach.core.models import Candidate, MessageStatus, OutboundMessage, Suppression
from outreach.domain.tokens import UNSUBSCRIBE_VALIDITY, sign, unsubscribe_message_id, unsubscribe_url, verify
from outreach.ops.sandbox import SandboxServer
from outreach.pipeline.delivery import deliver
from outreach.service.runtime import Runtime
from outreach.web import create_app
from tests.domain.test_seed_campaigns import OFFER_DATA
from tests.helpers import add_candidate, fire
from tests.policy.test_engine import queue_rows

ONE_CLICK = b"List-Unsubscribe=One-Click"


def suppressions(runtime: Runtime) -> list[tuple[str, str, str]]:
    with Session(runtime.engine) as session:
        return [(s.channel, s.address, s.scope) for s in session.scalars(select(Suppression).order_by(Suppression.id))]


def consent(runtime: Runtime, candidate_id: int) -> bool:
    with Session(runtime.engine) as session:
        return bool(session.scalar(select(Candidate.nurture_consent).where(Candidate.id == candidate_id)))


def row(runtime: Runtime, outbox_id: str) -> OutboundMessage:
    with Session(runtime.engine) as session:
        found = session.get(OutboundMessage, outbox_id)
        assert found is not None
        return found


def path_of(runtime: Runtime, outbox_id: str) -> str:
    return unsubscribe_url(runtime.settings, outbox_id, utcnow()).removeprefix(runtime.settings.public_url)


def nurture_mail_link(runtime: Runtime, sandbox: SandboxServer, candidate_id: int) -> tuple[str, str]:
    """Send the candidate a nurture email; its outbox id and the unsubscribe path its List-Unsubscribe names."""
    (outbox_id,) = queue_rows(runtime, candidate_id, 1)
    assert deliver(runtime, outbox_id).status == "sent"
    (mail,) = [m for m in sandbox.messages() if m.custom_args.get("outreach_id") == outbox_id]
    assert mail.headers["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    link = re.fullmatch(r"<(.+)>", mail.headers["List-Unsubscribe"])
    assert link is not None and link.group(1) in mail.text
    return outbox_id, link.group(1).removeprefix(runtime.settings.public_url)


def accept_offer(runtime: Runtime, sandbox: SandboxServer) -> OutboundMessage:
    """``offer_accepted`` for c-1, the scheduler run and what it queued delivered; the offer letter's row."""
    queued: list[str] = runtime.queued  # type: ignore[attr-defined]
    queued.clear()
    fire(runtime, "c-1", "offer_accepted", at=utcnow(), data=OFFER_DATA)
    runtime.scheduler.tick(utcnow())
    for outbox_id in queued:
        deliver(runtime, outbox_id)
    with Session(runtime.engine) as session:
        return session.scalars(select(OutboundMessage).where(OutboundMessage.campaign == "offer_letter")).one()


def test_get_asks_and_the_one_click_post_withdraws_nurture_only(runtime: Runtime, sandbox: SandboxServer) -> None:
    candidate = add_candidate(runtime, nurture_consent=True)
    outbox_id, path = nurture_mail_link(runtime, sandbox, candidate.id)
    body = path.rsplit("/", 1)[1].split(".")[0]
    # The token names the message's random id and when it was issued: no candidate id, no address.
    assert re.fullmatch(rf"{outbox_id}:[0-9]+", base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)).decode())
    client = TestClient(create_app(runtime))
    page = client.get(path)
    assert page.status_code == 200 and f'<form method="post" action="{path}"' in page.text
    assert page.headers["cache-control"] == "no-store" and page.headers["referrer-policy"] == "no-referrer"
    assert "退订" in page.text and "application or offer" in page.text
    assert suppressions(runtime) == [] and consent(runtime, candidate.id)  # a GET changes nothing
    done = client.post(path, content=ONE_CLICK)
    assert done.status_code == 200 and "您已成功退订" in done.text
    assert f'action="{path}/all"' in done.text  # "stop everything" is a second, separate POST
    assert suppressions(runtime) == [("email", "c-1@example.org", "nurture")]
    assert consent(runtime, candidate.id) is False
    assert client.post(path, content=ONE_CLICK).status_code == 200  # twice is harmless
    assert suppressions(runtime) == [("email", "c-1@example.org", "nurture")]


def test_a_nurture_unsubscribe_still_lets_the_offer_letter_go(runtime: Runtime, sandbox: SandboxServer) -> None:
    candidate = add_candidate(runtime, nurture_consent=True)
    _, path = nurture_mail_link(runtime, sandbox, candidate.id)
    assert TestClient(create_app(runtime)).post(path, content=ONE_CLICK).status_code == 200
    letter = accept_offer(runtime, sandbox)
    assert (letter.status, letter.rule, letter.reason) == (MessageStatus.SENT.value, None, None)
    assert [m.to for m in sandbox.messages() if m.custom_args.get("outreach_id") == letter.id] == ["c-1@example.org"]


def test_nurture_after_the_unsubscribe_is_ended_with_a_clear_reason(runtime: Runtime, sandbox: SandboxServer) -> None:
    candidate = add_candidate(runtime, nurture_consent=True)
    _, path = nurture_mail_link(runtime, sandbox, candidate.id)
    queued_email = queue_rows(runtime, candidate.id, 2)
    (queued_sms,) = queue_rows(runtime, candidate.id, 1, channel="sms", template="system_help")
    (transactional_sms,) = queue_rows(runtime, candidate.id, 1, channel="sms", category="transactional")
    assert TestClient(create_app(runtime)).post(path, content=ONE_CLICK).status_code == 200
    for outbox_id in queued_email:  # ended at once, with the rule and reason the send-time check would give
        ended = row(runtime, outbox_id)
        assert (ended.status, ended.rule, ended.reason) == (
            "suppressed",
            "suppression",
            "address suppressed for nurture: unsubscribed",
        )
    ended = row(runtime, queued_sms)  # nurture on the other channel: consent is withdrawn
    assert (ended.status, ended.rule, ended.reason) == ("suppressed", "consent", "no consent to nurture messages")
    assert row(runtime, transactional_sms).status == "pending"
    # A nurture mail queued later is refused at send time for the same reason.
    (later,) = queue_rows(runtime, candidate.id, 1)
    assert deliver(runtime, later).status == "suppressed"
    refused = row(runtime, later)
    assert (refused.rule, refused.reason) == ("suppression", "address suppressed for nurture: unsubscribed")
    assert len(sandbox.messages()) == 1  # only the first nurture mail went out


def test_stop_everything_suppresses_the_offer_letter_too(runtime: Runtime, sandbox: SandboxServer) -> None:
    candidate = add_candidate(runtime, nurture_consent=True)
    _, path = nurture_mail_link(runtime, sandbox, candidate.id)
    (pending_transactional,) = queue_rows(runtime, candidate.id, 1, category="transactional")
    client = TestClient(create_app(runtime))
    assert client.post(path, content=ONE_CLICK).status_code == 200
    everything = client.post(f"{path}/all")
    assert everything.status_code == 200 and "No more emails from us" in everything.text
    assert "我们不会再给您发送邮件" in everything.text
    assert suppressions(runtime) == [("email", "c-1@example.org", "email")]  # widened, not a second row
    assert row(runtime, pending_transactional).status == "suppressed"
    letter = accept_offer(runtime, sandbox)
    assert (letter.status, letter.rule, letter.reason) == (
        "suppressed",
        "suppression",
        "address suppressed: unsubscribed",
    )
    assert len(sandbox.messages()) == 1  # only the nurture mail
    # The one-click POST again does not narrow it back to nurture.
    assert client.post(path, content=ONE_CLICK).status_code == 200
    assert suppressions(runtime) == [("email", "c-1@example.org", "email")]


def test_links_expire_after_the_validity_window(runtime: Runtime) -> None:
    candidate = add_candidate(runtime, nurture_consent=True)
    (outbox_id,) = queue_rows(runtime, candidate.id, 1)
    path = path_of(runtime, outbox_id)
    client = TestClient(create_app(runtime))
    start = utcnow()
    set_clock(TravelClock(start + UNSUBSCRIBE_VALIDITY + timedelta(minutes=1)))
    for answer in (client.get(path), client.post(path, content=ONE_CLICK), client.post(f"{path}/all")):
        assert answer.status_code == 404 and "expired" in answer.text and "已过期" in answer.text
    assert suppressions(runtime) == [] and consent(runtime, candidate.id)
    set_clock(TravelClock(start + UNSUBSCRIBE_VALIDITY - timedelta(minutes=1)))  # still within the window
    assert client.post(path, content=ONE_CLICK).status_code == 200
    assert suppressions(runtime) == [("email", "c-1@example.org", "nurture")]


def test_forged_edited_truncated_and_old_tokens_change_nothing(runtime: Runtime) -> None:
    alex = add_candidate(runtime, "c-1", nurture_consent=True)
    kim = add_candidate(runtime, "c-2", nurture_consent=True)
    (alex_message,) = queue_rows(runtime, alex.id, 1)
    (kim_message,) = queue_rows(runtime, kim.id, 1)
    good = path_of(runtime, alex_message).rsplit("/", 1)[1]
    body, mac = good.split(".")
    payload = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)).decode()
    outbox_id, issued = payload.split(":")
    assert outbox_id == alex_message

    def b64(text: str) -> str:
        return base64.urlsafe_b64encode(text.encode()).rstrip(b"=").decode()

    attempts = [
        f"{b64(f'{kim_message}:{issued}')}.{mac}",  # Alex's token edited to name Kim's message
        f"{b64(f'{outbox_id}:{int(issued) + 86400 * 365}')}.{mac}",  # its issue time moved on
        good[:-1],  # truncated
        good[: len(good) // 2],
        f"{body}.{mac[:-2]}AA",
        f"{body}x.{mac}",
        "Zm9v.YmFy",
        "garbage",
        f"{body}.",
        f".{mac}",
        # The old kind, which named our sequential candidate id: no longer honoured.
        sign(runtime.settings, "unsubscribe", f"email:{alex.id}"),
        sign(runtime.settings, "unsubscribe", f"sms:{kim.id}"),
        # Genuine signatures on payloads that are not a message id and an issue time.
        sign(runtime.settings, "unsubscribe", f"{outbox_id}:"),
        sign(runtime.settings, "unsubscribe", f"{outbox_id}:{'9' * 30}"),
        sign(runtime.settings, "unsubscribe", f"{outbox_id}:١٢٣"),
        # A well-formed token for a message that does not exist.
        unsubscribe_url(runtime.settings, "0" * 32, utcnow()).rsplit("/", 1)[1],
    ]
    client = TestClient(create_app(runtime))
    for token in attempts:
        for answer in (client.get(f"/unsubscribe/{token}"), client.post(f"/unsubscribe/{token}", content=ONE_CLICK)):
            assert answer.status_code == 404, token
            assert "Link not valid" in answer.text and "链接无效" in answer.text
        assert client.post(f"/unsubscribe/{token}/all").status_code == 404, token
    assert suppressions(runtime) == []
    assert consent(runtime, alex.id) and consent(runtime, kim.id)
    # The genuine token does work, so the loop above would have seen a change.
    assert client.post(f"/unsubscribe/{good}", content=ONE_CLICK).status_code == 200
    assert suppressions(runtime) == [("email", "c-1@example.org", "nurture")]
    assert not consent(runtime, alex.id) and consent(runtime, kim.id)


def test_ten_thousand_forged_tokens_unsubscribe_no_one(runtime: Runtime) -> None:
    people = [add_candidate(runtime, f"c-{n}") for n in range(3)]
    messages = [queue_rows(runtime, person.id, 1)[0] for person in people]
    real = path_of(runtime, messages[0]).rsplit("/", 1)[1]
    body, mac = real.split(".")
    issued = int(utcnow().timestamp())
    rng = random.Random(20261125)

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    forged: list[str] = []
    for n in range(10_000):
        kind = n % 4
        if kind == 0:  # a payload naming another message, with a random MAC
            forged.append(f"{b64(f'{rng.randbytes(16).hex()}:{issued}'.encode())}.{b64(rng.randbytes(16))}")
        elif kind == 1:  # the real MAC on another candidate's message
            forged.append(f"{b64(f'{messages[1 + n % 2]}:{issued}'.encode())}.{mac}")
        elif kind == 2:  # one character of the real MAC changed
            position = rng.randrange(len(mac))
            replacement = "A" if mac[position] != "A" else "B"
            forged.append(f"{body}.{mac[:position]}{replacement}{mac[position + 1 :]}")
        else:  # noise
            forged.append(b64(rng.randbytes(rng.randint(1, 40))))
    assert all(verify(runtime.settings, "unsubscribe", token) is None for token in forged)
    assert all(unsubscribe_message_id(runtime.settings, token, utcnow()) is None for token in forged)
    client = TestClient(create_app(runtime))
    for token in forged[:200]:
        assert client.post(f"/unsubscribe/{token}").status_code == 404
    assert suppressions(runtime) == []
