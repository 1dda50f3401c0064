"""Suppressions: the one way an address is recorded as not to be messaged, and what is queued for it ended.

Every source goes through :func:`suppress`: a provider's bounce, spam report or unsubscribe event, an SMS opt-out
keyword, a one-click unsubscribe link, a provider refusing a number for good (Twilio 21610). Addresses are keyed
one way (:func:`outreach.policy.consent.suppression_address`: emails lowercased, phones as given in E.164), the
rows are written once each (``INSERT … ON CONFLICT DO NOTHING``), and, unless the caller only records, the
messages still queued to that address (``pending`` or ``held``, for every candidate with it) become
``suppressed`` through the outbox state machine.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from outreach.core.models import Candidate, Channel, Suppression
from outreach.core.sql import CHUNK, chunks, insert_ignore_many
from outreach.pipeline import outbox
from outreach.policy.consent import suppression_address

#: The rule a message ended by a suppression carries.
SUPPRESSION_RULE = "suppression"


@dataclass(frozen=True)
class Suppress:
    """One address to suppress: ``channel`` (email or sms), the address, why, and who said so."""

    channel: str
    address: str
    reason: str
    source: str


@dataclass
class Suppressed:
    written: int = 0  # new suppression rows (an address already suppressed is not written again)
    cancelled: list[str] = field(default_factory=list)  # outbox ids that became ``suppressed``


def suppress(
    session: Session,
    entries: Sequence[Suppress],
    now: datetime,
    *,
    cancel: bool = True,
    rule: str = SUPPRESSION_RULE,
    reason: str | None = None,
) -> Suppressed:
    """Suppress every address of ``entries`` (the first entry for an address wins) and, with ``cancel``, end the
    messages queued to it with ``rule`` and ``reason`` (default: ``address suppressed: <the entry's reason>``)."""
    result = Suppressed()
    wanted: dict[tuple[str, str], Suppress] = {}
    for entry in entries:
        if entry.address and entry.address.strip():
            wanted.setdefault((entry.channel, suppression_address(entry.channel, entry.address)), entry)
    if not wanted:
        return result
    rows = [
        {"channel": channel, "address": address, "reason": entry.reason, "source": entry.source, "created_at": now}
        for (channel, address), entry in sorted(wanted.items())
    ]
    result.written = len(insert_ignore_many(session, Suppression, rows, Suppression.id))
    if not cancel:
        return result
    by_reason: dict[tuple[str, str], list[str]] = {}
    for (channel, address), entry in wanted.items():
        by_reason.setdefault((channel, entry.reason), []).append(address)
    for (channel, why), addresses in sorted(by_reason.items()):
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
                reason=reason if reason is not None else f"address suppressed: {why}",
            )
    return result
