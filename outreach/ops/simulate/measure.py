"""What a run counts: each shard's database and fake providers read back (:func:`collect`), then counted and
re-checked over the whole cohort (:func:`measure`).

What the report counts, from the databases and the fake providers at the end:

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
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from outreach.core.models import Candidate, CandidateEvent, Enrollment, MessageStatus, OutboundMessage
from outreach.domain.campaigns import CampaignSet, EventType
from outreach.ops.simulate.cohort import REGIONS, Person
from outreach.ops.simulate.report import (
    LIFE_EVENTS,
    CampaignStats,
    Promise,
    RuleCount,
    SimulationReport,
    Violation,
    human,
)
from outreach.ops.simulate.world import World
from outreach.policy.calendar import BusinessCalendar, in_window
from outreach.policy.config import PolicySpec
from outreach.policy.quiet_hours import ALL_DAY, window_for

SENT = frozenset({MessageStatus.SENT.value, MessageStatus.DELIVERED.value})
WAITING = frozenset({MessageStatus.HELD.value, MessageStatus.PENDING.value})
MAX_VIOLATIONS_LISTED = 20

#: The seed's timing promises: (what, the event that starts the clock, how long it may take).
PROMISES: tuple[tuple[str, EventType, timedelta], ...] = (
    ("first contact within 48h of application", EventType.APPLIED, timedelta(hours=48)),
    ("offer letter within 24h of acceptance", EventType.OFFER_ACCEPTED, timedelta(hours=24)),
)


@dataclass(frozen=True)
class Row:
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
class ShardResult:
    """What one shard's world left behind, as plain data (it comes back from a worker process)."""

    rows: list[Row]
    enrollments: list[tuple[str, str, str, str | None]]  # enrollment, candidate, campaign, event
    events: list[tuple[str, str, datetime]]  # event, type, occurred_at
    deferrals: dict[tuple[str, str], dict[str, timedelta]]
    calls: list[str]  # outbox ids handed to a provider, one per call
    life_events: dict[str, int]
    stops: int


def collect(shard: int, world: World, calls: list[str], stops: int) -> ShardResult:
    """Read back ``world``'s database, recorded deferrals and provider calls; ids of its own rows carry the shard."""

    def key(number: int | None) -> str | None:
        return None if number is None else f"{shard}:{number}"

    with Session(world.runtime.engine) as session:
        rows = [
            Row(message_id, candidate, key(enrollment), campaign, channel, category, status, rule, sent_at)
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
    return ShardResult(
        rows=rows,
        enrollments=enrollments,
        events=events,
        deferrals={k: dict(v) for k, v in world.policy.deferrals.items()},
        calls=list(calls),
        life_events=dict(world.life_events),
        stops=stops,
    )


def measure(
    results: Sequence[ShardResult],
    people: dict[str, Person],
    campaigns: CampaignSet,
    spec: PolicySpec,
    *,
    start: datetime,
    end: datetime,
    seed: int,
    company_timezone: str,
    reopenings: int,
) -> SimulationReport:
    """Pool the shards' results into the report; every sent message is re-checked against the policy file."""
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
    by_candidate: dict[str, list[Row]] = defaultdict(list)
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
                            f"cap {cap.name}: {cap.max + 1} messages within {human(newest - oldest)}",
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
    rows: Sequence[Row],
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


def _p50(values: Sequence[int]) -> int:
    """The lower median (nearest rank), 0 for nothing."""
    ordered = sorted(values)
    return ordered[(len(ordered) - 1) // 2] if ordered else 0
