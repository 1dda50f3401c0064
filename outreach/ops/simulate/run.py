"""The entry point, :func:`simulate`: validate the campaigns, draw the cohort, cut it into shards, run each in its
own world (side by side in worker processes when there are cores for them) and measure what happened.
"""

from __future__ import annotations

import multiprocessing
import os
import random
import sys
import threading
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

from outreach.core.clock import FixedClock, current, set_clock, utcnow
from outreach.core.config import Settings
from outreach.core.errors import CampaignError
from outreach.domain.campaigns import Campaign, CampaignSet
from outreach.ops.simulate.cohort import Happening, Person, draw_cohort
from outreach.ops.simulate.measure import ShardResult, collect, measure
from outreach.ops.simulate.report import SimulationReport
from outreach.ops.simulate.world import (
    FakeEmail,
    FakeSms,
    RecordingPolicy,
    World,
    memory_engine,
    quiet_logs,
    seeded_ids,
)
from outreach.policy.calendar import localize
from outreach.policy.config import PolicySpec, load_policies
from outreach.providers.base import Providers
from outreach.service.runtime import Runtime

__all__ = ["SHARDS", "simulate"]

SHARDS = 4
"""How many parts the cohort is cut into. Nothing in the service ties one candidate to another (caps, quiet hours,
replies and enrollments are all per candidate; pacing is left out), so each part runs alone and the parts run side
by side. The number is fixed, not taken from the machine, so a seed gives the same report everywhere."""


@dataclass(frozen=True)
class _ShardJob:
    shard: int
    seed: int
    settings: Settings
    campaigns: CampaignSet
    spec: PolicySpec
    people: list[Person]
    timeline: list[Happening]
    start: datetime
    end: datetime


def _run_shard(job: _ShardJob) -> ShardResult:
    """Build the service on a fresh in-memory database, live through the span, and read back what happened."""
    engine = memory_engine()
    queue: list[str] = []
    ids = seeded_ids(random.Random(f"{job.seed}:ids:{job.shard}"))
    runtime = Runtime(job.settings, enqueue_override=queue.extend, new_id=ids)
    runtime.engine = engine
    runtime.campaigns = job.campaigns
    policy = RecordingPolicy(job.spec, job.settings)
    runtime.policy = policy
    calls: list[str] = []
    runtime.providers = Providers(email=FakeEmail(calls), sms=FakeSms(calls))
    world = World(runtime, policy, job.people, job.timeline, queue)
    clock = FixedClock(job.start)
    previous = current()
    try:
        with quiet_logs():
            set_clock(clock)
            world.create_people()
            stops = world.run(clock, job.start, job.end)
        return collect(job.shard, world, calls, stops)
    finally:
        set_clock(previous)
        engine.dispose()


def _run_shards(jobs: Sequence[_ShardJob], workers: int) -> list[ShardResult]:
    if workers <= 1 or len(jobs) <= 1:
        return [_run_shard(job) for job in jobs]
    # Forked where that is safe (Linux, no other thread whose locks the child would inherit held): it needs no
    # ``if __name__ == "__main__"`` guard in the caller's script. Spawned otherwise.
    safe_to_fork = sys.platform == "linux" and threading.active_count() == 1
    context = multiprocessing.get_context("fork" if safe_to_fork else "spawn")
    with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=context) as pool:
        return list(pool.map(_run_shard, jobs))


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

    cohort = draw_cohort(seed, candidates, begin, end, zone)
    people, stories, reopenings = cohort.people, cohort.stories, cohort.reopenings

    jobs: list[_ShardJob] = []
    for shard in range(SHARDS):
        members = list(range(shard, candidates, SHARDS))
        if not members:
            continue
        local = {index: position for position, index in enumerate(members)}
        happenings = [
            Happening(h.at, h.kind, local[h.person], h.job, h.reason, h.data)
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
    return measure(
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
