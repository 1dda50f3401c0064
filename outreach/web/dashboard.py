"""The operations dashboard at ``/dashboard``: server-rendered pages over the outbox, the analytics and the sandbox.

**Who may look.** The same API keys as ``/api`` (:mod:`outreach.web.auth`): a key pasted into the login form
becomes an HttpOnly, SameSite=Strict cookie scoped to ``/dashboard``; a Bearer header works too. Both roles see
every page, but the ``ops`` role never sees personal data: candidates appear by external id only, never a name,
address, phone number, subject, body or provider error text (which can quote an address). Pages for ``hr`` add
those. Without a valid key every page redirects to the login form. Forms that change something (login, logout)
are POSTs whose ``Origin`` (or ``Referer``) must be this site; with the SameSite=Strict cookie that is enough
against cross-site requests.

**What is shown.** Rates over time as inline SVG charts (with the same figures in tables), rates by campaign,
channel and source, the funnel per source with its drop-off, the SLA table and open alerts, a message search
with each message's status history and the policy decision that held or dropped it, the queue's depth and lag,
and, when a provider sandbox runs (``outreach up`` without credentials), the messages it received. The figures
come from :mod:`outreach.ops.analytics`; this module only lays them out.
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import Annotated, Any
from urllib.parse import parse_qs, quote, urlsplit

import requests
from fastapi import APIRouter, Depends, Form, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from jinja2 import Environment, PackageLoader, select_autoescape
from markupsafe import Markup
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
from outreach.domain.auth import Principal, Role, authenticate
from outreach.ops.analytics import Bucket, Dimension, FunnelRow, funnel, queue, rates, sla
from outreach.service.runtime import Runtime
from outreach.web.auth import COOKIE, principal_from

__all__ = ["line_chart", "router"]

PREFIX = "/dashboard"
router = APIRouter(prefix=PREFIX, include_in_schema=False)

#: How long the login cookie lives; the key itself stays valid until revoked.
SESSION_SECONDS = 8 * 3600
PAGE_SIZE = 50
SANDBOX_TIMEOUT = 3.0
#: Statuses that mean a policy rule stopped the message for now (held) or for good (dropped).
HELD = frozenset({MessageStatus.HELD.value})
DROPPED = frozenset({MessageStatus.SUPPRESSED.value, MessageStatus.SKIPPED.value, MessageStatus.CANCELLED.value})

_env = Environment(
    loader=PackageLoader("outreach.web", "templates"),
    autoescape=select_autoescape(default=True, default_for_string=True),
    trim_blocks=True,
    lstrip_blocks=True,
)


def _when(value: datetime | None) -> str:
    if value is None:
        return "—"
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


def _percent(value: float | None, digits: int = 1) -> str:
    if value is None:
        return "—"
    return f"{value * 100:.{digits}f}%"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    seconds = max(0.0, float(seconds))
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


_env.filters["when"] = _when
_env.filters["percent"] = _percent
_env.filters["duration"] = _duration


# -- who is looking ---------------------------------------------------------------------------------------------


class _LoginRequired(HTTPException):
    def __init__(self, location: str) -> None:
        super().__init__(status_code=303, detail="login required", headers={"Location": location})


def _safe_next(target: str | None) -> str:
    """Only a path on the dashboard itself: never an absolute URL (no open redirect)."""
    if not target:
        return PREFIX
    parts = urlsplit(target)
    if parts.scheme or parts.netloc or "\\" in target or not parts.path.startswith(PREFIX):
        return PREFIX
    return target


def viewer(request: Request) -> Principal:
    """The dependency on every page: the key's principal, or a redirect to the login form."""
    principal = principal_from(request, cookie=True)
    if principal is None:
        here = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        raise _LoginRequired(f"{PREFIX}/login?next={quote(here, safe='')}")
    return principal


ViewerDep = Annotated[Principal, Depends(viewer)]


def _runtime(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


def _same_origin(request: Request) -> bool:
    """A POST from a page of this site: its Origin (or, lacking one, Referer) names this host."""
    own = f"{request.url.scheme}://{request.url.netloc}"
    allowed = {own}
    public = _runtime(request).settings.public_url.rstrip("/")
    if public:
        parts = urlsplit(public)
        allowed.add(f"{parts.scheme}://{parts.netloc}")
    origin = request.headers.get("origin")
    if origin is not None:
        return origin in allowed
    referer = request.headers.get("referer")
    if referer is not None:
        parts = urlsplit(referer)
        return f"{parts.scheme}://{parts.netloc}" in allowed
    return True  # not a browser (browsers send Origin on every POST); the cookie is SameSite=Strict anyway


def _page(
    request: Request, template: str, principal: Principal | None, status_code: int = 200, **context: Any
) -> HTMLResponse:
    runtime = _runtime(request)
    body = _env.get_template(f"dashboard/{template}").render(
        principal=principal,
        hr=principal is not None and principal.role is Role.HR,
        path=request.url.path,
        prefix=PREFIX,
        sandbox=bool(runtime.sandbox_url),
        now=utcnow(),
        **context,
    )
    return HTMLResponse(body, status_code=status_code, headers=_headers())


def _headers() -> dict[str, str]:
    return {
        "Cache-Control": "no-store",
        "X-Frame-Options": "DENY",
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "same-origin",
        "Content-Security-Policy": (
            "default-src 'none'; style-src 'unsafe-inline'; img-src 'self' data:; form-action 'self'; "
            "frame-ancestors 'none'; base-uri 'none'"
        ),
    }


@router.get("/login", response_class=HTMLResponse)
def login_form(request: Request, next: str | None = None) -> Response:
    if principal_from(request, cookie=True) is not None:
        return RedirectResponse(_safe_next(next), status_code=303)
    return _page(request, "login.html", None, next=_safe_next(next), error=None)


@router.post("/login", response_class=HTMLResponse)
def login(request: Request, key: Annotated[str, Form()] = "", next: Annotated[str, Form()] = "") -> Response:
    if not _same_origin(request):
        error = "This form must be sent from this site."
        return _page(request, "login.html", None, 403, next=_safe_next(next), error=error)
    key = key.strip()
    principal = None
    if key:
        with Session(_runtime(request).engine) as session, session.begin():
            principal = authenticate(session, key)
    if principal is None:
        # Never echo the key back, not even a wrong one.
        message = "Paste an API key." if not key else "Unknown or revoked key."
        return _page(request, "login.html", None, 401, next=_safe_next(next), error=message)
    response = RedirectResponse(_safe_next(next), status_code=303)
    response.set_cookie(
        COOKIE,
        key,
        max_age=SESSION_SECONDS,
        path=PREFIX,
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )
    return response


@router.post("/logout")
def logout(request: Request) -> Response:
    if not _same_origin(request):
        return HTMLResponse("This form must be sent from this site.", status_code=403)
    response = RedirectResponse(f"{PREFIX}/login", status_code=303)
    response.delete_cookie(COOKIE, path=PREFIX, httponly=True, samesite="strict")
    return response


# -- charts -----------------------------------------------------------------------------------------------------

#: Okabe–Ito colours (told apart with colour-blindness) and a dash pattern each, so lines differ without colour.
_COLOURS = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#D55E00", "#56B4E9", "#000000")
_DASHES = ("", "6 3", "2 3", "8 3 2 3", "4 4", "1 2", "10 4")


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


@dataclass(frozen=True)
class Series:
    name: str
    values: Sequence[float | None]


def _nice_ceiling(value: float) -> float:
    if value <= 0:
        return 1.0
    magnitude = 10.0 ** math.floor(math.log10(value))
    for step in (1.0, 2.0, 2.5, 5.0, 10.0):
        if value <= step * magnitude:
            return step * magnitude
    return 10.0 * magnitude  # pragma: no cover - the loop always returns


def line_chart(
    title: str,
    labels: Sequence[str],
    series: Sequence[Series],
    *,
    x_label: str,
    y_label: str,
    percent: bool = True,
    width: int = 720,
    height: int = 280,
) -> Markup:
    """An accessible SVG line chart: a title and description, labelled axes, a tooltip on every point.

    Values are fractions when ``percent`` (shown as %), else counts; ``None`` leaves a gap.
    """
    left, right, top, bottom = 56, 12, 16, 52
    plot_w, plot_h = width - left - right, height - top - bottom
    known = [v for s in series for v in s.values if v is not None]
    top_value = _nice_ceiling(max(known, default=0.0))
    if percent:
        top_value = min(top_value, 1.0) if max(known, default=0.0) <= 1.0 else top_value

    def x(i: int) -> float:
        return left + (plot_w * (i + 0.5) / max(len(labels), 1))

    def y(v: float) -> float:
        return top + plot_h * (1 - v / top_value)

    def fmt(v: float) -> str:
        return _percent(v) if percent else f"{v:g}"

    slug = "".join(c if c.isalnum() else "-" for c in title.lower()).strip("-")
    desc = f"{len(series)} series over {len(labels)} periods; the figures are also in the table below."
    out = [
        f'<svg class="chart" viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" '
        f'aria-labelledby="{slug}-t {slug}-d" data-chart="{_e(slug)}">',
        f'<title id="{slug}-t">{_e(title)}</title><desc id="{slug}-d">{_e(desc)}</desc>',
    ]
    for k in range(5):
        tick = top_value * k / 4
        out.append(
            f'<line x1="{left}" x2="{width - right}" y1="{y(tick):.1f}" y2="{y(tick):.1f}" stroke="#ddd" />'
            f'<text x="{left - 6}" y="{y(tick) + 4:.1f}" text-anchor="end" font-size="11">{_e(fmt(tick))}</text>'
        )
    every = max(1, math.ceil(len(labels) / 10))
    for i, label in enumerate(labels):
        if i % every == 0:
            out.append(
                f'<text x="{x(i):.1f}" y="{top + plot_h + 16}" text-anchor="middle" font-size="11">{_e(label)}</text>'
            )
    out.append(
        f'<line x1="{left}" x2="{left}" y1="{top}" y2="{top + plot_h}" stroke="#555" />'
        f'<line x1="{left}" x2="{width - right}" y1="{top + plot_h}" y2="{top + plot_h}" stroke="#555" />'
        f'<text x="{left + plot_w / 2:.1f}" y="{height - 8}" text-anchor="middle" font-size="12">{_e(x_label)}</text>'
        f'<text transform="translate(14 {top + plot_h / 2:.1f}) rotate(-90)" text-anchor="middle" '
        f'font-size="12">{_e(y_label)}</text>'
    )
    for n, s in enumerate(series):
        colour, dash = _COLOURS[n % len(_COLOURS)], _DASHES[n % len(_DASHES)]
        segments: list[list[tuple[float, float]]] = [[]]
        for i, v in enumerate(s.values):
            if v is None:
                segments.append([])
            else:
                segments[-1].append((x(i), y(v)))
        out.append(f'<g class="series" data-series="{_e(s.name)}">')
        for points in segments:
            if len(points) > 1:
                path = " ".join(f"{px:.1f},{py:.1f}" for px, py in points)
                dash_attr = f' stroke-dasharray="{dash}"' if dash else ""
                out.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="2"{dash_attr} />')
        for i, v in enumerate(s.values):
            if v is not None:
                out.append(
                    f'<circle cx="{x(i):.1f}" cy="{y(v):.1f}" r="3" fill="{colour}">'
                    f"<title>{_e(s.name)}, {_e(labels[i])}: {_e(fmt(v))}</title></circle>"
                )
        out.append("</g>")
    out.append("</svg>")
    legend = "".join(
        f'<li><svg width="28" height="10" aria-hidden="true"><line x1="0" x2="28" y1="5" y2="5" '
        f'stroke="{_COLOURS[n % len(_COLOURS)]}" stroke-width="2"'
        + (f' stroke-dasharray="{_DASHES[n % len(_DASHES)]}"' if _DASHES[n % len(_DASHES)] else "")
        + f" /></svg> {_e(s.name)}</li>"
        for n, s in enumerate(series)
    )
    return Markup(f'<figure>{"".join(out)}<figcaption><ul class="legend">{legend}</ul></figcaption></figure>')


def bar_chart(title: str, bars: Sequence[tuple[str, float]], *, x_label: str, width: int = 720) -> Markup:
    """Horizontal bars (counts), one per label, each with its number written next to it."""
    row, left, right, top = 24, 120, 60, 8
    height = top + row * len(bars) + 36
    plot_w = width - left - right
    top_value = max((v for _, v in bars), default=0.0) or 1.0
    slug = "".join(c if c.isalnum() else "-" for c in title.lower()).strip("-")
    out = [
        f'<svg class="chart" viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" '
        f'aria-labelledby="{slug}-t" data-chart="{_e(slug)}"><title id="{slug}-t">{_e(title)}</title>'
    ]
    for i, (label, value) in enumerate(bars):
        y0 = top + i * row
        w = plot_w * value / top_value
        out.append(
            f'<text x="{left - 6}" y="{y0 + 16}" text-anchor="end" font-size="12">{_e(label)}</text>'
            f'<rect x="{left}" y="{y0 + 3}" width="{w:.1f}" height="{row - 6}" fill="{_COLOURS[0]}">'
            f"<title>{_e(label)}: {value:g}</title></rect>"
            f'<text x="{left + w + 4:.1f}" y="{y0 + 16}" font-size="12">{value:g}</text>'
        )
    out.append(
        f'<text x="{left + plot_w / 2:.1f}" y="{height - 6}" text-anchor="middle" font-size="12">{_e(x_label)}</text>'
        "</svg>"
    )
    return Markup("".join(out))


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
        with Session(_runtime(request).engine) as session:
            total = int(session.scalar(select(func.count()).select_from(query.subquery())) or 0)
            listed = query.order_by(OutboundMessage.created_at.desc(), OutboundMessage.id)
            listed = listed.offset((page_number - 1) * PAGE_SIZE).limit(PAGE_SIZE)
            rows = [(message, external) for message, external in session.execute(listed)]
    try:
        campaigns = sorted(_runtime(request).campaigns.campaigns)
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
    return _page(
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
    """What the policy did with it: ("held"|"dropped"|"passed", sentence), or None when no rule was recorded."""
    if message.rule is None and message.reason is None:
        return None
    rule = message.rule or "(unnamed rule)"
    reason = message.reason or ""
    if message.status in HELD:
        return "held", f"Held by {rule}: {reason}"
    if message.status in DROPPED:
        return "dropped", f"Dropped ({message.status}) by {rule}: {reason}"
    return "passed", f"Held earlier by {rule} ({reason}); it has since gone on"


@router.get("/messages/{message_id}", response_class=HTMLResponse)
def message_detail(request: Request, principal: ViewerDep, message_id: str) -> HTMLResponse:
    hr = principal.role is Role.HR
    with Session(_runtime(request).engine) as session:
        message = session.get(OutboundMessage, message_id[:32])
        if message is None:
            return _page(request, "not_found.html", principal, 404, what=f"No message with id {message_id[:32]!r}.")
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
        history = [HistoryEntry(message.created_at, "created", "outbox", f"not before {_when(message.not_before)}")]
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
    return _page(request, "message.html", principal, **context)


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
    sandbox_url = _runtime(request).sandbox_url
    items: list[InboxItem] = []
    error = None
    if sandbox_url:
        try:
            items = fetch_inbox(sandbox_url)
        except (requests.RequestException, ValueError):
            error = "The provider sandbox did not answer."
    return _page(request, "inbox.html", principal, items=items, error=error, sandbox_url=sandbox_url)


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
    engine = _runtime(request).engine
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
    return _page(
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
    engine = _runtime(request).engine
    errors: dict[str, str] = {}
    since = _since_days(days, errors)
    report = funnel(engine, since=since)
    chart = bar_chart(
        "Candidates reaching each stage, all sources",
        [(s.stage, float(s.reached)) for s in report.total.stages],
        x_label="candidates",
    )
    worst = {row.source: _worst_drop(row) for row in (report.total, *report.by_source)}
    return _page(request, "funnel.html", principal, errors=errors, report=report, chart=chart, worst=worst, days=days)


def _worst_drop(row: FunnelRow) -> str | None:
    """The stage after which the largest share of candidates is lost."""
    lost = [(1 - s.conversion, s.stage) for s in row.stages if s.conversion is not None and s.reached > 0]
    return max(lost)[1] if lost and max(lost)[0] > 0 else None


@router.get("/sla", response_class=HTMLResponse)
def sla_page(request: Request, principal: ViewerDep, days: str = "") -> HTMLResponse:
    engine = _runtime(request).engine
    errors: dict[str, str] = {}
    since = _since_days(days, errors)
    reports = sla(engine, since=since, limit=50)
    return _page(request, "sla.html", principal, errors=errors, reports=reports, alerts=_open_alerts(engine), days=days)


@router.get("/queue", response_class=HTMLResponse)
def queue_page(request: Request, principal: ViewerDep) -> HTMLResponse:
    report = queue(_runtime(request).engine)
    return _page(request, "queue.html", principal, report=report)
