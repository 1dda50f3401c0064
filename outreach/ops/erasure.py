"""Erasure of a candidate's personal data ("right to be forgotten").

The candidate row stays, stripped to what aggregate metrics need (stage, source, locale, dates), under a new
random external id; every text that could name or reach the person is removed from every table: addresses,
names, message subjects and bodies, replies, provider payloads, event data, free-text reasons. Suppressions of
their addresses are rewritten as keyed hashes (:func:`address_hash`), so an opt-out survives: the suppression
rule checks the hash as well as the address, and a new enrollment of the same address without fresh consent is
still refused. Counts, statuses and timestamps stay, so delivery and funnel figures do not change.
"""

from __future__ import annotations

import logging
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import CursorResult, Update, case, func, select, update
from sqlalchemy.orm import Session

from outreach.core.clock import utcnow
from outreach.core.config import Settings
from outreach.core.errors import NotFoundError
from outreach.core.models import (
    Alert,
    Candidate,
    CandidateEvent,
    DeliveryEvent,
    Enrollment,
    EnrollmentStatus,
    InboundMessage,
    MessageStatus,
    OutboundMessage,
    StageChange,
    Suppression,
    SuppressionScope,
    new_id,
)
from outreach.policy.consent import address_hash, suppression_address

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ErasureReport:
    """What was erased: counts only (the report itself must not hold personal data)."""

    candidate_id: int
    messages: int
    inbound: int
    events: int
    suppressions_hashed: int
    sandbox_records: int = 0

    def as_dict(self) -> dict[str, int]:
        return {
            "messages": self.messages,
            "inbound": self.inbound,
            "provider_events": self.events,
            "suppressions_hashed": self.suppressions_hashed,
            "sandbox_records": self.sandbox_records,
        }


def erase_candidate(session: Session, settings: Settings, external_id: str) -> tuple[ErasureReport, list[str]]:
    """Erase one candidate in the caller's transaction; returns the report and the addresses that were erased.

    The addresses are returned only so the caller can ask an external store (the sandbox) to forget them after
    commit; they are not kept anywhere.
    """
    candidate = session.scalar(select(Candidate).where(Candidate.external_id == external_id).with_for_update())
    if candidate is None or candidate.erased_at is not None:
        raise NotFoundError(f"candidate {external_id!r} not found")
    cid = candidate.id
    addresses = [(channel, a) for channel, a in (("email", candidate.email), ("sms", candidate.phone)) if a]

    messages = _updated(
        session,
        update(OutboundMessage)
        .where(OutboundMessage.candidate_id == cid)
        .values(subject=None, body=None, error_detail=None)
        .execution_options(synchronize_session=False),
    )
    message_ids = select(OutboundMessage.id).where(OutboundMessage.candidate_id == cid).scalar_subquery()
    events = _updated(
        session,
        update(DeliveryEvent)
        .where(DeliveryEvent.message_id.in_(message_ids))
        .values(raw={})
        .execution_options(synchronize_session=False),
    )
    inbound = _updated(
        session,
        update(InboundMessage)
        .where(InboundMessage.candidate_id == cid)
        .values(from_address="", to_address=None, subject=None, body="", raw={})
        .execution_options(synchronize_session=False),
    )
    # Nothing more goes to someone who asked to be forgotten; what was queued ends cancelled, with the rule named.
    session.execute(
        update(Enrollment)
        .where(Enrollment.candidate_id == cid)
        .values(
            context={},
            status=case(
                (Enrollment.status == EnrollmentStatus.ACTIVE.value, EnrollmentStatus.EXITED.value),
                else_=Enrollment.status,
            ),
            exit_reason=case(
                (Enrollment.status == EnrollmentStatus.ACTIVE.value, "erased"), else_=Enrollment.exit_reason
            ),
            next_run_at=None,
        )
        .execution_options(synchronize_session=False)
    )
    session.execute(
        update(OutboundMessage)
        .where(
            OutboundMessage.candidate_id == cid,
            OutboundMessage.status.in_((MessageStatus.PENDING.value, MessageStatus.HELD.value)),
        )
        .values(status=MessageStatus.CANCELLED.value, rule="erasure", reason="candidate erased")
        .execution_options(synchronize_session=False)
    )
    session.execute(
        update(CandidateEvent)
        .where(CandidateEvent.candidate_id == cid)
        .values(reason=None, data={})
        .execution_options(synchronize_session=False)
    )
    session.execute(
        update(StageChange)
        .where(StageChange.candidate_id == cid)
        .values(reason=None)
        .execution_options(synchronize_session=False)
    )
    session.execute(
        update(Alert)
        .where(Alert.candidate_id == cid)
        .values(message="(candidate erased)")
        .execution_options(synchronize_session=False)
    )
    hashed = 0
    for channel, address in addresses:
        hashed += _hash_suppression(session, settings, channel, address)
        # Inbound mail or SMS from the address that never matched the candidate (unmatched senders).
        session.execute(
            update(InboundMessage)
            .where(
                InboundMessage.channel == channel,
                func.lower(InboundMessage.from_address) == suppression_address(channel, address),
            )
            .values(from_address="", to_address=None, subject=None, body="", raw={})
            .execution_options(synchronize_session=False)
        )

    candidate.external_id = f"erased-{new_id()[:20]}"
    candidate.name = ""
    candidate.email = None
    candidate.phone = None
    candidate.timezone = None
    candidate.tags = []
    candidate.data = {}
    candidate.erased_at = utcnow()
    session.flush()
    report = ErasureReport(
        candidate_id=cid, messages=messages, inbound=inbound, events=events, suppressions_hashed=hashed
    )
    return report, [address for _, address in addresses]


def _updated(session: Session, statement: Update) -> int:
    result = session.execute(statement)
    return int(cast(CursorResult[Any], result).rowcount)


def _hash_suppression(session: Session, settings: Settings, channel: str, address: str) -> int:
    plain = suppression_address(channel, address)
    row = session.scalar(select(Suppression).where(Suppression.channel == channel, Suppression.address == plain))
    if row is None:
        return 0
    hashed = address_hash(settings.signing_key, channel, address)
    kept = session.scalar(select(Suppression).where(Suppression.channel == channel, Suppression.address == hashed))
    if kept is not None:
        if kept.scope == SuppressionScope.NURTURE.value != row.scope:
            # The wider of the two stays: an address suppressed for everything is never narrowed to nurture.
            kept.scope, kept.reason, kept.source = row.scope, row.reason, row.source
        session.delete(row)
    else:
        row.address = hashed
    return 1


def forget_in_sandbox(sandbox_url: str, addresses: list[str], timeout: float = 5.0) -> int:
    """Ask the provider sandbox (the embedded default's inbox) to drop what it holds for ``addresses``."""
    if not addresses:
        return 0
    query = urllib.parse.urlencode([("to", a) for a in addresses])
    request = urllib.request.Request(f"{sandbox_url.rstrip('/')}/_sandbox/messages?{query}", method="DELETE")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            import json

            return int(json.loads(response.read() or b"{}").get("dropped", 0))
    except (urllib.error.URLError, OSError, ValueError) as exc:
        log.warning("sandbox did not confirm erasure", extra={"error": type(exc).__name__})
        raise
