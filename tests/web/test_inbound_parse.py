"""SendGrid Inbound Parse: a candidate's email in SendGrid's multipart form, behind a secret token."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select, update
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from outreach.core.clock import set_clock
from outreach.core.config import Secret
from outreach.core.models import Alert, Candidate, Enrollment, InboundMessage, OutboundMessage
from outreach.domain.tokens import reply_address
from outreach.inbound import replies
from outreach.inbound.replies import EmailResult, InboundEmail
from outreach.service.runtime import Runtime
from outreach.web import create_app, inbound_parse
from outreach.web.webhooks import WebhookSettings
from tests.helpers import INBOUND_TOKEN, add_candidate, add_job, fire

FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "sendgrid" / "inbound_parse_reply.form"
PATH = "/webhooks/sendgrid/inbound"
FORM = "multipart/form-data; boundary=xYzZY"
TOKEN = INBOUND_TOKEN
# Tuesday 24 November 2026, 10:14 in Shanghai: business hours, so no out-of-hours auto-reply.
AT = datetime(2026, 11, 24, 2, 14, tzinfo=UTC)
# The same Tuesday, 22:00 in Shanghai: the company is closed.
EVENING = datetime(2026, 11, 24, 14, 0, tzinfo=UTC)
SUBJECT = "回复：后端工程师职位 - 周四下午可以面试"
MESSAGE_ID = "<20261124101401.4F2A9C@mail.example.cn>"


def fixture_body() -> bytes:
    # SendGrid posts CRLF lines; whatever a checkout does to line ends, send it the way SendGrid does.
    return FIXTURE.read_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def form(*parts: tuple[str, bytes], files: tuple[tuple[str, bytes], ...] = ()) -> bytes:
    out = b""
    for name, value in parts:
        out += b'--xYzZY\r\nContent-Disposition: form-data; name="' + name.encode() + b'"\r\n\r\n' + value + b"\r\n"
    for filename, content in files:
        out += (
            b'--xYzZY\r\nContent-Disposition: form-data; name="attachment1"; filename="'
            + filename.encode()
            + b'"\r\nContent-Type: application/pdf\r\n\r\n'
            + content
            + b"\r\n"
        )
    return out + b"--xYzZY--\r\n"


@pytest.fixture(autouse=True)
def clock() -> Iterator[list[datetime]]:
    now = [AT]
    set_clock(lambda: now[0])
    yield now
    set_clock(None)


class FakeAutoReply:
    """Stands in for :mod:`outreach.inbound.autoreply`: records its calls, plans nothing unless told to."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, str, int]] = []
        self.plan: str | None = None

    def plan_auto_reply(
        self, session: Session, runtime: Runtime, candidate: Candidate, channel: str, inbound: Any
    ) -> Any:
        self.calls.append((candidate.id, channel, inbound.id))
        return self.plan


@pytest.fixture
def autoreply(runtime: Runtime) -> FakeAutoReply:
    fake = FakeAutoReply()
    runtime.auto_reply = fake.plan_auto_reply
    return fake


def hooks(**changes: Any) -> WebhookSettings:
    return WebhookSettings(inbound_token=Secret(TOKEN), **changes)


def post(client: TestClient, body: bytes, *, token: str | None = TOKEN, **headers: str) -> Any:
    url = PATH if token is None else f"{PATH}?token={token}"
    return client.post(url, content=body, headers={"Content-Type": FORM, **headers})


def applicant(runtime: Runtime) -> str:
    """c-42 applied an hour ago; the JD email went out. Returns that email's outbox id."""
    add_job(runtime)
    add_candidate(runtime, "c-42", name="张伟", email="zhangwei@example.cn", locale="zh-CN")
    fire(runtime, "c-42", "applied", at=AT - timedelta(hours=1), job="j-1")
    runtime.scheduler.tick(AT - timedelta(hours=1))
    with Session(runtime.engine) as session, session.begin():
        outbox_id = session.scalars(
            select(OutboundMessage.id).where(OutboundMessage.campaign == "jd_intro", OutboundMessage.channel == "email")
        ).one()
        session.execute(
            update(OutboundMessage)
            .where(OutboundMessage.id == outbox_id)
            .values(status="sent", sent_at=AT - timedelta(minutes=59))
        )
    return outbox_id


def count(runtime: Runtime, model: type[Any]) -> int:
    with Session(runtime.engine) as session:
        return int(session.scalar(select(func.count()).select_from(model)) or 0)


def stored(runtime: Runtime) -> InboundMessage:
    with Session(runtime.engine) as session:
        return session.scalars(select(InboundMessage)).one()


def jd_intro(runtime: Runtime) -> Enrollment:
    with Session(runtime.engine) as session:
        return session.scalars(select(Enrollment).where(Enrollment.campaign == "jd_intro")).one()


def alerts(runtime: Runtime) -> list[Alert]:
    with Session(runtime.engine) as session:
        return list(session.scalars(select(Alert).order_by(Alert.id)))


# -- the documented form ------------------------------------------------------------------------------------


def test_documented_form_is_stored_stops_the_sequence_and_tells_hr(
    runtime: Runtime, client: TestClient, autoreply: FakeAutoReply
) -> None:
    outbox_id = applicant(runtime)
    queued_before = list(runtime.queued)  # type: ignore[attr-defined]
    answer = post(client, fixture_body())
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"kind": "reply", "queued": 0}

    message = stored(runtime)
    assert (message.kind, message.channel, message.provider) == ("reply", "email", "sendgrid")
    assert message.provider_message_id == MESSAGE_ID
    assert message.subject == SUBJECT  # GB2312 bytes, decoded as charsets says
    assert "周四下午两点以后都可以面试" in message.body
    assert message.from_address == "zhangwei@example.cn"
    assert message.in_reply_to == outbox_id  # no token: the last email we sent them
    assert message.answered_at is None
    assert message.received_at == AT
    assert (message.raw["spf"], message.raw["attachments"]) == ("pass", 0)
    assert "Message-ID: " + MESSAGE_ID in message.raw["headers"]

    enrollment = jd_intro(runtime)
    assert (enrollment.status, enrollment.exit_reason) == ("exited", "replied")
    [alert] = alerts(runtime)
    assert (alert.kind, alert.campaign, alert.message, alert.resolved_at) == (
        "candidate_replied",
        "jd_intro",
        "c-42 replied by email",
        None,
    )
    with Session(runtime.engine) as session:
        candidate = session.scalars(select(Candidate)).one()
    assert alert.candidate_id == candidate.id
    assert autoreply.calls == [(candidate.id, "email", message.id)]
    assert runtime.queued == queued_before  # type: ignore[attr-defined]


def test_the_same_message_twice_is_stored_once(runtime: Runtime, client: TestClient, autoreply: FakeAutoReply) -> None:
    applicant(runtime)
    assert post(client, fixture_body()).json()["kind"] == "reply"
    again = post(client, fixture_body())
    assert (again.status_code, again.json()["kind"]) == (200, "duplicate")
    assert (count(runtime, InboundMessage), count(runtime, Alert)) == (1, 1)
    assert len(autoreply.calls) == 1


# -- authentication -------------------------------------------------------------------------------------------


def test_wrong_or_missing_token_is_403_and_stores_nothing(runtime: Runtime, client: TestClient) -> None:
    applicant(runtime)
    wrong_basic = "Basic " + base64.b64encode(b"inbound:t0K").decode()
    for case in (
        post(client, fixture_body(), token="t0K"),
        post(client, fixture_body(), token="t0k0"),
        post(client, fixture_body(), token=""),
        post(client, fixture_body(), token=None),
        post(client, fixture_body(), token=None, Authorization=wrong_basic),
        post(client, fixture_body(), token=None, Authorization="Basic %%%"),
        post(client, fixture_body(), token=None, Authorization="Bearer t0k"),
    ):
        assert case.status_code == 403
        assert TOKEN not in case.text and "zhangwei" not in case.text
    assert (count(runtime, InboundMessage), count(runtime, Alert)) == (0, 0)
    assert jd_intro(runtime).status == "active"


def test_basic_auth_carries_the_token_as_password(runtime: Runtime, client: TestClient) -> None:
    applicant(runtime)
    basic = "Basic " + base64.b64encode(b"sendgrid:" + TOKEN.encode()).decode()
    answer = post(client, fixture_body(), token=None, Authorization=basic)
    assert answer.status_code == 200, answer.text
    assert stored(runtime).kind == "reply"


def test_without_a_configured_token_the_hook_is_unavailable(runtime: Runtime) -> None:
    applicant(runtime)
    client = TestClient(create_app(runtime, WebhookSettings()))
    assert post(client, fixture_body(), token="").status_code == 503
    assert post(client, fixture_body(), token=TOKEN).status_code == 503
    assert count(runtime, InboundMessage) == 0


# -- matching -------------------------------------------------------------------------------------------------


def test_a_reply_token_finds_the_candidate_writing_from_another_address(
    runtime: Runtime, client: TestClient, autoreply: FakeAutoReply
) -> None:
    runtime.settings = runtime.settings.with_overrides(email_reply_to="Talent Team <talent@parse.example.com>")
    outbox_id = applicant(runtime)
    add_candidate(runtime, "c-7", email="zw.private@example.net")  # the From address belongs to someone else
    token_address = reply_address(runtime.settings, outbox_id)
    assert token_address is not None
    body = (
        fixture_body()
        .replace(b"talent@parse.example.com", token_address.encode())
        .replace(b"zhangwei@example.cn", b"zw.private@example.net")
    )
    answer = post(client, body)
    assert answer.json()["kind"] == "reply", answer.text
    message = stored(runtime)
    with Session(runtime.engine) as session:
        candidate = session.get(Candidate, message.candidate_id)
        assert candidate is not None and candidate.external_id == "c-42"
    assert (message.in_reply_to, message.to_address, message.from_address) == (
        outbox_id,
        token_address,
        "zw.private@example.net",
    )
    assert jd_intro(runtime).status == "exited"
    assert [a.message for a in alerts(runtime)] == ["c-42 replied by email"]


def test_a_token_in_cc_or_the_envelope_counts_and_a_forged_one_does_not(runtime: Runtime, client: TestClient) -> None:
    runtime.settings = runtime.settings.with_overrides(email_reply_to="talent@parse.example.com")
    outbox_id = applicant(runtime)
    token_address = reply_address(runtime.settings, outbox_id)
    assert token_address is not None
    local, _, domain = token_address.partition("@")
    forged = f"{local[:-2]}AA@{domain}"
    base = fixture_body().replace(b"zhangwei@example.cn", b"someone@example.net")
    envelope = b'{"to":["' + token_address.encode() + b'"],"from":"someone@example.net"}'
    via_envelope = base.replace(b'{"to":["talent@parse.example.com"],"from":"someone@example.net"}', envelope)
    assert post(client, via_envelope).json()["kind"] == "reply"
    forged_body = base.replace(b"talent@parse.example.com", forged.encode()).replace(MESSAGE_ID.encode(), b"<x@y>")
    assert post(client, forged_body).json()["kind"] == "unmatched"
    with Session(runtime.engine) as session:
        kinds = dict(session.execute(select(InboundMessage.provider_message_id, InboundMessage.in_reply_to)).all())
    assert kinds == {MESSAGE_ID: outbox_id, "<x@y>": None}


def test_an_unknown_sender_is_stored_unmatched_without_alert(
    runtime: Runtime, client: TestClient, autoreply: FakeAutoReply
) -> None:
    answer = post(client, fixture_body())
    assert answer.json()["kind"] == "unmatched"
    message = stored(runtime)
    assert (message.kind, message.candidate_id) == ("unmatched", None)
    assert count(runtime, Alert) == 0 and autoreply.calls == []


def test_automatic_mail_pauses_and_raises_no_alert(
    runtime: Runtime, client: TestClient, autoreply: FakeAutoReply, clock: list[datetime]
) -> None:
    applicant(runtime)
    clock[0] = EVENING  # out of hours: an auto-reply would be due if this were a person
    body = fixture_body().replace(b"MIME-Version: 1.0\r\n", b"Auto-Submitted: auto-replied\r\nMIME-Version: 1.0\r\n")
    answer = post(client, body)
    assert answer.json() == {"kind": "auto_reply", "queued": 0}, answer.text
    enrollment = jd_intro(runtime)
    assert enrollment.status == "active"
    assert enrollment.next_run_at is not None and enrollment.next_run_at >= EVENING + timedelta(days=7)
    assert count(runtime, Alert) == 0 and autoreply.calls == []
    assert stored(runtime).kind == "auto_reply"


# -- the out-of-hours auto-reply ------------------------------------------------------------------------------


def test_a_planned_auto_reply_is_enqueued_after_commit(
    runtime: Runtime, client: TestClient, autoreply: FakeAutoReply
) -> None:
    outbox_id = applicant(runtime)
    autoreply.plan = outbox_id  # any committed outbox row will do
    seen: list[tuple[str, bool]] = []

    def enqueue(ids: Any) -> None:
        with Session(runtime.engine) as session:  # a worker's view: only what is committed
            seen.extend((i, session.scalar(select(InboundMessage.id)) is not None) for i in ids)

    runtime.enqueue_override = enqueue
    answer = post(client, fixture_body())
    assert answer.json() == {"kind": "reply", "queued": 1}
    assert seen == [(outbox_id, True)]


def test_out_of_hours_reply_gets_the_real_auto_reply(
    runtime: Runtime, client: TestClient, clock: list[datetime]
) -> None:
    pytest.importorskip("outreach.inbound.autoreply")
    applicant(runtime)
    clock[0] = EVENING
    answer = post(client, fixture_body())
    assert answer.json() == {"kind": "reply", "queued": 1}, answer.text
    with Session(runtime.engine) as session:
        auto = session.scalars(select(OutboundMessage).where(OutboundMessage.category == "auto_reply")).one()
    assert auto.id in runtime.queued  # type: ignore[attr-defined]
    assert post(client, fixture_body()).json() == {"kind": "duplicate", "queued": 0}


# -- bad requests ---------------------------------------------------------------------------------------------


def test_malformed_posts_are_400_and_store_nothing(runtime: Runtime, client: TestClient) -> None:
    applicant(runtime)
    good = fixture_body()
    cases = {
        "json": (b'{"from": "a@b.c"}', "application/json"),
        "no boundary": (good, "multipart/form-data"),
        "truncated": (good[: len(good) // 2], FORM),
        "no from": (form(("to", b"talent@parse.example.com")), FORM),
        "envelope not json": (form(("from", b"a@example.org"), ("envelope", b"{to:")), FORM),
        "envelope not an object": (form(("from", b"a@example.org"), ("envelope", b"[1]")), FORM),
        "charsets not json": (form(("from", b"a@example.org"), ("charsets", b"utf-8")), FORM),
        "envelope to not addresses": (form(("from", b"a@example.org"), ("envelope", b'{"to": [1]}')), FORM),
    }
    for case, (body, content_type) in cases.items():
        answer = client.post(f"{PATH}?token={TOKEN}", content=body, headers={"Content-Type": content_type})
        assert answer.status_code == 400, case
    assert count(runtime, InboundMessage) == 0


def test_text_over_the_limit_is_413_but_attachments_stream_past(runtime: Runtime) -> None:
    add_candidate(runtime, "c-42", email="zhangwei@example.cn")
    client = TestClient(create_app(runtime, hooks(max_body_bytes=1024)))
    sender = ("from", b"zhangwei@example.cn")
    too_long = form(sender, ("text", b"x" * 2000))
    assert post(client, too_long).status_code == 413

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit holds while reading
        yield too_long[:700]
        yield too_long[700:]

    assert client.post(f"{PATH}?token={TOKEN}", content=chunks(), headers={"Content-Type": FORM}).status_code == 413
    assert count(runtime, InboundMessage) == 0
    with_cv = form(sender, ("text", b"My CV is attached."), ("attachments", b"1"), files=(("cv.pdf", b"%PDF" * 4000),))
    answer = post(client, with_cv)
    assert answer.status_code == 200, answer.text
    message = stored(runtime)
    assert (message.body, message.raw["attachments"]) == ("My CV is attached.", 1)
    assert message.provider_message_id.startswith("sha256:")  # no headers, no Message-ID: a hash of the form


def test_database_failure_is_503_and_writes_nothing(
    runtime: Runtime, client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    applicant(runtime)
    real = replies.handle_inbound_email

    def handle_then_fail(session: Session, runtime: Runtime, email: InboundEmail) -> EmailResult:
        real(session, runtime, email)  # stored, stopped, alerted … then the connection goes
        raise OperationalError("COMMIT", {}, ConnectionError("server closed the connection"))

    monkeypatch.setattr(inbound_parse, "handle_inbound_email", handle_then_fail)
    answer = post(client, fixture_body())
    assert answer.status_code == 503
    assert (count(runtime, InboundMessage), count(runtime, Alert)) == (0, 0)
    assert jd_intro(runtime).status == "active"


# -- the raw MIME option ----------------------------------------------------------------------------------------


def test_the_raw_mime_format_is_read_too(runtime: Runtime, client: TestClient, autoreply: FakeAutoReply) -> None:
    applicant(runtime)
    mime = (
        "From: =?UTF-8?B?5byg5Lyf?= <ZhangWei@Example.cn>\r\n"
        "To: talent@parse.example.com\r\n"
        "Subject: =?UTF-8?B?5Zue5aSN77ya5oSf6LCi?=\r\n"
        "Message-ID: <raw-1@mail.example.cn>\r\n"
        "MIME-Version: 1.0\r\n"
        'Content-Type: text/plain; charset="gb2312"\r\n'
        "Content-Transfer-Encoding: base64\r\n\r\n"
        + base64.b64encode("好的，谢谢！".encode("gb2312")).decode()
        + "\r\n"
    ).encode()
    body = form(
        ("from", "张伟 <ZhangWei@Example.cn>".encode()),
        ("to", b"talent@parse.example.com"),
        ("email", mime),
        ("envelope", b'{"to":["talent@parse.example.com"],"from":"zhangwei@example.cn"}'),
        ("charsets", b'{"to":"UTF-8","from":"UTF-8","subject":"UTF-8"}'),
    )
    assert post(client, body).json()["kind"] == "reply"
    message = stored(runtime)
    assert (message.provider_message_id, message.subject, message.body.strip()) == (
        "<raw-1@mail.example.cn>",
        "回复：感谢",
        "好的，谢谢！",
    )


def test_nul_in_a_relayed_mail_is_stored_as_a_replacement_character(
    runtime: Runtime, client: TestClient, autoreply: FakeAutoReply
) -> None:
    """No database text holds a NUL (PostgreSQL refused the row: a 500, which SendGrid retries for days)."""
    applicant(runtime)
    body = form(
        ("from", b"Zhang <zhangwei@example.cn>"),
        ("to", b"jobs@example.com"),
        ("subject", b"re\x00: interview"),
        ("text", b"Thursday \x00 works"),
        ("headers", b"Message-ID: <a\x00b@example.cn>\r\nX-Odd: \x00\r\n"),
        ("envelope", b'{"to": ["jobs@example.com\\u0000"], "from": "zhangwei@example.cn"}'),
    )
    answer = post(client, body)
    assert answer.status_code == 200, answer.text
    message = stored(runtime)
    assert (message.subject, message.body) == ("re\ufffd: interview", "Thursday \ufffd works")
    assert message.kind == "reply"
