"""Suppressions: the one way an address is recorded as not to be messaged, and what is queued for it ended.

Every source goes through :func:`suppress`: a provider's bounce, spam report or unsubscribe event, an SMS opt-out
keyword, a one-click unsubscribe link (:func:`unsubscribe`), a provider refusing a number for good (Twilio 21610).
Each says what it stops (its :class:`~outreach.core.models.SuppressionScope`): nurture messages only (the
unsubscribe link), or everything on the channel (the candidate asked: ``email`` / ``sms``; the provider will not
deliver: ``provider``). Addresses are keyed one way (:func:`outreach.policy.consent.suppression_address`: emails
lowercased, phones as given in E.164). There is one row per address and channel, written once (``INSERT … ON
CONFLICT``): a channel-wide suppression replaces a ``nurture`` one, nothing ever narrows one. Unless the caller
only records, the messages still queued to that address (``pending`` or ``held``, for every candidate with it)
that the suppression stops become ``suppressed`` through the outbox state machine.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import Table, func, select
from sqlalchemy.orm import Session

from outreach.core.models import Candidate, Channel, OutboundMessage, Suppression, SuppressionScope
from outreach.core.sql import CHUNK, chunks, insert_or_replace_many
from outreach.domain.campaigns import Category
from outreach.pipeline import outbox
from outreach.policy.consent import NO_CONSENT_REASON, NurtureConsentRule, suppressed_reason, suppression_address

#: The rule a message ended by a suppression carries.
SUPPRESSION_RULE = "suppression"

_NURTURE_SCOPE = SuppressionScope.NURTURE.value


@dataclass(frozen=True)
class Suppress:
    """One address to suppress: ``channel`` (email or sms), the address, why, who said so, and what it stops
    (``scope``, a :class:`~outreach.core.models.SuppressionScope` value)."""

    channel: str
    address: str
    reason: str
    source: str
    scope: str


@dataclass
class Suppressed:
    written: int = 0  # suppression rows written or widened (an address already suppressed as widely is not)
    cancelled: list[str] = field(default_factory=list)  # outbox ids that became ``suppressed``


def _wider(scope: str, than: str) -> bool:
    """Whether a suppression of ``scope`` stops more than one of ``than`` (every scope but nurture stops all)."""
    return than == _NURTURE_SCOPE and scope != _NURTURE_SCOPE


def _widens(table: Table, excluded: Any) -> Any:
    return (table.c.scope == _NURTURE_SCOPE) & (excluded.scope != _NURTURE_SCOPE)


def suppress(
    session: Session,
    entries: Sequence[Suppress],
    now: datetime,
    *,
    cancel: bool = True,
    rule: str = SUPPRESSION_RULE,
    reason: str | None = None,
) -> Suppressed:
    """Suppress every address of ``entries`` (for an address named twice, the wider entry, else the first, wins)
    and, with ``cancel``, end the messages queued to it that the suppression stops (only nurture ones for a
    ``nurture`` scope) with ``rule`` and ``reason`` (default: the send-time reason, ``address suppressed: <the
    entry's reason>``, or ``address suppressed for nurture: …``)."""
    result = Suppressed()
    wanted: dict[tuple[str, str], Suppress] = {}
    for entry in entries:
        if entry.address and entry.address.strip():
            key = (entry.channel, suppression_address(entry.channel, entry.address))
            known = wanted.get(key)
            if known is None or _wider(entry.scope, known.scope):
                wanted[key] = entry
    if not wanted:
        return result
    rows = [
        {
            "channel": channel,
            "address": address,
            "reason": entry.reason,
            "source": entry.source,
            "scope": entry.scope,
            "created_at": now,
        }
        for (channel, address), entry in sorted(wanted.items())
    ]
    written = insert_or_replace_many(
        session,
        Suppression,
        rows,
        Suppression.id,
        conflict=("channel", "address"),
        replace=("reason", "source", "scope", "created_at"),
        when=_widens,
    )
    result.written = len(written)
    if not cancel:
        return result
    by_reason: dict[tuple[str, str, str], list[str]] = {}
    for (channel, address), entry in wanted.items():
        by_reason.setdefault((channel, entry.scope, entry.reason), []).append(address)
    for (channel, scope, why), addresses in sorted(by_reason.items()):
        for chunk in chunks(sorted(addresses), CHUNK):
            match = (
                func.lower(Candidate.email).in_(chunk) if channel == Channel.EMAIL.value else Candidate.phone.in_(chunk)
            )
            result.cancelled += outbox.suppress_queued(
                session,
                channel,
                select(Candidate.id).where(match),
                now,
                rule=rule,
                reason=reason if reason is not None else suppressed_reason(scope, why),
                category=Category.NURTURE.value if scope == _NURTURE_SCOPE else None,
            )
    return result


@dataclass(frozen=True)
class Unsubscribed:
    """What an unsubscribe link did: the channel of the message it came in, and the queued messages it ended."""

    channel: str
    cancelled: list[str]


def unsubscribe(session: Session, outbox_id: str, now: datetime, *, everything: bool = False) -> Unsubscribed | None:
    """What the unsubscribe link of the message stored as ``outbox_id`` does; None when there is no such message.

    The candidate's nurture consent is withdrawn, their address on the message's channel is suppressed for nurture
    (or, with ``everything``, for all messages on that channel: the page's explicit second choice), and the
    messages queued that this stops end ``suppressed``: nurture ones on every channel (the consent rule's reason on
    the other channel), and with ``everything`` all of them on this channel. Mail about an application or offer
    still goes unless ``everything``.
    """
    found = session.execute(
        select(OutboundMessage.candidate_id, OutboundMessage.channel).where(OutboundMessage.id == outbox_id)
    ).first()
    if found is None:
        return None
    candidate_id, channel = found
    candidate = session.get(Candidate, candidate_id)
    if candidate is None:
        return None
    candidate.nurture_consent = False
    address = candidate.email if channel == Channel.EMAIL.value else candidate.phone
    scope = channel if everything else _NURTURE_SCOPE
    cancelled: list[str] = []
    if address:
        cancelled += suppress(session, [Suppress(channel, address, "unsubscribed", "link", scope)], now).cancelled
    for other in Channel:
        cancelled += outbox.suppress_queued(
            session,
            other.value,
            [candidate.id],
            now,
            rule=NurtureConsentRule.name,
            reason=NO_CONSENT_REASON,
            category=Category.NURTURE.value,
        )
    return Unsubscribed(channel, cancelled)
