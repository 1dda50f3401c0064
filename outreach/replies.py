"""Inbound email: a real reply stops the campaigns that exit on a reply; an automatic one only pauses them.

Automatic mail is recognised by its headers (RFC 3834 ``Auto-Submitted``, ``Precedence: bulk|auto_reply|list``,
``X-Autoreply``/``X-Autorespond``, Microsoft's ``X-Auto-Response-Suppress``, mailing-list headers) and by the
subjects out-of-office responders use in English and Chinese. An out-of-office answer means "not now", not
"stop": the sequence waits (``stop_on_reply.out_of_office_pause`` in the policy file) and then goes on.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from outreach.config import Settings
from outreach.enrollment import pause_for_out_of_office, record_reply
from outreach.models import Candidate, InboundMessage
from outreach.runtime import Runtime
from outreach.scheduler import insert_ignore
from outreach.tokens import sign, verify

log = logging.getLogger(__name__)

_AUTO_SUBJECT = re.compile(
    r"(out of (the )?office|automatic reply|auto[- ]?reply|autoreply|away from (the )?office|on (annual )?leave"
    r"|vacation|abwesenheit|自动回复|自動回覆|休假|不在办公室|外出)",
    re.IGNORECASE,
)
_LIST_HEADERS = ("list-id", "list-unsubscribe", "list-post", "list-help")


def reply_address(settings: Settings, outbox_id: str) -> str | None:
    """``replies+<signed outbox id>@domain`` from ``OUTREACH_EMAIL_REPLY_TO``, so a reply finds its message even
    when it comes from another address; None when no reply-to address is configured."""
    base = settings.email_reply_to
    if not base or "@" not in base:
        return None
    name, _, address = base.rpartition("<")
    address = address.rstrip(">").strip() if name or "<" in base else base.strip()
    local, _, domain = address.partition("@")
    return f"{local}+{sign(settings, 'reply', outbox_id)}@{domain}"


def outbox_id_from_reply_address(settings: Settings, address: str) -> str | None:
    """The outbox id in a reply address we minted, or None (forged, damaged or not ours)."""
    local = address.strip().strip("<>").partition("@")[0]
    _, plus, token = local.partition("+")
    return verify(settings, "reply", token) if plus else None


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
    provider_message_id: str
    from_: str
    to: str
    subject: str
    text: str
    received_at: datetime
    headers: Mapping[str, str] = field(default_factory=dict)
    raw: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class EmailResult:
    kind: str  # reply, auto_reply, unmatched, duplicate
    candidate_external_id: str | None


def handle_inbound_email(session: Session, runtime: Runtime, email: InboundEmail) -> EmailResult:
    """Store the message once and let it stop (reply) or pause (automatic) the candidate's campaigns."""
    address = email.from_.strip().lower()
    candidate = session.scalars(
        select(Candidate).where(func.lower(Candidate.email) == address).order_by(Candidate.updated_at.desc())
    ).first()
    automatic = is_automatic(email.headers, email.subject)
    kind = "auto_reply" if automatic else ("reply" if candidate is not None else "unmatched")
    stored = insert_ignore(
        session,
        InboundMessage,
        {
            "candidate_id": candidate.id if candidate else None,
            "channel": "email",
            "provider": "sendgrid",
            "provider_message_id": email.provider_message_id,
            "from_address": address,
            "to_address": email.to,
            "subject": email.subject[:500],
            "body": email.text,
            "kind": kind,
            "received_at": email.received_at,
            "raw": dict(email.raw),
        },
    )
    if not stored:
        return EmailResult("duplicate", candidate.external_id if candidate else None)
    if candidate is None:
        log.info("inbound email from an unknown sender", extra={"kind": kind})
        return EmailResult(kind, None)
    if automatic:
        pause = runtime.policy.spec.stop_on_reply.out_of_office_pause
        paused = pause_for_out_of_office(session, candidate, email.received_at, pause)
        log.info("automatic reply paused sequences", extra={"candidate_id": candidate.id, "paused": paused})
    elif runtime.policy.spec.stop_on_reply.enabled:
        stopped = record_reply(session, runtime.campaigns, candidate, email.received_at)
        log.info("reply stopped sequences", extra={"candidate_id": candidate.id, "stopped": stopped})
    return EmailResult(kind, candidate.external_id)
