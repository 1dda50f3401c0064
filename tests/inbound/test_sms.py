"""Inbound SMS: keywords suppress, lift and help once; anything else is a reply that stops campaigns."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from outreach.core.clock import set_clock, utcnow
from outreach.core.models import Candidate, Enrollment, InboundMessage, OutboundMessage, Suppression
from outreach.domain.render import Renderer
from outreach.inbound.sms import InboundResult, InboundSms, handle_inbound_sms
from outreach.ops.sandbox import SandboxServer
from outreach.pipeline.delivery import deliver
from outreach.service.runtime import Runtime
from tests.conftest import ROOT
from tests.helpers import add_candidate, add_job, fire

T0 = datetime(2026, 11, 25, 2, 0, tzinfo=UTC)
PHONE = "+8613800138000"
OTHER_PHONE = "+8613900139000"
UNKNOWN_PHONE = "+8613700137000"
OUR_NUMBER = "+15005550006"

OPT_OUT_EN = "You're unsubscribed from Example Co. messages. Reply START to resubscribe."
OPT_IN_EN = "You're subscribed again to Example Co. messages. Reply STOP to unsubscribe, HELP for help."

_sids = itertools.count(1)


def sms(body: str, *, phone: str = PHONE, at: datetime = T0, sid: str | None = None) -> InboundSms:
    sid = sid or f"SM{next(_sids):032x}"
    return InboundSms(
        provider_message_id=sid,
        from_=phone,
        to=OUR_NUMBER,
        body=body,
        received_at=at,
        raw={"MessageSid": sid, "From": phone, "To": OUR_NUMBER, "Body": body},
    )


def handle(runtime: Runtime, message: InboundSms) -> InboundResult:
    with Session(runtime.engine, expire_on_commit=False) as session, session.begin():
        return handle_inbound_sms(session, runtime, message)


def queue(runtime: Runtime, candidate: Candidate, channel: str, count: int, status: str = "pending") -> list[str]:
    """Outbox rows as the scheduler leaves them, without enrollments (so any number fit one candidate)."""
    with Session(runtime.engine, expire_on_commit=False) as session, session.begin():
        rows = [
            OutboundMessage(
                candidate_id=candidate.id,
                campaign="jd_intro",
                step=step,
                channel=channel,
                template="jd_nudge" if channel == "sms" else "jd_intro",
                category="transactional",
                status=status,
                not_before=T0,
                sent_at=T0 if status == "sent" else None,
            )
            for step in range(count)
        ]
        session.add_all(rows)
        session.flush()
        return [row.id for row in rows]


def statuses(runtime: Runtime, ids: list[str]) -> set[tuple[str, str | None, str | None]]:
    with Session(runtime.engine) as session:
        rows = session.scalars(select(OutboundMessage).where(OutboundMessage.id.in_(ids)))
        return {(row.status, row.rule, row.reason) for row in rows}


def suppressions(runtime: Runtime) -> list[Suppression]:
    with Session(runtime.engine) as session:
        return list(session.scalars(select(Suppression).order_by(Suppression.id)))


def inbound(runtime: Runtime) -> list[InboundMessage]:
    with Session(runtime.engine) as session:
        return list(session.scalars(select(InboundMessage).order_by(InboundMessage.id)))


def jd_intro_enrollment(runtime: Runtime, candidate: Candidate) -> Enrollment:
    with Session(runtime.engine) as session:
        return session.scalars(
            select(Enrollment).where(Enrollment.candidate_id == candidate.id, Enrollment.campaign == "jd_intro")
        ).one()


def reload(runtime: Runtime, candidate: Candidate) -> Candidate:
    with Session(runtime.engine) as session:
        found = session.get(Candidate, candidate.id)
        assert found is not None
        return found


# --- opt-out -----------------------------------------------------------------------------------------------


def test_stop_suppresses_every_queued_sms_of_the_number_and_confirms_once(runtime: Runtime) -> None:
    candidate = add_candidate(runtime)
    other = add_candidate(runtime, "c-2", phone=OTHER_PHONE)
    queued_sms = queue(runtime, candidate, "sms", 90) + queue(runtime, candidate, "sms", 10, status="held")
    queued_email = queue(runtime, candidate, "email", 5)
    already_sent = queue(runtime, candidate, "sms", 1, status="sent")
    someone_else = queue(runtime, other, "sms", 3)

    result = handle(runtime, sms(" Stop. ", at=T0))

    assert result == InboundResult("opt_out", "c-1", OPT_OUT_EN)
    assert statuses(runtime, queued_sms) == {("suppressed", "consent", "opted out by SMS keyword")}
    assert statuses(runtime, queued_email) == {("pending", None, None)}
    assert statuses(runtime, already_sent) == {("sent", None, None)}
    assert statuses(runtime, someone_else) == {("pending", None, None)}
    [suppression] = suppressions(runtime)
    assert (suppression.channel, suppression.address, suppression.reason, suppression.source, suppression.scope) == (
        "sms",
        PHONE,
        "opt_out",
        "keyword",
        "sms",  # its carrier meaning: no SMS from us at all, not only nurture
    )
    assert suppression.confirmed_at is not None
    [message] = inbound(runtime)
    assert (message.kind, message.candidate_id, message.body, message.from_address) == (
        "opt_out",
        candidate.id,
        " Stop. ",
        PHONE,
    )
    assert (message.provider, message.channel, message.to_address, message.received_at) == (
        "twilio",
        "sms",
        OUR_NUMBER,
        T0,
    )

    again = handle(runtime, sms("STOP", at=T0 + timedelta(minutes=5)))
    assert again == InboundResult("opt_out", "c-1", None)
    assert len(suppressions(runtime)) == 1
    assert [m.kind for m in inbound(runtime)] == ["opt_out", "opt_out"]
    # A keyword is not a conversation: nothing counts as a reply.
    assert reload(runtime, candidate).last_reply_at is None


def test_stop_after_a_nurture_unsubscribe_stops_all_sms_and_start_lifts_it(runtime: Runtime) -> None:
    candidate = add_candidate(runtime)
    with Session(runtime.engine) as session, session.begin():
        session.add(Suppression(channel="sms", address=PHONE, reason="unsubscribed", source="link", scope="nurture"))
    queued_sms = queue(runtime, candidate, "sms", 2)
    result = handle(runtime, sms("STOP", at=T0))
    assert result == InboundResult("opt_out", "c-1", OPT_OUT_EN)  # confirmed: the nurture row never was
    assert statuses(runtime, queued_sms) == {("suppressed", "consent", "opted out by SMS keyword")}
    [suppression] = suppressions(runtime)
    assert (suppression.reason, suppression.source, suppression.scope) == ("opt_out", "keyword", "sms")
    assert handle(runtime, sms("START", at=T0 + timedelta(minutes=1))).kind == "opt_in"
    assert suppressions(runtime) == []


def test_stop_is_not_a_reply_and_leaves_campaigns_running(runtime: Runtime) -> None:
    candidate = add_candidate(runtime)
    add_job(runtime)
    fire(runtime, "c-1", "applied", at=T0, job="j-1")
    handle(runtime, sms("退订", at=T0 + timedelta(minutes=1)))
    assert jd_intro_enrollment(runtime, candidate).status == "active"
    assert reload(runtime, candidate).last_reply_at is None


def test_stop_from_an_unknown_number_is_still_honoured(runtime: Runtime) -> None:
    candidate = add_candidate(runtime)
    queued = queue(runtime, candidate, "sms", 2)

    result = handle(runtime, sms("STOP", phone=UNKNOWN_PHONE))

    assert result == InboundResult("opt_out", None, OPT_OUT_EN)  # in the default locale
    [suppression] = suppressions(runtime)
    assert (suppression.address, suppression.reason) == (UNKNOWN_PHONE, "opt_out")
    [message] = inbound(runtime)
    assert (message.candidate_id, message.kind) == (None, "opt_out")
    assert statuses(runtime, queued) == {("pending", None, None)}


def test_a_message_from_an_unknown_number_is_unmatched(runtime: Runtime) -> None:
    add_candidate(runtime)
    result = handle(runtime, sms("Who is this?", phone=UNKNOWN_PHONE))
    assert result == InboundResult("unmatched", None, None)
    [message] = inbound(runtime)
    assert (message.candidate_id, message.kind) == (None, "unmatched")
    assert suppressions(runtime) == []


def test_zh_cn_candidate_gets_the_chinese_confirmation(runtime: Runtime) -> None:
    add_candidate(runtime, name="张伟", locale="zh-CN")
    result = handle(runtime, sms("TD"))
    assert result.kind == "opt_out"
    assert result.reply == "【Example Co.】您已成功退订短信通知，回复START可重新订阅。"
    help_result = handle(runtime, sms("HELP", at=T0 + timedelta(minutes=1)))
    assert help_result.reply is not None and "回复T退订" in help_result.reply


def test_a_provider_suppression_is_confirmed_but_keeps_its_reason(runtime: Runtime) -> None:
    add_candidate(runtime)
    with Session(runtime.engine) as session, session.begin():
        session.add(Suppression(channel="sms", address=PHONE, reason="twilio 21610", source="provider"))
    assert handle(runtime, sms("STOP")).reply == OPT_OUT_EN
    assert handle(runtime, sms("STOP")).reply is None
    [suppression] = suppressions(runtime)
    assert (suppression.reason, suppression.source) == ("twilio 21610", "provider")
    # An opt-in keyword does not lift what the provider (or a bounce, or a person) decided.
    assert handle(runtime, sms("START")) == InboundResult("opt_in", "c-1", None)
    assert len(suppressions(runtime)) == 1


def test_nothing_reaches_the_provider_after_an_opt_out(runtime: Runtime, sandbox: SandboxServer) -> None:
    add_candidate(runtime)
    add_job(runtime)
    fire(runtime, "c-1", "applied", at=T0, job="j-1")
    runtime.scheduler.tick(T0 + timedelta(hours=1))
    with Session(runtime.engine) as session:
        rows = {row.channel: row.id for row in session.scalars(select(OutboundMessage))}
    assert set(rows) == {"email", "sms"}

    assert handle(runtime, sms("stop", at=T0 + timedelta(minutes=90))).kind == "opt_out"

    # Outbox rows are due from the wall-clock time they were written, so deliver at the real now.
    assert deliver(runtime, rows["sms"]).status == "not-pending"
    assert statuses(runtime, [rows["sms"]]) == {("suppressed", "consent", "opted out by SMS keyword")}
    assert deliver(runtime, rows["email"]).status == "sent"  # email is another channel
    assert [m.channel for m in sandbox.wait_for(1, timeout=5)] == ["email"]

    # A step queued after the opt-out (the two-day reminder: STOP is not a reply) is stopped as well.
    runtime.scheduler.tick(T0 + timedelta(days=3))
    with Session(runtime.engine) as session:
        reminder = session.scalars(select(OutboundMessage).where(OutboundMessage.template == "jd_reminder")).one()
    deliver(runtime, reminder.id)
    assert {status for status, _, _ in statuses(runtime, [reminder.id])} == {"suppressed"}
    assert [m.channel for m in sandbox.messages()] == ["email"]


# --- opt-in ------------------------------------------------------------------------------------------------


def test_start_lifts_the_opt_out_and_confirms_once(runtime: Runtime) -> None:
    add_candidate(runtime)
    handle(runtime, sms("STOP"))

    result = handle(runtime, sms("START", at=T0 + timedelta(hours=1)))

    assert result == InboundResult("opt_in", "c-1", OPT_IN_EN)
    assert suppressions(runtime) == []
    assert handle(runtime, sms("unstop", at=T0 + timedelta(hours=2))) == InboundResult("opt_in", "c-1", None)

    # A new opt-out is a new opt-out: confirmed again, once.
    assert handle(runtime, sms("STOP", at=T0 + timedelta(hours=3))).reply == OPT_OUT_EN
    assert handle(runtime, sms("STOP", at=T0 + timedelta(hours=4))).reply is None


def test_start_without_an_opt_out_changes_nothing_and_says_nothing(runtime: Runtime) -> None:
    add_candidate(runtime)
    assert handle(runtime, sms("START")) == InboundResult("opt_in", "c-1", None)
    assert suppressions(runtime) == []


def test_yes_is_an_answer_unless_there_is_an_opt_out_to_lift(runtime: Runtime) -> None:
    candidate = add_candidate(runtime)
    add_job(runtime)
    fire(runtime, "c-1", "applied", at=T0, job="j-1")

    assert handle(runtime, sms("Yes!", at=T0 + timedelta(hours=1))) == InboundResult("reply", "c-1", None)
    assert jd_intro_enrollment(runtime, candidate).exit_reason == "replied"

    handle(runtime, sms("STOP", at=T0 + timedelta(hours=2)))
    assert handle(runtime, sms("YES", at=T0 + timedelta(hours=3))) == InboundResult("opt_in", "c-1", OPT_IN_EN)
    assert suppressions(runtime) == []
    assert [m.kind for m in inbound(runtime)] == ["reply", "opt_out", "opt_in"]


# --- help --------------------------------------------------------------------------------------------------


def test_help_is_answered_at_most_once_a_day_per_number(runtime: Runtime) -> None:
    candidate = add_candidate(runtime)
    add_candidate(runtime, "c-2", phone=OTHER_PHONE)

    first = handle(runtime, sms("HELP", at=T0))
    assert first.kind == "help" and first.reply is not None
    assert "Example Co." in first.reply and "STOP" in first.reply and "reply" in first.reply.lower()
    assert handle(runtime, sms("help", at=T0 + timedelta(hours=1))) == InboundResult("help", "c-1", None)
    # Another number has its own day.
    assert handle(runtime, sms("INFO", phone=OTHER_PHONE, at=T0 + timedelta(hours=1))).reply is not None
    assert reload(runtime, candidate).last_reply_at is None


def test_help_counts_the_day_from_the_last_answer(runtime: Runtime) -> None:
    add_candidate(runtime)
    answered = [
        handle(runtime, sms("HELP", at=T0 + timedelta(hours=hours))).reply is not None
        for hours in (0, 1, 23, 30, 40, 53, 54, 200)
    ]
    # 0 answered; 1 and 23 within a day of it; 30 is a day after the last answer (not after the last HELP);
    # 40 and 53 within a day of 30; 54 a day after 30; 200 long after.
    assert answered == [True, False, False, True, False, False, True, True]


# --- replies -----------------------------------------------------------------------------------------------


def test_a_reply_stops_campaigns_that_exit_on_reply(runtime: Runtime, sandbox: SandboxServer) -> None:
    candidate = add_candidate(runtime)
    add_job(runtime)
    fire(runtime, "c-1", "applied", at=T0, job="j-1")
    runtime.scheduler.tick(T0 + timedelta(hours=1))
    with Session(runtime.engine) as session:
        nudge = session.scalars(select(OutboundMessage).where(OutboundMessage.channel == "sms")).one()
    assert deliver(runtime, nudge.id).status == "sent"

    at = utcnow()  # after the nudge went out
    result = handle(runtime, sms("Thanks! Could we talk on Tuesday?", at=at))

    # At the wall-clock time of the run; an out-of-hours auto-reply may be queued (tests/inbound/test_autoreply.py).
    assert (result.kind, result.candidate_external_id, result.reply) == ("reply", "c-1", None)
    enrollment = jd_intro_enrollment(runtime, candidate)
    assert (enrollment.status, enrollment.exit_reason) == ("exited", "replied")
    assert reload(runtime, candidate).last_reply_at == at
    [message] = inbound(runtime)
    assert (message.kind, message.candidate_id, message.in_reply_to) == ("reply", candidate.id, nudge.id)
    assert message.raw["Body"] == "Thanks! Could we talk on Tuesday?"
    assert suppressions(runtime) == []


def test_a_shared_number_belongs_to_the_candidate_we_last_texted(runtime: Runtime) -> None:
    first = add_candidate(runtime, "c-1")
    second = add_candidate(runtime, "c-2")  # same phone: applied twice under two ATS ids
    queue(runtime, first, "sms", 1, status="sent")
    queued_first = queue(runtime, first, "sms", 2)
    queued_second = queue(runtime, second, "sms", 2)
    with Session(runtime.engine) as session, session.begin():
        session.add(
            OutboundMessage(
                candidate_id=second.id,
                campaign="jd_intro",
                step=9,
                channel="sms",
                template="jd_nudge",
                category="transactional",
                status="sent",
                not_before=T0,
                sent_at=T0 - timedelta(days=3),
            )
        )

    assert handle(runtime, sms("ok", at=T0 + timedelta(hours=1))).candidate_external_id == "c-1"
    # The opt-out is about the number: both records lose their queued SMS.
    handle(runtime, sms("STOP", at=T0 + timedelta(hours=2)))
    assert {status for status, _, _ in statuses(runtime, queued_first + queued_second)} == {"suppressed"}


# --- idempotency, transactions, privacy --------------------------------------------------------------------


def test_the_same_provider_message_twice_has_no_second_effect(runtime: Runtime) -> None:
    candidate = add_candidate(runtime)
    queue(runtime, candidate, "sms", 3)
    assert handle(runtime, sms("STOP", sid="SMdup")).reply == OPT_OUT_EN

    # A retried webhook, even one that (wrongly) carries another body, changes nothing and answers nothing.
    assert handle(runtime, sms("STOP", sid="SMdup")) == InboundResult("duplicate", "c-1", None)
    assert handle(runtime, sms("START", sid="SMdup")) == InboundResult("duplicate", "c-1", None)
    assert len(suppressions(runtime)) == 1
    assert len(inbound(runtime)) == 1

    add_job(runtime)
    fire(runtime, "c-1", "applied", at=T0, job="j-1")
    assert handle(runtime, sms("hello", sid="SMdup")).kind == "duplicate"
    assert jd_intro_enrollment(runtime, candidate).status == "active"
    assert reload(runtime, candidate).last_reply_at is None


def test_everything_happens_in_the_callers_transaction(runtime: Runtime) -> None:
    candidate = add_candidate(runtime)
    queued = queue(runtime, candidate, "sms", 2)
    with Session(runtime.engine) as session:
        session.begin()
        assert handle_inbound_sms(session, runtime, sms("STOP")).kind == "opt_out"
        session.rollback()
    assert suppressions(runtime) == []
    assert inbound(runtime) == []
    assert statuses(runtime, queued) == {("pending", None, None)}


def test_received_at_must_be_aware(runtime: Runtime) -> None:
    add_candidate(runtime)
    with pytest.raises(ValueError, match="timezone-aware"), Session(runtime.engine) as session:
        handle_inbound_sms(session, runtime, sms("hi", at=datetime(2026, 11, 25, 2, 0)))


def test_logs_carry_kinds_and_ids_but_no_numbers_or_text(runtime: Runtime, caplog: pytest.LogCaptureFixture) -> None:
    add_candidate(runtime)
    add_job(runtime)
    fire(runtime, "c-1", "applied", at=T0, job="j-1")
    caplog.set_level(logging.DEBUG, logger="outreach")
    secret = "my new number is 13912345678, call me"
    for body in ("HELP", "STOP", "START", secret):
        handle(runtime, sms(body, at=utcnow()))
    handle(runtime, sms("STOP", phone=UNKNOWN_PHONE))
    records = [r for r in caplog.records if r.name == "outreach.inbound.sms"]
    assert {getattr(r, "kind", None) for r in records} >= {"help", "opt_out", "opt_in", "reply"}
    dumped = " ".join(f"{r.getMessage()} {r.__dict__}" for r in records)
    for personal in (PHONE, PHONE[1:], UNKNOWN_PHONE, secret, "13912345678", "Alex"):
        assert personal not in dumped


# --- templates ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("template", ["system_opt_out", "system_opt_in", "system_help"])
@pytest.mark.parametrize("locale", ["en", "zh-CN"])
def test_system_templates_need_only_the_company_and_fit_one_sms(template: str, locale: str) -> None:
    renderer = Renderer(ROOT / "templates")
    assert renderer.resolve_locale("sms", template, locale) == locale
    company = {"name": "Example Co.", "timezone": "Asia/Shanghai"}
    rendered = renderer.render_sms(template, locale, {"company": company})
    assert "Example Co." in rendered.text
    assert rendered.segments == 1
    assert rendered.encoding == ("GSM-7" if locale == "en" else "UCS-2")


# --- out-of-hours auto-reply -------------------------------------------------------------------------------

SATURDAY_NIGHT = datetime(2026, 11, 28, 14, 0, tzinfo=UTC)  # 22:00 in Shanghai, the company's timezone


@pytest.fixture
def saturday_night() -> Iterator[datetime]:
    """The clock at Saturday night (the auto-reply row is stamped with the current time, like the webhook)."""
    set_clock(lambda: SATURDAY_NIGHT)
    yield SATURDAY_NIGHT
    set_clock(None)


def auto_reply_rows(runtime: Runtime) -> list[OutboundMessage]:
    with Session(runtime.engine) as session:
        return list(session.scalars(select(OutboundMessage).where(OutboundMessage.category == "auto_reply")))


def test_a_reply_out_of_hours_queues_the_auto_reply(runtime: Runtime, saturday_night: datetime) -> None:
    candidate = add_candidate(runtime)
    result = handle(runtime, sms("Are you hiring?", at=saturday_night))
    [row] = auto_reply_rows(runtime)
    assert result == InboundResult("reply", "c-1", None, (row.id,))
    assert (row.candidate_id, row.channel, row.template, row.status) == (
        candidate.id,
        "sms",
        "system_out_of_hours",
        "pending",
    )


def test_a_reply_in_business_hours_queues_nothing(runtime: Runtime) -> None:
    add_candidate(runtime)
    assert handle(runtime, sms("Are you hiring?", at=T0)) == InboundResult("reply", "c-1", None, ())
    assert auto_reply_rows(runtime) == []


def test_a_retried_webhook_plans_no_second_auto_reply(runtime: Runtime, saturday_night: datetime) -> None:
    add_candidate(runtime)
    assert len(handle(runtime, sms("Hi", sid="SMnight", at=saturday_night)).queue) == 1
    assert handle(runtime, sms("Hi", sid="SMnight", at=saturday_night)) == InboundResult("duplicate", "c-1", None)
    assert len(auto_reply_rows(runtime)) == 1


def test_the_auto_reply_is_part_of_the_callers_transaction(runtime: Runtime, saturday_night: datetime) -> None:
    add_candidate(runtime)
    with Session(runtime.engine) as session:
        session.begin()
        assert len(handle_inbound_sms(session, runtime, sms("Hi", at=saturday_night)).queue) == 1
        session.rollback()
    assert auto_reply_rows(runtime) == []
    assert inbound(runtime) == []
