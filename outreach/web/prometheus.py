"""Prometheus ``/metrics``: counts read from the database at scrape time.

Web processes, schedulers and delivery workers are separate processes, and the database already holds every
fact. So instead of counters kept in each process (lost on restart, split across workers), one collector
aggregates the tables when Prometheus scrapes, and caches the answer for a few seconds so dashboards with
several panels, or several scrapers, cost one round of queries.

Series (every label value is a provider, channel, status, rule, error code or event type: no personal data):

- ``outreach_messages_sent_total{channel,provider}``: outbox rows a provider accepted (they have a provider
  message id), auto-replies excluded.
- ``outreach_messages_failed_total{channel,provider,status,error_code}``: rows that ended ``failed``,
  ``bounced`` or ``undelivered``, with the provider's error code (``none`` when it gave none).
- ``outreach_messages_dropped_total{status,rule}``: rows never sent because a rule said so (``suppressed``,
  ``skipped``, ``cancelled``), by that rule.
- ``outreach_messages_deferred_total{rule}``: rows a rule held back at least once, by the rule that last did.
  The outbox keeps one ``rule`` per row and no history: a held row keeps its rule when it is released and
  sent, so it is still counted, but a row deferred twice counts once (under the later rule), and a deferred
  row that later failed is counted under its failure instead. It is a lower bound of deferral decisions.
- ``outreach_messages_held{rule}``: rows held right now, by rule.
- ``outreach_queue_depth{status}``: outbox rows per status right now.
- ``outreach_queue_lag_seconds``: how long the oldest due ``pending`` row has waited (0 when none is due).
- ``outreach_webhook_events_total{provider,type}``: provider events stored (SendGrid, Twilio), after
  de-duplication.
- ``outreach_inbound_messages_total{channel,kind}``: inbound messages stored (replies, keywords, auto-replies).
- ``outreach_auto_replies_sent_total{channel}``: our auto-replies a provider accepted.
- ``outreach_alerts_open{kind}``: alerts nobody has resolved yet, by kind (``message_failed``,
  ``message_uncertain``, ``offer_unanswered`` …): alert on ``outreach_alerts_open{kind="message_failed"} > 0``.

``/metrics`` needs no key, like ``/healthz``: it holds no personal data and Prometheus scrapes without
credentials in most deployments. Keep it off the public internet (scrape it on the internal network, or let
the reverse proxy allow only the Prometheus server) since counts still describe the business.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from outreach.core.models import AUTO_REPLY, Alert, DeliveryEvent, InboundMessage, MessageStatus, OutboundMessage
from outreach.ops.analytics import queue

__all__ = ["CACHE_SECONDS", "OutboxCollector", "registry_for", "router"]

#: How long one round of queries answers scrapes.
CACHE_SECONDS = 5.0
NONE = "none"
_FAILED = (MessageStatus.FAILED.value, MessageStatus.BOUNCED.value, MessageStatus.UNDELIVERED.value)
_DROPPED = (MessageStatus.SUPPRESSED.value, MessageStatus.SKIPPED.value, MessageStatus.CANCELLED.value)
#: Rules written on rows that are not deferral decisions (failures and the lease sweeper).
_NOT_DEFERRALS = ("template", "retries", "provider", "lease", "suppression")
_NOT_DEFERRED_STATUSES = (*_DROPPED, MessageStatus.FAILED.value)

Labels = tuple[str, ...]


@dataclass
class Snapshot:
    """One round of queries: label values → count, per series."""

    sent: dict[Labels, int] = field(default_factory=dict)
    failed: dict[Labels, int] = field(default_factory=dict)
    dropped: dict[Labels, int] = field(default_factory=dict)
    deferred: dict[Labels, int] = field(default_factory=dict)
    held: dict[Labels, int] = field(default_factory=dict)
    depth: dict[Labels, int] = field(default_factory=dict)
    lag_seconds: float = 0.0
    webhook_events: dict[Labels, int] = field(default_factory=dict)
    inbound: dict[Labels, int] = field(default_factory=dict)
    auto_replies: dict[Labels, int] = field(default_factory=dict)
    open_alerts: dict[Labels, int] = field(default_factory=dict)


def _label(value: object) -> str:
    return NONE if value is None or value == "" else str(value)


def _grouped(session: Session, statement: object) -> dict[Labels, int]:
    result: dict[Labels, int] = {}
    for row in session.execute(statement):  # type: ignore[call-overload]
        *labels, count = row
        key = tuple(_label(v) for v in labels)
        result[key] = result.get(key, 0) + int(count)
    return result


def take_snapshot(engine: Engine) -> Snapshot:
    m = OutboundMessage
    accepted = m.provider_message_id.is_not(None)
    with Session(engine) as session:
        snapshot = Snapshot(
            sent=_grouped(
                session,
                select(m.channel, m.provider, func.count())
                .where(accepted, m.category != AUTO_REPLY)
                .group_by(m.channel, m.provider),
            ),
            failed=_grouped(
                session,
                select(m.channel, m.provider, m.status, m.error_code, func.count())
                .where(m.status.in_(_FAILED))
                .group_by(m.channel, m.provider, m.status, m.error_code),
            ),
            dropped=_grouped(
                session,
                select(m.status, m.rule, func.count()).where(m.status.in_(_DROPPED)).group_by(m.status, m.rule),
            ),
            deferred=_grouped(
                session,
                select(m.rule, func.count())
                .where(
                    m.rule.is_not(None),
                    m.rule.not_in(_NOT_DEFERRALS),
                    m.status.not_in(_NOT_DEFERRED_STATUSES),
                )
                .group_by(m.rule),
            ),
            held=_grouped(
                session,
                select(m.rule, func.count()).where(m.status == MessageStatus.HELD.value).group_by(m.rule),
            ),
            webhook_events=_grouped(
                session,
                select(DeliveryEvent.provider, DeliveryEvent.type, func.count()).group_by(
                    DeliveryEvent.provider, DeliveryEvent.type
                ),
            ),
            inbound=_grouped(
                session,
                select(InboundMessage.channel, InboundMessage.kind, func.count()).group_by(
                    InboundMessage.channel, InboundMessage.kind
                ),
            ),
            auto_replies=_grouped(
                session,
                select(m.channel, func.count()).where(accepted, m.category == AUTO_REPLY).group_by(m.channel),
            ),
            open_alerts=_grouped(
                session, select(Alert.kind, func.count()).where(Alert.resolved_at.is_(None)).group_by(Alert.kind)
            ),
        )
    report = queue(engine)
    snapshot.depth = {(status,): count for status, count in report.by_status.items()}
    snapshot.lag_seconds = report.oldest_due_lag_seconds
    return snapshot


def _family(
    kind: type[CounterMetricFamily] | type[GaugeMetricFamily],
    name: str,
    documentation: str,
    labels: Iterable[str],
    values: dict[Labels, int],
) -> Metric:
    family = kind(name, documentation, labels=list(labels))
    for key, count in sorted(values.items()):
        family.add_metric(list(key), count)
    return family


class OutboxCollector(Collector):
    """Collects :func:`take_snapshot` at scrape time, answering from a cache for ``cache_seconds``."""

    def __init__(self, engine: Engine, cache_seconds: float = CACHE_SECONDS) -> None:
        self.engine = engine
        self.cache_seconds = cache_seconds
        self._lock = threading.Lock()
        self._cached: tuple[float, Snapshot] | None = None

    def snapshot(self) -> Snapshot:
        with self._lock:
            now = time.monotonic()
            if self._cached is None or now - self._cached[0] >= self.cache_seconds:
                self._cached = (now, take_snapshot(self.engine))
            return self._cached[1]

    def collect(self) -> Iterator[Metric]:
        s = self.snapshot()
        yield _family(
            CounterMetricFamily,
            "outreach_messages_sent",
            "Messages a provider accepted (auto-replies excluded).",
            ("channel", "provider"),
            s.sent,
        )
        yield _family(
            CounterMetricFamily,
            "outreach_messages_failed",
            "Messages that ended failed, bounced or undelivered, by provider error code.",
            ("channel", "provider", "status", "error_code"),
            s.failed,
        )
        yield _family(
            CounterMetricFamily,
            "outreach_messages_dropped",
            "Messages never sent because a rule suppressed, skipped or cancelled them.",
            ("status", "rule"),
            s.dropped,
        )
        yield _family(
            CounterMetricFamily,
            "outreach_messages_deferred",
            "Messages a rule held back at least once, by the last deferring rule (a lower bound).",
            ("rule",),
            s.deferred,
        )
        yield _family(GaugeMetricFamily, "outreach_messages_held", "Messages held right now.", ("rule",), s.held)
        yield _family(GaugeMetricFamily, "outreach_queue_depth", "Outbox rows per status.", ("status",), s.depth)
        lag = GaugeMetricFamily("outreach_queue_lag_seconds", "How long the oldest due pending outbox row has waited.")
        lag.add_metric([], s.lag_seconds)
        yield lag
        yield _family(
            CounterMetricFamily,
            "outreach_webhook_events",
            "Provider webhook events stored (after de-duplication).",
            ("provider", "type"),
            s.webhook_events,
        )
        yield _family(
            CounterMetricFamily,
            "outreach_inbound_messages",
            "Inbound messages stored, by kind (reply, opt_out, auto_reply …).",
            ("channel", "kind"),
            s.inbound,
        )
        yield _family(
            CounterMetricFamily,
            "outreach_auto_replies_sent",
            "Auto-replies a provider accepted.",
            ("channel",),
            s.auto_replies,
        )
        yield _family(
            GaugeMetricFamily,
            "outreach_alerts_open",
            "Alerts nobody has resolved yet, by kind (message_failed: a transactional message will not arrive).",
            ("kind",),
            s.open_alerts,
        )


def registry_for(engine: Engine, cache_seconds: float = CACHE_SECONDS) -> CollectorRegistry:
    """A registry of its own per app (not the process-global one), holding the outbox collector."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(OutboxCollector(engine, cache_seconds))
    return registry


router = APIRouter()


@router.get("/metrics", include_in_schema=False)
def metrics(request: Request) -> Response:
    """Prometheus text exposition; no key needed (see the module notes)."""
    registry: CollectorRegistry | None = getattr(request.app.state, "prometheus", None)
    if registry is None:
        registry = request.app.state.prometheus = registry_for(request.app.state.runtime.engine)
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
