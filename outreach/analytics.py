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

Every count is of distinct messages; a rate is ``None`` when its denominator is 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import date, datetime, timedelta
from enum import StrEnum
from typing import Any, Literal

from sqlalchemy import Engine

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
    "funnel",
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


Bucket = Literal["day", "week"]

#: The value a group gets when the dimension is empty (a candidate without a source, a row without a locale).
UNKNOWN = "unknown"


def _rate(numerator: int, denominator: int) -> float | None:
    return None if denominator == 0 else numerator / denominator


@dataclass(frozen=True)
class RateRow:
    """One group of :func:`rates`: its key (``None`` when not grouped), its period start and the counts.

    ``key`` is the dimension's value as text (a campaign name, a step number "0", a channel …); ``period`` is
    the first day of the bucket (a Monday for weeks) when a bucket was asked for.
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

    def as_dict(self) -> dict[str, Any]:
        return {
            "candidate": self.candidate,
            "event_at": self.event_at.isoformat(),
            "due_at": self.due_at.isoformat(),
            "done_at": self.done_at.isoformat() if self.done_at else None,
            "late_seconds": self.late_seconds,
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


def rates(
    engine: Engine,
    by: Dimension | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    bucket: Bucket | None = None,
) -> list[RateRow]:
    """Counts and rates of the messages sent in ``[since, until)``, grouped by ``by`` and/or period ``bucket``.

    ``by=Dimension.PERIOD`` groups by ``bucket`` alone (``day`` when not given). Groups are sorted by period,
    then key. See the module notes for what every count means.
    """
    raise NotImplementedError


def funnel(
    engine: Engine, since: datetime | None = None, until: datetime | None = None, by_source: bool = True
) -> FunnelReport:
    """How far the candidates who applied in ``[since, until)`` got, overall and per source channel.

    The application time is the first ``applied`` event, else when the candidate was created. A candidate
    reached a stage if the stage history (``StageChange``, either side of a move) or the current stage shows
    it or any later stage; ``hired`` counts as ``accepted`` and ``declined`` (an offer declined) as ``offer``.
    """
    raise NotImplementedError


def sla(
    engine: Engine,
    since: datetime | None = None,
    until: datetime | None = None,
    now: datetime | None = None,
    specs: Sequence[SlaSpec] = SLAS,
    limit: int = 100,
) -> list[SlaReport]:
    """Each promise in ``specs`` over its events in ``[since, until)``, judged at ``now`` (default: utcnow)."""
    raise NotImplementedError


def queue(engine: Engine, now: datetime | None = None) -> QueueReport:
    """The outbox right now: depth by status and the lag of the oldest due pending row."""
    raise NotImplementedError
