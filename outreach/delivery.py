"""Deliver one outbox row: the one function the worker actor calls.

The order is fixed: claim the row (``pending`` → ``sending``, a conditional update, so one outbox id delivered
five times at once makes one provider call) → re-check that it may still go out → render → call the provider
→ record the provider's message id.

The hot path is two short transactions on one pooled connection: (1) claim (the update returns the row), lock
the candidate (one select that also reads the enrollment and job), run the rules, render and store tracked
links, commit — the ``sending`` row is durable before (2) the provider call, after which one update records
the outcome. Transient provider failures put the row back to ``pending`` with
``not_before`` set to the provider's reset time and tell the caller when to retry; permanent ones end the row
as ``failed`` with the provider's code, and suppress the address when the provider says so (Twilio 21610).
Ambiguous ones (the request went out, the answer never came: a read timeout, a reset after sending) end the row
``uncertain`` and are never retried: the provider's events reconcile it, or the sweep raises an alert.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, select, update
from sqlalchemy.orm import Session, lazyload

from outreach.autoreply import AUTO_REPLY, reply_by
from outreach.campaigns import Category
from outreach.errors import (
    AmbiguousProviderError,
    PermanentProviderError,
    TemplateError,
    TransientProviderError,
)
from outreach.links import track_email, track_sms
from outreach.models import (
    Candidate,
    Channel,
    Enrollment,
    Job,
    MessageStatus,
    OutboundMessage,
    Suppression,
    utcnow,
)
from outreach.policy.base import Stage as PolicyStage
from outreach.policy.consent import with_opt_out_hint
from outreach.providers.base import EmailMessage, SendResult, SmsMessage
from outreach.render import sms_segments
from outreach.replies import reply_address
from outreach.runtime import Runtime
from outreach.tokens import unsubscribe_url

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Outcome:
    """What happened to one delivery attempt; ``retry_in`` (seconds) asks the caller to try again later."""

    status: str
    retry_in: float | None = None
    provider_message_id: str | None = None


def claim(session: Session, outbox_id: str, now: datetime, lease: timedelta) -> OutboundMessage | None:
    """``pending`` → ``sending`` if still pending and due; returns the claimed row, or None if not ours.

    ``attempts`` on the returned row is this attempt's number."""
    return session.scalars(
        update(OutboundMessage)
        .where(
            OutboundMessage.id == outbox_id,
            OutboundMessage.status == MessageStatus.PENDING.value,
            OutboundMessage.not_before <= now,
        )
        .values(
            status=MessageStatus.SENDING.value,
            lease_until=now + lease,
            attempts=OutboundMessage.attempts + 1,
            # Provisional: caps count rows being sent by this time, so a racing worker sees this one.
            sent_at=now,
            updated_at=now,
        )
        .returning(OutboundMessage)
        .execution_options(synchronize_session=False, populate_existing=True)
    ).first()


def lock_candidate(
    session: Session, candidate_id: int, enrollment_id: int | None = None
) -> tuple[Candidate, Enrollment | None, Job | None]:
    """Serialise sends to one candidate so caps hold under concurrency (SQLite has one writer anyway).

    The same statement reads the message's enrollment and its job (neither locked), so the rules and the
    template context need no further reads."""
    postgres = session.get_bind().dialect.name == "postgresql"
    if enrollment_id is None:
        query = select(Candidate).where(Candidate.id == candidate_id)
        if postgres:
            query = query.with_for_update(key_share=True)
        return session.scalars(query).one(), None, None
    joined = (
        select(Candidate, Enrollment, Job)
        .select_from(Candidate)
        .outerjoin(Enrollment, Enrollment.id == enrollment_id)
        .outerjoin(Job, Job.id == Enrollment.job_id)
        .options(lazyload(Enrollment.candidate))
        .where(Candidate.id == candidate_id)
    )
    if postgres:
        joined = joined.with_for_update(key_share=True, of=Candidate)
    candidate, enrollment, job = session.execute(joined).one()
    return candidate, enrollment, job


def build_context(
    runtime: Runtime,
    message: OutboundMessage,
    candidate: Candidate,
    enrollment: Enrollment | None,
    job: Job | None,
) -> dict[str, Any]:
    """The variables a template sees. Keep in step with ``outreach.render.sample_context``."""
    settings = runtime.settings
    context = dict(enrollment.context) if enrollment is not None else {}
    name = candidate.name or ""
    built: dict[str, Any] = {
        "candidate": {
            "external_id": candidate.external_id,
            "name": name,
            "first_name": name.split()[0] if name.split() else name,
            "locale": candidate.locale,
            "timezone": candidate.timezone,
            "stage": candidate.stage,
            "source": candidate.source,
            "tags": list(candidate.tags),
        },
        "job": None
        if job is None
        else {
            "external_id": job.external_id,
            "title": job.title,
            "department": job.department,
            "location": job.location,
            "description": job.description,
            "booking_url": job.booking_url,
            "salary_min": job.salary_min,
            "salary_max": job.salary_max,
            "tags": list(job.tags),
        },
        "company": {"name": settings.company_name, "timezone": settings.company_timezone},
        "event": context.get("event"),
        "links": {
            "booking": job.booking_url if job is not None else None,
            "unsubscribe": unsubscribe_url(settings, message.channel, message.candidate_id),
        },
        "message": {"id": message.id},
        "campaign": {"name": message.campaign, "category": message.category},
        "concerns": [tag.split(":", 1)[1] for tag in candidate.tags if tag.startswith("concern:")],
    }
    if message.category == AUTO_REPLY:
        # The out-of-hours answer names the next business opening, in the candidate's timezone.
        built["reply_by"] = reply_by(runtime, message.created_at, candidate)
    return built


#: Facts about the send that are worth keeping even when a provider event already moved the row on.
_SEND_FACTS = ("provider", "provider_message_id", "locale", "segments", "subject", "body")


def _finish(session: Session, outbox_id: str, now: datetime, **values: Any) -> None:
    result = session.execute(
        update(OutboundMessage)
        .where(
            OutboundMessage.id == outbox_id,
            OutboundMessage.status.in_([MessageStatus.SENDING.value, MessageStatus.UNCERTAIN.value]),
        )
        .values(lease_until=None, updated_at=now, **values)
        .returning(OutboundMessage.id)
    )
    if result.first() is None:
        # The provider's webhook got here first (it may, the moment the provider accepts): keep its status,
        # add what only we know.
        facts = {k: v for k, v in values.items() if k in _SEND_FACTS and v is not None}
        if facts:
            session.execute(
                update(OutboundMessage)
                .where(OutboundMessage.id == outbox_id)
                .values(lease_until=None, updated_at=now, **facts)
            )


def backoff(attempt: int) -> float:
    """Exponential with jitter, 2 s … 5 min, when the provider gave no reset time of its own."""
    base = min(2.0**attempt, 300.0)
    return base * random.uniform(0.8, 1.2)


def deliver(runtime: Runtime, outbox_id: str, now: datetime | None = None) -> Outcome:
    # One pooled connection for the whole attempt: one checkout (and liveness check) instead of one per step.
    with runtime.engine.connect() as connection:
        return _deliver(runtime, connection, outbox_id, now or utcnow())


def _deliver(runtime: Runtime, connection: Connection, outbox_id: str, now: datetime) -> Outcome:
    settings = runtime.settings
    # One transaction: claim, lock the candidate, run the rules, render, store tracked links. An unexpected error
    # rolls it all back to pending; a template error ends the row as failed in the same transaction.
    with Session(connection, expire_on_commit=False) as session, session.begin():
        message = claim(session, outbox_id, now, timedelta(seconds=settings.lease_seconds))
        if message is None:
            return Outcome("not-pending")
        attempt = message.attempts
        candidate, enrollment, job = lock_candidate(session, message.candidate_id, message.enrollment_id)
        # The rules again, right before the provider call: state may have changed since scheduling.
        subject = runtime.policy.subject(
            candidate,
            channel=message.channel,
            category=message.category,
            campaign=message.campaign,
            now=now,
            stage=PolicyStage.SEND,
            message_id=outbox_id,
            locked=True,
            enrollment_state=None if enrollment is None else (enrollment.status, enrollment.exit_reason),
        )
        verdict = runtime.policy.evaluate(session, subject, message.enrollment_id)
        if not verdict.decision.allowed:
            held = verdict.status is MessageStatus.HELD
            session.execute(
                update(OutboundMessage)
                .where(OutboundMessage.id == outbox_id)
                .values(
                    status=verdict.status.value,
                    rule=verdict.decision.rule,
                    reason=verdict.decision.reason,
                    not_before=verdict.decision.until if held else OutboundMessage.not_before,
                    enqueued_at=None,
                    sent_at=None,
                    lease_until=None,
                    updated_at=now,
                )
                .execution_options(synchronize_session=False)
            )
            return Outcome(verdict.status.value)
        context = build_context(runtime, message, candidate, enrollment, job)
        validity = runtime.policy.sms_validity(subject) if message.channel == Channel.SMS.value else None
        try:
            payload, locale, segments = _compose(runtime, session, message, candidate, context, validity)
        except TemplateError as exc:
            _finish(
                session,
                outbox_id,
                now,
                status=MessageStatus.FAILED.value,
                rule="template",
                error_code="template",
                error_detail=str(exc)[:500],
            )
            log.error("template failed", extra={"outbox_id": outbox_id, "template": message.template})
            return Outcome(MessageStatus.FAILED.value)

    provider_name = runtime.providers.email.name if isinstance(payload, EmailMessage) else runtime.providers.sms.name
    rate = runtime.policy.spec.rate_limits.get(provider_name)
    if rate is not None:
        sender = (
            settings.email_from
            if isinstance(payload, EmailMessage)
            else (settings.sms_from or settings.twilio_messaging_service_sid)
        )
        booking = runtime.pacer.book(f"{provider_name}:{sender}", rate, cost=float(segments or 1))
        if not booking.granted:
            # The sender is booked out for a while: give the slot back and come back when it frees.
            _release(connection, outbox_id, utcnow(), booking.wait, attempts=OutboundMessage.attempts - 1)
            return Outcome(MessageStatus.PENDING.value, retry_in=booking.wait)
        if booking.wait > 0:
            time.sleep(booking.wait)

    try:
        result: SendResult
        if isinstance(payload, EmailMessage):
            result = runtime.providers.email.send_email(payload)
        else:
            result = runtime.providers.sms.send_sms(payload)
    except AmbiguousProviderError as exc:
        # The request went out and no answer came back: the provider may have the message. Sending it again
        # could reach the candidate twice, so the row waits, uncertain, for the provider's events (which name our
        # id) to reconcile it; the scheduler's sweep alerts a person when none come.
        with Session(connection) as session, session.begin():
            _finish(
                session,
                outbox_id,
                utcnow(),
                status=MessageStatus.UNCERTAIN.value,
                rule="ambiguous",
                reason=f"{exc.provider} call failed after the request was sent ({str(exc)[:200]}); it may have "
                "been accepted: reconcile from provider events, do not resend",
                provider=exc.provider,
                subject=payload.subject if isinstance(payload, EmailMessage) else None,
                body=payload.text if isinstance(payload, EmailMessage) else payload.body,
                locale=locale,
                segments=segments,
                error_code=exc.code or "ambiguous",
                error_detail=str(exc)[:500],
            )
        log.warning("provider answer lost; message uncertain", extra={"outbox_id": outbox_id, "provider": exc.provider})
        return Outcome(MessageStatus.UNCERTAIN.value)
    except TransientProviderError as exc:
        if attempt >= settings.max_retries:
            with Session(connection) as session, session.begin():
                _finish(
                    session,
                    outbox_id,
                    utcnow(),
                    status=MessageStatus.FAILED.value,
                    rule="retries",
                    error_code=exc.code or str(exc.status or "transient"),
                    error_detail=str(exc)[:500],
                )
            return Outcome(MessageStatus.FAILED.value)
        delay = exc.retry_after if exc.retry_after is not None else backoff(attempt)
        _release(
            connection,
            outbox_id,
            utcnow(),
            delay,
            error_code=exc.code or str(exc.status or "network"),
            error_detail=str(exc)[:500],
        )
        log.warning(
            "provider busy; retrying",
            extra={"outbox_id": outbox_id, "provider": exc.provider, "status": exc.status, "delay": delay},
        )
        return Outcome(MessageStatus.PENDING.value, retry_in=delay)
    except PermanentProviderError as exc:
        with Session(connection) as session, session.begin():
            _finish(
                session,
                outbox_id,
                utcnow(),
                status=MessageStatus.FAILED.value,
                rule="provider",
                provider=exc.provider,
                error_code=exc.code or str(exc.status),
                error_detail=str(exc)[:500],
            )
            if exc.suppress:
                from outreach.scheduler import insert_ignore

                insert_ignore(
                    session,
                    Suppression,
                    {
                        "channel": message.channel,
                        "address": payload.to,
                        "reason": f"{exc.provider} {exc.code}",
                        "source": "provider",
                        "created_at": utcnow(),
                    },
                )
        log.warning(
            "provider refused message",
            extra={"outbox_id": outbox_id, "provider": exc.provider, "code": exc.code},
        )
        return Outcome(MessageStatus.FAILED.value)

    # The claim time stands as the send time: caps counted the row from then on, and they must keep agreeing.
    sent_at = now
    with Session(connection) as session, session.begin():
        _finish(
            session,
            outbox_id,
            sent_at,
            status=MessageStatus.SENT.value,
            subject=payload.subject if isinstance(payload, EmailMessage) else None,
            body=payload.text if isinstance(payload, EmailMessage) else payload.body,
            provider=result.provider,
            provider_message_id=result.provider_message_id,
            sent_at=sent_at,
            locale=locale,
            segments=segments,
            error_code=None,
            error_detail=None,
        )
    return Outcome(MessageStatus.SENT.value, provider_message_id=result.provider_message_id)


def _compose(
    runtime: Runtime,
    session: Session,
    message: OutboundMessage,
    candidate: Candidate,
    context: dict[str, Any],
    validity: int | None,
) -> tuple[EmailMessage | SmsMessage, str, int | None]:
    """Render the message for its provider: (payload, locale, SMS segments). Tracked links go into ``session``."""
    settings = runtime.settings
    outbox_id = message.id
    if message.channel == Channel.EMAIL.value:
        email = runtime.renderer.render_email(message.template, candidate.locale, context)
        # Click tracking (outreach.links): links become signed /r/ redirects if the campaign tracks clicks.
        email = track_email(runtime, message, email, context, session)
        headers: dict[str, str] = {}
        if message.category == AUTO_REPLY:
            # RFC 3834: so the other side's auto-responder does not answer our auto-reply.
            headers = {"Auto-Submitted": "auto-replied"}
        if message.category == Category.NURTURE.value:
            link = context["links"]["unsubscribe"]
            headers = {
                "List-Unsubscribe": f"<{link}>",
                "List-Unsubscribe-Post": "List-Unsubscribe=One-Click",
            }
        payload = EmailMessage(
            message_id=outbox_id,
            to=candidate.email or "",
            subject=email.subject,
            text=email.text,
            html=email.html,
            from_email=settings.email_from,
            reply_to=reply_address(settings, outbox_id) or settings.email_reply_to or None,
            categories=(message.campaign, message.template),
            custom_args={"outreach_id": outbox_id},
            headers=headers,
        )
        return payload, email.locale, None
    sms = runtime.renderer.render_sms(message.template, candidate.locale, context)
    body = track_sms(runtime, message, sms.text, context, session)  # click tracking (outreach.links)
    if message.category == Category.NURTURE.value:
        body = with_opt_out_hint(body, sms.locale)
    sms_payload = SmsMessage(
        message_id=outbox_id,
        to=candidate.phone or "",
        body=body,
        status_callback=f"{settings.public_url}/webhooks/twilio/status?outreach_id={outbox_id}",
        validity_period=validity,
    )
    return sms_payload, sms.locale, sms_segments(body)[1]


def _release(connection: Connection, outbox_id: str, now: datetime, delay: float, **values: Any) -> None:
    retry_at = now + timedelta(seconds=delay)
    with Session(connection) as session, session.begin():
        session.execute(
            update(OutboundMessage)
            .where(OutboundMessage.id == outbox_id, OutboundMessage.status == MessageStatus.SENDING.value)
            .values(
                status=MessageStatus.PENDING.value,
                not_before=retry_at,
                enqueued_at=retry_at,
                lease_until=None,
                sent_at=None,
                updated_at=now,
                **values,
            )
        )
