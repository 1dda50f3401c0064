"""Replies stop campaigns on every channel; automatic replies pause them and do not count as replies."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from outreach.inbound import InboundSms, handle_inbound_sms
from outreach.models import Candidate, Enrollment, OutboundMessage
from outreach.replies import InboundEmail, handle_inbound_email, is_automatic
from outreach.runtime import Runtime
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
