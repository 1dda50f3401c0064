"""Inbound SMS: keywords (opt-out, opt-in, help) and conversation replies, handled once per provider message.

The Twilio inbound webhook parses the request into an :class:`InboundSms` and calls :func:`handle_inbound_sms`
inside its own transaction; whatever text comes back in :attr:`InboundResult.reply` is answered with TwiML.

* Every message is stored once (``inbound_messages`` is unique on the provider's message id): a webhook the
  provider retries is a ``duplicate`` and changes nothing.
* The sender is matched to a candidate by phone number. Several candidate records may share a number; the one
  we last texted (or else the one last updated) is the one the message belongs to.
* An opt-out keyword suppresses the *number* for all SMS from us, its carrier meaning (scope ``sms``;
  suppressions are per address, so an unknown sender is honoured too) and cancels the SMS already queued for it,
  for every candidate with that number. The confirmation is
  sent at most once per opt-out: ``suppressions.confirmed_at`` records it.
* An opt-in keyword lifts only an opt-out made by keyword (reason ``opt_out``). Suppressions from the provider
  (Twilio 21610), from bounces or from the unsubscribe link stay: the keyword does not prove the number may
  be texted again, so a person must lift those. ``YES`` is an opt-in only when there is an opt-out to lift;
  otherwise it is an ordinary answer (see :mod:`outreach.policy.keywords`).
* HELP is answered at most once per 24 hours per number, so two machines cannot talk to each other forever.
* Anything else is a reply: it stops the candidate's campaigns that exit on a reply. Keywords never do.
* A reply that arrives while the company is closed (the business calendar) gets the out-of-hours auto-reply
  (:func:`outreach.inbound.autoreply.plan_auto_reply`): an outbox row written in this transaction, whose id comes back
  in :attr:`InboundResult.queue` for the caller to enqueue after its commit.

Log lines carry kinds and ids only, never numbers or message text.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from outreach.core.clock import utcnow
from outreach.core.errors import TemplateError
from outreach.core.models import Candidate, Channel, InboundMessage, OutboundMessage, Suppression, SuppressionScope
from outreach.core.sql import insert_ignore
from outreach.domain.candidates import normalise_phone
from outreach.inbound.conversation import last_sent_to, notify_reply
from outreach.inbound.services import InboundServices
from outreach.pipeline.enrollment import record_reply
from outreach.pipeline.services import Services
from outreach.pipeline.suppression import Suppress, suppress
from outreach.policy.keywords import Keyword, classify, is_conversational

__all__ = [
    "HELP_INTERVAL",
    "OPT_OUT_REASON",
    "InboundKind",
    "InboundResult",
    "InboundSms",
    "handle_inbound_sms",
]

log = logging.getLogger(__name__)

PROVIDER = "twilio"
#: ``suppressions.reason`` of an opt-out by SMS keyword; the only reason an opt-in keyword lifts.
OPT_OUT_REASON = "opt_out"
OPT_OUT_SOURCE = "keyword"
#: The outbox rule and reason on SMS cancelled by an opt-out.
CONSENT_RULE = "consent"
CONSENT_REASON = "opted out by SMS keyword"
#: HELP is answered at most once in this long per number.
HELP_INTERVAL = timedelta(hours=24)
# How far back the HELP history is read; a number that sent more HELPs than this without a day's pause
# gets no answer.
_HELP_HISTORY_LIMIT = 200

_TEMPLATES = {
    Keyword.OPT_OUT: "system_opt_out",
    Keyword.OPT_IN: "system_opt_in",
    Keyword.HELP: "system_help",
}


class InboundKind(StrEnum):
    OPT_OUT = "opt_out"
    OPT_IN = "opt_in"
    HELP = "help"
    REPLY = "reply"
    UNMATCHED = "unmatched"
    DUPLICATE = "duplicate"


@dataclass(frozen=True)
class InboundSms:
    """One inbound SMS as the provider reported it."""

    provider_message_id: str  # Twilio MessageSid
    from_: str  # E.164
    to: str
    body: str
    received_at: datetime  # aware UTC
    raw: Mapping[str, str]


@dataclass(frozen=True)
class InboundResult:
    """What the message was (an :class:`InboundKind` value) and the text to answer with, if any.

    ``queue`` holds the outbox ids the handling wrote (the out-of-hours auto-reply); enqueue them after commit.
    """

    kind: str
    candidate_external_id: str | None
    reply: str | None
    queue: tuple[str, ...] = ()


def handle_inbound_sms(session: Session, runtime: InboundServices, sms: InboundSms) -> InboundResult:
    """Store the message once, act on it, and say what to answer. Runs in the caller's transaction.

    ``kind`` is ``opt_out``, ``opt_in`` or ``help`` for keywords (from known and unknown numbers alike),
    ``reply`` for a known candidate's message, ``unmatched`` for anyone else's, and ``duplicate`` when this
    provider message was handled before (nothing happens then and there is no answer).
    """
    if sms.received_at.tzinfo is None:
        raise ValueError("received_at must be timezone-aware")
    received_at = sms.received_at.astimezone(UTC)
    address = _address(sms.from_, runtime.settings.default_phone_region)
    candidate = _match_candidate(session, address)

    keyword = classify(sms.body)
    if keyword is Keyword.OPT_IN and is_conversational(sms.body) and not _has_opt_out(session, address):
        # "Yes" with nothing to lift is an answer, not a request to resubscribe.
        keyword = None
    if keyword is not None:
        kind = InboundKind(keyword.value)
    elif candidate is not None:
        kind = InboundKind.REPLY
    else:
        kind = InboundKind.UNMATCHED

    stored = insert_ignore(
        session,
        InboundMessage,
        {
            "candidate_id": candidate.id if candidate is not None else None,
            "channel": Channel.SMS.value,
            "provider": PROVIDER,
            "provider_message_id": sms.provider_message_id,
            "from_address": address,
            "to_address": sms.to,
            "body": sms.body,
            "kind": kind.value,
            "in_reply_to": last_sent_to(session, candidate.id, Channel.SMS.value, received_at)
            if candidate is not None
            else None,
            "received_at": received_at,
            "raw": dict(sms.raw),
            "created_at": utcnow(),
        },
    )
    external_id = candidate.external_id if candidate is not None else None
    if not stored:
        log.info("inbound sms duplicate", extra={"provider_message_id": sms.provider_message_id})
        return InboundResult(InboundKind.DUPLICATE.value, external_id, None)

    extra: dict[str, Any] = {
        "provider_message_id": sms.provider_message_id,
        "kind": kind.value,
        "candidate_id": candidate.id if candidate is not None else None,
    }
    # Rendered first: a broken system template must never stop an opt-out, and an opt-out whose confirmation
    # could not be written stays unconfirmed.
    text: str | None = None
    if keyword is not None:
        locale = candidate.locale if candidate is not None else runtime.settings.default_locale
        text = _render(runtime, _TEMPLATES[keyword], locale)

    answer = False
    queue: tuple[str, ...] = ()
    if kind is InboundKind.OPT_OUT:
        extra["cancelled"] = _opt_out(session, address)
        answer = text is not None and _claim_confirmation(session, address)
    elif kind is InboundKind.OPT_IN:
        answer = _opt_in(session, address)
    elif kind is InboundKind.HELP:
        answer = not _help_answered_within(session, address, received_at, exclude=sms.provider_message_id)
    elif kind is InboundKind.REPLY:
        assert candidate is not None
        extra["exited"] = record_reply(session, runtime.campaigns, candidate, received_at)
        message = _stored(session, sms.provider_message_id)
        notify_reply(session, candidate, Channel.SMS.value, message.id)
        auto_reply = runtime.auto_reply(session, runtime, candidate, Channel.SMS.value, message)
        queue = (auto_reply,) if auto_reply is not None else ()
        extra["auto_reply"] = auto_reply

    reply = text if answer else None
    extra["answered"] = reply is not None
    log.info("inbound sms", extra=extra)
    return InboundResult(kind.value, external_id, reply, queue)


# --- matching ----------------------------------------------------------------------------------------------


def _address(raw: str, default_region: str) -> str:
    """The sender in E.164 as candidates' numbers are stored; short codes and odd senders as given."""
    value = raw.strip()
    try:
        return normalise_phone(value, default_region)
    except ValueError:
        return value


def _match_candidate(session: Session, address: str) -> Candidate | None:
    candidates = list(
        session.scalars(
            select(Candidate)
            .where(Candidate.phone == address)
            .order_by(Candidate.updated_at.desc(), Candidate.id.desc())
            .limit(20)
        )
    )
    if len(candidates) <= 1:
        return candidates[0] if candidates else None
    # Several records share the number (a person who applied twice): the message answers our latest SMS.
    last_texted = session.execute(
        select(OutboundMessage.candidate_id, func.max(OutboundMessage.sent_at))
        .where(
            OutboundMessage.candidate_id.in_([c.id for c in candidates]),
            OutboundMessage.channel == Channel.SMS.value,
            OutboundMessage.sent_at.is_not(None),
        )
        .group_by(OutboundMessage.candidate_id)
    ).all()
    if not last_texted:
        return candidates[0]
    latest_id = max(last_texted, key=lambda row: (row[1], row[0]))[0]
    return next(c for c in candidates if c.id == latest_id)


def _stored(session: Session, provider_message_id: str) -> InboundMessage:
    """The row this message was just stored as."""
    return session.scalars(
        select(InboundMessage).where(
            InboundMessage.provider == PROVIDER,
            InboundMessage.provider_message_id == provider_message_id,
        )
    ).one()


# --- keywords ----------------------------------------------------------------------------------------------


def _has_opt_out(session: Session, address: str) -> bool:
    found = session.scalar(
        select(Suppression.id).where(
            Suppression.channel == Channel.SMS.value,
            Suppression.address == address,
            Suppression.reason == OPT_OUT_REASON,
        )
    )
    return found is not None


def _opt_out(session: Session, address: str) -> int:
    """Suppress the number and cancel what is queued for it; returns how many outbox rows were cancelled.
    Outbox rows name the candidate, not the number: every candidate with this number loses its queued SMS."""
    opt_out = Suppress(Channel.SMS.value, address, OPT_OUT_REASON, OPT_OUT_SOURCE, SuppressionScope.SMS.value)
    return len(suppress(session, [opt_out], utcnow(), rule=CONSENT_RULE, reason=CONSENT_REASON).cancelled)


def _claim_confirmation(session: Session, address: str) -> bool:
    """True once per opt-out: marks the suppression confirmed if nobody has confirmed it yet.

    A conditional update, so two STOPs handled at once confirm once (PostgreSQL makes the second wait for the
    first's row lock and then finds ``confirmed_at`` set).
    """
    row = session.execute(
        update(Suppression)
        .where(
            Suppression.channel == Channel.SMS.value,
            Suppression.address == address,
            Suppression.confirmed_at.is_(None),
        )
        .values(confirmed_at=utcnow())
        .returning(Suppression.id)
        .execution_options(synchronize_session=False)
    ).first()
    return row is not None


def _opt_in(session: Session, address: str) -> bool:
    """Lift a keyword opt-out of this number; True when there was one (only then is it confirmed)."""
    row = session.execute(
        delete(Suppression)
        .where(
            Suppression.channel == Channel.SMS.value,
            Suppression.address == address,
            Suppression.reason == OPT_OUT_REASON,
        )
        .returning(Suppression.id)
        .execution_options(synchronize_session=False)
    ).first()
    return row is not None


def _help_answered_within(session: Session, address: str, at: datetime, *, exclude: str) -> bool:
    """Whether an earlier HELP from this number was answered less than :data:`HELP_INTERVAL` before ``at``.

    Answers are not stored, so they are worked out from the HELP history: a HELP is answered when no answered
    HELP came in the interval before it. Walking back to the first HELP that had none in the interval before
    it (certainly answered) and forward from there gives the last answer, so a number that sends HELP every
    23 hours is still answered once a day rather than never again.
    """
    times = list(
        session.scalars(
            select(InboundMessage.received_at)
            .where(
                InboundMessage.channel == Channel.SMS.value,
                InboundMessage.from_address == address,
                InboundMessage.kind == InboundKind.HELP.value,
                InboundMessage.provider_message_id != exclude,
                InboundMessage.received_at <= at,
            )
            .order_by(InboundMessage.received_at.desc())
            .limit(_HELP_HISTORY_LIMIT)
        )
    )
    if not times or at - times[0] >= HELP_INTERVAL:
        return False
    # times is newest first; find the newest HELP with no HELP in the interval before it.
    anchor = next(
        (i for i in range(len(times) - 1) if times[i] - times[i + 1] >= HELP_INTERVAL),
        len(times) - 1 if len(times) < _HELP_HISTORY_LIMIT else None,
    )
    if anchor is None:
        return True  # HELP after HELP for longer than we look back: stay quiet
    last_answer = times[anchor]
    for time in reversed(times[:anchor]):
        if time - last_answer >= HELP_INTERVAL:
            last_answer = time
    return at - last_answer < HELP_INTERVAL


def _render(runtime: Services, template: str, locale: str | None) -> str | None:
    """A system reply's text, or None (logged) when the template is missing or broken."""
    settings = runtime.settings
    # System messages belong to no campaign: the company is all they know.
    context = {"company": {"name": settings.company_name, "timezone": settings.company_timezone}}
    try:
        return runtime.renderer.render_sms(template, locale, context).text
    except TemplateError as exc:
        # The message names the file and line, never context values.
        log.error("system reply template failed", extra={"template": template, "error": str(exc)})
        return None
