"""Messages that may or may not have reached the provider, and the alert that hands them to a person.

A row becomes ``uncertain`` when its provider call ended without an answer after the request went out
(:class:`~outreach.core.errors.AmbiguousProviderError`, rule ``ambiguous``) or when its worker died during the call
(the sweeper's ``lease`` rule). Such a row is never sent again automatically: the provider's events name our
outbox id and move it to ``sent``/``delivered`` (:mod:`outreach.inbound.events`). When no event came within
``OUTREACH_UNCERTAIN_ALERT_AFTER`` seconds, :func:`alert_uncertain_messages` (run by the scheduler's sweep)
raises one ``message_uncertain`` alert per row, so a person checks the provider's log and decides. An open alert
whose row was reconciled since is resolved by the same pass.

Alerts are keyed by the outbox id in their text (``… [outbox <id>]``), not by the enrollment: one enrollment may
have several uncertain rows, and the alerts table allows one alert per (enrollment, kind). Alert texts carry ids,
campaign and step only, never personal data.
"""

from __future__ import annotations

import logging
import re
from datetime import datetime, timedelta

from sqlalchemy import Engine, exists, literal, select, update
from sqlalchemy.orm import Session

from outreach.core.db import transaction
from outreach.core.models import Alert, MessageStatus, OutboundMessage

__all__ = ["ALERT_UNCERTAIN", "alert_uncertain_messages", "raise_uncertain_alerts"]

log = logging.getLogger(__name__)

ALERT_UNCERTAIN = "message_uncertain"

_TAG = re.compile(r"\[outbox ([0-9a-zA-Z_-]+)\]$")


def _tag(outbox_id: str) -> str:
    return f"[outbox {outbox_id}]"


def raise_uncertain_alerts(session: Session, now: datetime, window: timedelta, limit: int = 1000) -> tuple[int, int]:
    """Alert the ``uncertain`` rows older than ``window`` that have no alert yet; resolve the open alerts whose
    row is no longer ``uncertain``. Returns (raised, resolved). Safe to run on every tick and in several
    schedulers at once (PostgreSQL skips rows another pass holds)."""
    resolved = _resolve_reconciled(session, now)
    alerted = exists().where(
        Alert.kind == ALERT_UNCERTAIN,
        Alert.candidate_id == OutboundMessage.candidate_id,
        Alert.message.like(literal("%[outbox ") + OutboundMessage.id + literal("]")),
    )
    query = (
        select(
            OutboundMessage.id,
            OutboundMessage.candidate_id,
            OutboundMessage.campaign,
            OutboundMessage.step,
            OutboundMessage.channel,
            OutboundMessage.provider,
            OutboundMessage.rule,
            OutboundMessage.updated_at,
        )
        .where(
            OutboundMessage.status == MessageStatus.UNCERTAIN.value,
            OutboundMessage.updated_at <= now - window,
            ~alerted,
        )
        .order_by(OutboundMessage.updated_at, OutboundMessage.id)
        .limit(limit)
    )
    if session.get_bind().dialect.name == "postgresql":
        query = query.with_for_update(of=OutboundMessage, skip_locked=True)
    raised = 0
    for outbox_id, candidate_id, campaign, step, channel, provider, rule, since in session.execute(query).all():
        waited = int((now - since).total_seconds() // 60)
        why = "its worker stopped during the send" if rule == "lease" else "the provider call lost its answer"
        session.add(
            Alert(
                kind=ALERT_UNCERTAIN,
                candidate_id=candidate_id,
                enrollment_id=None,  # several rows of one enrollment may each need their own alert
                campaign=campaign,
                message=(
                    f"{campaign} step {step + 1} {channel} via {provider or 'provider'}: may or may not have been "
                    f"sent ({why}); no provider event for {waited} min. Check the provider's log before sending "
                    f"again; it is never resent automatically {_tag(outbox_id)}"
                ),
                created_at=now,
            )
        )
        raised += 1
    if raised:
        log.warning("uncertain messages alerted", extra={"count": raised})
    return raised, resolved


def _resolve_reconciled(session: Session, now: datetime) -> int:
    """Resolve the open ``message_uncertain`` alerts whose row a provider event has moved on since."""
    open_alerts = session.execute(
        select(Alert.id, Alert.message).where(Alert.kind == ALERT_UNCERTAIN, Alert.resolved_at.is_(None))
    ).all()
    by_outbox: dict[str, int] = {}
    for alert_id, text in open_alerts:
        found = _TAG.search(text)
        if found:
            by_outbox[found.group(1)] = alert_id
    if not by_outbox:
        return 0
    still_uncertain = set(
        session.scalars(
            select(OutboundMessage.id).where(
                OutboundMessage.id.in_(list(by_outbox)), OutboundMessage.status == MessageStatus.UNCERTAIN.value
            )
        )
    )
    done = [alert_id for outbox_id, alert_id in by_outbox.items() if outbox_id not in still_uncertain]
    if done:
        session.execute(update(Alert).where(Alert.id.in_(done), Alert.resolved_at.is_(None)).values(resolved_at=now))
    return len(done)


def alert_uncertain_messages(engine: Engine, now: datetime, window: timedelta, limit: int = 1000) -> int:
    """:func:`raise_uncertain_alerts` in a transaction of its own (the scheduler sweep's entry point); returns
    how many alerts were raised."""
    with transaction(engine) as session:
        raised, _ = raise_uncertain_alerts(session, now, window, limit)
    return raised
