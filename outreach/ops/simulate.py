"""Run the real campaigns and policies over a synthetic cohort on a virtual clock (``outreach campaigns simulate``).

HR changes a cadence, a cap or a quiet-hours window and wants to know what it does to candidates before it ships.
:func:`simulate` answers with a year (or any span) of recruiting compressed into seconds:

* a fresh in-memory SQLite database with the service's own tables;
* the campaigns from the campaigns folder (all of them, or only the ones named; a campaign named explicitly runs
  even when its file says ``enabled: false``, so a draft can be tried before it goes live) and the policy file
  beside them, unchanged except for ``rate_limits``: provider pacing is about wall-clock throughput and means
  nothing on a virtual clock;
* a synthetic cohort drawn from ``seed``: names, emails and valid phone numbers in each candidate's country, mostly
  Shanghai with candidates elsewhere in Asia, in Europe and in the Americas, en and zh-CN, tags, sources, nurture
  consent, and a life story (an application at any hour of any day, replies, an out-of-office auto-reply now and
  then, offers accepted with the onboarding data or declined with a reason, final-interview rejections, hires,
  jobs reopening for the talent pool);
* the service itself: every story event goes through :func:`outreach.pipeline.enrollment.record_event` (replies through
  :func:`~outreach.pipeline.enrollment.record_reply`, auto-replies through
  :func:`~outreach.pipeline.enrollment.pause_for_out_of_office`); at every instant the scheduler runs the passes of
  :meth:`Scheduler.tick <outreach.pipeline.scheduler.Scheduler.tick>` that move messages (cron firings, due steps, the
  sweeper releasing held rows; passes with nothing due are not run, and passes that only raise HR alerts are left
  out), and everything they queue goes through :func:`outreach.pipeline.delivery.deliver` with the rules at schedule and
  send time, template rendering included. Only the providers are fakes that record the call; nothing leaves the
  process.

The clock (:func:`outreach.core.clock.set_clock`) jumps from one interesting instant to the next (the next story
event, the earliest due enrollment step, the earliest held message, the next cron firing) instead of stepping
through every minute. Candidates never affect one another (caps, windows, replies and enrollments are all per
candidate), so the cohort is cut into :data:`SHARDS` parts, each with its own database, run side by side in
worker processes when there are cores for them.

What the report counts, from the database and the fake providers at the end:

* **sent**: outbox rows that ended ``sent``, per campaign and per candidate (max and p50, the lower median, over
  the candidates the campaign enrolled; over the whole cohort for all campaigns together);
* **deferred**: messages a rule held at least once (each policy decision is recorded as it is made; the
  out-of-office pause, which holds messages outside the policy engine, is recorded as it happens), by rule, with
  the longest single deferral;
* **dropped**: rows that ended without being sent (``suppressed``, ``cancelled``, ``skipped``, ``failed``), by
  the rule on the row; rows still held or pending when the simulation ends are counted as *waiting*;
* **outside window**: every sent message re-checked on its own: its send time, read on the wall clock of the
  recipient's real timezone (the cohort's, not the one the service inferred), must fall in the quiet-hours window
  the policy file gives that channel, category and phone country, on a working day when the window asks for one;
* **cap violations**: every cap of the policy file re-checked over each candidate's sent messages; a message is a
  violation when it is the ``max + 1``-th inside one ``per`` window;
* **duplicate sends**: provider calls for an outbox id that was already handed to a provider;
* **promises**: first contact within 48 hours of an application and the offer letter within 24 hours of an
  acceptance: the first message sent from the enrollments the event started. Events whose deadline lies after
  the end of the simulation and that have no message yet are *too recent to judge*, not failures.

The run is deterministic for a seed, whatever the number of processes: the cohort comes from
``random.Random(seed)``, and so do the outbox ids the scheduler mints (their hash places a deferred message inside
the quiet-hours ``spread``).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import random
import sys
import threading
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import phonenumbers
from croniter import croniter
from sqlalchemy import Engine, create_engine, func, select
from sqlalchemy import event as sqlalchemy_event
from sqlalchemy.orm import Session
from sqlalchemy.pool import StaticPool

from outreach.core.clock import FixedClock, current, set_clock, utcnow
from outreach.core.config import Settings
from outreach.core.errors import CampaignError
from outreach.core.models import (
    Base,
    Candidate,
    CandidateEvent,
    Enrollment,
    EnrollmentStatus,
    MessageStatus,
    OutboundMessage,
    Stage,
)
from outreach.domain.campaigns import Campaign, CampaignSet, EventType
from outreach.domain.candidates import CandidateIn, JobIn, upsert_candidate, upsert_job
from outreach.pipeline.delivery import deliver
from outreach.pipeline.enrollment import EventIn, pause_for_out_of_office, record_event, record_reply
from outreach.pipeline.scheduler import TickResult
from outreach.policy.base import Decision, Subject, Verdict
from outreach.policy.calendar import BusinessCalendar, in_window, localize
from outreach.policy.config import PolicySpec, load_policies
from outreach.policy.engine import PolicyEngine
from outreach.policy.quiet_hours import ALL_DAY, window_for
from outreach.providers.base import EmailMessage, EmailProvider, Providers, SendResult, SmsMessage, SmsProvider
from outreach.service.runtime import Runtime

__all__ = ["CampaignStats", "Promise", "RuleCount", "SimulationReport", "Violation", "simulate"]

SENT = frozenset({MessageStatus.SENT.value, MessageStatus.DELIVERED.value})
WAITING = frozenset({MessageStatus.HELD.value, MessageStatus.PENDING.value})
POOL_STAGES = (Stage.DECLINED.value, Stage.REJECTED.value, Stage.TALENT_POOL.value)
MAX_VIOLATIONS_LISTED = 20

REGIONS = ("China", "rest of Asia", "Europe", "Americas")
LIFE_EVENTS = {
    "applied": "applications",
    "reply": "replies",
    "auto_reply": "out-of-office auto-replies",
    "offer_extended": "offers",
    "offer_accepted": "accepted",
    "offer_declined": "declined",
    "final_interview_failed": "final-interview rejections",
    "hired": "hires",
    "job_reopened": "jobs reopened",
    "job_opened": "talent-pool candidates shortlisted for them",
}
"""What the synthetic world did, in the order the report lists it."""

#: The seed's timing promises: (what, the event that starts the clock, how long it may take).
PROMISES: tuple[tuple[str, EventType, timedelta], ...] = (
    ("first contact within 48h of application", EventType.APPLIED, timedelta(hours=48)),
    ("offer letter within 24h of acceptance", EventType.OFFER_ACCEPTED, timedelta(hours=24)),
)


# -- the report --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CampaignStats:
    name: str
    enrolled: int
    sent: int
    email: int
    sms: int
    per_candidate_max: int
    per_candidate_p50: int
    deferred: int
    dropped: int
    waiting: int
    outside_window: int
    cap_violations: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "enrolled": self.enrolled,
            "sent": self.sent,
            "email": self.email,
            "sms": self.sms,
            "per_candidate": {"max": self.per_candidate_max, "p50": self.per_candidate_p50},
            "deferred": self.deferred,
            "dropped": self.dropped,
            "waiting": self.waiting,
            "outside_window": self.outside_window,
            "cap_violations": self.cap_violations,
        }


@dataclass(frozen=True)
class RuleCount:
    """Messages of one campaign held (or dropped) by one rule."""

    rule: str
    campaign: str
    messages: int
    status: str | None = None  # dropped: the final status
    longest: timedelta | None = None  # deferred: the longest single deferral

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"rule": self.rule, "campaign": self.campaign, "messages": self.messages}
        if self.status is not None:
            out["status"] = self.status
        if self.longest is not None:
            out["longest_wait_seconds"] = int(self.longest.total_seconds())
        return out


@dataclass(frozen=True)
class Promise:
    name: str
    event: str
    within: timedelta
    applicable: bool  # a simulated campaign starts on this event
    judged: int
    met: int
    too_recent: int
    longest: timedelta | None  # the longest delay to a first message (None: no message at all)
    never: int  # judged events that never got a message

    @property
    def share(self) -> float | None:
        return self.met / self.judged if self.judged else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "event": self.event,
            "within_hours": self.within.total_seconds() / 3600,
            "applicable": self.applicable,
            "judged": self.judged,
            "met": self.met,
            "share": self.share,
            "never": self.never,
            "too_recent": self.too_recent,
            "longest_seconds": None if self.longest is None else int(self.longest.total_seconds()),
        }


@dataclass(frozen=True)
class Violation:
    kind: str  # outside_window, cap, duplicate
    message_id: str
    campaign: str
    channel: str
    candidate: str  # the synthetic candidate's external id
    at: datetime
    detail: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "message_id": self.message_id,
            "campaign": self.campaign,
            "channel": self.channel,
            "candidate": self.candidate,
            "at": self.at.isoformat(),
            "detail": self.detail,
        }


@dataclass(frozen=True)
class SimulationReport:
    candidates: int
    days: int
    seed: int
    start: datetime
    end: datetime
    company_timezone: str
    campaign_names: tuple[str, ...]
    cohort: dict[str, Any]
    life_events: dict[str, int]
    campaigns: tuple[CampaignStats, ...]
    overall: CampaignStats
    deferrals: tuple[RuleCount, ...]
    drops: tuple[RuleCount, ...]
    promises: tuple[Promise, ...]
    outside_window: int
    cap_violations: int
    duplicate_sends: int
    violations: tuple[Violation, ...]
    clock_stops: int  # how many instants the virtual clock stopped at, over all shards

    @property
    def ok(self) -> bool:
        """No message outside its window, no cap exceeded, nothing sent twice."""
        return self.outside_window == 0 and self.cap_violations == 0 and self.duplicate_sends == 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "parameters": {
                "candidates": self.candidates,
                "days": self.days,
                "seed": self.seed,
                "start": self.start.isoformat(),
                "end": self.end.isoformat(),
                "company_timezone": self.company_timezone,
                "campaigns": list(self.campaign_names),
            },
            "cohort": self.cohort,
            "life_events": self.life_events,
            "campaigns": [c.to_dict() for c in self.campaigns],
            "overall": self.overall.to_dict(),
            "deferrals": [d.to_dict() for d in self.deferrals],
            "drops": [d.to_dict() for d in self.drops],
            "promises": [p.to_dict() for p in self.promises],
            "checks": {
                "outside_window": self.outside_window,
                "cap_violations": self.cap_violations,
                "duplicate_sends": self.duplicate_sends,
                "ok": self.ok,
            },
            "violations": [v.to_dict() for v in self.violations],
            "clock_stops": self.clock_stops,
        }

    def render_table(self) -> str:
        zone = ZoneInfo(self.company_timezone)
        lines: list[str] = []
        start, end = self.start.astimezone(zone), self.end.astimezone(zone)
        lines.append(
            f"Simulated {self.candidates:,} candidates over {self.days} days, {start:%Y-%m-%d %H:%M} → "
            f"{end:%Y-%m-%d %H:%M} ({self.company_timezone}), seed {self.seed}; no message left the process."
        )
        cohort = self.cohort
        locales = ", ".join(f"{n} {name}" for name, n in cohort["locales"].items())
        regions = ", ".join(f"{n} {name}" for name, n in cohort["regions"].items())
        lines.append(
            f"Cohort: {locales}; {regions}; {cohort['with_phone']} with a phone, {cohort['with_email']} with an "
            f"email, {cohort['nurture_consent']} consent to nurture, {cohort['talent_pool_at_start']} in the talent "
            "pool at the start."
        )
        events = ", ".join(f"{n:,} {LIFE_EVENTS.get(name, name)}" for name, n in self.life_events.items())
        lines.append(f"Life events: {events}.")
        lines.append("")

        header = (
            "campaign",
            "enrolled",
            "sent",
            "email",
            "sms",
            "max/cand",
            "p50/cand",
            "deferred",
            "dropped",
            "waiting",
            "outside window",
            "cap violations",
        )
        rows = [
            (
                c.name,
                f"{c.enrolled:,}",
                f"{c.sent:,}",
                f"{c.email:,}",
                f"{c.sms:,}",
                str(c.per_candidate_max),
                str(c.per_candidate_p50),
                f"{c.deferred:,}",
                f"{c.dropped:,}",
                f"{c.waiting:,}",
                str(c.outside_window),
                str(c.cap_violations),
            )
            for c in (*self.campaigns, self.overall)
        ]
        lines += _table(header, rows, separator_before_last=True)
        lines.append("")

        lines.append("Deferred by rule (messages held at least once; one message can be held by several rules)")
        if self.deferrals:
            lines += _table(
                ("rule", "campaign", "messages", "longest wait"),
                [(d.rule, d.campaign, f"{d.messages:,}", _human(d.longest)) for d in self.deferrals],
                left=2,
            )
        else:
            lines.append("  none")
        lines.append("")

        lines.append("Dropped by rule (never sent)")
        if self.drops:
            lines += _table(
                ("rule", "campaign", "status", "messages"),
                [(d.rule, d.campaign, d.status or "", f"{d.messages:,}") for d in self.drops],
                left=3,
            )
        else:
            lines.append("  none")
        lines.append("")

        lines.append("Promises")
        for promise in self.promises:
            if not promise.applicable:
                lines.append(f"  {promise.name}: not simulated (no selected campaign starts on {promise.event})")
                continue
            share = "n/a" if promise.share is None else f"{promise.share:.1%}"
            detail = f"{promise.met:,}/{promise.judged:,} met ({share}), longest {_human(promise.longest)}"
            if promise.never:
                detail += f", {promise.never:,} never contacted"
            if promise.too_recent:
                detail += f", {promise.too_recent:,} too recent to judge"
            lines.append(f"  {promise.name}: {detail}")
        lines.append("")

        lines.append("Checks")
        lines.append(f"  messages sent outside their window: {self.outside_window}")
        lines.append(f"  frequency-cap violations: {self.cap_violations}")
        lines.append(f"  duplicate provider calls: {self.duplicate_sends}")
        for violation in self.violations:
            lines.append(
                f"  ! {violation.kind} {violation.campaign} {violation.channel} {violation.message_id} "
                f"({violation.candidate}): {violation.detail}"
            )
        lines.append("  OK" if self.ok else "  FAILED")
        return "\n".join(lines)


def _table(
    header: Sequence[str], rows: Sequence[Sequence[str]], *, left: int = 1, separator_before_last: bool = False
) -> list[str]:
    """Text columns (the first ``left``) aligned left, numbers right."""
    widths = [max(len(header[i]), *(len(row[i]) for row in rows)) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        aligned = (
            cell.ljust(width) if index < left else cell.rjust(width)
            for index, (cell, width) in enumerate(zip(cells, widths, strict=True))
        )
        return ("  " + "  ".join(aligned)).rstrip()

    out = [line(header)]
    for index, row in enumerate(rows):
        if separator_before_last and index == len(rows) - 1:
            out.append("  " + "-" * (sum(widths) + 2 * (len(widths) - 1)))
        out.append(line(row))
    return out


def _human(period: timedelta | None) -> str:
    if period is None:
        return "-"
    minutes = int(period.total_seconds() // 60)
    days, rest = divmod(minutes, 1440)
    hours, minutes = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes:02d}m"
    return f"{minutes}m"


def _p50(values: Sequence[int]) -> int:
    """The lower median (nearest rank), 0 for nothing."""
    ordered = sorted(values)
    return ordered[(len(ordered) - 1) // 2] if ordered else 0


# -- the synthetic cohort ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Place:
    zone: str
    country: str
    region: str
    weight: float
    zh_share: float
    phone_implies_zone: bool  # the phone's country has one timezone: the ATS may leave the timezone out


PLACES = (
    _Place("Asia/Shanghai", "CN", "China", 0.62, 0.92, True),
    _Place("Asia/Hong_Kong", "HK", "rest of Asia", 0.04, 0.6, True),
    _Place("Asia/Singapore", "SG", "rest of Asia", 0.04, 0.4, True),
    _Place("Asia/Tokyo", "JP", "rest of Asia", 0.02, 0.2, True),
    _Place("Europe/Berlin", "DE", "Europe", 0.05, 0.15, True),
    _Place("Europe/London", "GB", "Europe", 0.05, 0.15, False),
    _Place("Europe/Paris", "FR", "Europe", 0.03, 0.1, True),
    _Place("Europe/Amsterdam", "NL", "Europe", 0.02, 0.1, True),
    _Place("America/New_York", "US", "Americas", 0.05, 0.15, False),
    _Place("America/Los_Angeles", "US", "Americas", 0.04, 0.2, False),
    _Place("America/Chicago", "US", "Americas", 0.02, 0.1, False),
    _Place("America/Toronto", "CA", "Americas", 0.02, 0.15, False),
)


def _words(text: str) -> tuple[str, ...]:
    return tuple(text.split())


EN_FIRST = _words(
    "Alex Jordan Taylor Morgan Sam Chris Emma Liam Olivia Noah Sophia Lucas Mia Ethan Hannah Daniel "
    "Laura Jonas Lena Marie Thomas Chloe Raj Priya Kenji Yuki Aisha Mateo Sara Felix Nora Omar Ines "
    "David Julia"
)
EN_LAST = _words(
    "Smith Johnson Brown Garcia Miller Müller Schmidt Dubois Martin Bakker Jansen Tanaka Sato Tan Lim "
    "Wong Chen Patel Nguyen Kim Rossi Novak Silva Khan Fischer Lambert Evans Walker Lee Ng"
)
ZH_SURNAMES = (
    ("王", "wang"),
    ("李", "li"),
    ("张", "zhang"),
    ("刘", "liu"),
    ("陈", "chen"),
    ("杨", "yang"),
    ("黄", "huang"),
    ("赵", "zhao"),
    ("吴", "wu"),
    ("周", "zhou"),
    ("徐", "xu"),
    ("孙", "sun"),
    ("马", "ma"),
    ("朱", "zhu"),
    ("胡", "hu"),
    ("郭", "guo"),
    ("何", "he"),
    ("林", "lin"),
    ("罗", "luo"),
    ("高", "gao"),
)
ZH_GIVEN = (
    ("伟", "wei"),
    ("芳", "fang"),
    ("娜", "na"),
    ("敏", "min"),
    ("静", "jing"),
    ("磊", "lei"),
    ("洋", "yang"),
    ("艳", "yan"),
    ("勇", "yong"),
    ("杰", "jie"),
    ("涛", "tao"),
    ("明", "ming"),
    ("超", "chao"),
    ("秀英", "xiuying"),
    ("晓东", "xiaodong"),
    ("子涵", "zihan"),
    ("浩然", "haoran"),
    ("欣怡", "xinyi"),
    ("雨桐", "yutong"),
    ("一鸣", "yiming"),
)
SOURCES = (
    ("linkedin", 0.2),
    ("boss_zhipin", 0.22),
    ("liepin", 0.1),
    ("referral", 0.15),
    ("careers_site", 0.18),
    ("campus", 0.08),
    ("indeed", 0.07),
)
STACKS = ("python", "java", "go", "frontend", "data", "ml", "mobile", "qa")
CONCERNS = ("growth", "pay", "remote")
DECLINE_REASONS = (
    "other_offer",
    "counter_offer",
    "compensation",
    "location",
    "timing",
    "personal",
    "role_fit",
    "Decided to stay closer to family for now",
)
HR_CONTACTS = (
    {"name": "李娜", "email": "li.na@example.com", "phone": "+862150001234"},
    {"name": "Chen Jie", "email": "chen.jie@example.com", "phone": "+862150001235"},
    {"name": "Anna Keller", "email": "anna.keller@example.com"},
    {"name": "王磊"},
)
OFFICES = {
    "Shanghai": "18F, 1000 Century Avenue, Pudong, Shanghai",
    "Beijing": "6F, 1 Zhongguancun Street, Haidian, Beijing",
    "Shenzhen": "Tower B, 9 Keyuan Road, Nanshan, Shenzhen",
    "Hangzhou": "3F, 88 Wenyi West Road, Hangzhou",
    "Singapore": "20 Collyer Quay, #10-01, Singapore",
    "Berlin": "Rosenthaler Straße 40, 10178 Berlin",
}
DOCUMENTS = {
    "en": ["Passport or national ID card", "Original degree certificate", "Two passport-size photos"],
    "zh-CN": ["身份证原件及复印件", "学历、学位证书原件", "两张一寸免冠照片"],
}

#: (external id, title, department, office, tags, salary range)
JOBS: tuple[tuple[str, str, str, str, tuple[str, ...], int, int], ...] = (
    ("be-101", "Backend Engineer (Python)", "Platform", "Shanghai", ("stack:python",), 30000, 50000),
    ("be-102", "Senior Java Engineer", "Payments", "Shanghai", ("stack:java",), 35000, 55000),
    ("in-103", "Go Infrastructure Engineer", "Infrastructure", "Beijing", ("stack:go",), 35000, 60000),
    ("fe-104", "Frontend Engineer (React)", "Product", "Shenzhen", ("stack:frontend",), 25000, 45000),
    ("da-105", "Data Engineer", "Data", "Shanghai", ("stack:data", "stack:python"), 30000, 50000),
    ("ml-106", "Machine Learning Engineer", "AI Lab", "Hangzhou", ("stack:ml", "stack:python"), 40000, 70000),
    ("mo-107", "Android Engineer", "Mobile", "Shenzhen", ("stack:mobile",), 28000, 48000),
    ("sr-108", "Site Reliability Engineer", "Infrastructure", "Singapore", ("stack:go",), 8000, 12000),
    ("qa-109", "QA Automation Engineer", "Quality", "Hangzhou", ("stack:qa", "stack:python"), 20000, 35000),
    ("se-110", "Solutions Engineer, Europe", "Sales Engineering", "Berlin", ("stack:java",), 6000, 8500),
    ("fe-111", "Developer Advocate", "Developer Relations", "Shanghai", ("stack:frontend",), 30000, 45000),
    ("be-112", "高级后端工程师", "平台研发部", "Shanghai", ("stack:java", "stack:go"), 40000, 65000),
)


@dataclass
class _Person:
    external_id: str
    zone: ZoneInfo
    country: str | None  # the phone's country (None: no phone)
    region: str
    locale: str
    fields: dict[str, Any]
    pool: bool
    db_id: int = 0


@dataclass(frozen=True)
class _Happening:
    """One thing that happens in the synthetic world: an ATS event, a reply, an auto-reply, a job reopening."""

    at: datetime
    kind: str  # an EventType value, "reply", "auto_reply" or "job_reopened"
    person: int  # index in the cohort; -1 for job_reopened
    job: str | None = None
    reason: str | None = None
    data: dict[str, Any] = field(default_factory=dict)


def _weighted(rng: random.Random, options: Sequence[tuple[Any, float]]) -> Any:
    return rng.choices([o for o, _ in options], weights=[w for _, w in options])[0]


def _ascii(text: str) -> str:
    cleaned = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    return "".join(ch for ch in cleaned.lower() if ch.isalnum())


def _phone(rng: random.Random, region: str) -> str:
    """A valid mobile number of ``region`` in E.164: the library's example with other last digits."""
    example = phonenumbers.example_number_for_type(region, phonenumbers.PhoneNumberType.MOBILE)
    assert example is not None, region
    national = str(example.national_number)
    for _ in range(20):
        digits = national[:-4] + f"{rng.randrange(10_000):04d}"
        number = phonenumbers.parse(f"+{example.country_code}{digits}")
        if phonenumbers.is_valid_number(number):
            return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)
    return phonenumbers.format_number(example, phonenumbers.PhoneNumberFormat.E164)


def _person(rng: random.Random, index: int) -> _Person:
    place: _Place = _weighted(rng, [(p, p.weight) for p in PLACES])
    locale = "zh-CN" if rng.random() < place.zh_share else "en"
    if locale == "zh-CN":
        (surname, surname_latin), (given, given_latin) = rng.choice(ZH_SURNAMES), rng.choice(ZH_GIVEN)
        name, local_part = surname + given, f"{given_latin}.{surname_latin}"
    else:
        first, last = rng.choice(EN_FIRST), rng.choice(EN_LAST)
        name, local_part = f"{first} {last}", f"{_ascii(first)}.{_ascii(last)}"
    external_id = f"sim-{index + 1:05d}"
    has_phone = rng.random() < 0.95
    has_email = not has_phone or rng.random() < 0.99
    stacks = rng.sample(STACKS, rng.choice((1, 1, 2)))
    concerns = rng.sample(CONCERNS, rng.choice((0, 1, 1, 2)))
    fields: dict[str, Any] = {
        "external_id": external_id,
        "name": name,
        "email": f"{local_part}{index + 1}@{rng.choice(('example.com', 'example.org', 'example.net'))}"
        if has_email
        else None,
        "phone": _phone(rng, place.country) if has_phone else None,
        "locale": locale,
        # Some ATS records carry no timezone; the service then reads it off the phone number.
        "timezone": None if has_phone and place.phone_implies_zone and rng.random() < 0.1 else place.zone,
        "source": _weighted(rng, SOURCES),
        "tags": [f"stack:{s}" for s in stacks] + [f"concern:{c}" for c in concerns],
        "nurture_consent": rng.random() < 0.6,
    }
    return _Person(
        external_id=external_id,
        zone=ZoneInfo(place.zone),
        country=place.country if has_phone else None,
        region=place.region,
        locale=locale,
        fields=fields,
        pool=rng.random() < 0.2,
    )


def _local_moment(rng: random.Random, day: date, zone: ZoneInfo, business_share: float) -> datetime:
    """A moment on ``day`` in ``zone``: office hours with probability ``business_share``, else any hour."""
    minute = rng.randrange(9 * 60, 18 * 60) if rng.random() < business_share else rng.randrange(24 * 60)
    wall = datetime.combine(day, time()) + timedelta(minutes=minute, seconds=rng.randrange(60))
    return localize(wall, zone)


def _office_hours(moment: datetime, zone: ZoneInfo, hour: int = 10, minute: int = 30) -> datetime:
    """The next weekday at ``hour:minute`` in ``zone`` on or after ``moment``'s local date."""
    day = moment.astimezone(zone).date()
    while day.weekday() >= 5:
        day += timedelta(days=1)
    return localize(datetime.combine(day, time(hour, minute)), zone)


def _story(
    rng: random.Random, index: int, person: _Person, start: datetime, end: datetime, company: ZoneInfo
) -> list[_Happening]:
    """One candidate's life: an application and what follows it. Times past ``end`` are dropped later.

    The candidate acts on their own clock (applications at any hour, replies); HR acts in office hours of the
    company's timezone (offers, rejections).
    """
    span = (end - start).total_seconds()
    applied = start + timedelta(seconds=rng.uniform(0, span))
    moment = _local_moment(rng, applied.astimezone(person.zone).date(), person.zone, 0.65)
    if start <= moment < end:
        applied = moment
    job = rng.choice([j for j in JOBS if set(j[4]) & set(person.fields["tags"])] or list(JOBS))
    job_id, title, office = job[0], job[1], job[3]
    out = [_Happening(applied, EventType.APPLIED.value, index, job=job_id)]

    def days(low: float, high: float) -> timedelta:
        return timedelta(seconds=rng.uniform(low, high) * 86400)

    # Candidates answer the job-description mail: only those with an email reply or auto-reply to it.
    if person.fields["email"] and rng.random() < 0.03:
        out.append(_Happening(applied + timedelta(minutes=2), "auto_reply", index))
    if person.fields["email"] and rng.random() < 0.36:
        delay = min(timedelta(hours=rng.expovariate(1 / 18)), timedelta(days=6)) + timedelta(minutes=10)
        out.append(_Happening(applied + delay, "reply", index))

    roll = rng.random()
    if roll < 0.18:
        offered = _office_hours(applied + days(10, 35), company, rng.randrange(10, 18))
        hr = dict(rng.choice(HR_CONTACTS))
        offer_data = {
            "position": title,
            "hr_contact": hr,
            "respond_by": (offered + timedelta(days=7)).date().isoformat(),
        }
        out.append(_Happening(offered, EventType.OFFER_EXTENDED.value, index, job=job_id, data=offer_data))
        if rng.random() < 0.35:
            out.append(_Happening(offered + days(0.1, 2.5), "reply", index))
        decision = rng.random()
        if decision < 0.6:
            accepted = offered + days(0.2, 6)
            start_day = (accepted + days(14, 45)).astimezone(person.zone).date()
            while start_day.weekday() >= 5:
                start_day += timedelta(days=1)
            data: dict[str, Any] = {
                "position": title,
                "start_date": start_day.isoformat(),
                "start_place": OFFICES.get(office, office),
                "hr_contact": hr,
            }
            if rng.random() < 0.7:
                data["documents"] = list(DOCUMENTS[person.locale])
            if rng.random() < 0.5:
                deadline = start_day - timedelta(days=7)
                data["medical_check"] = {"place": "iKang Health Centre", "deadline": deadline.isoformat()}
            out.append(_Happening(accepted, EventType.OFFER_ACCEPTED.value, index, job=job_id, data=data))
            first_day = localize(datetime.combine(start_day, time(9, 30)), person.zone)
            out.append(_Happening(first_day, EventType.HIRED.value, index, job=job_id))
        elif decision < 0.88:
            reason = rng.choice(DECLINE_REASONS)
            out.append(
                _Happening(
                    offered + days(1, 8),
                    EventType.OFFER_DECLINED.value,
                    index,
                    job=job_id,
                    reason=reason,
                    data={"position": title},
                )
            )
    elif roll < 0.32:
        rejected = _office_hours(applied + days(7, 30), company, rng.randrange(10, 18))
        out.append(_Happening(rejected, EventType.FINAL_INTERVIEW_FAILED.value, index, job=job_id))
    return out


# -- the world's plumbing: clock, ids, providers, recorded decisions ---------------------------------------------


class _FakeEmail(EmailProvider):
    """Records the outbox id of every call and answers like a provider that accepted the message."""

    name = "simulator"

    def __init__(self, calls: list[str]) -> None:
        self.calls = calls

    def send_email(self, message: EmailMessage) -> SendResult:
        self.calls.append(message.message_id)
        return SendResult(self.name, f"sim-{len(self.calls)}")


class _FakeSms(SmsProvider):
    name = "simulator"

    def __init__(self, calls: list[str]) -> None:
        self.calls = calls

    def send_sms(self, message: SmsMessage) -> SendResult:
        self.calls.append(message.message_id)
        return SendResult(self.name, f"sim-{len(self.calls)}")


class _RecordingPolicy(PolicyEngine):
    """The real engine, remembering every deferral it decides: (rule, campaign) → message id → longest wait."""

    def __init__(self, spec: PolicySpec, settings: Settings) -> None:
        super().__init__(spec, settings, on_decision=self._observe)
        self.deferrals: dict[tuple[str, str], dict[str, timedelta]] = defaultdict(dict)

    def record(self, rule: str, campaign: str, message_id: str, wait: timedelta) -> None:
        seen = self.deferrals[(rule, campaign)]
        seen[message_id] = max(wait, seen.get(message_id, timedelta(0)))

    def _observe(self, subject: Subject, decision: Decision) -> None:
        if decision.verdict is Verdict.DEFER and decision.until is not None and subject.message_id:
            self.record(decision.rule, subject.campaign, subject.message_id, decision.until - subject.now)


def _seeded_ids(rng: random.Random) -> Callable[[], str]:
    """Outbox ids from ``rng``, so a seed gives the same quiet-hours spread each time."""

    def seeded() -> str:
        return f"{rng.getrandbits(128):032x}"

    return seeded


@contextmanager
def _quiet_logs() -> Iterator[None]:
    """The scheduler logs every release of held rows; over a simulated year that is noise."""
    logger = logging.getLogger("outreach")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _memory_engine() -> Engine:
    engine = create_engine("sqlite://", poolclass=StaticPool, connect_args={"check_same_thread": False})

    def pragmas(connection: Any, _record: Any) -> None:
        cursor = connection.cursor()
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    sqlalchemy_event.listen(engine, "connect", pragmas)
    Base.metadata.create_all(engine)
    return engine


def _select_campaigns(campaigns: CampaignSet, names: Sequence[str]) -> CampaignSet:
    if not names:
        return campaigns
    unknown = sorted(set(names) - set(campaigns.campaigns))
    if unknown:
        known = ", ".join(sorted(campaigns.campaigns))
        raise ValueError(f"no campaign named {', '.join(unknown)} (known: {known})")
    chosen: dict[str, Campaign] = {}
    for name in dict.fromkeys(names):
        campaign = campaigns.campaigns[name]
        chosen[name] = campaign if campaign.enabled else campaign.model_copy(update={"enabled": True})
    return CampaignSet(chosen, {name: campaigns.sources[name] for name in chosen if name in campaigns.sources})


def _start_instant(start: datetime | None, zone: ZoneInfo) -> datetime:
    if start is None:
        today = utcnow().astimezone(zone).date()
        return localize(datetime.combine(today, time()), zone)
    if start.tzinfo is None:
        return localize(start, zone)
    return start.astimezone(UTC)


# -- the run -----------------------------------------------------------------------------------------------------


class _World:
    """One shard of the cohort living through the simulated span, on its own database."""

    def __init__(
        self,
        runtime: Runtime,
        policy: _RecordingPolicy,
        people: Sequence[_Person],
        timeline: Sequence[_Happening],
        queue: list[str],
    ) -> None:
        self.runtime = runtime
        self.policy = policy
        self.people = people
        self.timeline = timeline
        self.queue = queue
        self.life_events: Counter[str] = Counter()
        steps = (
            select(func.min(Enrollment.next_run_at))
            .where(Enrollment.status == EnrollmentStatus.ACTIVE.value, Enrollment.next_run_at.is_not(None))
            .scalar_subquery()
        )
        held = (
            select(func.min(OutboundMessage.not_before))
            .where(OutboundMessage.status == MessageStatus.HELD.value)
            .scalar_subquery()
        )
        self._due_query = select(steps, held)

    def create_people(self) -> None:
        settings = self.runtime.settings
        with Session(self.runtime.engine, expire_on_commit=False) as session, session.begin():
            for external_id, title, department, office, tags, low, high in JOBS:
                data = JobIn(
                    external_id=external_id,
                    title=title,
                    department=department,
                    location=office,
                    description=(
                        f"Join the {department} team in {office}.\n\n"
                        "You will design, build and run services our customers rely on every day, "
                        "with a team that values clear writing and careful reviews."
                    ),
                    salary_min=low,
                    salary_max=high,
                    booking_url=f"https://book.example.com/interview/{external_id}",
                    tags=list(tags),
                )
                upsert_job(session, data)
            for person in self.people:
                fields = {k: v for k, v in person.fields.items() if v is not None}
                candidate = upsert_candidate(
                    session, CandidateIn.model_validate(fields, context={"settings": settings}), settings
                )
                if person.pool:
                    candidate.stage = Stage.TALENT_POOL.value
                session.flush()
                person.db_id = candidate.id

    def happen(self, batch: Sequence[_Happening]) -> None:
        runtime = self.runtime
        settings = runtime.settings
        with Session(runtime.engine, expire_on_commit=False) as session, session.begin():
            for happening in batch:
                if happening.kind == "job_reopened":
                    self._job_reopened(session, happening)
                    continue
                person = self.people[happening.person]
                if happening.kind in ("reply", "auto_reply"):
                    candidate = session.get(Candidate, person.db_id)
                    assert candidate is not None
                    if happening.kind == "reply":
                        self._reply(session, candidate, happening.at)
                    else:
                        self._auto_reply(session, candidate, happening.at)
                    self.life_events[happening.kind] += 1
                    continue
                event_in = EventIn(
                    type=EventType(happening.kind),
                    job_id=happening.job,
                    reason=happening.reason,
                    occurred_at=happening.at,
                    data=happening.data,
                )
                record_event(
                    session,
                    runtime.campaigns,
                    person.external_id,
                    event_in,
                    company_tz=settings.company_timezone,
                    calendar=self.policy.calendar,
                )
                self.life_events[happening.kind] += 1

    def _reply(self, session: Session, candidate: Candidate, at: datetime) -> None:
        # As the inbound webhooks do: a reply stops the sequences that exit on one, if the policy says so.
        if self.policy.spec.stop_on_reply.enabled:
            record_reply(session, self.runtime.campaigns, candidate, at)
        else:
            candidate.last_reply_at = at

    def _auto_reply(self, session: Session, candidate: Candidate, at: datetime) -> None:
        pause = self.policy.spec.stop_on_reply.out_of_office_pause
        pause_for_out_of_office(session, candidate, at, pause)
        held = session.execute(
            select(OutboundMessage.id, OutboundMessage.campaign).where(
                OutboundMessage.candidate_id == candidate.id,
                OutboundMessage.status == MessageStatus.HELD.value,
                OutboundMessage.rule == "out_of_office",
            )
        )
        for message_id, campaign in held:
            self.policy.record("out_of_office", campaign, message_id, pause)

    def _job_reopened(self, session: Session, happening: _Happening) -> None:
        job_tags = set(next(j[4] for j in JOBS if j[0] == happening.job))
        pool = session.scalars(select(Candidate).where(Candidate.stage.in_(POOL_STAGES)).order_by(Candidate.id)).all()
        shortlisted = [c for c in pool if set(c.tags) & job_tags]
        for candidate in shortlisted:
            record_event(
                session,
                self.runtime.campaigns,
                candidate.external_id,
                EventIn(type=EventType.JOB_OPENED, job_id=happening.job, occurred_at=happening.at),
                company_tz=self.runtime.settings.company_timezone,
                calendar=self.policy.calendar,
            )
        self.life_events["job_opened"] += len(shortlisted)

    def due_times(self) -> tuple[datetime | None, datetime | None]:
        """When the service next has work of its own: (the earliest due enrollment step, the earliest held row)."""
        with self.runtime.engine.connect() as connection:
            step, held = connection.execute(self._due_query).one()
        return step, held

    def run(self, clock: FixedClock, start: datetime, end: datetime) -> int:
        """Advance from ``start`` to ``end``, stopping only where something happens; returns the stops made.

        At each stop: the story events of that instant, then the scheduler's own passes in the order
        :meth:`Scheduler.tick <outreach.pipeline.scheduler.Scheduler.tick>` runs them (cron firings, due steps until
        none is left, the sweeper releasing held rows), then delivery of everything they queued. A pass with nothing to
        do is not run: a year has thousands of stops, and an idle pass still costs its transaction.
        """
        runtime = self.runtime
        scheduler = runtime.scheduler
        timeline = self.timeline
        zone = ZoneInfo(runtime.settings.company_timezone)
        firings: list[datetime] = []
        for campaign in runtime.campaigns.scheduled():
            assert campaign.trigger.cron is not None
            schedule = croniter(campaign.trigger.cron, (start - timedelta(seconds=1)).astimezone(zone))
            while (fire_at := schedule.get_next(datetime).astimezone(UTC)) <= end:
                firings.append(fire_at)
        firings.sort()
        # Story events that can start an enrollment; replies and the rest only ever stop or delay one.
        enrolling = {kind.value for kind in EventType if runtime.campaigns.for_event(kind.value)}
        if EventType.JOB_OPENED.value in enrolling:
            enrolling.add("job_reopened")
        next_event = next_firing = 0
        now = start
        stops = 0
        step_at, held_at = self.due_times()
        while True:
            clock.set(now)
            stops += 1
            result = TickResult()
            due = next_event
            while due < len(timeline) and timeline[due].at <= now:
                due += 1
            firing = next_firing < len(firings) and firings[next_firing] <= now
            while next_firing < len(firings) and firings[next_firing] <= now:
                next_firing += 1
            if due > next_event:
                arrived = timeline[next_event:due]
                self.happen(arrived)
                next_event = due
                if any(h.kind in enrolling for h in arrived):
                    step_at = now  # enrollments may have started, due at once
            if firing:
                scheduler.fire_cron(now, result)
                step_at = now
            claimed = 0
            if step_at is not None and step_at <= now:
                claimed = scheduler.run_due(now, result)
            if held_at is not None and held_at <= now:
                scheduler.sweep(now, result)
            while self.queue:
                batch = list(self.queue)
                self.queue.clear()
                for outbox_id in batch:
                    deliver(runtime, outbox_id, now)
            step_at, held_at = self.due_times()
            upcoming = [
                moment
                for moment in (
                    timeline[next_event].at if next_event < len(timeline) else None,
                    firings[next_firing] if next_firing < len(firings) else None,
                    step_at,
                    held_at,
                )
                if moment is not None
            ]
            if not upcoming:
                break
            # Steps still due now (one step right after another, or more than a claim batch) run at the same
            # instant, as the scheduler's next pass would; otherwise the clock moves on.
            following = min(upcoming)
            if following <= now:
                following = now if claimed else now + timedelta(seconds=1)
            if following > end:
                break
            now = following
        return stops


# -- shards: independent parts of the cohort, each on its own database and, when there are cores, its own process ---

SHARDS = 4
"""How many parts the cohort is cut into. Nothing in the service ties one candidate to another (caps, quiet hours,
replies and enrollments are all per candidate; pacing is left out), so each part runs alone and the parts run side
by side. The number is fixed, not taken from the machine, so a seed gives the same report everywhere."""


@dataclass(frozen=True)
class _Row:
    """One outbox row as the report needs it; candidates by external id, enrollments as ``shard:id``."""

    id: str
    candidate: str
    enrollment: str | None
    campaign: str
    channel: str
    category: str
    status: str
    rule: str | None
    sent_at: datetime | None


@dataclass(frozen=True)
class _ShardJob:
    shard: int
    seed: int
    settings: Settings
    campaigns: CampaignSet
    spec: PolicySpec
    people: list[_Person]
    timeline: list[_Happening]
    start: datetime
    end: datetime


@dataclass(frozen=True)
class _ShardResult:
    rows: list[_Row]
    enrollments: list[tuple[str, str, str, str | None]]  # enrollment, candidate, campaign, event
    events: list[tuple[str, str, datetime]]  # event, type, occurred_at
    deferrals: dict[tuple[str, str], dict[str, timedelta]]
    calls: list[str]  # outbox ids handed to a provider, one per call
    life_events: dict[str, int]
    stops: int


def _run_shard(job: _ShardJob) -> _ShardResult:
    """Build the service on a fresh in-memory database, live through the span, and read back what happened."""
    engine = _memory_engine()
    queue: list[str] = []
    ids = _seeded_ids(random.Random(f"{job.seed}:ids:{job.shard}"))
    runtime = Runtime(job.settings, enqueue_override=queue.extend, new_id=ids)
    runtime.engine = engine
    runtime.campaigns = job.campaigns
    policy = _RecordingPolicy(job.spec, job.settings)
    runtime.policy = policy
    calls: list[str] = []
    runtime.providers = Providers(email=_FakeEmail(calls), sms=_FakeSms(calls))
    world = _World(runtime, policy, job.people, job.timeline, queue)
    clock = FixedClock(job.start)
    previous = current()
    try:
        with _quiet_logs():
            set_clock(clock)
            world.create_people()
            stops = world.run(clock, job.start, job.end)
        return _collect(job.shard, world, calls, stops)
    finally:
        set_clock(previous)
        engine.dispose()


def _collect(shard: int, world: _World, calls: list[str], stops: int) -> _ShardResult:
    def key(number: int | None) -> str | None:
        return None if number is None else f"{shard}:{number}"

    with Session(world.runtime.engine) as session:
        rows = [
            _Row(message_id, candidate, key(enrollment), campaign, channel, category, status, rule, sent_at)
            for message_id, candidate, enrollment, campaign, channel, category, status, rule, sent_at in (
                session.execute(
                    select(
                        OutboundMessage.id,
                        Candidate.external_id,
                        OutboundMessage.enrollment_id,
                        OutboundMessage.campaign,
                        OutboundMessage.channel,
                        OutboundMessage.category,
                        OutboundMessage.status,
                        OutboundMessage.rule,
                        OutboundMessage.sent_at,
                    )
                    .join(Candidate, Candidate.id == OutboundMessage.candidate_id)
                    .order_by(OutboundMessage.created_at, OutboundMessage.id)
                )
            )
        ]
        enrollments = [
            (f"{shard}:{enrollment}", candidate, campaign, key(event))
            for enrollment, candidate, campaign, event in session.execute(
                select(Enrollment.id, Candidate.external_id, Enrollment.campaign, Enrollment.event_id)
                .join(Candidate, Candidate.id == Enrollment.candidate_id)
                .order_by(Enrollment.id)
            )
        ]
        events = [
            (f"{shard}:{event}", kind, occurred_at)
            for event, kind, occurred_at in session.execute(
                select(CandidateEvent.id, CandidateEvent.type, CandidateEvent.occurred_at).order_by(CandidateEvent.id)
            )
        ]
    return _ShardResult(
        rows=rows,
        enrollments=enrollments,
        events=events,
        deferrals={k: dict(v) for k, v in world.policy.deferrals.items()},
        calls=list(calls),
        life_events=dict(world.life_events),
        stops=stops,
    )


def _run_shards(jobs: Sequence[_ShardJob], workers: int) -> list[_ShardResult]:
    if workers <= 1 or len(jobs) <= 1:
        return [_run_shard(job) for job in jobs]
    # Forked where that is safe (Linux, no other thread whose locks the child would inherit held): it needs no
    # ``if __name__ == "__main__"`` guard in the caller's script. Spawned otherwise.
    safe_to_fork = sys.platform == "linux" and threading.active_count() == 1
    context = multiprocessing.get_context("fork" if safe_to_fork else "spawn")
    with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=context) as pool:
        return list(pool.map(_run_shard, jobs))


# -- measuring ---------------------------------------------------------------------------------------------------


def _measure(
    results: Sequence[_ShardResult],
    people: dict[str, _Person],
    campaigns: CampaignSet,
    spec: PolicySpec,
    *,
    start: datetime,
    end: datetime,
    seed: int,
    company_timezone: str,
    reopenings: int,
) -> SimulationReport:
    calendar = BusinessCalendar.from_spec(spec.calendar)
    rows = [row for result in results for row in result.rows]
    enrollments = [e for result in results for e in result.enrollments]
    events = [e for result in results for e in result.events]
    deferrals: dict[tuple[str, str], dict[str, timedelta]] = defaultdict(dict)
    for result in results:
        for rule_campaign, waits in result.deferrals.items():
            deferrals[rule_campaign].update(waits)
    sent = [r for r in rows if r.status in SENT and r.sent_at is not None]
    violations: list[Violation] = []

    # Every sent message against its window, on the recipient's real wall clock.
    outside: Counter[str] = Counter()
    for row in sent:
        assert row.sent_at is not None
        person = people[row.candidate]
        window, working_days_only = window_for(spec.quiet_hours, row.channel, row.category, person.country)
        if window is None and not working_days_only:
            continue
        day_ok = calendar.is_working_day if working_days_only else None
        if not in_window(row.sent_at, person.zone, window or ALL_DAY, day_ok):
            outside[row.campaign] += 1
            local = row.sent_at.astimezone(person.zone)
            when = f"{window or 'any time'}{' on working days' if working_days_only else ''}"
            violations.append(
                Violation(
                    "outside_window",
                    row.id,
                    row.campaign,
                    row.channel,
                    row.candidate,
                    row.sent_at,
                    f"sent {local:%a %Y-%m-%d %H:%M} {person.zone}, window {when}",
                )
            )

    # Every cap over every candidate's sent messages.
    capped: Counter[str] = Counter()
    by_candidate: dict[str, list[_Row]] = defaultdict(list)
    for row in sent:
        by_candidate[row.candidate].append(row)
    for cap in spec.caps:
        channels = {c.value for c in cap.channels}
        categories = {c.value for c in cap.categories}
        for candidate, own in sorted(by_candidate.items()):
            counted = sorted(
                (r for r in own if r.channel in channels and r.category in categories),
                key=lambda r: (r.sent_at, r.id),
            )
            for k in range(cap.max, len(counted)):
                newest, oldest = counted[k].sent_at, counted[k - cap.max].sent_at
                assert newest is not None and oldest is not None
                if newest - oldest < cap.per:
                    capped[counted[k].campaign] += 1
                    violations.append(
                        Violation(
                            "cap",
                            counted[k].id,
                            counted[k].campaign,
                            counted[k].channel,
                            candidate,
                            newest,
                            f"cap {cap.name}: {cap.max + 1} messages within {_human(newest - oldest)}",
                        )
                    )

    # Provider calls: one per sent row, never two for one outbox id.
    calls = Counter(outbox_id for result in results for outbox_id in result.calls)
    duplicates = sum(n - 1 for n in calls.values() if n > 1)
    by_id = {r.id: r for r in rows}
    for outbox_id, n in sorted(calls.items()):
        if n > 1:
            row = by_id[outbox_id]
            detail = f"{n} provider calls for one outbox row"
            violations.append(
                Violation("duplicate", outbox_id, row.campaign, row.channel, row.candidate, row.sent_at or end, detail)
            )

    # Per campaign, and all together.
    deferred_ids: dict[str, set[str]] = defaultdict(set)
    for (_, campaign), waits in deferrals.items():
        deferred_ids[campaign].update(waits)
    enrolled: dict[str, set[str]] = defaultdict(set)
    for _, candidate, campaign, _ in enrollments:
        enrolled[campaign].add(candidate)
    dropped = [r for r in rows if r.status not in SENT and r.status not in WAITING]

    def stats(name: str, only: str | None, population: set[str]) -> CampaignStats:
        def ours(campaign: str) -> bool:
            return only is None or campaign == only

        mine = [r for r in sent if ours(r.campaign)]
        per_candidate = Counter(r.candidate for r in mine)
        counts = [per_candidate.get(candidate, 0) for candidate in population]
        return CampaignStats(
            name=name,
            enrolled=len(population),
            sent=len(mine),
            email=sum(1 for r in mine if r.channel == "email"),
            sms=sum(1 for r in mine if r.channel == "sms"),
            per_candidate_max=max(counts, default=0),
            per_candidate_p50=_p50(counts),
            deferred=len(set().union(*(ids for campaign, ids in deferred_ids.items() if ours(campaign)))),
            dropped=sum(1 for r in dropped if ours(r.campaign)),
            waiting=sum(1 for r in rows if r.status in WAITING and ours(r.campaign)),
            outside_window=sum(n for campaign, n in outside.items() if ours(campaign)),
            cap_violations=sum(n for campaign, n in capped.items() if ours(campaign)),
        )

    names = sorted(campaigns.campaigns)
    per_campaign = tuple(stats(name, name, enrolled.get(name, set())) for name in names)
    overall = stats("all campaigns", None, set(people))

    deferral_counts = tuple(
        RuleCount(rule, campaign, len(waits), longest=max(waits.values()))
        for (rule, campaign), waits in sorted(deferrals.items())
        if waits
    )
    drop_counts = Counter((r.rule or r.status, r.campaign, r.status) for r in dropped)
    drops = tuple(
        RuleCount(rule, campaign, n, status=status) for (rule, campaign, status), n in sorted(drop_counts.items())
    )
    promises = _promises(campaigns, rows, enrollments, events, end)

    cohort_people = list(people.values())
    regions = Counter(p.region for p in cohort_people)
    cohort = {
        "locales": dict(sorted(Counter(p.locale for p in cohort_people).items())),
        "regions": {name: regions[name] for name in REGIONS if regions[name]},
        "with_phone": sum(1 for p in cohort_people if p.fields["phone"]),
        "with_email": sum(1 for p in cohort_people if p.fields["email"]),
        "without_timezone": sum(1 for p in cohort_people if not p.fields["timezone"]),
        "nurture_consent": sum(1 for p in cohort_people if p.fields["nurture_consent"]),
        "talent_pool_at_start": sum(1 for p in cohort_people if p.pool),
    }
    happened: Counter[str] = Counter()
    for result in results:
        happened.update(result.life_events)
    happened["job_reopened"] = reopenings
    life_events = {name: happened[name] for name in LIFE_EVENTS if happened[name]}
    return SimulationReport(
        candidates=len(cohort_people),
        days=round((end - start).total_seconds() / 86400),
        seed=seed,
        start=start,
        end=end,
        company_timezone=company_timezone,
        campaign_names=tuple(names),
        cohort=cohort,
        life_events=life_events,
        campaigns=per_campaign,
        overall=overall,
        deferrals=deferral_counts,
        drops=drops,
        promises=promises,
        outside_window=sum(outside.values()),
        cap_violations=sum(capped.values()),
        duplicate_sends=duplicates,
        violations=tuple(violations[:MAX_VIOLATIONS_LISTED]),
        clock_stops=sum(result.stops for result in results),
    )


def _promises(
    campaigns: CampaignSet,
    rows: Sequence[_Row],
    enrollments: Sequence[tuple[str, str, str, str | None]],
    events: Sequence[tuple[str, str, datetime]],
    end: datetime,
) -> tuple[Promise, ...]:
    """For each promise: how long from the event to the first message sent by the enrollments it started."""
    first_sent: dict[str, datetime] = {}
    for row in rows:
        if row.status in SENT and row.sent_at is not None and row.enrollment is not None:
            known = first_sent.get(row.enrollment)
            if known is None or row.sent_at < known:
                first_sent[row.enrollment] = row.sent_at
    started: dict[str, list[str]] = defaultdict(list)
    for enrollment, _, _, event in enrollments:
        if event is not None:
            started[event].append(enrollment)
    out: list[Promise] = []
    for label, event_type, within in PROMISES:
        judged = met = too_recent = never = 0
        longest: timedelta | None = None
        for event, kind, occurred_at in events:
            if kind != event_type.value or not started.get(event):
                continue
            times = [first_sent[e] for e in started[event] if e in first_sent]
            if not times:
                if occurred_at + within > end:
                    too_recent += 1
                else:
                    judged += 1
                    never += 1
                continue
            delay = min(times) - occurred_at
            if delay > within and occurred_at + within > end:
                too_recent += 1
                continue
            judged += 1
            met += delay <= within
            longest = delay if longest is None else max(longest, delay)
        applicable = bool(campaigns.for_event(event_type.value))
        out.append(Promise(label, event_type.value, within, applicable, judged, met, too_recent, longest, never))
    return tuple(out)


# -- the entry point ---------------------------------------------------------------------------------------------


def simulate(
    campaigns_dir: Path,
    templates_dir: Path,
    *,
    names: Sequence[str] = (),
    candidates: int = 1000,
    days: int = 365,
    seed: int = 7,
    start: datetime | None = None,
    settings: Settings | None = None,
    workers: int | None = None,
) -> SimulationReport:
    """Simulate ``days`` days of the campaigns in ``campaigns_dir`` over ``candidates`` synthetic candidates.

    ``names`` restricts the run to those campaigns (unknown names raise ValueError). ``start`` defaults to today's
    midnight in the company timezone; a naive ``start`` is read in that zone. ``settings`` supplies the company
    (timezone, name, locales, phone region, scheduler knobs); its database, broker and providers are never used.
    ``workers`` processes run the cohort's parts side by side (default: one per core, at most :data:`SHARDS`; 1
    runs everything in this process); the report does not depend on it. Raises
    :class:`~outreach.core.errors.CampaignError` when the campaigns or the policy file are invalid.

    The virtual clock is process-wide (:func:`outreach.core.clock.set_clock`): do not run this inside a live service.
    """
    if candidates < 1:
        raise ValueError("candidates must be at least 1")
    if days < 1:
        raise ValueError("days must be at least 1")
    base = settings or Settings()
    zone = ZoneInfo(base.company_timezone)
    begin = _start_instant(start, zone)
    end = begin + timedelta(days=days)

    selected = _select_campaigns(_validated(campaigns_dir, templates_dir), names)
    spec = load_policies(campaigns_dir).model_copy(update={"rate_limits": {}})
    sim_settings = base.with_overrides(
        database_url="sqlite://", broker_url="", campaigns_dir=campaigns_dir, templates_dir=templates_dir
    )

    rng = random.Random(seed)
    people = [_person(rng, index) for index in range(candidates)]
    stories = [_story(rng, index, person, begin, end, zone) for index, person in enumerate(people)]
    # A job reopens about every six weeks; the ATS then shortlists the matching talent-pool candidates.
    count = max(1, round(days / 45))
    reopenings = [
        _Happening(
            _office_hours(begin + (end - begin) * (n + 0.6) / count, zone), "job_reopened", -1, rng.choice(JOBS)[0]
        )
        for n in range(count)
    ]
    reopenings = [h for h in reopenings if begin <= h.at <= end]

    jobs: list[_ShardJob] = []
    for shard in range(SHARDS):
        members = list(range(shard, candidates, SHARDS))
        if not members:
            continue
        local = {index: position for position, index in enumerate(members)}
        happenings = [
            _Happening(h.at, h.kind, local[h.person], h.job, h.reason, h.data)
            for index in members
            for h in stories[index]
            if begin <= h.at <= end
        ] + reopenings
        happenings.sort(key=lambda h: (h.at, h.person, h.kind))
        jobs.append(
            _ShardJob(
                shard=shard,
                seed=seed,
                settings=sim_settings,
                campaigns=selected,
                spec=spec,
                people=[people[index] for index in members],
                timeline=happenings,
                start=begin,
                end=end,
            )
        )
    results = _run_shards(jobs, workers if workers is not None else min(os.cpu_count() or 1, SHARDS))
    return _measure(
        results,
        {person.external_id: person for person in people},
        selected,
        spec,
        start=begin,
        end=end,
        seed=seed,
        company_timezone=base.company_timezone,
        reopenings=len(reopenings),
    )


def _validated(campaigns_dir: Path, templates_dir: Path) -> CampaignSet:
    from outreach.service.validation import validate_all

    loaded, problems = validate_all(campaigns_dir, templates_dir)
    if problems or loaded is None:
        raise CampaignError(problems)
    return loaded
