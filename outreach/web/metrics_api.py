"""Metrics for operations: rates, the funnel, the SLAs, the queue and the loaded campaigns.

Every route here is :func:`~outreach.web.auth.ops_readable`: the answers hold counts, rates, durations,
campaign and template names and opaque candidate external ids, never names, addresses, phones, salaries or
message text. The figures come from :mod:`outreach.ops.analytics` (its module notes define each one).

``since`` and ``until`` take ``30d`` / ``12h`` / ``2w`` (that long ago) or an ISO date or datetime (UTC unless it
says otherwise); ``since`` defaults to 30 days ago, ``until`` to now. A bad value answers 422 naming the parameter.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Query

from outreach.core.clock import utcnow
from outreach.domain.campaigns import Campaign
from outreach.ops import analytics
from outreach.web.api import RuntimeDep
from outreach.web.auth import ops_readable

__all__ = ["DEFAULT_SINCE", "campaign_out", "router"]

router = APIRouter(prefix="/api/v1")

#: How far back the figures go when ``since`` is not given.
DEFAULT_SINCE = timedelta(days=30)

SinceQuery = Annotated[str | None, Query(description="30d, 12h, 2w or an ISO date/datetime; default 30d")]
UntilQuery = Annotated[str | None, Query(description="30d, 12h, 2w or an ISO date/datetime; default now")]


def _window(since: str | None, until: str | None) -> tuple[datetime, datetime | None]:
    now = utcnow()
    start = analytics.parse_moment(since, "since", now) or now - DEFAULT_SINCE
    end = analytics.parse_moment(until, "until", now)
    analytics.check_window(start, end)
    return start, end


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment else None


@router.get("/metrics", tags=["metrics"])
@ops_readable
def get_rates(
    runtime: RuntimeDep,
    by: Annotated[str | None, Query(description="campaign, step, channel, template, locale, source or period")] = None,
    since: SinceQuery = None,
    until: UntilQuery = None,
    bucket: Annotated[
        str | None,
        Query(description="day, week (UTC) or month (company timezone): also split every group by period"),
    ] = None,
) -> dict[str, Any]:
    """Delivery, open, click, reply, opt-out and bounce counts and rates of the messages sent in the window.

    Rates: delivery = delivered / messages, open = opened / delivered emails, click, reply and opt-out =
    each / delivered, bounce = bounced / messages; ``null`` when the denominator is 0. Auto-replies are not
    messages, and neither auto-replies nor keywords are replies.
    """
    dimension = analytics.parse_dimension(by)
    period = analytics.parse_bucket(bucket)
    start, end = _window(since, until)
    rows = analytics.rates(
        runtime.engine,
        by=dimension,
        since=start,
        until=end,
        bucket=period,
        timezone=runtime.settings.company_timezone,
    )
    if dimension is analytics.Dimension.PERIOD:
        period = period or "day"
    return {
        "by": dimension.value if dimension else None,
        "bucket": period,
        "since": _iso(start),
        "until": _iso(end),
        "items": [row.as_dict() for row in rows],
    }


@router.get("/metrics/funnel", tags=["metrics"])
@ops_readable
def get_funnel(runtime: RuntimeDep, since: SinceQuery = None, until: UntilQuery = None) -> dict[str, Any]:
    """Candidates who applied in the window: how many reached each stage, overall and per source channel,
    and how many were lost at each stage (``dropped``: reached it but not the next one)."""
    start, end = _window(since, until)
    return analytics.funnel(runtime.engine, since=start, until=end).as_dict()


@router.get("/metrics/sla", tags=["metrics"])
@ops_readable
def get_sla(
    runtime: RuntimeDep,
    since: SinceQuery = None,
    until: UntilQuery = None,
    limit: Annotated[int, Query(ge=0, le=1000, description="breaches listed per promise")] = 100,
) -> dict[str, Any]:
    """The timing promises over the events in the window: met, breached, pending, the share met, the worst
    lateness, and the breaches by candidate external id."""
    start, end = _window(since, until)
    reports = analytics.sla(runtime.engine, since=start, until=end, limit=limit)
    return {"since": _iso(start), "until": _iso(end), "items": [report.as_dict() for report in reports]}


@router.get("/queue", tags=["metrics"])
@ops_readable
def get_queue(runtime: RuntimeDep) -> dict[str, Any]:
    """The outbox now: rows by status, due pending rows and the lag of the oldest (seconds)."""
    return analytics.queue(runtime.engine).as_dict()


def campaign_out(campaign: Campaign) -> dict[str, Any]:
    trigger = campaign.trigger
    return {
        "name": campaign.name,
        "description": campaign.description,
        "category": campaign.category.value,
        "enabled": campaign.enabled,
        "trigger": {
            "event": trigger.event.value if trigger.event else None,
            "cron": trigger.cron,
            "audience": trigger.audience.model_dump(mode="json"),
        },
        "exit_on": [condition.value for condition in campaign.exit_on],
        "track_clicks": campaign.tracks_clicks,
        "steps": [
            {
                "channel": step.channel.value,
                "template": step.template,
                "delay_seconds": step.delay.total_seconds(),
                "business_days": step.business_days,
                "at": step.at,
                "only_if": step.only_if,
                "unless_clicked": list(step.unless_clicked),
                "alert": step.alert,
            }
            for step in campaign.steps
        ],
    }


@router.get("/campaigns", tags=["campaigns"])
@ops_readable
def list_campaigns(runtime: RuntimeDep) -> dict[str, Any]:
    """The campaigns this service loaded, by name: category, trigger, exit conditions and steps."""
    items = [campaign_out(campaign) for campaign in sorted(runtime.campaigns, key=lambda c: c.name)]
    return {"items": items, "count": len(items)}
