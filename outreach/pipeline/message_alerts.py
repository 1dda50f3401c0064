"""Alerts about single outbound messages: what a person must do because a message did not go as it should.

Every scheduler pass (its sweep) runs :func:`alert_messages`, which raises at most one alert per message and kind
(``alerts.outbox_id``) and resolves the open ones whose message has moved on:

- ``message_failed``: a **transactional** message (the job description after an application, an offer follow-up,
  the offer letter, a thank-you) that ended ``failed`` (its template, the provider, or retries ran out), was
  ``suppressed`` (an opt-out, a provider block, a cap that drops) or was ``skipped`` for want of an address. The
  promise to the candidate is broken and nothing will retry it: raised on the pass after it happened, with the rule
  and the reason in words. Resolved when the message is sent after all (a person re-sent it).
- ``message_uncertain``: a message that may or may not have reached the provider (:mod:`outreach.pipeline.outbox`,
  rule ``ambiguous`` or the sweeper's ``lease``). The provider's events (which name our outbox id) usually settle it
  within seconds, so a nurture message is alerted only when none came within ``OUTREACH_UNCERTAIN_ALERT_AFTER``; a
  transactional one at once. Where the provider can be asked (:mod:`outreach.pipeline.reconcile`), a row is left to
  the lookups while they may still settle it (found: sent; proven absent: sent again) and alerted once a lookup could
  not tell, or when they have not settled it in time. Resolved when an event or a lookup settles it.

Alert texts carry the campaign, step, channel, rule and reason, never personal data: ops may read alert counts, and
the reasons the pipeline writes name rules, templates and provider codes (provider error text is redacted of
addresses and numbers before it is stored).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Engine, and_, exists, or_, select, update
from sqlalchemy.orm import Session

from outreach.core.db import transaction
from outreach.core.models import Alert, MessageStatus, OutboundMessage
from outreach.core.sql import insert_ignore_many
from outreach.domain.campaigns import Category

__all__ = [
    "ALERT_FAILED",
    "ALERT_UNCERTAIN",
    "FAILURE_LOOKBACK",
    "alert_messages",
    "raise_failure_alerts",
    "raise_uncertain_alerts",
]

log = logging.getLogger(__name__)

ALERT_FAILED = "message_failed"
ALERT_UNCERTAIN = "message_uncertain"

#: How far back a pass looks for transactional messages that ended badly. A scheduler stopped for longer than this
#: does not alert what failed before (nor, after an upgrade, years of history).
FAILURE_LOOKBACK = timedelta(days=7)

_TRANSACTIONAL = Category.TRANSACTIONAL.value
_FAILED = MessageStatus.FAILED.value
_SUPPRESSED = MessageStatus.SUPPRESSED.value
_SKIPPED = MessageStatus.SKIPPED.value
_UNCERTAIN = MessageStatus.UNCERTAIN.value
_SETTLED = (MessageStatus.SENT.value, MessageStatus.DELIVERED.value)

_COLUMNS = (
    OutboundMessage.id,
    OutboundMessage.candidate_id,
    OutboundMessage.enrollment_id,
    OutboundMessage.campaign,
    OutboundMessage.step,
    OutboundMessage.channel,
    OutboundMessage.category,
    OutboundMessage.status,
    OutboundMessage.provider,
    OutboundMessage.rule,
    OutboundMessage.reason,
    OutboundMessage.error_code,
    OutboundMessage.error_detail,
    OutboundMessage.updated_at,
)


def _not_alerted(kind: str) -> Any:
    return ~exists().where(Alert.kind == kind, Alert.outbox_id == OutboundMessage.id)


def _failure_in_words(row: Any) -> str:
    """Why a transactional message will not reach the candidate, for the person who must act."""
    where = f"{row.campaign} step {row.step + 1} ({row.channel})"
    rule = row.rule or "unknown"
    if row.status == _FAILED:
        if rule == "template":
            why = f"its template could not be rendered: {row.error_detail or row.reason or 'no detail'}"
            act = "fix the template (outreach campaigns validate), then send it by hand"
        elif rule == "retries":
            why = f"{row.provider or 'the provider'} kept failing until the retries ran out ({row.error_code or '?'})"
            act = "check the provider's status page and send it by hand"
        else:
            detail = f": {row.error_detail}" if row.error_detail else ""
            why = f"{row.provider or 'the provider'} refused it ({row.error_code or 'no code'}{detail})"
            act = "check the candidate's address or number, then reach them another way"
    elif row.status == _SKIPPED:
        why = row.reason or "the candidate has no address on this channel"
        act = "add the address, or reach the candidate another way"
    else:
        why = f"{rule}: {row.reason or 'suppressed'}"
        act = "reach the candidate another way (a call) if the message still matters"
    return f"{where} was not sent: {why}. {act}."


def raise_failure_alerts(session: Session, now: datetime, limit: int = 1000) -> tuple[int, int]:
    """One ``message_failed`` alert per transactional message that ended failed, suppressed or skipped for want
    of an address (within :data:`FAILURE_LOOKBACK`); resolve those whose message was sent since. Returns (raised,
    resolved)."""
    failed = or_(
        OutboundMessage.status.in_((_FAILED, _SUPPRESSED)),
        and_(OutboundMessage.status == _SKIPPED, OutboundMessage.rule == "address"),
    )
    rows = session.execute(
        select(*_COLUMNS)
        .where(
            OutboundMessage.category == _TRANSACTIONAL,
            failed,
            OutboundMessage.updated_at >= now - FAILURE_LOOKBACK,
            _not_alerted(ALERT_FAILED),
        )
        .order_by(OutboundMessage.updated_at, OutboundMessage.id)
        .limit(limit)
    ).all()
    raised = _raise(session, now, ALERT_FAILED, rows, _failure_in_words)
    resolved = _resolve(session, now, ALERT_FAILED, OutboundMessage.status.in_(_SETTLED))
    if raised:
        log.warning("transactional messages failed", extra={"count": raised})
    return raised, resolved


def _uncertain_in_words(now: datetime, looked_up: Mapping[str, datetime], cannot_tell: Mapping[str, str]) -> Any:
    def words(row: Any) -> str:
        waited = int((now - row.updated_at).total_seconds() // 60)
        why = "its worker stopped during the send" if row.rule == "lease" else "the provider call lost its answer"
        provider = row.provider or "provider"
        text = (
            f"{row.campaign} step {row.step + 1} {row.channel} via {provider}: may or may not have been sent ({why}); "
            f"no provider event for {waited} min"
        )
        if row.channel not in looked_up:
            return f"{text}. Check the provider's log before sending again; it is never resent automatically"
        asked = f" ({cannot_tell[row.id]})" if row.id in cannot_tell else ""
        return (
            f"{text}, and asking {row.provider or 'the provider'} could not settle it{asked}. Lookups go on: it is "
            "sent again only if the provider proves it never got it. Check the provider's log before sending it by hand"
        )

    return words


def raise_uncertain_alerts(
    session: Session,
    now: datetime,
    window: timedelta,
    limit: int = 1000,
    *,
    settling: Mapping[str, datetime] | None = None,
    cannot_tell: Mapping[str, str] | None = None,
) -> tuple[int, int]:
    """One ``message_uncertain`` alert per ``uncertain`` row: transactional ones at once, others once ``window``
    has passed without a provider event; resolve those an event or a lookup has settled since. Returns (raised,
    resolved). Safe to run on every tick and in several schedulers at once (the alert's key makes a second one a
    no-op).

    ``settling``: per channel whose provider lookups may still settle its rows, the instant after which a row that
    became uncertain is left to them (not alerted yet); ``cannot_tell``: rows a lookup could not settle this pass
    (alerted as usual, with the lookup's reason in words)."""
    cannot_tell = cannot_tell or {}
    due = or_(OutboundMessage.category == _TRANSACTIONAL, OutboundMessage.updated_at <= now - window)
    conditions = [OutboundMessage.status == _UNCERTAIN, due, _not_alerted(ALERT_UNCERTAIN)]
    left_to_lookups = [
        and_(OutboundMessage.channel == channel, OutboundMessage.updated_at > since)
        for channel, since in sorted((settling or {}).items())
    ]
    if left_to_lookups:
        alertable = ~or_(*left_to_lookups)
        if cannot_tell:
            alertable = or_(alertable, OutboundMessage.id.in_(sorted(cannot_tell)))
        conditions.append(alertable)
    rows = session.execute(
        select(*_COLUMNS).where(*conditions).order_by(OutboundMessage.updated_at, OutboundMessage.id).limit(limit)
    ).all()
    raised = _raise(session, now, ALERT_UNCERTAIN, rows, _uncertain_in_words(now, settling or {}, cannot_tell))
    resolved = _resolve(session, now, ALERT_UNCERTAIN, OutboundMessage.status != _UNCERTAIN)
    if raised:
        log.warning("uncertain messages alerted", extra={"count": raised})
    return raised, resolved


def _raise(session: Session, now: datetime, kind: str, rows: Sequence[Any], words: Any) -> int:
    if not rows:
        return 0
    alerts = [
        {
            "kind": kind,
            "candidate_id": row.candidate_id,
            "enrollment_id": None,  # one enrollment may have several such messages, each with its own alert
            "campaign": row.campaign,
            "outbox_id": row.id,
            "message": words(row)[:500],
            "created_at": now,
        }
        for row in rows
    ]
    return len(insert_ignore_many(session, Alert, alerts, Alert.id))


def _resolve(session: Session, now: datetime, kind: str, moved_on: Any) -> int:
    """Resolve the open alerts of ``kind`` whose message now matches ``moved_on``."""
    settled = exists().where(OutboundMessage.id == Alert.outbox_id, moved_on)
    result = session.execute(
        update(Alert)
        .where(Alert.kind == kind, Alert.resolved_at.is_(None), Alert.outbox_id.is_not(None), settled)
        .values(resolved_at=now)
        .execution_options(synchronize_session=False)
    )
    return int(getattr(result, "rowcount", 0) or 0)


def alert_messages(
    engine: Engine,
    now: datetime,
    uncertain_window: timedelta,
    limit: int = 1000,
    *,
    settling: Mapping[str, datetime] | None = None,
    cannot_tell: Mapping[str, str] | None = None,
) -> int:
    """Both kinds in a transaction of their own (the scheduler sweep's entry point, after the lookups:
    ``settling`` and ``cannot_tell`` as for :func:`raise_uncertain_alerts`); how many alerts were raised."""
    with transaction(engine) as session:
        failed, _ = raise_failure_alerts(session, now, limit)
        uncertain, _ = raise_uncertain_alerts(
            session, now, uncertain_window, limit, settling=settling, cannot_tell=cannot_tell
        )
    return failed + uncertain
