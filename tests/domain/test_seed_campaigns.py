"""Every seed campaign end to end: ATS event (or cron tick) → scheduler → real SDKs → sandbox, in the
candidate's language, with the right content at the right time."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from outreach.core.models import Alert, Candidate, OutboundMessage
from outreach.ops.sandbox import SandboxMessage, SandboxServer
from outreach.pipeline.delivery import deliver
from outreach.service.runtime import Runtime
from tests.helpers import add_candidate, add_job, fire, resolved_links

T0 = datetime(2026, 11, 25, 2, 0, tzinfo=UTC)  # a Wednesday, 10:00 in Shanghai
OFFER_DATA = {
    "start_date": "2027-01-04",
    "start_place": "Building 3, 88 Keyuan Road, Shanghai",
    "hr_contact": {"name": "Li Na", "email": "lina@example.com", "phone": "+862150001234"},
    "documents": ["ID card", "Degree certificate"],
    "medical_check": {"place": "Ruijin Hospital", "deadline": "2026-12-20"},
}


@pytest.fixture
def live(runtime: Runtime) -> Runtime:
    """Deliver whatever the scheduler queues straight away, through the real providers."""

    def run(ids: Sequence[str]) -> None:
        for outbox_id in ids:
            assert deliver(runtime, outbox_id).status == "sent"

    runtime.enqueue_override = run
    return runtime


def has_chinese(text: str) -> bool:
    return any("\u4e00" <= ch <= "\u9fff" for ch in text)


def sent(sandbox: SandboxServer, channel: str | None = None) -> list[SandboxMessage]:
    return [m for m in sandbox.messages() if channel is None or m.channel == channel]


def test_jd_intro_email_nudge_and_reminder(live: Runtime, sandbox: SandboxServer) -> None:
    add_candidate(live, name="Alex Morgan")
    add_job(live, title="Backend Engineer", booking_url="https://book.example.com/be-1")
    fire(live, "c-1", "applied", at=T0, job="j-1")
    live.scheduler.tick(T0)
    (mail,) = sent(sandbox)
    assert mail.channel == "email" and "Backend Engineer" in mail.subject
    assert "Hi Alex" in mail.text
    assert "https://book.example.com/be-1" in resolved_links(live, mail.text)
    assert "https://book.example.com/be-1" in resolved_links(live, mail.html)
    assert "interview" in mail.text.lower()
    assert "Build the services" in mail.text  # the job description itself
    live.scheduler.tick(T0 + timedelta(minutes=4))
    assert len(sent(sandbox)) == 1
    live.scheduler.tick(T0 + timedelta(minutes=5))
    (nudge,) = sent(sandbox, "sms")
    assert nudge.to == "+8613800138000" and resolved_links(live, nudge.body) == ["https://book.example.com/be-1"]
    live.scheduler.tick(T0 + timedelta(days=2, minutes=5))
    assert len(sent(sandbox, "sms")) == 2


def test_jd_intro_in_chinese_and_no_reminder_after_a_reply(live: Runtime, sandbox: SandboxServer) -> None:
    add_candidate(live, name="张伟", locale="zh-CN")
    add_job(live, title="后端工程师")
    fire(live, "c-1", "applied", at=T0, job="j-1")
    live.scheduler.tick(T0 + timedelta(minutes=5))
    mail, nudge = sorted(sent(sandbox), key=lambda m: m.channel)
    assert has_chinese(mail.subject) and "张伟" in mail.text and "后端工程师" in mail.subject
    assert has_chinese(nudge.body) and nudge.segments >= 1
    with Session(live.engine) as session, session.begin():
        session.execute(update(Candidate).values(last_reply_at=T0 + timedelta(hours=3)))
    live.scheduler.tick(T0 + timedelta(days=3))
    assert len(sent(sandbox)) == 2  # replied: no reminder


def test_offer_followup_after_three_silent_days_with_hr_alert(live: Runtime, sandbox: SandboxServer) -> None:
    add_candidate(live, name="王芳", locale="zh-CN")
    add_job(live)
    fire(live, "c-1", "offer_extended", at=T0, job="j-1")
    live.scheduler.tick(T0 + timedelta(days=2, hours=23))
    assert sent(sandbox) == []
    live.scheduler.tick(T0 + timedelta(days=3))
    (mail,) = sent(sandbox)
    assert has_chinese(mail.subject) and "王芳" in mail.text
    with Session(live.engine) as session:
        alert = session.scalars(select(Alert)).one()
        assert (alert.kind, alert.campaign) == ("offer_unanswered", "offer_followup")


def test_offer_letter_with_checklist_and_what_the_candidate_cares_about(live: Runtime, sandbox: SandboxServer) -> None:
    add_candidate(live, name="Alex Morgan", tags=["concern:growth", "concern:remote"])
    add_job(live)
    fire(live, "c-1", "offer_extended", at=T0, job="j-1")
    accepted_at = T0 + timedelta(days=1)
    fire(live, "c-1", "offer_accepted", at=accepted_at, job="j-1", data=OFFER_DATA)
    live.scheduler.tick(accepted_at)  # within 24 hours: at once
    (letter,) = sent(sandbox)
    for expected in ("Building 3, 88 Keyuan Road", "Li Na", "ID card", "Degree certificate", "Ruijin Hospital"):
        assert expected in letter.text, expected
    assert "2027" in letter.text
    assert "LEARNING AND GROWTH" in letter.text
    assert "HOW BONUSES WORK" not in letter.text
    live.scheduler.tick(accepted_at + timedelta(days=5))
    assert len(sent(sandbox)) == 1  # the offer follow-up stopped when the stage moved to accepted


def test_offer_letter_in_chinese_with_pay_section(live: Runtime, sandbox: SandboxServer) -> None:
    add_candidate(live, name="张伟", locale="zh-CN", tags=["concern:pay"])
    fire(live, "c-1", "offer_accepted", at=T0, data=OFFER_DATA)
    live.scheduler.tick(T0)
    (letter,) = sent(sandbox)
    assert has_chinese(letter.subject) and "Li Na" in letter.text
    assert "【学习与成长】" not in letter.text


def test_final_thanks_keeps_the_profile_in_the_pool(live: Runtime, sandbox: SandboxServer) -> None:
    add_candidate(live, name="Alex Morgan")
    fire(live, "c-1", "final_interview_failed", at=T0)
    live.scheduler.tick(T0)
    (mail,) = sent(sandbox)
    assert "talent pool" in mail.text
    with Session(live.engine) as session:
        assert session.scalars(select(Candidate.stage)).one() == "rejected"


def test_decline_followup_now_and_recontact_in_six_months(live: Runtime, sandbox: SandboxServer) -> None:
    add_candidate(live, name="Alex Morgan")
    fire(live, "c-1", "offer_declined", at=T0, reason="salary")
    live.scheduler.tick(T0 + timedelta(hours=1))
    (thanks,) = sent(sandbox)
    assert "Alex" in thanks.text and "honest feedback" in thanks.text  # the reason, acknowledged
    live.scheduler.tick(T0 + timedelta(days=150))
    assert len(sent(sandbox)) == 1
    live.scheduler.tick(T0 + timedelta(days=182, hours=1))
    assert len(sent(sandbox)) == 2
    with Session(live.engine) as session:
        templates = list(session.scalars(select(OutboundMessage.template).order_by(OutboundMessage.step)))
    assert templates == ["decline_thanks", "decline_recontact"]


def test_quarterly_nurture_reaches_the_consenting_pool_with_unsubscribe(live: Runtime, sandbox: SandboxServer) -> None:
    add_candidate(live, "pool-en", name="Alex Morgan", nurture_consent=True)
    add_candidate(live, "pool-zh", name="张伟", locale="zh-CN", nurture_consent=True)
    add_candidate(live, "pool-no", nurture_consent=False)
    add_candidate(live, "busy", nurture_consent=True)  # still applying: not in the talent pool
    with Session(live.engine) as session, session.begin():
        session.execute(update(Candidate).where(Candidate.external_id != "busy").values(stage="talent_pool"))
    live.scheduler.tick(datetime(2027, 1, 1, 2, 5, tzinfo=UTC))
    received = {m.to: m for m in sent(sandbox)}
    assert set(received) == {"pool-en@example.org", "pool-zh@example.org"}
    assert has_chinese(received["pool-zh@example.org"].subject)
    english = received["pool-en@example.org"]
    assert english.headers.get("List-Unsubscribe-Post") == "List-Unsubscribe=One-Click"
    assert "/unsubscribe/" in english.headers.get("List-Unsubscribe", "")
    live.scheduler.tick(datetime(2027, 1, 1, 3, 0, tzinfo=UTC))
    assert len(sent(sandbox)) == 2  # one firing per quarter


def test_job_reactivation_only_for_matching_talent_pool(live: Runtime, sandbox: SandboxServer) -> None:
    add_job(live, "j-9", title="Java Platform Lead", tags=["stack:java"], booking_url="https://book.example.com/j9")
    add_candidate(live, "match", name="Alex Morgan", tags=["stack:java"], nurture_consent=True)
    add_candidate(live, "other", tags=["stack:go"], nurture_consent=True)
    with Session(live.engine) as session, session.begin():
        session.execute(update(Candidate).values(stage="declined"))
    assert [e.campaign for e in fire(live, "match", "job_opened", at=T0, job="j-9")] == ["job_reactivation"]
    assert fire(live, "other", "job_opened", at=T0, job="j-9") == []
    live.scheduler.tick(T0)
    (mail,) = sent(sandbox)
    assert mail.to == "match@example.org"
    assert "Java Platform Lead" in mail.subject + mail.text
    assert "https://book.example.com/j9" in resolved_links(live, mail.text)  # nurture: tracked
