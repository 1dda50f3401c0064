"""Inbound email: a real reply stops the campaigns that exit on a reply and tells HR; an automatic one only pauses.

A message is matched to a candidate by the reply token in any recipient address first (every email we send has
``replies+<signed outbox id>@…`` as its Reply-To, so the token names the message answered, even when the candidate
writes from another address), else by the sender's address, case-insensitively.

Automatic mail is recognised by its headers (RFC 3834 ``Auto-Submitted``, ``Precedence: bulk|auto_reply|list``,
``X-Autoreply``/``X-Autorespond``, Microsoft's ``X-Auto-Response-Suppress``, mailing-list headers) and by the
subjects out-of-office responders use in English and Chinese. An out-of-office answer means "not now", not
"stop": the sequence waits (``stop_on_reply.out_of_office_pause`` in the policy file) and then goes on.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import getaddresses, parseaddr
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from outreach.core.clock import utcnow
from outreach.core.config import Settings
from outreach.core.models import Candidate, Channel, InboundMessage, OutboundMessage
from outreach.core.sql import insert_ignore
from outreach.domain.tokens import outbox_id_from_reply_address
from outreach.inbound.conversation import last_sent_to, notify_reply, stored_inbound_id
from outreach.inbound.services import InboundServices
from outreach.pipeline.enrollment import pause_for_out_of_office, record_reply

log = logging.getLogger(__name__)

PROVIDER = "sendgrid"

_AUTO_SUBJECT = re.compile(
    r"(out of (the )?office|automatic reply|auto[- ]?reply|autoreply|away from (the )?office|on (annual )?leave"
    r"|vacation|abwesenheit|自动回复|自動回覆|休假|不在办公室|外出)",
    re.IGNORECASE,
)
_LIST_HEADERS = ("list-id", "list-unsubscribe", "list-post", "list-help")


def is_automatic(headers: Mapping[str, str], subject: str | None) -> bool:
    """True for mail a machine sent on someone's behalf (out-of-office, bulk, lists, bounces)."""
    lowered = {k.lower(): v.strip().lower() for k, v in headers.items()}
    if lowered.get("auto-submitted", "no") not in ("", "no"):
        return True
    if lowered.get("precedence") in {"bulk", "auto_reply", "list", "junk"}:
        return True
    if any(name in lowered for name in ("x-autoreply", "x-autorespond", "x-auto-response-suppress")):
        return True
    if any(name in lowered for name in _LIST_HEADERS):
        return True
    if lowered.get("return-path") == "<>":
        return True
    return bool(subject and _AUTO_SUBJECT.search(subject))


@dataclass(frozen=True)
class InboundEmail:
    """One inbound email as the provider reported it.

    ``to`` is the To header as given; ``recipients`` are the other addresses it was delivered to (Cc, the SMTP
    envelope), all searched for our reply token.
    """

    provider_message_id: str
    from_: str
    to: str
    subject: str
    text: str
    received_at: datetime
    headers: Mapping[str, str] = field(default_factory=dict)
    raw: Mapping[str, Any] = field(default_factory=dict)
    recipients: tuple[str, ...] = ()


@dataclass(frozen=True)
class EmailResult:
    kind: str  # reply, auto_reply, unmatched, duplicate
    candidate_external_id: str | None
    inbound_id: int | None = None
    #: Outbox ids to enqueue once the transaction has committed (the out-of-hours auto-reply).
    queue: tuple[str, ...] = ()


@dataclass(frozen=True)
class _Match:
    candidate: Candidate | None
    in_reply_to: str | None
    to_address: str | None
    by_token: bool = False


def _addresses(values: Sequence[str]) -> list[str]:
    return [address for _, address in getaddresses([v for v in values if v]) if address]


def _match(session: Session, settings: Settings, email: InboundEmail, sender: str) -> _Match:
    """The reply token in any recipient address names the message answered (hence the candidate, whatever address
    they write from); without one, the sender's address names the candidate and the answer is to our last email."""
    recipients = _addresses([email.to, *email.recipients])
    for address in recipients:
        outbox_id = outbox_id_from_reply_address(settings, address)
        if outbox_id is None:
            continue
        candidate_id = session.scalar(select(OutboundMessage.candidate_id).where(OutboundMessage.id == outbox_id))
        if candidate_id is not None:
            return _Match(session.get(Candidate, candidate_id), outbox_id, address, by_token=True)
    first = recipients[0] if recipients else (email.to or None)
    candidate = session.scalars(
        select(Candidate)
        .where(func.lower(Candidate.email) == sender)
        .order_by(Candidate.updated_at.desc(), Candidate.id.desc())
        .limit(1)
    ).first()
    if candidate is None:
        return _Match(None, None, first)
    return _Match(candidate, last_sent_to(session, candidate.id, Channel.EMAIL.value, email.received_at), first)


def handle_inbound_email(session: Session, runtime: InboundServices, email: InboundEmail) -> EmailResult:
    """Store the message once and act on it, in the caller's transaction.

    A real reply stops the candidate's campaigns that exit on a reply, raises a ``candidate_replied`` alert for HR
    and may plan the out-of-hours auto-reply (its outbox id comes back in :attr:`EmailResult.queue`, to enqueue
    after commit). Automatic mail only pauses the sequences. Duplicates and unknown senders change nothing else.
    """
    if email.received_at.tzinfo is None:
        raise ValueError("received_at must be timezone-aware")
    received_at = email.received_at.astimezone(UTC)
    sender = (parseaddr(email.from_)[1] or email.from_).strip().lower()
    match = _match(session, runtime.settings, email, sender)
    candidate = match.candidate
    automatic = is_automatic(email.headers, email.subject)
    kind = "auto_reply" if automatic else ("reply" if candidate is not None else "unmatched")
    stored = insert_ignore(
        session,
        InboundMessage,
        {
            "candidate_id": candidate.id if candidate else None,
            "channel": Channel.EMAIL.value,
            "provider": PROVIDER,
            "provider_message_id": email.provider_message_id,
            "from_address": sender[:320],
            "to_address": match.to_address[:320] if match.to_address else None,
            "subject": email.subject[:500],
            "body": email.text,
            "kind": kind,
            "in_reply_to": match.in_reply_to,
            "received_at": received_at,
            "raw": dict(email.raw),
            "created_at": utcnow(),
        },
    )
    external_id = candidate.external_id if candidate else None
    if not stored:
        log.info("inbound email duplicate", extra={"provider_message_id": email.provider_message_id})
        return EmailResult("duplicate", external_id)
    inbound_id = stored_inbound_id(session, PROVIDER, email.provider_message_id)
    extra: dict[str, Any] = {"kind": kind, "inbound_id": inbound_id, "by_token": match.by_token}
    if candidate is None:
        log.info("inbound email from an unknown sender", extra=extra)
        return EmailResult(kind, None, inbound_id)
    extra["candidate_id"] = candidate.id
    if automatic:
        pause = runtime.policy.spec.stop_on_reply.out_of_office_pause
        extra["paused"] = pause_for_out_of_office(session, candidate, received_at, pause)
        log.info("automatic reply paused sequences", extra=extra)
        return EmailResult(kind, external_id, inbound_id)
    if runtime.policy.spec.stop_on_reply.enabled:
        extra["stopped"] = record_reply(session, runtime.campaigns, candidate, received_at)
    notify_reply(session, candidate, Channel.EMAIL.value, inbound_id)
    queue = _plan_auto_reply(session, runtime, candidate, inbound_id)
    extra["queued"] = len(queue)
    log.info("reply received", extra=extra)
    return EmailResult(kind, external_id, inbound_id, queue)


def _plan_auto_reply(
    session: Session, runtime: InboundServices, candidate: Candidate, inbound_id: int | None
) -> tuple[str, ...]:
    """The out-of-hours auto-reply for a real reply, if one is due (the runtime's planner decides)."""
    inbound = session.get(InboundMessage, inbound_id) if inbound_id is not None else None
    if inbound is None:
        return ()
    outbox_id = runtime.auto_reply(session, runtime, candidate, Channel.EMAIL.value, inbound)
    return (outbox_id,) if outbox_id else ()
