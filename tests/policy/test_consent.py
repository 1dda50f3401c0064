"""Consent rules and the nurture SMS opt-out hint."""

from __future__ import annotations

from outreach.ops.sandbox import SandboxServer
from outreach.pipeline.delivery import deliver
from outreach.policy.consent import with_opt_out_hint
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
