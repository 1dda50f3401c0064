"""The simulation's report: per campaign and overall counts, deferrals and drops by rule, the promises and the
checks, as a dict (``--format json``) and as a text table.

Plain frozen dataclasses; :mod:`outreach.ops.simulate.measure` fills them in.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

__all__ = ["CampaignStats", "Promise", "RuleCount", "SimulationReport", "Violation"]

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
                [(d.rule, d.campaign, f"{d.messages:,}", human(d.longest)) for d in self.deferrals],
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
            detail = f"{promise.met:,}/{promise.judged:,} met ({share}), longest {human(promise.longest)}"
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


def human(period: timedelta | None) -> str:
    """A duration as the report prints it (``3d 4h``, ``2h 05m``, ``12m``; ``-`` for none)."""
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
