"""Replies stop campaigns on every channel; automatic replies pause them and do not count as replies."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from outreach.core.models import Alert, Candidate, Enrollment, InboundMessage, OutboundMessage
from outreach.domain.tokens import reply_address
from outreach.inbound.replies import EmailResult, InboundEmail, handle_inbound_email, is_automatic
from outreach.inbound.sms import InboundSms, handle_inbound_sms
from outreach.service.runtime import Runtime
from tests.helpers import add_candidate, add_job, fire

T0 = datetime(2026, 11, 25, 2, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("headers", "subject", "expected"),
    [
        ({"Auto-Submitted": "auto-replied"}, "Re: Backend Engineer", True),
        ({"Auto-Submitted": "no"}, "Re: Backend Engineer", False),
        ({"Precedence": "bulk"}, "Hello", True),
        ({"X-Autoreply": "yes"}, "Hello", True),
        ({"List-Id": "<jobs.example.org>"}, "Hello", True),
        ({}, "Out of Office: back on Monday", True),
        ({}, "Automatic reply: Backend Engineer", True),
        ({}, "自动回复：您好", True),
        ({}, "Re: Backend Engineer - happy to talk", False),
        ({}, None, False),
    ],
)
def test_automatic_mail_is_recognised(headers: dict[str, str], subject: str | None, expected: bool) -> None:
    assert is_automatic(headers, subject) is expected


def nurture_enrollment(runtime: Runtime) -> None:
    add_job(runtime, tags=["stack:python"])
    add_candidate(runtime, stage="talent_pool", nurture_consent=True)
    fire(runtime, "c-1", "job_opened", at=T0, job="j-1")


def enrollment_status(runtime: Runtime) -> tuple[str, str | None]:
    with Session(runtime.engine) as session:
        enrollment = session.scalars(select(Enrollment)).one()
        return enrollment.status, enrollment.exit_reason


def test_an_sms_reply_stops_the_email_nurture(runtime: Runtime) -> None:
    nurture_enrollment(runtime)
    with Session(runtime.engine) as session, session.begin():
        handle_inbound_sms(
            session,
            runtime,
            InboundSms("SM1", "+8613800138000", "+15005550006", "Thanks, not looking right now", T0, {}),
        )
    assert enrollment_status(runtime) == ("exited", "replied")
    assert runtime.scheduler.tick(T0 + timedelta(hours=1)).queued == []


def test_an_email_reply_stops_and_is_stored_once(runtime: Runtime) -> None:
    nurture_enrollment(runtime)
    email = InboundEmail("msg-1", "C-1@Example.org", "talent@example.com", "Re: a role for you", "Sounds good!", T0)
    with Session(runtime.engine) as session, session.begin():
        assert handle_inbound_email(session, runtime, email).kind == "reply"
    with Session(runtime.engine) as session, session.begin():
        assert handle_inbound_email(session, runtime, email).kind == "duplicate"
    assert enrollment_status(runtime) == ("exited", "replied")


def test_an_out_of_office_reply_pauses_then_the_sequence_resumes(runtime: Runtime) -> None:
    nurture_enrollment(runtime)
    away = InboundEmail(
        "msg-2",
        "c-1@example.org",
        "talent@example.com",
        "Out of office until Dec 3",
        "",
        T0,
        headers={"Auto-Submitted": "auto-replied"},
    )
    with Session(runtime.engine) as session, session.begin():
        assert handle_inbound_email(session, runtime, away).kind == "auto_reply"
    assert enrollment_status(runtime) == ("active", None)
    with Session(runtime.engine) as session:
        assert session.scalars(select(Candidate.last_reply_at)).one() is None
    assert runtime.scheduler.tick(T0 + timedelta(days=6)).queued == []
    resumed = runtime.scheduler.tick(T0 + timedelta(days=7, minutes=1))
    assert len(resumed.queued) == 1
    with Session(runtime.engine) as session:
        assert session.scalars(select(OutboundMessage.template)).one() == "job_reactivation"


# -- matching, HR notification and the auto-reply hook --------------------------------------------------------


class RecordingAutoReply:
    def __init__(self, plan: str | None = None) -> None:
        self.plan = plan
        self.calls: list[tuple[int, str, str]] = []

    def __call__(self, session: Session, runtime: Runtime, candidate: Candidate, channel: str, inbound: Any) -> Any:
        self.calls.append((candidate.id, channel, inbound.kind))
        return self.plan


@pytest.fixture
def autoreply(runtime: Runtime) -> RecordingAutoReply:
    recorder = RecordingAutoReply(plan="f" * 32)
    runtime.auto_reply = recorder
    return recorder


def handle(runtime: Runtime, email: InboundEmail) -> EmailResult:
    with Session(runtime.engine) as session, session.begin():
        return handle_inbound_email(session, runtime, email)


def sent_email(runtime: Runtime, external_id: str, campaign: str = "offer_followup") -> str:
    with Session(runtime.engine, expire_on_commit=False) as session, session.begin():
        candidate = session.scalars(select(Candidate).where(Candidate.external_id == external_id)).one()
        message = OutboundMessage(
            candidate_id=candidate.id,
            campaign=campaign,
            step=0,
            channel="email",
            template=campaign,
            category="transactional",
            status="delivered",
            sent_at=T0 - timedelta(days=1),
        )
        session.add(message)
    return message.id


def reply_alerts(runtime: Runtime) -> list[tuple[str, str | None, str]]:
    with Session(runtime.engine) as session:
        return [(a.kind, a.campaign, a.message) for a in session.scalars(select(Alert).order_by(Alert.id))]


def test_a_reply_tells_hr_and_returns_the_auto_reply(runtime: Runtime, autoreply: RecordingAutoReply) -> None:
    nurture_enrollment(runtime)
    outbox_id = sent_email(runtime, "c-1")
    result = handle(runtime, InboundEmail("m-1", "Alex Morgan <C-1@Example.org>", "t@example.com", "Re", "Yes", T0))
    assert (result.kind, result.candidate_external_id, result.queue) == ("reply", "c-1", ("f" * 32,))
    assert result.inbound_id is not None
    assert reply_alerts(runtime) == [("candidate_replied", "offer_followup", "c-1 replied by email")]
    with Session(runtime.engine) as session:
        assert session.scalars(select(InboundMessage.in_reply_to)).one() == outbox_id
    assert len(autoreply.calls) == 1 and autoreply.calls[0][1:] == ("email", "reply")
    again = handle(runtime, InboundEmail("m-1", "c-1@example.org", "t@example.com", "Re", "Yes", T0))
    assert (again.kind, again.queue) == ("duplicate", ())
    assert len(reply_alerts(runtime)) == 1 and len(autoreply.calls) == 1


def test_the_reply_token_in_cc_wins_over_the_sender(runtime: Runtime, autoreply: RecordingAutoReply) -> None:
    runtime.settings = runtime.settings.with_overrides(email_reply_to="Talent <talent@example.com>")
    add_candidate(runtime, "c-1")
    add_candidate(runtime, "c-2")
    outbox_id = sent_email(runtime, "c-2", campaign="decline_followup")
    token = reply_address(runtime.settings, outbox_id)
    assert token is not None
    email = InboundEmail("m-2", "c-1@example.org", "Someone <x@example.net>", "Re", "Hi", T0, recipients=(token,))
    result = handle(runtime, email)
    assert (result.kind, result.candidate_external_id) == ("reply", "c-2")
    assert reply_alerts(runtime) == [("candidate_replied", "decline_followup", "c-2 replied by email")]
    with Session(runtime.engine) as session:
        message = session.scalars(select(InboundMessage)).one()
        assert (message.in_reply_to, message.to_address) == (outbox_id, token)


def test_automatic_and_unknown_mail_raise_no_alert_and_no_auto_reply(
    runtime: Runtime, autoreply: RecordingAutoReply
) -> None:
    nurture_enrollment(runtime)
    away = InboundEmail("m-3", "c-1@example.org", "t@example.com", "Automatic reply: away", "", T0)
    assert handle(runtime, away).kind == "auto_reply"
    stranger = InboundEmail("m-4", "who@example.net", "t@example.com", "Hello", "Hi", T0)
    assert handle(runtime, stranger) == EmailResult("unmatched", None, handle_inbound_id(runtime, "m-4"))
    assert reply_alerts(runtime) == [] and autoreply.calls == []


def handle_inbound_id(runtime: Runtime, provider_message_id: str) -> int | None:
    query = select(InboundMessage.id).where(InboundMessage.provider_message_id == provider_message_id)
    with Session(runtime.engine) as session:
        return session.scalar(query)
