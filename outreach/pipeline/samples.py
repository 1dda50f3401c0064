"""Sample rows for ``campaigns validate`` and ``campaigns preview``: a realistic candidate, job and event, shaped
into a template context by the same function a real send uses (:func:`outreach.pipeline.context.shape_context`).
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from outreach.core.models import Candidate, Channel, Enrollment, Job, OutboundMessage
from outreach.domain.event_data import EventContract
from outreach.pipeline.context import shape_context

__all__ = ["sample_context"]

SAMPLE_MESSAGE_ID = "9c4e1f0a2b7d4e5f8a1b2c3d4e5f6a7b"
SAMPLE_COMPANY = {"name": "Example Co.", "timezone": "Asia/Shanghai"}
SAMPLE_UNSUBSCRIBE = f"https://outreach.example.com/u/{SAMPLE_MESSAGE_ID}.Zk3q"

_SAMPLE_PEOPLE: Mapping[str, Mapping[str, Any]] = {
    "en": {
        "candidate": {
            "external_id": "cand-20931",
            "name": "Emma Clarke",
            "first_name": "Emma",
            "locale": "en",
            "timezone": "Europe/London",
        },
        "job": {
            "title": "Senior Backend Engineer",
            "department": "Platform Engineering",
            "location": "Shanghai (hybrid)",
            "description": (
                "You'll join the six-person platform team that runs the services behind our production "
                "planning product: scheduling, inventory and supplier data for more than 4,000 factories.\n\n"
                "What you'll do:\n"
                "- Design and build Python services that handle millions of planning events a day\n"
                "- Own reliability for the services you ship, with sensible on-call (about one week in six)\n"
                "- Mentor two mid-level engineers and help shape how the team works\n\n"
                "What we're looking for: five or more years building backend systems, solid SQL, and the "
                "habit of writing things down. Experience with manufacturing or supply chains is a bonus, "
                "not a requirement."
            ),
        },
        "hr_contact": {"name": "Li Na", "email": "li.na@example.com", "phone": "+86 21 5555 0123"},
        "start_place": "Example Co. Shanghai office, 18F, 1000 Century Avenue, Pudong. Ask for Li Na at reception.",
        "documents": [
            "Passport or national ID card",
            "Original degree certificate",
            "Bank card for salary payments",
            "Two passport-size photos",
        ],
        "medical_check": {
            "place": "iKang Health Centre, 7F, 88 Lujiazui Ring Road, Shanghai",
            "deadline": "2026-02-23",
            "notes": "Please don't eat for 8 hours beforehand; the check takes about an hour.",
        },
        "salary": "CNY 45,000 per month, 14 months a year",
    },
    "zh": {
        "candidate": {
            "external_id": "cand-20931",
            "name": "张伟",
            "first_name": "伟",
            "locale": "zh-CN",
            "timezone": "Asia/Shanghai",
        },
        "job": {
            "title": "高级后端工程师",
            "department": "平台研发部",
            "location": "上海（混合办公）",
            "description": (
                "你将加入平台研发部的六人小组，负责支撑我们生产计划产品的核心服务：为4000多家工厂提供排产、"
                "库存和供应商数据。\n\n"
                "工作内容：\n"
                "- 设计并开发每天处理数百万条排产事件的 Python 服务\n"
                "- 对自己上线的服务稳定性负责，值班安排合理（约每六周一次）\n"
                "- 带教两位中级工程师，一起完善团队的研发流程\n\n"
                "任职要求：五年以上后端开发经验，SQL 功底扎实，有良好的文档习惯。有制造业或供应链行业经验者优先，"
                "但不是必须。"
            ),
        },
        "hr_contact": {"name": "李娜", "email": "li.na@example.com", "phone": "021-5555 0123"},
        "start_place": "上海市浦东新区世纪大道1000号18楼 Example Co. 上海办公室（到前台找李娜即可）",
        "documents": [
            "身份证原件及复印件",
            "学历、学位证书原件",
            "本人名下的工资卡（招商银行优先）",
            "两张一寸免冠照片",
        ],
        "medical_check": {
            "place": "爱康国宾上海陆家嘴分院（陆家嘴环路88号7楼）",
            "deadline": "2026-02-23",
            "notes": "体检前请空腹8小时，全程约1小时。",
        },
        "salary": "月薪45,000元，每年14薪",
    },
}

_SAMPLE_EVENT_DATA: Mapping[str, tuple[str | None, tuple[str, ...]]] = {
    # event type → (reason, event.data keys taken from the person's sample)
    "applied": (None, ()),
    "offer_extended": (None, ("position", "hr_contact", "respond_by")),
    "offer_accepted": (
        None,
        ("start_date", "start_place", "hr_contact", "documents", "medical_check", "position", "salary"),
    ),
    "offer_declined": ("other_offer", ("position",)),
    "final_interview_failed": (None, ()),
    "job_opened": (None, ()),
    "hired": (None, ("start_date", "start_place")),
}


def sample_context(
    locale: str | None = None, *, event_type: str = "offer_accepted", contract: EventContract | None = None
) -> dict[str, Any]:
    """A realistic context with every key a real send provides (for ``campaigns validate`` and previews): sample
    rows, shaped by :func:`outreach.pipeline.context.shape_context` like every send.

    ``locale`` picks a Chinese or English sample person; ``event_type`` shapes ``event`` (the offer letter's
    data by default). With the event data ``contract``, ``event.data`` holds exactly the fields it declares: the
    sample person's value where it has one of the declared type, else the contract's example. The result is a fresh
    copy each call.
    """
    person = _SAMPLE_PEOPLE["zh" if (locale or "").lower().startswith("zh") else "en"]
    concerns = ["growth", "pay", "remote"]
    sample = person["candidate"]
    candidate = Candidate(
        id=0,
        external_id=sample["external_id"],
        name=sample["name"],
        locale=locale or sample["locale"],
        timezone=sample["timezone"],
        stage="offer",
        source="referral",
        tags=["backend", *(f"concern:{concern}" for concern in concerns)],
    )
    job = Job(
        external_id="job-4471",
        **person["job"],
        booking_url="https://book.example.com/interview/job-4471",
        salary_min=35000,
        salary_max=50000,
        tags=["backend", "python", "platform"],
    )
    offer_data: dict[str, Any] = {
        "start_date": "2026-03-02",
        "start_place": person["start_place"],
        "hr_contact": dict(person["hr_contact"]),
        "documents": list(person["documents"]),
        "medical_check": dict(person["medical_check"]),
        "position": job.title,
        "salary": person["salary"],
        "respond_by": "2026-02-13",
    }
    reason, data_keys = _SAMPLE_EVENT_DATA.get(event_type, (None, ()))
    if contract is None:
        data = {key: offer_data[key] for key in data_keys}
    else:
        data = contract.example(event_type)
        for key in data:
            if key in offer_data and not contract.check(event_type, {**data, key: offer_data[key]}):
                data[key] = offer_data[key]
    event = {"type": event_type, "reason": reason, "occurred_at": "2026-02-09T09:30:00+08:00", "data": data}
    message = OutboundMessage(
        id=SAMPLE_MESSAGE_ID,
        candidate_id=0,
        channel=Channel.EMAIL.value,
        campaign="offer_letter",
        category="transactional",
        created_at=datetime(2026, 2, 9, 1, 30, tzinfo=UTC),
    )
    return shape_context(
        message,
        candidate,
        Enrollment(context={"event": event}),
        job,
        company=dict(SAMPLE_COMPANY),
        unsubscribe=SAMPLE_UNSUBSCRIBE,
    )
