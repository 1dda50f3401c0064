"""Consent rules (suppressions by scope, nurture consent) and the nurture SMS opt-out hint."""

from __future__ import annotations

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from outreach.core.clock import utcnow
from outreach.core.models import Candidate, Suppression
from outreach.ops.sandbox import SandboxServer
from outreach.pipeline.delivery import deliver
from outreach.policy.base import Stage, Verdict
from outreach.policy.bulk import PolicyReads
from outreach.policy.consent import address_hash, with_opt_out_hint
from outreach.service.runtime import Runtime
from tests.helpers import add_candidate
from tests.policy.test_engine import queue_rows


def test_hint_is_added_once_in_the_right_language() -> None:
    assert (
        with_opt_out_hint("【示例科技】新职位上线，欢迎了解。", "zh-CN") == "【示例科技】新职位上线，欢迎了解。回T退订"
    )
    assert with_opt_out_hint("新职位 回T退订", "zh-CN") == "新职位 回T退订"
    assert with_opt_out_hint("New roles at Example Co.", "en-GB") == "New roles at Example Co. Reply STOP to opt out"


def test_nurture_sms_in_chinese_ends_with_the_opt_out_hint(runtime: Runtime, sandbox: SandboxServer) -> None:
    candidate = add_candidate(runtime, name="张伟", locale="zh-CN", stage="talent_pool", nurture_consent=True)
    # No seed campaign has a nurture SMS yet; the help text stands in for one (it needs only `company`).
    (outbox_id,) = queue_rows(runtime, candidate.id, 1, channel="sms", template="system_help")
    assert deliver(runtime, outbox_id).status == "sent"
    (sms,) = sandbox.messages()
    assert sms.body.endswith("回T退订")


def test_nurture_without_consent_is_suppressed(runtime: Runtime, sandbox: SandboxServer) -> None:
    candidate = add_candidate(runtime, stage="talent_pool", nurture_consent=False)
    (outbox_id,) = queue_rows(runtime, candidate.id, 1)
    assert deliver(runtime, outbox_id).status == "suppressed"
    assert sandbox.messages() == []


SCOPE_CASES = [
    # (scope, channel of the suppression, message channel, category, expected reason or None for allowed)
    ("nurture", "email", "email", "nurture", "address suppressed for nurture: unsubscribed"),
    ("nurture", "email", "email", "transactional", None),
    ("nurture", "email", "email", "auto_reply", None),
    ("email", "email", "email", "transactional", "address suppressed: unsubscribed"),
    ("email", "email", "email", "nurture", "address suppressed: unsubscribed"),
    ("email", "email", "sms", "transactional", None),
    ("provider", "email", "email", "transactional", "address suppressed: unsubscribed"),
    ("sms", "sms", "sms", "transactional", "address suppressed: unsubscribed"),
    ("sms", "sms", "email", "transactional", None),
    ("provider", "sms", "sms", "nurture", "address suppressed: unsubscribed"),
    ("nurture", "sms", "sms", "transactional", None),
]


@pytest.mark.parametrize(("scope", "suppressed_on", "channel", "category", "expected"), SCOPE_CASES)
def test_a_suppression_stops_what_its_scope_says_on_both_paths(
    runtime: Runtime, scope: str, suppressed_on: str, channel: str, category: str, expected: str | None
) -> None:
    candidate = add_candidate(runtime, nurture_consent=True)
    address = candidate.email if suppressed_on == "email" else candidate.phone
    with Session(runtime.engine) as session, session.begin():
        session.add(Suppression(channel=suppressed_on, address=address, reason="unsubscribed", scope=scope))
    engine = runtime.policy
    with Session(runtime.engine) as session:
        person = session.get(Candidate, candidate.id)
        assert person is not None
        subject = engine.subject(
            person, channel=channel, category=category, campaign="c", now=utcnow(), stage=Stage.SEND, locked=True
        )
        single = engine.evaluate(session, subject).decision
        reads = PolicyReads.load(session, engine, [person], [channel], utcnow())
        bulk = reads.evaluate(session, subject, person, None)
    for decision in (single, bulk):
        if expected is None:
            assert decision.allowed, decision
        else:
            assert (decision.verdict, decision.rule, decision.reason) == (Verdict.SUPPRESS, "suppression", expected)


def test_a_row_written_without_a_scope_stops_its_whole_channel(runtime: Runtime) -> None:
    with Session(runtime.engine) as session, session.begin():
        session.add(Suppression(channel="sms", address="+8613800138000", reason="opt_out"))
    with Session(runtime.engine) as session:
        assert session.scalars(select(Suppression.scope)).one() == "sms"


def test_nurture_scope_at_send_time(runtime: Runtime, sandbox: SandboxServer) -> None:
    candidate = add_candidate(runtime, stage="talent_pool", nurture_consent=True)
    with Session(runtime.engine) as session, session.begin():
        session.add(Suppression(channel="email", address="c-1@example.org", reason="unsubscribed", scope="nurture"))
    (nurture,) = queue_rows(runtime, candidate.id, 1)
    (transactional,) = queue_rows(runtime, candidate.id, 1, category="transactional")
    assert deliver(runtime, nurture).status == "suppressed"
    assert deliver(runtime, transactional).status == "sent"
    assert len(sandbox.messages()) == 1


def test_of_two_suppressions_of_an_address_the_channel_wide_one_speaks(runtime: Runtime) -> None:
    candidate = add_candidate(runtime, nurture_consent=True)
    key = runtime.settings.signing_key
    with Session(runtime.engine) as session, session.begin():
        # In clear, a nurture unsubscribe; under the erased record's hash, a hard bounce.
        session.add(Suppression(channel="email", address="c-1@example.org", reason="unsubscribed", scope="nurture"))
        hashed = address_hash(key, "email", "c-1@example.org")
        session.add(Suppression(channel="email", address=hashed, reason="bounced", scope="provider"))
    engine = runtime.policy
    with Session(runtime.engine) as session:
        person = session.get(Candidate, candidate.id)
        assert person is not None
        for category in ("nurture", "transactional"):
            subject = engine.subject(
                person, channel="email", category=category, campaign="c", now=utcnow(), stage=Stage.SEND, locked=True
            )
            reads = PolicyReads.load(session, engine, [person], ["email"], utcnow())
            bulk = reads.evaluate(session, subject, person, None)
            for decision in (engine.evaluate(session, subject).decision, bulk):
                assert (decision.rule, decision.reason) == ("suppression", "address suppressed: bounced")
