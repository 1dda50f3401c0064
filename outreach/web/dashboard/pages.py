"""The dashboard's pages: the overview, funnel, SLA and queue, the message search and detail, and the sandbox inbox.

**What is shown.** Rates over time as inline SVG charts (with the same figures in tables), rates by campaign,
channel and source, the funnel per source with its drop-off, the SLA table and open alerts, a message search
with each message's status history and the policy decision that held or dropped it, the queue's depth and lag,
and, when a provider sandbox runs (``outreach up`` without credentials), the messages it received. The figures
come from :mod:`outreach.ops.analytics`; this module only lays them out.

Every page takes the :func:`~outreach.web.dashboard.login.viewer` dependency: the ``ops`` role never sees personal
data (candidates by external id only), ``hr`` pages add it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

import requests
from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from outreach.core.clock import utcnow
from outreach.core.models import (
    Alert,
    Candidate,
    Channel,
    DeliveryEvent,
    InboundMessage,
    LinkClick,
    MessageStatus,
    OutboundMessage,
    TrackedLink,
)
from outreach.domain.auth import Role
from outreach.ops.analytics import Bucket, Dimension, FunnelRow, funnel, queue, rates, sla
from outreach.web.dashboard.charts import Series, bar_chart, line_chart
from outreach.web.dashboard.login import ViewerDep
from outreach.web.dashboard.render import PREFIX, format_when, render_page, runtime_of

__all__ = ["fetch_inbox", "router"]

router = APIRouter(prefix=PREFIX, include_in_schema=False)

PAGE_SIZE = 50
SANDBOX_TIMEOUT = 3.0
#: Statuses that mean a policy rule stopped the message for now (held) or for good (dropped).
HELD = frozenset({MessageStatus.HELD.value})
DROPPED = frozenset({MessageStatus.SUPPRESSED.value, MessageStatus.SKIPPED.value, MessageStatus.CANCELLED.value})
NOT_DELIVERED = frozenset({MessageStatus.FAILED.value, MessageStatus.BOUNCED.value, MessageStatus.UNDELIVERED.value})


# -- message search and detail ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class SearchForm:
    candidate: str = ""
    campaign: str = ""
    status: str = ""
    channel: str = ""
    date_from: str = ""
    date_to: str = ""
    page: int = 1


def _parse_day(field: str, value: str, errors: dict[str, str]) -> date | None:
    value = value.strip()
    if not value:
        return None
    try:
        return date.fromisoformat(value)
    except ValueError:
        errors[field] = f"{field}: not a date; use YYYY-MM-DD"
        return None


def _day_start(day: date) -> datetime:
    return datetime.combine(day, time.min, tzinfo=UTC)


@router.get("/messages", response_class=HTMLResponse)
def messages(
    request: Request,
    principal: ViewerDep,
    candidate: str = "",
    campaign: str = "",
    status: str = "",
    channel: str = "",
    date_from: str = "",
    date_to: str = "",
    page: str = "1",
) -> HTMLResponse:
    errors: dict[str, str] = {}
    statuses = [s.value for s in MessageStatus]
    channels = [c.value for c in Channel]
    if status and status not in statuses:
        errors["status"] = f"status: unknown; use one of {', '.join(statuses)}"
    if channel and channel not in channels:
        errors["channel"] = f"channel: unknown; use one of {', '.join(channels)}"
    start = _parse_day("date_from", date_from, errors)
    end = _parse_day("date_to", date_to, errors)
    if start and end and end < start:
        errors["date_to"] = "date_to: before date_from"
    page_number = int(page) if page.isdigit() and int(page) >= 1 else 1
    form = SearchForm(candidate.strip(), campaign.strip(), status, channel, date_from, date_to, page_number)
    rows: list[tuple[OutboundMessage, str]] = []
    total = 0
    if not errors:
        query = select(OutboundMessage, Candidate.external_id).join(
            Candidate, Candidate.id == OutboundMessage.candidate_id
        )
        if form.candidate:
            query = query.where(Candidate.external_id == form.candidate)
        if form.campaign:
            query = query.where(OutboundMessage.campaign == form.campaign)
        if status:
            query = query.where(OutboundMessage.status == status)
        if channel:
            query = query.where(OutboundMessage.channel == channel)
        if start:
            query = query.where(OutboundMessage.created_at >= _day_start(start))
        if end:
            query = query.where(OutboundMessage.created_at < _day_start(end) + timedelta(days=1))
        with Session(runtime_of(request).engine) as session:
            total = int(session.scalar(select(func.count()).select_from(query.subquery())) or 0)
            listed = query.order_by(OutboundMessage.created_at.desc(), OutboundMessage.id)
            listed = listed.offset((page_number - 1) * PAGE_SIZE).limit(PAGE_SIZE)
            rows = [(message, external) for message, external in session.execute(listed)]
    try:
        campaigns = sorted(runtime_of(request).campaigns.campaigns)
    except Exception:  # an invalid campaigns folder must not take the search down
        campaigns = []
    query_without_page = "&".join(
        f"{k}={quote(v, safe='')}"
        for k, v in (
            ("candidate", form.candidate),
            ("campaign", form.campaign),
            ("status", form.status),
            ("channel", form.channel),
            ("date_from", form.date_from),
            ("date_to", form.date_to),
        )
        if v
    )
    return render_page(
        request,
        "messages.html",
        principal,
        form=form,
        errors=errors,
        rows=rows,
        total=total,
        pages=max(1, math.ceil(total / PAGE_SIZE)),
        statuses=statuses,
        channels=channels,
        campaigns=campaigns,
        base_query=query_without_page,
    )


@dataclass(frozen=True)
class HistoryEntry:
    at: datetime
    what: str
    source: str
    detail: str = ""


def _decision(message: OutboundMessage) -> tuple[str, str] | None:
    """What became of it: ("held"|"dropped"|"failed"|"uncertain"|"passed", sentence), or None when no rule was
    recorded. "passed" only for a message that has gone on (queued again, sent or delivered) after a hold."""
    if message.rule is None and message.reason is None:
        return None
    rule = message.rule or "(unnamed rule)"
    reason = message.reason or message.error_detail or "no reason recorded"
    if message.status in HELD:
        return "held", f"Held by {rule}: {reason}"
    if message.status in DROPPED:
        return "dropped", f"Dropped ({message.status}) by {rule}: {reason}"
    if message.status in NOT_DELIVERED:
        code = f", code {message.error_code}" if message.error_code else ""
        return "failed", f"Not delivered ({message.status} by {rule}{code}): {reason}"
    if message.status == MessageStatus.UNCERTAIN.value:
        return "uncertain", f"May or may not have been sent ({rule}): {reason}; never resent automatically"
    return "passed", f"Held earlier by {rule} ({reason}); it has since gone on"


@router.get("/messages/{message_id}", response_class=HTMLResponse)
def message_detail(request: Request, principal: ViewerDep, message_id: str) -> HTMLResponse:
    hr = principal.role is Role.HR
    with Session(runtime_of(request).engine) as session:
        message = session.get(OutboundMessage, message_id[:32])
        if message is None:
            return render_page(
                request, "not_found.html", principal, 404, what=f"No message with id {message_id[:32]!r}."
            )
        candidate = session.get(Candidate, message.candidate_id)
        events = list(
            session.scalars(
                select(DeliveryEvent)
                .where(DeliveryEvent.message_id == message.id)
                .order_by(DeliveryEvent.occurred_at, DeliveryEvent.id)
            )
        )
        replies = list(
            session.scalars(
                select(InboundMessage)
                .where(InboundMessage.in_reply_to == message.id)
                .order_by(InboundMessage.received_at, InboundMessage.id)
            )
        )
        clicks = list(
            session.execute(
                select(LinkClick.clicked_at, TrackedLink.name, TrackedLink.position)
                .join(TrackedLink, TrackedLink.id == LinkClick.link_id)
                .where(TrackedLink.message_id == message.id)
                .order_by(LinkClick.clicked_at)
            )
        )
        history = [
            HistoryEntry(message.created_at, "created", "outbox", f"not before {format_when(message.not_before)}")
        ]
        if message.enqueued_at:
            history.append(HistoryEntry(message.enqueued_at, "enqueued", "outbox"))
        if message.sent_at:
            history.append(HistoryEntry(message.sent_at, "sent", "outbox", message.provider or ""))
        if message.delivered_at:
            history.append(HistoryEntry(message.delivered_at, "delivered", "outbox"))
        for event in events:
            history.append(HistoryEntry(event.occurred_at, event.type, f"event ({event.provider})"))
        for reply in replies:
            history.append(HistoryEntry(reply.received_at, f"inbound {reply.kind}", f"inbound ({reply.channel})"))
        for clicked_at, name, position in clicks:
            history.append(HistoryEntry(clicked_at, "link clicked", "link", name or f"link {position}"))
        history.sort(key=lambda h: h.at)
        context: dict[str, Any] = {
            "message": message,
            "external_id": candidate.external_id if candidate else "—",
            "history": history,
            "decision": _decision(message),
            "replies": replies,
        }
        if hr and candidate is not None:
            context["candidate_name"] = candidate.name
            context["reply_bodies"] = [(r.received_at, r.kind, r.subject, r.body) for r in replies]
    return render_page(request, "message.html", principal, **context)


# -- sandbox inbox ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class InboxItem:
    received_at: datetime | None
    provider: str
    channel: str
    outbox_id: str | None
    segments: int
    to: str
    subject: str
    text: str
    index: int


def _outbox_id(record: Mapping[str, Any]) -> str | None:
    custom = record.get("custom_args") or {}
    if isinstance(custom, Mapping) and custom.get("outreach_id"):
        return str(custom["outreach_id"])
    callback = record.get("status_callback")
    if isinstance(callback, str) and "?" in callback:
        found = parse_qs(urlsplit(callback).query).get("outreach_id")
        if found:
            return found[0]
    return None


def fetch_inbox(sandbox_url: str, limit: int = 200) -> list[InboxItem]:
    """The sandbox's received messages, newest first (its JSON API, ``GET /_sandbox/messages``)."""
    with requests.Session() as http:
        http.trust_env = False  # the sandbox is local; never send its traffic through a proxy
        answer = http.get(f"{sandbox_url.rstrip('/')}/_sandbox/messages", timeout=SANDBOX_TIMEOUT)
        answer.raise_for_status()
        records = answer.json()
    records = records.get("messages", []) if isinstance(records, dict) else records
    items = []
    for index, record in enumerate(records):
        if not isinstance(record, Mapping):
            continue
        try:
            received = datetime.fromisoformat(str(record.get("received_at")))
        except ValueError:
            received = None
        items.append(
            InboxItem(
                received_at=received,
                provider=str(record.get("provider", "")),
                channel=str(record.get("channel", "")),
                outbox_id=_outbox_id(record),
                segments=int(record.get("segments") or 0),
                to=str(record.get("to", "")),
                subject=str(record.get("subject", "")),
                text=str(record.get("text") or record.get("body") or ""),
                index=index,
            )
        )
    items.reverse()
    return items[:limit]


@router.get("/inbox", response_class=HTMLResponse)
def inbox(request: Request, principal: ViewerDep) -> HTMLResponse:
    sandbox_url = runtime_of(request).sandbox_url
    items: list[InboxItem] = []
    error = None
    if sandbox_url:
        try:
            items = fetch_inbox(sandbox_url)
        except (requests.RequestException, ValueError):
            error = "The provider sandbox did not answer."
    return render_page(request, "inbox.html", principal, items=items, error=error, sandbox_url=sandbox_url)


# -- overview, funnel, SLA, queue -------------------------------------------------------------------------------

#: The rates the overview charts, in order: (label, attribute of RateRow).
RATES: tuple[tuple[str, str], ...] = (
    ("delivery", "delivery_rate"),
    ("open", "open_rate"),
    ("click", "click_rate"),
    ("reply", "reply_rate"),
    ("opt-out", "opt_out_rate"),
    ("bounce", "bounce_rate"),
)
MAX_DAYS = 366


@dataclass(frozen=True)
class Range:
    bucket: Bucket
    days: int
    since: datetime
    periods: tuple[date, ...]


def _range(bucket: str, days: str, errors: dict[str, str], now: datetime) -> Range:
    chosen: Bucket = "week" if bucket == "week" else "day"
    if bucket not in ("", "day", "week"):
        errors["bucket"] = "bucket: use day or week"
    default = 84 if chosen == "week" else 30
    span = default
    if days:
        if days.isdigit() and 1 <= int(days) <= MAX_DAYS:
            span = int(days)
        else:
            errors["days"] = f"days: a whole number from 1 to {MAX_DAYS}"
    today = now.astimezone(UTC).date()
    first = today - timedelta(days=span - 1)
    if chosen == "week":
        first -= timedelta(days=first.weekday())
        step = timedelta(days=7)
    else:
        step = timedelta(days=1)
    periods = []
    cursor = first
    while cursor <= today:
        periods.append(cursor)
        cursor += step
    return Range(chosen, span, _day_start(first), tuple(periods))


def _since_days(days: str, errors: dict[str, str]) -> datetime | None:
    """``days`` back from now, or None (all time) when not given."""
    if not days:
        return None
    if days.isdigit() and 1 <= int(days) <= MAX_DAYS:
        return utcnow() - timedelta(days=int(days))
    errors["days"] = f"days: a whole number from 1 to {MAX_DAYS}"
    return None


def _open_alerts(engine: Engine, limit: int = 200) -> list[tuple[Alert, str | None]]:
    """Alerts nobody resolved yet, newest first, with the candidate's external id (alert texts carry no names)."""
    query = (
        select(Alert, Candidate.external_id)
        .outerjoin(Candidate, Candidate.id == Alert.candidate_id)
        .where(Alert.resolved_at.is_(None))
        .order_by(Alert.created_at.desc(), Alert.id.desc())
        .limit(limit)
    )
    with Session(engine) as session:
        return [(alert, external) for alert, external in session.execute(query)]


def _count_open_alerts(engine: Engine) -> int:
    with Session(engine) as session:
        return int(session.scalar(select(func.count()).select_from(Alert).where(Alert.resolved_at.is_(None))) or 0)


#: The breakdowns the overview always shows, and the ones it adds on request (``?by=``).
BREAKDOWNS = (Dimension.CAMPAIGN, Dimension.CHANNEL, Dimension.SOURCE)
EXTRA_BREAKDOWNS = (Dimension.STEP, Dimension.TEMPLATE, Dimension.LOCALE)


@router.get("", response_class=HTMLResponse)
def overview(request: Request, principal: ViewerDep, bucket: str = "day", days: str = "", by: str = "") -> HTMLResponse:
    engine = runtime_of(request).engine
    now = utcnow()
    errors: dict[str, str] = {}
    window = _range(bucket, days, errors, now)
    total = rates(engine, since=window.since)[0]
    periodic = rates(engine, by=Dimension.PERIOD, bucket=window.bucket, since=window.since)
    per_period = {row.period: row for row in periodic}
    rows = [per_period.get(p) for p in window.periods]
    labels = [p.strftime("%m-%d") for p in window.periods]
    chart = line_chart(
        f"Rates per {window.bucket}",
        labels,
        [Series(label, [getattr(r, attr) if r else None for r in rows]) for label, attr in RATES],
        x_label=f"{window.bucket} starting (UTC)",
        y_label="rate",
    )
    volume = line_chart(
        f"Messages per {window.bucket}",
        labels,
        [Series("messages", [float(r.messages) if r else 0.0 for r in rows])],
        x_label=f"{window.bucket} starting (UTC)",
        y_label="messages",
        percent=False,
        height=200,
    )
    dimensions = list(BREAKDOWNS)
    extra = {d.value: d for d in EXTRA_BREAKDOWNS}
    if by in extra:
        dimensions.append(extra[by])
    elif by and by not in {d.value for d in BREAKDOWNS}:
        errors["by"] = f"by: use one of {', '.join(extra)}"
    breakdowns = [(d.value, d.value.capitalize(), rates(engine, by=d, since=window.since)) for d in dimensions]
    return render_page(
        request,
        "overview.html",
        principal,
        errors=errors,
        window=window,
        total=total,
        chart=chart,
        volume=volume,
        periods=list(zip(window.periods, rows, strict=True)),
        breakdowns=breakdowns,
        rate_names=RATES,
        queue=queue(engine, now=now),
        open_alerts=_count_open_alerts(engine),
        by=by,
        extra_breakdowns=list(extra),
    )


@router.get("/funnel", response_class=HTMLResponse)
def funnel_page(request: Request, principal: ViewerDep, days: str = "") -> HTMLResponse:
    engine = runtime_of(request).engine
    errors: dict[str, str] = {}
    since = _since_days(days, errors)
    report = funnel(engine, since=since)
    chart = bar_chart(
        "Candidates reaching each stage, all sources",
        [(s.stage, float(s.reached)) for s in report.total.stages],
        x_label="candidates",
    )
    worst = {row.source: _worst_drop(row) for row in (report.total, *report.by_source)}
    return render_page(
        request, "funnel.html", principal, errors=errors, report=report, chart=chart, worst=worst, days=days
    )


def _worst_drop(row: FunnelRow) -> str | None:
    """The stage after which the largest share of candidates is lost."""
    lost = [(1 - s.conversion, s.stage) for s in row.stages if s.conversion is not None and s.reached > 0]
    return max(lost)[1] if lost and max(lost)[0] > 0 else None


@router.get("/sla", response_class=HTMLResponse)
def sla_page(request: Request, principal: ViewerDep, days: str = "") -> HTMLResponse:
    engine = runtime_of(request).engine
    errors: dict[str, str] = {}
    since = _since_days(days, errors)
    reports = sla(engine, since=since, limit=50)
    return render_page(
        request, "sla.html", principal, errors=errors, reports=reports, alerts=_open_alerts(engine), days=days
    )


@router.get("/queue", response_class=HTMLResponse)
def queue_page(request: Request, principal: ViewerDep) -> HTMLResponse:
    report = queue(runtime_of(request).engine)
    return render_page(request, "queue.html", principal, report=report)
