"""Analytics: delivery and engagement rates, the hiring funnel, the timing promises (SLAs) and the queue.

Pure read-only queries on an :class:`~sqlalchemy.Engine`; the API (``outreach.web.metrics_api``), the dashboard
and ``outreach report`` all call these functions, so every surface shows the same figures. Results are frozen
dataclasses holding only counts, rates, durations, campaign/template names and opaque candidate external ids:
no names, addresses, phone numbers or message text, so the ``ops`` role may read every one of them.

What counts as what (:func:`rates`)
-----------------------------------

- **messages**: outbox rows we tried to send, not counting auto-replies (``category = auto_reply``): status
  ``sending``, ``uncertain``, ``sent``, ``delivered``, ``failed``, ``bounced`` or ``undelivered``. Rows a rule
  held back, suppressed, skipped or cancelled never went out and are not messages. A message's time (for
  ``since``/``until`` and the period buckets) is when it was sent (``sent_at``), else when it was created.
- **delivered**: messages with proof of arrival: a provider event ``delivered``, or an engagement event that
  implies it (``opened``, ``clicked``, ``unsubscribed``, ``complained``). ``delivery_rate = delivered / messages``.
- **opened** (email only): messages with at least one ``opened`` event; five opens of one mail count once.
  ``open_rate = opened / delivered emails``.
- **clicked**: messages with a provider ``clicked`` event or a click on one of their tracked links (``/r/``).
  ``click_rate = clicked / delivered``.
- **replied**: messages that got at least one inbound message of kind ``reply``; auto-replies (out-of-office)
  and keywords (STOP, HELP …) do not count. A reply belongs to the message it answers (``in_reply_to``) or,
  when that is unknown, to the latest message sent to the candidate before it arrived.
  ``reply_rate = replied / delivered``.
- **opted_out**: messages after which the candidate unsubscribed: a provider ``unsubscribed`` event on the
  message, or an inbound ``opt_out`` keyword attributed like a reply. Unsubscribes through our own link page
  name a candidate, not a message, and are not attributed. ``opt_out_rate = opted_out / delivered``.
- **bounced**: messages with a hard ``bounced`` event (the address does not exist). ``bounce_rate = bounced /
  messages``. An asynchronous bounce can follow a delivery, so one message may count as both.

Every count is of distinct messages; a rate is ``None`` when its denominator is 0. With ``since``, provider
events from an hour before it on and inbound messages from it on are read (a reply cannot precede the message
it answers), so the cost follows the window, not the tables.
"""

from __future__ import annotations

import re
from bisect import bisect_left, bisect_right
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, date, datetime, timedelta
from enum import StrEnum
from typing import Any, Literal
from zoneinfo import ZoneInfo

from sqlalchemy import ColumnElement, Engine, Select, and_, case, func, literal, or_, select
from sqlalchemy.orm import Session

from outreach.core.clock import check_instant, utcnow
from outreach.core.errors import ValidationError
from outreach.core.models import (
    AUTO_REPLY,
    Alert,
    Candidate,
    CandidateEvent,
    DeliveryEvent,
    InboundMessage,
    LinkClick,
    MessageStatus,
    OutboundMessage,
    StageChange,
    TrackedLink,
    UTCDateTime,
)
from outreach.domain.campaigns import Category

__all__ = [
    "FUNNEL_STAGES",
    "SLAS",
    "Bucket",
    "Dimension",
    "FunnelReport",
    "FunnelRow",
    "FunnelStage",
    "QueueReport",
    "RateRow",
    "SlaBreach",
    "SlaReport",
    "SlaSpec",
    "check_window",
    "funnel",
    "parse_bucket",
    "parse_dimension",
    "parse_moment",
    "queue",
    "rates",
    "sla",
]


class Dimension(StrEnum):
    """What :func:`rates` groups by. ``source`` is the candidate's source channel; ``period`` the time bucket."""

    CAMPAIGN = "campaign"
    STEP = "step"
    CHANNEL = "channel"
    TEMPLATE = "template"
    LOCALE = "locale"
    SOURCE = "source"
    PERIOD = "period"


Bucket = Literal["day", "week", "month"]

#: The value a group gets when the dimension is empty (a candidate without a source, a row without a locale).
UNKNOWN = "unknown"


def _rate(numerator: int, denominator: int) -> float | None:
    return None if denominator == 0 else numerator / denominator


@dataclass(frozen=True)
class RateRow:
    """One group of :func:`rates`: its key (``None`` when not grouped), its period start and the counts.

    ``key`` is the dimension's value as text (a campaign name, a channel …; for steps the outbox's 0-based step
    index, as ``GET /api/v1/messages`` shows it, so "0" is a campaign's first step); ``period`` is the first day
    of the bucket when a bucket was asked for: the UTC day, the Monday of the week (UTC), or the 1st of the month
    in the timezone :func:`rates` was given (the company's: a monthly review counts the company's months).
    """

    key: str | None
    period: date | None
    messages: int
    delivered: int
    emails_delivered: int
    opened: int
    clicked: int
    replied: int
    opted_out: int
    bounced: int

    @property
    def delivery_rate(self) -> float | None:
        """delivered / messages."""
        return _rate(self.delivered, self.messages)

    @property
    def open_rate(self) -> float | None:
        """opened / delivered emails (SMS have no opens)."""
        return _rate(self.opened, self.emails_delivered)

    @property
    def click_rate(self) -> float | None:
        """clicked / delivered."""
        return _rate(self.clicked, self.delivered)

    @property
    def reply_rate(self) -> float | None:
        """replied / delivered (auto-replies excluded)."""
        return _rate(self.replied, self.delivered)

    @property
    def opt_out_rate(self) -> float | None:
        """opted_out / delivered."""
        return _rate(self.opted_out, self.delivered)

    @property
    def bounce_rate(self) -> float | None:
        """bounced / messages."""
        return _rate(self.bounced, self.messages)

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["period"] = self.period.isoformat() if self.period else None
        for name in ("delivery_rate", "open_rate", "click_rate", "reply_rate", "opt_out_rate", "bounce_rate"):
            data[name] = getattr(self, name)
        return data


#: The funnel's stages in order. Reaching a later stage counts as having reached every earlier one.
FUNNEL_STAGES: tuple[str, ...] = ("applied", "contacted", "interviewing", "final", "offer", "accepted")


@dataclass(frozen=True)
class FunnelStage:
    """``reached``: candidates of the cohort who got at least this far; ``dropped``: of those, how many never
    reached the next stage (0 for the last); ``conversion``: reached next / reached (None for the last or 0)."""

    stage: str
    reached: int
    dropped: int
    conversion: float | None


@dataclass(frozen=True)
class FunnelRow:
    """The funnel for one source channel (``source`` is ``None`` for the total over all sources)."""

    source: str | None
    stages: tuple[FunnelStage, ...]

    def as_dict(self) -> dict[str, Any]:
        return {"source": self.source, "stages": [asdict(s) for s in self.stages]}


@dataclass(frozen=True)
class FunnelReport:
    """The cohort is the candidates who applied between ``since`` and ``until``."""

    since: datetime | None
    until: datetime | None
    total: FunnelRow
    by_source: tuple[FunnelRow, ...]

    def as_dict(self) -> dict[str, Any]:
        return {
            "since": self.since.isoformat() if self.since else None,
            "until": self.until.isoformat() if self.until else None,
            "total": self.total.as_dict(),
            "by_source": [row.as_dict() for row in self.by_source],
        }


@dataclass(frozen=True)
class SlaSpec:
    """A timing promise: after each ``event``, something must happen within ``within``.

    ``campaigns``: the answer is the first message sent to the candidate from one of these campaigns after the
    event (empty: any message but an auto-reply). ``alert``: the answer is an HR alert of this kind instead, due
    only if the candidate did not answer (reply, accept or decline) within ``within``, and then by ``within`` +
    ``grace`` (the scheduler's round).
    """

    name: str
    description: str
    event: str
    within: timedelta
    campaigns: tuple[str, ...] = ()
    alert: str | None = None
    grace: timedelta = timedelta(0)


#: The seed's promises (campaigns/*.yaml): first contact within 48 h of applying; the offer letter within 24 h
#: of acceptance; a note within 24 h of a decline and of a failed final interview; an offer unanswered for 3 days
#: raises an ``offer_unanswered`` alert (within the hour after).
SLAS: tuple[SlaSpec, ...] = (
    SlaSpec("first_contact", "first message within 48 h of applying", "applied", timedelta(hours=48)),
    SlaSpec(
        "offer_letter",
        "offer letter within 24 h of acceptance",
        "offer_accepted",
        timedelta(hours=24),
        campaigns=("offer_letter",),
    ),
    SlaSpec(
        "decline_note",
        "a note within 24 h of a declined offer",
        "offer_declined",
        timedelta(hours=24),
        campaigns=("decline_followup",),
    ),
    SlaSpec(
        "final_note",
        "a note within 24 h of a failed final interview",
        "final_interview_failed",
        timedelta(hours=24),
        campaigns=("final_thanks",),
    ),
    SlaSpec(
        "offer_unanswered_alert",
        "an alert when an offer is unanswered for 3 days",
        "offer_extended",
        timedelta(days=3),
        alert="offer_unanswered",
        grace=timedelta(hours=1),
    ),
)


@dataclass(frozen=True)
class SlaBreach:
    """One late (or missing) answer. ``done_at`` is None when it has not happened at all."""

    candidate: str
    event_at: datetime
    due_at: datetime
    done_at: datetime | None
    late_seconds: float
    #: Why it is breached before its time: the answer failed and will not be retried (the message's reason).
    reason: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "candidate": self.candidate,
            "event_at": self.event_at.isoformat(),
            "due_at": self.due_at.isoformat(),
            "done_at": self.done_at.isoformat() if self.done_at else None,
            "late_seconds": self.late_seconds,
            "reason": self.reason,
        }


@dataclass(frozen=True)
class SlaReport:
    """One promise over the events between ``since`` and ``until``.

    ``total`` = met + breached + pending; ``pending``: not answered yet and still inside the window;
    ``met_pct`` = met / (met + breached) × 100 (None if nothing is decided yet); ``worst_late_seconds``: the
    largest lateness among breaches (for an answer still missing, measured up to now). ``breaches`` lists
    them, latest first, at most ``limit``.
    """

    name: str
    description: str
    total: int
    met: int
    breached: int
    pending: int
    met_pct: float | None
    worst_late_seconds: float | None
    breaches: tuple[SlaBreach, ...] = field(default=())

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["breaches"] = [b.as_dict() for b in self.breaches]
        return data


@dataclass(frozen=True)
class QueueReport:
    """Outbox depth per status (every status, 0 included), the due ``pending`` rows and how late the oldest is.

    ``oldest_due_lag_seconds``: now − ``not_before`` of the oldest pending row that is due (0 when none is).
    ``held_due``: held rows whose deferral has ended and that the scheduler has not released yet.
    """

    at: datetime
    by_status: dict[str, int]
    due_pending: int
    held_due: int
    oldest_due_lag_seconds: float

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["at"] = self.at.isoformat()
        return data


_AGO = re.compile(r"^\s*(\d+)\s*([hdw])\s*$")
_AGO_UNITS = {"h": timedelta(hours=1), "d": timedelta(days=1), "w": timedelta(weeks=1)}


def parse_moment(value: str | None, field_name: str, now: datetime | None = None) -> datetime | None:
    """``30d`` / ``12h`` / ``2w`` (that long before ``now``), or an ISO date or datetime (UTC unless it says
    otherwise); empty → None. Anything else raises :class:`~outreach.core.errors.ValidationError` naming the field."""
    if value is None or not value.strip():
        return None
    match = _AGO.match(value)
    try:
        if match:
            moment = (now or utcnow()) - int(match.group(1)) * _AGO_UNITS[match.group(2)]
        else:
            moment = datetime.fromisoformat(value.strip())
    except ValueError:
        raise ValidationError(
            field_name, "give a time like 30d, 12h or 2w (ago), or an ISO date or datetime (2026-11-01)"
        ) from None
    except OverflowError:  # 99999999d ago is before the year 1
        moment = datetime.min.replace(tzinfo=UTC)
    try:
        return check_instant(moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment)
    except ValueError as exc:
        raise ValidationError(field_name, str(exc)) from None


def parse_dimension(value: str | None, field_name: str = "by") -> Dimension | None:
    if value is None or not value.strip():
        return None
    try:
        return Dimension(value.strip())
    except ValueError:
        raise ValidationError(field_name, f"must be one of {', '.join(d.value for d in Dimension)}") from None


def parse_bucket(value: str | None, field_name: str = "bucket") -> Bucket | None:
    if value is None or not value.strip():
        return None
    if value.strip() == "day":
        return "day"
    if value.strip() == "week":
        return "week"
    if value.strip() == "month":
        return "month"
    raise ValidationError(field_name, "must be day, week or month")


def check_window(since: datetime | None, until: datetime | None) -> None:
    if since is not None and until is not None and until <= since:
        raise ValidationError("until", "must be after since")


#: Outbox statuses of a row that went to (or at least towards) a provider: the "messages" of :func:`rates`.
ATTEMPTED: tuple[str, ...] = tuple(
    s.value
    for s in (
        MessageStatus.SENDING,
        MessageStatus.UNCERTAIN,
        MessageStatus.SENT,
        MessageStatus.DELIVERED,
        MessageStatus.FAILED,
        MessageStatus.BOUNCED,
        MessageStatus.UNDELIVERED,
    )
)
#: Provider events that prove a message arrived.
ARRIVAL_EVENTS: tuple[str, ...] = ("delivered", "opened", "clicked", "unsubscribed", "complained")


def _message_time() -> ColumnElement[datetime]:
    return func.coalesce(OutboundMessage.sent_at, OutboundMessage.created_at, type_=UTCDateTime())


def _period(engine: Engine, moment: ColumnElement[datetime], bucket: Literal["day", "week"]) -> ColumnElement[str]:
    """The bucket's first day as ``YYYY-MM-DD`` text, computed by the database in UTC (weeks start on Monday)."""
    if engine.dialect.name == "sqlite":
        if bucket == "week":
            return func.date(moment, "weekday 0", "-6 days")
        return func.date(moment)
    return func.to_char(func.date_trunc(bucket, moment), "YYYY-MM-DD")


def _month_starts(first: date, last: date) -> list[date]:
    """The 1st of every month from ``first``'s to ``last``'s, and of the month after."""
    starts = [first.replace(day=1)]
    while starts[-1] <= last:
        previous = starts[-1]
        starts.append(date(previous.year + previous.month // 12, previous.month % 12 + 1, 1))
    return starts


def _month(
    engine: Engine, moment: ColumnElement[datetime], scope: Sequence[ColumnElement[bool]], timezone: str
) -> ColumnElement[str]:
    """The first day (``YYYY-MM-DD``) of the calendar month in ``timezone`` that ``moment`` falls in.

    Neither SQLite nor the query can be told a timezone's rules, so the months' boundaries are computed here, as
    UTC instants between the first and the last message in ``scope``, and compared in one ``CASE``: a message
    sent at 23:30 UTC on 31 January is in February in Shanghai.
    """
    zone = ZoneInfo(timezone)
    with Session(engine) as session:
        first, last = session.execute(select(func.min(moment), func.max(moment)).where(*scope)).one()
    if first is None or last is None:
        return literal(None)
    starts = _month_starts(first.astimezone(zone).date(), last.astimezone(zone).date())
    # The local midnight that starts each month, as an instant; the last one ends the last month.
    bounds = [datetime(d.year, d.month, d.day, tzinfo=zone).astimezone(UTC) for d in starts]
    labels = [d.isoformat() for d in starts]
    return case(*((moment < bounds[i + 1], labels[i]) for i in range(len(starts) - 1)), else_=labels[-1])


def _attributed(kind: str, since: datetime | None) -> Select[Any]:
    """Outbox ids that inbound messages of ``kind`` answer: ``in_reply_to``, else the latest message sent to the
    candidate before the inbound message arrived. Only inbound messages from ``since`` on can answer a message
    sent since then."""
    latest = (
        select(OutboundMessage.id)
        .where(
            OutboundMessage.candidate_id == InboundMessage.candidate_id,
            OutboundMessage.category != AUTO_REPLY,
            OutboundMessage.status.in_(ATTEMPTED),
            OutboundMessage.sent_at.is_not(None),
            OutboundMessage.sent_at <= InboundMessage.received_at,
        )
        .order_by(OutboundMessage.sent_at.desc(), OutboundMessage.id.desc())
        .limit(1)
        .correlate(InboundMessage)
        .scalar_subquery()
    )
    target = func.coalesce(InboundMessage.in_reply_to, latest)
    answers = select(target.label("target")).where(InboundMessage.kind == kind)
    if since is not None:
        answers = answers.where(InboundMessage.received_at >= since)
    inner = answers.subquery()
    return select(inner.c.target).where(inner.c.target.is_not(None))


#: Provider timestamps may be a little earlier than our own send time (clocks, whole seconds): events this much
#: older than ``since`` are still read.
EVENT_SKEW = timedelta(hours=1)


def _with_event(since: datetime | None, *types: str) -> Select[Any]:
    query = select(DeliveryEvent.message_id).where(DeliveryEvent.type.in_(types), DeliveryEvent.message_id.is_not(None))
    if since is not None:
        query = query.where(DeliveryEvent.occurred_at >= since - EVENT_SKEW)
    return query


def _count(condition: ColumnElement[bool]) -> ColumnElement[int]:
    return func.coalesce(func.sum(case((condition, 1), else_=0)), 0)


def rates(
    engine: Engine,
    by: Dimension | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    bucket: Bucket | None = None,
    timezone: str = "UTC",
) -> list[RateRow]:
    """Counts and rates of the messages sent in ``[since, until)``, grouped by ``by`` and/or period ``bucket``.

    ``by=Dimension.PERIOD`` groups by ``bucket`` alone (``day`` when not given). Groups are sorted by period,
    then key. Without ``by`` and ``bucket`` there is one row (``key`` None) even when nothing was sent. Day and
    week buckets are UTC days and Monday weeks; month buckets are calendar months in ``timezone`` (callers pass
    the company's). See the module notes for what every count means.
    """
    if by is Dimension.PERIOD:
        bucket, by = bucket or "day", None
    m = OutboundMessage
    moment = _message_time()
    delivered = m.id.in_(_with_event(since, *ARRIVAL_EVENTS))
    is_email = m.channel == "email"
    clicked = m.id.in_(_with_event(since, "clicked")) | m.id.in_(
        select(TrackedLink.message_id).join(LinkClick, LinkClick.link_id == TrackedLink.id)
    )
    opted_out = m.id.in_(_with_event(since, "unsubscribed")) | m.id.in_(_attributed("opt_out", since))
    key: Any = literal(None)
    query_from: Any = m
    if by is Dimension.CAMPAIGN:
        key = m.campaign
    elif by is Dimension.STEP:
        key = m.step
    elif by is Dimension.CHANNEL:
        key = m.channel
    elif by is Dimension.TEMPLATE:
        key = m.template
    elif by is Dimension.LOCALE:
        key = func.coalesce(m.locale, UNKNOWN)
    elif by is Dimension.SOURCE:
        key = func.coalesce(Candidate.source, UNKNOWN)
        query_from = m.__table__.join(Candidate.__table__, Candidate.id == m.candidate_id)
    scope = [m.category != AUTO_REPLY, m.status.in_(ATTEMPTED)]
    if since is not None:
        scope.append(moment >= since)
    if until is not None:
        scope.append(moment < until)
    period: ColumnElement[Any] = literal(None)
    if bucket == "month":
        period = _month(engine, moment, scope, timezone)
    elif bucket:
        period = _period(engine, moment, bucket)
    query = (
        select(
            period.label("period"),
            key.label("key"),
            func.count().label("messages"),
            _count(delivered),
            _count(delivered & is_email),
            _count(is_email & m.id.in_(_with_event(since, "opened"))),
            _count(clicked),
            _count(m.id.in_(_attributed("reply", since))),
            _count(opted_out),
            _count(m.id.in_(_with_event(since, "bounced"))),
        )
        .select_from(query_from)
        .where(*scope)
    )
    grouped = by is not None or bucket is not None
    if grouped:
        groups = [g for g, used in ((period, bucket), (key, by)) if used]
        query = query.group_by(*groups)
    with Session(engine) as session:
        result = session.execute(query).all()
    rows = [
        RateRow(
            key=None if by is None else str(row[1]),
            period=date.fromisoformat(str(row[0])) if bucket else None,
            messages=int(row[2]),
            delivered=int(row[3]),
            emails_delivered=int(row[4]),
            opened=int(row[5]),
            clicked=int(row[6]),
            replied=int(row[7]),
            opted_out=int(row[8]),
            bounced=int(row[9]),
        )
        for row in result
    ]
    rows.sort(key=lambda r: (r.period or date.min, _sortable(r.key)))
    return rows


def _sortable(key: str | None) -> tuple[int, str]:
    """Numeric keys (steps) sort as numbers, the rest as text."""
    if key is None:
        return (0, "")
    return (int(key), "") if key.isdigit() else (1 << 30, key)


# -- the funnel ---------------------------------------------------------------------------------------------------

_STAGE_RANK = {stage: index for index, stage in enumerate(FUNNEL_STAGES)}
#: Stages outside the funnel's line that still prove how far a candidate got.
_IMPLIES = {"hired": "accepted", "declined": "offer"}


def _rank(stage: str | None) -> int:
    if stage is None:
        return -1
    return _STAGE_RANK.get(_IMPLIES.get(stage, stage), -1)


def _funnel_row(source: str | None, furthest: Sequence[int]) -> FunnelRow:
    reached = [sum(1 for f in furthest if f >= index) for index in range(len(FUNNEL_STAGES))]
    stages = []
    for index, stage in enumerate(FUNNEL_STAGES):
        last = index == len(FUNNEL_STAGES) - 1
        following = 0 if last else reached[index + 1]
        stages.append(
            FunnelStage(
                stage=stage,
                reached=reached[index],
                dropped=0 if last else reached[index] - following,
                conversion=None if last else _rate(following, reached[index]),
            )
        )
    return FunnelRow(source=source, stages=tuple(stages))


def funnel(
    engine: Engine, since: datetime | None = None, until: datetime | None = None, by_source: bool = True
) -> FunnelReport:
    """How far the candidates who applied in ``[since, until)`` got, overall and per source channel.

    The application time is the first ``applied`` event, else when the candidate was created. A candidate
    reached a stage if the stage history (``StageChange``, either side of a move) or the current stage shows
    it or any later stage; ``hired`` counts as ``accepted`` and ``declined`` (an offer declined) as ``offer``.
    Every candidate of the cohort reached ``applied``. Sources are sorted by name; ``unknown`` when missing.
    """
    applied = (
        select(CandidateEvent.candidate_id, func.min(CandidateEvent.occurred_at).label("at"))
        .where(CandidateEvent.type == "applied")
        .group_by(CandidateEvent.candidate_id)
        .subquery()
    )
    at = func.coalesce(applied.c.at, Candidate.created_at, type_=UTCDateTime())
    cohort = select(Candidate.id, Candidate.source, Candidate.stage).outerjoin(
        applied, applied.c.candidate_id == Candidate.id
    )
    if since is not None:
        cohort = cohort.where(at >= since)
    if until is not None:
        cohort = cohort.where(at < until)
    cohort_ids = cohort.with_only_columns(Candidate.id).scalar_subquery()
    furthest: dict[int, int] = {}
    sources: dict[int, str] = {}
    with Session(engine) as session:
        for candidate_id, source, stage in session.execute(cohort):
            furthest[candidate_id] = max(0, _rank(stage))
            sources[candidate_id] = source or UNKNOWN
        history = select(StageChange.candidate_id, StageChange.from_stage, StageChange.to_stage).where(
            StageChange.candidate_id.in_(cohort_ids)
        )
        for candidate_id, from_stage, to_stage in session.execute(history):
            if candidate_id in furthest:
                furthest[candidate_id] = max(furthest[candidate_id], _rank(from_stage), _rank(to_stage))
    per_source: dict[str, list[int]] = defaultdict(list)
    for candidate_id, value in furthest.items():
        per_source[sources[candidate_id]].append(value)
    rows = tuple(_funnel_row(source, per_source[source]) for source in sorted(per_source)) if by_source else ()
    return FunnelReport(since=since, until=until, total=_funnel_row(None, list(furthest.values())), by_source=rows)


# -- SLAs ---------------------------------------------------------------------------------------------------------

#: What answers an offer, for the unanswered-offer promise: the candidate accepting or declining it.
_OFFER_ANSWERS = ("offer_accepted", "offer_declined")
#: Messages that answer a promise: attempted and not refused by the provider (a failed one is a broken promise).
_ANSWERED = tuple(status for status in ATTEMPTED if status != MessageStatus.FAILED.value)
#: Statuses that end a transactional answer for good.
_BROKEN = (MessageStatus.FAILED.value, MessageStatus.SUPPRESSED.value)


def _first_after(times: Sequence[datetime], moment: datetime) -> datetime | None:
    index = bisect_left(times, moment)
    return times[index] if index < len(times) else None


def _any_within(times: Sequence[datetime], start: datetime, end: datetime) -> bool:
    index = bisect_right(times, start)
    return index < len(times) and times[index] <= end


def sla(
    engine: Engine,
    since: datetime | None = None,
    until: datetime | None = None,
    now: datetime | None = None,
    specs: Sequence[SlaSpec] = SLAS,
    limit: int = 100,
) -> list[SlaReport]:
    """Each promise in ``specs`` over its events in ``[since, until)``, judged at ``now`` (default: utcnow).

    An answer counts if it came at or after the event. For an alert promise, an offer that the candidate
    answered (a reply, an accept or decline, or any stage change away from ``offer``) within ``within`` is
    not counted at all: no alert was owed.
    """
    now = now or utcnow()
    with Session(engine) as session:
        query = (
            select(CandidateEvent.type, CandidateEvent.candidate_id, CandidateEvent.occurred_at, Candidate.external_id)
            .join(Candidate, Candidate.id == CandidateEvent.candidate_id)
            .where(CandidateEvent.type.in_({spec.event for spec in specs}))
        )
        if since is not None:
            query = query.where(CandidateEvent.occurred_at >= since)
        if until is not None:
            query = query.where(CandidateEvent.occurred_at < until)
        events = session.execute(query.order_by(CandidateEvent.occurred_at, CandidateEvent.id)).all()
        if not events:
            return [_sla_report(spec, [], now, limit) for spec in specs]
        start = min(row[2] for row in events)
        # Answers: every message and alert since the earliest event, as sorted times per candidate (and campaign).
        sent_any: dict[int, list[datetime]] = defaultdict(list)
        sent_by_campaign: dict[tuple[int, str], list[datetime]] = defaultdict(list)
        messages = session.execute(
            select(OutboundMessage.candidate_id, OutboundMessage.campaign, OutboundMessage.sent_at).where(
                OutboundMessage.category != AUTO_REPLY,
                OutboundMessage.status.in_(_ANSWERED),
                OutboundMessage.sent_at >= start,
            )
        )
        for sent_to, campaign, sent_at in messages:
            if sent_at is not None:
                sent_any[sent_to].append(sent_at)
                sent_by_campaign[(sent_to, campaign)].append(sent_at)
        # Transactional answers that ended failed, suppressed or without an address: nothing will retry them, so
        # the promise is broken the moment they fail (the alert a person gets is message_failed).
        failures: dict[tuple[int, str], list[tuple[datetime, str]]] = defaultdict(list)
        for failed_for, campaign, failed_at, rule, reason in session.execute(
            select(
                OutboundMessage.candidate_id,
                OutboundMessage.campaign,
                OutboundMessage.updated_at,
                OutboundMessage.rule,
                OutboundMessage.reason,
            ).where(
                OutboundMessage.category == Category.TRANSACTIONAL.value,
                OutboundMessage.updated_at >= start,
                or_(
                    OutboundMessage.status.in_(_BROKEN),
                    and_(OutboundMessage.status == MessageStatus.SKIPPED.value, OutboundMessage.rule == "address"),
                ),
            )
        ):
            failures[(failed_for, campaign)].append(
                (failed_at, f"{campaign} {rule or 'failed'}: {reason or 'no reason'}")
            )
        alerts: dict[tuple[int, str], list[datetime]] = defaultdict(list)
        for alerted, kind, created_at in session.execute(
            select(Alert.candidate_id, Alert.kind, Alert.created_at).where(
                Alert.created_at >= start, Alert.candidate_id.is_not(None)
            )
        ):
            if alerted is not None:
                alerts[(alerted, kind)].append(created_at)
        answers: dict[int, list[datetime]] = defaultdict(list)
        if any(spec.alert for spec in specs):
            for replier, received_at in session.execute(
                select(InboundMessage.candidate_id, InboundMessage.received_at).where(
                    InboundMessage.kind == "reply", InboundMessage.received_at >= start
                )
            ):
                if replier is not None:
                    answers[replier].append(received_at)
            for answerer, answered_at in session.execute(
                select(CandidateEvent.candidate_id, CandidateEvent.occurred_at).where(
                    CandidateEvent.type.in_(_OFFER_ANSWERS), CandidateEvent.occurred_at >= start
                )
            ):
                answers[answerer].append(answered_at)
            for mover, changed_at in session.execute(
                select(StageChange.candidate_id, StageChange.changed_at).where(
                    StageChange.from_stage == "offer", StageChange.to_stage != "offer", StageChange.changed_at >= start
                )
            ):
                answers[mover].append(changed_at)
    for table in (sent_any, sent_by_campaign, alerts, answers):
        for times in table.values():
            times.sort()
    for failed in failures.values():
        failed.sort()
    reports = []
    for spec in specs:
        cases: list[tuple[str, datetime, datetime, datetime | None, str | None]] = []
        for event_type, candidate_id, occurred_at, external_id in events:
            if event_type != spec.event:
                continue
            due = occurred_at + spec.within
            if spec.alert is not None:
                if _any_within(answers.get(candidate_id, []), occurred_at, due):
                    continue
                due += spec.grace
                done = _first_after(alerts.get((candidate_id, spec.alert), []), occurred_at)
            elif spec.campaigns:
                found = [_first_after(sent_by_campaign.get((candidate_id, c), []), occurred_at) for c in spec.campaigns]
                done = min((f for f in found if f is not None), default=None)
            else:
                done = _first_after(sent_any.get(candidate_id, []), occurred_at)
            broken = None
            if spec.alert is None and done is None:
                broken = _first_failure(failures, candidate_id, spec.campaigns, occurred_at)
            cases.append((external_id, occurred_at, due, done, broken))
        reports.append(_sla_report(spec, cases, now, limit))
    return reports


def _first_failure(
    failures: Mapping[tuple[int, str], Sequence[tuple[datetime, str]]],
    candidate_id: int,
    campaigns: Sequence[str],
    after: datetime,
) -> str | None:
    """The reason of the first failed answer after ``after`` (from ``campaigns``, or any when none are named)."""
    found = [
        (failed_at, reason)
        for (failed_for, campaign), failed in failures.items()
        if failed_for == candidate_id and (not campaigns or campaign in campaigns)
        for failed_at, reason in failed
        if failed_at >= after
    ]
    return min(found)[1] if found else None


def _sla_report(
    spec: SlaSpec,
    cases: Sequence[tuple[str, datetime, datetime, datetime | None, str | None]],
    now: datetime,
    limit: int,
) -> SlaReport:
    met = pending = 0
    breaches: list[SlaBreach] = []
    for external_id, event_at, due, done, broken in cases:
        if done is not None and done <= due:
            met += 1
        elif done is None and now < due and broken is None:
            pending += 1
        else:
            late = max(0.0, ((done or now) - due).total_seconds())
            breaches.append(SlaBreach(external_id, event_at, due, done, late, broken if done is None else None))
    decided = met + len(breaches)
    breaches.sort(key=lambda b: (b.event_at, b.candidate), reverse=True)
    return SlaReport(
        name=spec.name,
        description=spec.description,
        total=len(cases),
        met=met,
        breached=len(breaches),
        pending=pending,
        met_pct=None if decided == 0 else round(100.0 * met / decided, 2),
        worst_late_seconds=max((b.late_seconds for b in breaches), default=None),
        breaches=tuple(breaches[:limit]),
    )


# -- the queue ----------------------------------------------------------------------------------------------------


def queue(engine: Engine, now: datetime | None = None) -> QueueReport:
    """The outbox right now: depth by status and the lag of the oldest due pending row."""
    now = now or utcnow()
    m = OutboundMessage
    with Session(engine) as session:
        counts: dict[str, int] = {
            status: n for status, n in session.execute(select(m.status, func.count()).group_by(m.status))
        }
        due_pending, oldest = session.execute(
            select(func.count(), func.min(m.not_before)).where(
                m.status == MessageStatus.PENDING.value, m.not_before <= now
            )
        ).one()
        held_due = session.scalar(select(func.count()).where(m.status == MessageStatus.HELD.value, m.not_before <= now))
    return QueueReport(
        at=now,
        by_status={status.value: int(counts.get(status.value, 0)) for status in MessageStatus},
        due_pending=int(due_pending),
        held_due=int(held_due or 0),
        oldest_due_lag_seconds=max(0.0, (now - oldest).total_seconds()) if oldest is not None else 0.0,
    )
