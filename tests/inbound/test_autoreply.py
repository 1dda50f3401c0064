"""Out-of-hours auto-replies: once, on the same channel, naming the next opening in the candidate's own time.

The company calendar is the default one: Asia/Shanghai, Monday to Friday 09:00-18:00, mainland China's public
holidays and make-up working days. Every test runs on a virtual clock set to the moment the candidate writes,
as the webhooks stamp ``received_at`` with the current time.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from urllib.parse import urlencode
from zoneinfo import ZoneInfo

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session
from twilio.request_validator import RequestValidator

from outreach.core.clock import set_clock
from outreach.core.models import AUTO_REPLY, Candidate, InboundMessage, OutboundMessage
from outreach.domain.render import Renderer
from outreach.inbound.autoreply import TEMPLATE, WINDOW, plan_auto_reply
from outreach.inbound.replies import is_automatic
from outreach.inbound.sms import InboundResult, InboundSms, handle_inbound_sms
from outreach.ops.sandbox import SandboxServer
from outreach.pipeline.context import format_reply_by, reply_by
from outreach.pipeline.delivery import deliver
from outreach.pipeline.samples import sample_context
from outreach.policy.engine import OUTREACH_CATEGORIES
from outreach.service.runtime import Runtime
from outreach.web import create_app, webhooks
from outreach.web.webhooks import WebhookSettings
from tests.conftest import ROOT
from tests.helpers import add_candidate, wait_until_a_session_waits_for_a_lock

SHANGHAI = ZoneInfo("Asia/Shanghai")
PHONE = "+8613800138000"
OUR_NUMBER = "+15005550006"  # settings.sms_from in tests/conftest.py
OUR_EMAIL = "talent@example.com"  # settings.email_from's address


def shanghai(year: int, month: int, day: int, hour: int, minute: int) -> datetime:
    return datetime(year, month, day, hour, minute, tzinfo=SHANGHAI)


FRIDAY_AFTER_CLOSING = shanghai(2026, 11, 27, 18, 1)
SATURDAY = shanghai(2026, 11, 28, 11, 0)
NATIONAL_DAY = shanghai(2026, 10, 2, 10, 0)  # a public holiday (Friday), off until Thursday 8 October
MAKEUP_SATURDAY = shanghai(2026, 10, 10, 10, 0)  # worked in exchange for the National Day week
TUESDAY_BEFORE_CLOSING = shanghai(2026, 11, 24, 17, 59)

_ids = itertools.count(1)


@dataclass
class Clock:
    now: datetime

    def advance(self, delta: timedelta) -> datetime:
        self.now += delta
        return self.now


@pytest.fixture
def clock() -> Iterator[Clock]:
    virtual = Clock(FRIDAY_AFTER_CLOSING.astimezone(UTC))
    set_clock(lambda: virtual.now)
    yield virtual
    set_clock(None)


def text_in(
    runtime: Runtime, clock: Clock, body: str, *, at: datetime | None = None, phone: str = PHONE
) -> InboundResult:
    """An SMS from ``phone`` arriving at ``at`` (the clock's time by default), handled as the webhook does."""
    if at is not None:
        clock.now = at.astimezone(UTC)
    sid = f"SM{next(_ids):032x}"
    sms = InboundSms(sid, phone, OUR_NUMBER, body, clock.now, {"MessageSid": sid})
    with Session(runtime.engine, expire_on_commit=False) as session, session.begin():
        return handle_inbound_sms(session, runtime, sms)


def mail_in(
    runtime: Runtime,
    clock: Clock,
    candidate: Candidate,
    *,
    at: datetime | None = None,
    subject: str = "Re: Backend Engineer",
    headers: dict[str, str] | None = None,
    from_: str | None = None,
) -> str | None:
    """An email stored as ``outreach.inbound.replies`` stores it, then answered through ``plan_auto_reply``."""
    if at is not None:
        clock.now = at.astimezone(UTC)
    kind = "auto_reply" if is_automatic(headers or {}, subject) else "reply"
    with Session(runtime.engine, expire_on_commit=False) as session, session.begin():
        inbound = InboundMessage(
            candidate_id=candidate.id,
            channel="email",
            provider="sendgrid",
            provider_message_id=f"msg-{next(_ids)}",
            from_address=(from_ or candidate.email or "").lower(),
            to_address=OUR_EMAIL,
            subject=subject,
            body="Hello!",
            kind=kind,
            received_at=clock.now,
        )
        session.add(inbound)
        session.flush()
        row = session.get(Candidate, candidate.id)
        assert row is not None
        return plan_auto_reply(session, runtime, row, "email", inbound)


def auto_replies(runtime: Runtime) -> list[OutboundMessage]:
    with Session(runtime.engine) as session:
        query = select(OutboundMessage).where(OutboundMessage.category == AUTO_REPLY)
        return list(session.scalars(query.order_by(OutboundMessage.created_at)))


def outbox_row(runtime: Runtime, outbox_id: str) -> OutboundMessage:
    with Session(runtime.engine) as session:
        found = session.get(OutboundMessage, outbox_id)
        assert found is not None
        return found


# --- when there is an answer -------------------------------------------------------------------------------


def test_friday_after_closing_is_answered_with_monday_opening_in_the_candidates_time(
    runtime: Runtime, sandbox: SandboxServer, clock: Clock
) -> None:
    candidate = add_candidate(runtime, timezone="Europe/Berlin")

    result = text_in(runtime, clock, "Is the role still open?", at=FRIDAY_AFTER_CLOSING)

    assert (result.kind, result.reply) == ("reply", None)
    [outbox_id] = result.queue
    row = outbox_row(runtime, outbox_id)
    assert (row.candidate_id, row.enrollment_id, row.campaign, row.step) == (candidate.id, None, AUTO_REPLY, 0)
    assert (row.channel, row.template, row.category, row.status) == ("sms", TEMPLATE, "auto_reply", "pending")
    assert row.not_before == FRIDAY_AFTER_CLOSING

    assert deliver(runtime, outbox_id).status == "sent"
    [sent] = sandbox.wait_for(1, timeout=5)
    # Monday 09:00 in Shanghai is 02:00 in Berlin (CET, UTC+1).
    assert sent.channel == "sms" and sent.to == PHONE
    assert sent.body == (
        "Thanks, Example Co. got your message. We're out of office now; a recruiter will reply by "
        "Monday 30 November, 02:00 (your time, Europe/Berlin)."
    )
    row = outbox_row(runtime, outbox_id)
    assert (row.status, row.category, row.body, row.segments) == ("sent", "auto_reply", sent.body, 1)
    # Metrics tell it apart from outreach: it is neither transactional nor nurture.
    assert row.category not in OUTREACH_CATEGORIES


def test_an_email_on_saturday_is_answered_by_email_in_chinese(
    runtime: Runtime, sandbox: SandboxServer, clock: Clock
) -> None:
    candidate = add_candidate(runtime, name="张伟", locale="zh-CN", timezone="Asia/Shanghai")

    outbox_id = mail_in(runtime, clock, candidate, at=SATURDAY)

    assert outbox_id is not None
    assert deliver(runtime, outbox_id).status == "sent"
    [sent] = sandbox.wait_for(1, timeout=5)
    assert (sent.channel, sent.to) == ("email", "c-1@example.org")
    assert sent.subject == "自动回复：Example Co. 已收到您的来信"
    assert "招聘专员将于11月30日（星期一）09:00（您当地时间）前回复您" in sent.text
    assert "11月30日（星期一）09:00（您当地时间）" in sent.html
    assert sent.headers.get("Auto-Submitted") == "auto-replied"  # RFC 3834: other responders stay quiet
    row = outbox_row(runtime, outbox_id)
    assert (row.channel, row.category, row.locale, row.subject) == ("email", "auto_reply", "zh-CN", sent.subject)
    # Should our answer come back to us (a forward, a bounce), it is recognised as automatic and not answered.
    assert is_automatic({}, sent.subject)


@pytest.mark.parametrize(
    ("at", "expected"),
    [
        pytest.param(FRIDAY_AFTER_CLOSING, "Monday 30 November, 09:00", id="friday-18:01"),
        pytest.param(shanghai(2026, 11, 27, 18, 0), "Monday 30 November, 09:00", id="friday-18:00-closed"),
        pytest.param(SATURDAY, "Monday 30 November, 09:00", id="saturday"),
        pytest.param(shanghai(2026, 11, 24, 8, 59), "Tuesday 24 November, 09:00", id="tuesday-08:59"),
        pytest.param(NATIONAL_DAY, "Thursday 8 October, 09:00", id="public-holiday"),
        pytest.param(shanghai(2026, 10, 9, 20, 0), "Saturday 10 October, 09:00", id="before-makeup-saturday"),
        pytest.param(MAKEUP_SATURDAY, None, id="makeup-working-saturday"),
        pytest.param(TUESDAY_BEFORE_CLOSING, None, id="tuesday-17:59"),
        pytest.param(shanghai(2026, 11, 24, 9, 0), None, id="tuesday-09:00"),
    ],
)
def test_only_messages_outside_business_hours_are_answered(
    runtime: Runtime, sandbox: SandboxServer, clock: Clock, at: datetime, expected: str | None
) -> None:
    add_candidate(runtime)  # Asia/Shanghai, like the company

    result = text_in(runtime, clock, "Hello, any news?", at=at)

    assert result.kind == "reply"
    if expected is None:
        assert result.queue == ()
        assert auto_replies(runtime) == []
        return
    [outbox_id] = result.queue
    assert deliver(runtime, outbox_id).status == "sent"
    [sent] = sandbox.wait_for(1, timeout=5)
    assert sent.body.endswith(f"a recruiter will reply by {expected} (your time, Asia/Shanghai).")


def test_the_reply_time_is_stated_in_the_candidates_timezone(runtime: Runtime, clock: Clock) -> None:
    def stated(timezone: str | None, locale: str = "en", at: datetime = FRIDAY_AFTER_CLOSING) -> dict[str, str]:
        candidate = Candidate(external_id="x", locale=locale, timezone=timezone, phone=None)
        found = reply_by(runtime.settings, runtime.policy.calendar, at, candidate)
        assert found is not None
        return found

    berlin = stated("Europe/Berlin")
    assert berlin == {
        "iso": "2026-11-30T02:00:00+01:00",
        "timezone": "Europe/Berlin",
        "en": "Monday 30 November, 02:00 (your time, Europe/Berlin)",
        "zh": "11月30日（星期一）02:00（您当地时间）",
        "text": "Monday 30 November, 02:00 (your time, Europe/Berlin)",
    }
    # Monday 09:00 in Shanghai is still Sunday evening in New York.
    assert stated("America/New_York")["en"] == "Sunday 29 November, 20:00 (your time, America/New_York)"
    assert stated("Asia/Shanghai", "zh-CN")["text"] == "11月30日（星期一）09:00（您当地时间）"
    # The offset of the opening counts, not the message's: Berlin leaves summer time on 25 October 2026.
    friday_before_dst_ends = shanghai(2026, 10, 23, 19, 0)
    assert stated("Europe/Berlin", at=friday_before_dst_ends)["iso"] == "2026-10-26T02:00:00+01:00"
    # No timezone of their own: the company's (the test candidate has no phone to infer one from).
    assert stated(None)["timezone"] == "Asia/Shanghai"


def test_reply_by_formats_by_hand() -> None:
    moment = datetime(2026, 12, 1, 9, 0, tzinfo=ZoneInfo("Europe/Berlin"))
    assert format_reply_by(moment, "Europe/Berlin", "en") == "Tuesday 1 December, 09:00 (your time, Europe/Berlin)"
    assert format_reply_by(moment, "Europe/Berlin", "zh") == "12月1日（星期二）09:00（您当地时间）"


# --- once per conversation ---------------------------------------------------------------------------------


def test_one_auto_reply_per_candidate_within_12_hours_on_any_channel(runtime: Runtime, clock: Clock) -> None:
    candidate = add_candidate(runtime)
    first = text_in(runtime, clock, "Hi!", at=FRIDAY_AFTER_CLOSING)
    assert len(first.queue) == 1

    assert text_in(runtime, clock, "One more thing...", at=FRIDAY_AFTER_CLOSING + timedelta(hours=2)).queue == ()
    assert mail_in(runtime, clock, candidate, at=FRIDAY_AFTER_CLOSING + timedelta(hours=3)) is None
    just_before = FRIDAY_AFTER_CLOSING + WINDOW - timedelta(seconds=1)
    assert text_in(runtime, clock, "Still there?", at=just_before).queue == ()

    later = text_in(runtime, clock, "Good morning", at=FRIDAY_AFTER_CLOSING + WINDOW)
    assert len(later.queue) == 1
    assert [row.id for row in auto_replies(runtime)] == [first.queue[0], later.queue[0]]


def test_each_candidate_has_their_own_window(runtime: Runtime, clock: Clock) -> None:
    add_candidate(runtime)
    add_candidate(runtime, "c-2", phone="+8613900139000")
    assert len(text_in(runtime, clock, "Hi", at=SATURDAY).queue) == 1
    assert len(text_in(runtime, clock, "Hi", phone="+8613900139000").queue) == 1


# --- never an answer ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("body", ["STOP", "退订", "HELP", "START"])
def test_keywords_at_night_get_no_auto_reply(runtime: Runtime, clock: Clock, body: str) -> None:
    add_candidate(runtime)
    result = text_in(runtime, clock, body, at=SATURDAY)
    assert result.kind in {"opt_out", "help", "opt_in"}
    assert result.queue == ()
    assert auto_replies(runtime) == []


def test_an_unknown_sender_at_night_gets_no_auto_reply(runtime: Runtime, clock: Clock) -> None:
    add_candidate(runtime)
    result = text_in(runtime, clock, "Hello?", at=SATURDAY, phone="+8613700137000")
    assert (result.kind, result.queue) == ("unmatched", ())


@pytest.mark.parametrize(
    "headers",
    [
        {"Auto-Submitted": "auto-replied"},
        {"Precedence": "bulk"},
        {"Precedence": "auto_reply"},
        {"Precedence": "list"},
        {"X-Autoreply": "yes"},
        {"List-Id": "<jobs.example.org>"},
    ],
)
def test_automatic_mail_gets_no_auto_reply(runtime: Runtime, clock: Clock, headers: dict[str, str]) -> None:
    candidate = add_candidate(runtime)
    assert mail_in(runtime, clock, candidate, at=SATURDAY, headers=headers) is None
    assert mail_in(runtime, clock, candidate, subject="Out of office: back Monday") is None
    assert auto_replies(runtime) == []


def test_two_auto_responders_facing_each_other_send_one_message_each_over_sms(
    runtime: Runtime, sandbox: SandboxServer, clock: Clock
) -> None:
    add_candidate(runtime)  # their phone answers every message automatically
    ours, theirs = 0, 1
    queued = text_in(runtime, clock, "Can we talk tonight?", at=FRIDAY_AFTER_CLOSING).queue
    for _ in range(20):
        if not queued:
            break
        for outbox_id in queued:
            assert deliver(runtime, outbox_id).status == "sent"
            ours += 1
        # Their auto-responder answers ours within a minute; to us it is just another message.
        clock.advance(timedelta(seconds=40))
        queued = text_in(runtime, clock, "I'm driving, I'll get back to you.").queue
        theirs += 1
    assert (ours, theirs) == (1, 2)
    assert len(sandbox.messages()) == 1


def test_two_auto_responders_facing_each_other_send_one_message_each_over_email(
    runtime: Runtime, sandbox: SandboxServer, clock: Clock
) -> None:
    candidate = add_candidate(runtime)
    first = mail_in(runtime, clock, candidate, at=SATURDAY)
    assert first is not None and deliver(runtime, first).status == "sent"
    # Their vacation responder answers ours (RFC 3834 headers), and again, and again: never answered.
    for _ in range(3):
        clock.advance(timedelta(minutes=1))
        echo = mail_in(runtime, clock, candidate, subject="Automatic reply: Re: Automatic reply", headers={})
        assert echo is None
        clock.advance(timedelta(minutes=1))
        assert mail_in(runtime, clock, candidate, headers={"Auto-Submitted": "auto-replied"}) is None
    assert len(sandbox.messages()) == 1


def test_our_own_senders_are_never_answered(runtime: Runtime, clock: Clock) -> None:
    runtime.settings = runtime.settings.with_overrides(email_reply_to="Talent Team <replies@hire.example.com>")
    candidate = add_candidate(runtime)
    clock.now = SATURDAY.astimezone(UTC)
    for sender in ("Talent@Example.com", "replies@hire.example.com", "REPLIES+c2lnbmVk.token@hire.example.com"):
        assert mail_in(runtime, clock, candidate, from_=sender) is None
    assert auto_replies(runtime) == []
    # Our SMS number writing to us, whatever the candidate record says.
    with Session(runtime.engine, expire_on_commit=False) as session, session.begin():
        inbound = InboundMessage(
            candidate_id=candidate.id,
            channel="sms",
            provider="twilio",
            provider_message_id="SMours",
            from_address=OUR_NUMBER,
            kind="reply",
            received_at=clock.now,
        )
        session.add(inbound)
        session.flush()
        assert plan_auto_reply(session, runtime, candidate, "sms", inbound) is None
    # A candidate record that carries our own address would make us write to ourselves.
    ourselves = add_candidate(runtime, "c-ours", email=OUR_EMAIL)
    assert mail_in(runtime, clock, ourselves) is None
    assert auto_replies(runtime) == []


def test_suppression_still_applies_to_auto_replies(runtime: Runtime, sandbox: SandboxServer, clock: Clock) -> None:
    add_candidate(runtime)
    text_in(runtime, clock, "STOP", at=SATURDAY)
    clock.advance(timedelta(minutes=5))
    result = text_in(runtime, clock, "Sorry, wrong button - can we still talk?")
    [outbox_id] = result.queue
    assert deliver(runtime, outbox_id).status == "suppressed"
    assert outbox_row(runtime, outbox_id).rule == "suppression"
    assert sandbox.messages() == []  # the STOP confirmation went back in TwiML, the auto-reply nowhere


# --- templates ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("locale", ["en", "zh-CN"])
def test_the_system_template_renders_in_both_locales(locale: str) -> None:
    """System templates belong to no campaign, so ``campaigns validate`` does not see them: checked here."""
    renderer = Renderer(ROOT / "templates")
    assert renderer.resolve_locale("email", TEMPLATE, locale) == locale
    assert renderer.resolve_locale("sms", TEMPLATE, locale) == locale
    sample = sample_context(locale)
    opening = datetime(2026, 11, 30, 2, 0, tzinfo=ZoneInfo("Europe/Berlin"))
    by = {language: format_reply_by(opening, "Europe/Berlin", language) for language in ("en", "zh")}
    context = {"company": sample["company"], "candidate": sample["candidate"], "reply_by": by}
    language = locale.split("-")[0]

    sms = renderer.render_sms(TEMPLATE, locale, context)
    assert by[language] in sms.text and "Example Co." in sms.text
    assert (sms.encoding, sms.segments) == ("GSM-7" if locale == "en" else "UCS-2", 1)

    email = renderer.render_email(TEMPLATE, locale, context)
    assert by[language] in email.text and by[language] in email.html
    assert sample["candidate"]["first_name" if locale == "en" else "name"] in email.text
    assert is_automatic({}, email.subject)

    # Without a known opening (a calendar with no working day ahead) and without a name, it still reads well.
    bare = {"company": sample["company"], "candidate": {"name": "", "first_name": ""}, "reply_by": None}
    assert renderer.render_sms(TEMPLATE, locale, bare).segments == 1
    assert renderer.render_email(TEMPLATE, locale, bare).text.startswith("Hello," if locale == "en" else "您好！")


# --- the webhook -------------------------------------------------------------------------------------------

PUBLIC_URL = "https://hooks.example.com"


def inbound_app(runtime: Runtime) -> TestClient:
    runtime.settings = runtime.settings.with_overrides(public_url=PUBLIC_URL)
    app: FastAPI = create_app(runtime)
    if not any(getattr(route, "path", "").startswith("/webhooks/") for route in app.routes):
        app.include_router(webhooks.router)
    app.state.webhook_settings = WebhookSettings()
    return TestClient(app)


def post_sms(client: TestClient, body: str, sid: str) -> str:
    params = {"MessageSid": sid, "From": PHONE, "To": OUR_NUMBER, "Body": body}
    path = "/webhooks/twilio/inbound"
    signature = RequestValidator("test-token").compute_signature(PUBLIC_URL + path, params)
    answer = client.post(
        path,
        content=urlencode(params).encode(),
        headers={"Content-Type": "application/x-www-form-urlencoded", "X-Twilio-Signature": signature},
    )
    assert answer.status_code == 200, answer.text
    return str(answer.text)


def test_the_twilio_webhook_enqueues_the_auto_reply_after_commit(runtime: Runtime, clock: Clock) -> None:
    add_candidate(runtime)
    client = inbound_app(runtime)
    seen: list[tuple[str, str]] = []

    def enqueue(ids: Sequence[str]) -> None:
        # Called after the commit: a fresh session already sees the row.
        for outbox_id in ids:
            seen.append((outbox_id, outbox_row(runtime, outbox_id).status))

    runtime.enqueue_override = enqueue
    clock.now = SATURDAY.astimezone(UTC)
    assert post_sms(client, "Hello there", "SMweb1").endswith("<Response/>")  # answered by the worker, not TwiML
    [row] = auto_replies(runtime)
    assert seen == [(row.id, "pending")]
    # The provider retrying the webhook changes nothing.
    post_sms(client, "Hello there", "SMweb1")
    assert len(seen) == 1 and len(auto_replies(runtime)) == 1


def test_a_failed_enqueue_leaves_the_auto_reply_to_the_sweeper(runtime: Runtime, clock: Clock) -> None:
    add_candidate(runtime)
    client = inbound_app(runtime)

    def broken(ids: Sequence[str]) -> None:
        raise ConnectionError("broker down")

    runtime.enqueue_override = broken
    clock.now = SATURDAY.astimezone(UTC)
    post_sms(client, "Hello there", "SMweb2")
    [row] = auto_replies(runtime)
    assert (row.status, row.enqueued_at) == ("pending", SATURDAY)
    requeued: list[str] = []
    runtime.scheduler.enqueue = requeued.extend
    clock.advance(timedelta(seconds=runtime.settings.lease_seconds + 1))
    runtime.scheduler.tick()
    assert requeued == [row.id]


# --- privacy and concurrency -------------------------------------------------------------------------------


def test_logs_carry_ids_and_reasons_but_no_personal_data(
    runtime: Runtime, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    candidate = add_candidate(runtime, name="Alex Morgan")
    caplog.set_level(logging.DEBUG, logger="outreach")
    secret = "call me on 13912345678 tonight"
    text_in(runtime, clock, secret, at=SATURDAY)
    text_in(runtime, clock, secret, at=SATURDAY + timedelta(minutes=1))
    mail_in(runtime, clock, candidate, headers={"Auto-Submitted": "auto-replied"})
    records = [r for r in caplog.records if r.name == "outreach.inbound.autoreply"]
    assert {r.getMessage() for r in records} == {"auto-reply planned", "no auto-reply"}
    assert {getattr(r, "reason", None) for r in records} == {
        None,
        "already auto-replied within 12 hours",
        "inbound kind auto_reply",
    }
    dumped = " ".join(f"{r.getMessage()} {r.__dict__}" for r in records)
    for personal in (PHONE, PHONE[1:], secret, "13912345678", "Alex", "c-1@example.org"):
        assert personal not in dumped


def test_two_messages_at_once_plan_one_auto_reply(pg_runtime: Runtime, clock: Clock) -> None:
    """PostgreSQL: the candidate's row lock makes the second planner wait and then see the first's row."""
    runtime = pg_runtime
    candidate = add_candidate(runtime)
    at = clock.now = SATURDAY.astimezone(UTC)

    def inbound(session: Session, sid: str) -> InboundMessage:
        message = InboundMessage(
            candidate_id=candidate.id,
            channel="sms",
            provider="twilio",
            provider_message_id=sid,
            from_address=PHONE,
            kind="reply",
            received_at=at,
        )
        session.add(message)
        session.flush()
        return message

    second: list[str | None] = []
    with Session(runtime.engine, expire_on_commit=False) as first_session, first_session.begin():
        first = plan_auto_reply(first_session, runtime, candidate, "sms", inbound(first_session, "SMa"))
        assert first is not None

        def other() -> None:
            with Session(runtime.engine, expire_on_commit=False) as session, session.begin():
                second.append(plan_auto_reply(session, runtime, candidate, "sms", inbound(session, "SMb")))

        thread = threading.Thread(target=other)
        thread.start()
        wait_until_a_session_waits_for_a_lock(runtime.engine)
        assert thread.is_alive(), "the second planner should wait for the first transaction"
    thread.join(timeout=10)
    assert second == [None]
    assert len(auto_replies(runtime)) == 1
