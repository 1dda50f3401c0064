"""Deliver outbox rows one request per message: what the worker actors call, for a group of ids or for one.

This is one of the two ways of calling a provider over the outbox's transitions (:mod:`outreach.pipeline.outbox`, which
owns every write of a row in flight); the other is :mod:`outreach.pipeline.batch` (many nurture emails in one SendGrid
request). Both go through the same claim, hand-off, record, fail, uncertain and give-back functions.

A group is the ids enqueued together (a scheduler pass, the sweeper), up to ``outreach.service.broker.GROUP_SIZE`` in
one broker message. Per group, on one pooled connection:

1. **Claim, check, render: one transaction.** One statement (:func:`outreach.pipeline.outbox.claim`) claims every row of
   the group that is still ``pending`` and due (``pending`` → ``sending``, a provisional ``sent_at`` so caps count
   it, a lease, and the claim marker ``rule = 'claimed'``; rows another worker is claiming are skipped), one locks
   their candidates in id order (``FOR NO KEY UPDATE``, read with the enrollments and jobs), and the rules' reads
   (suppressions, recent sends) are loaded once (:class:`outreach.policy.bulk.PolicyReads`). Every rule runs for
   every row; two rows of one candidate are counted by the caps one after the other. Refused rows get their
   status, rule and reason; allowed ones are rendered and their tracked links stored (one insert for the group); a
   template error ends its row ``failed``. Commit.
2. **Hand-off, then the call, per row.** One short autocommit update (:func:`outreach.pipeline.outbox.hand_off`) clears
   the marker and counts the attempt (``attempts + 1``, the lease renewed) — only then is the provider called, one
   request per message. A row whose hand-off finds it no longer claimed (the sweeper took it back after its lease ran
   out) is skipped. The sweeper puts a ``sending`` row whose lease expired while still marked ``claimed`` back to
   ``pending`` (it never reached a provider); one without the marker becomes ``uncertain`` (it may have).
3. **Record.** Accepted rows are written ``sent`` (:func:`outreach.pipeline.outbox.record_sent`: provider id, what went
   out) in bulk: on PostgreSQL in the next row's hand-off statement (a data-modifying CTE, so one commit per message)
   and at the group's end, elsewhere every few sends; a provider event that already moved a row on keeps its status and
   the row only gains the send's facts. A worker killed between a send and its record leaves the row ``sending`` without
   the marker: ``uncertain``, reconciled from provider events or lookups (:mod:`outreach.pipeline.reconcile`), never
   resent unless the provider proves it never got it.

Provider outcomes per row: transient (429, 5xx, a connection that never opened) puts the row back to ``pending``
with ``not_before`` at the provider's reset time (or a backoff) and asks the caller to wake that row again then
(a 429 also gives back the group's rows not yet handed off: the account is rate limited); ambiguous (the request
went out, the answer never came: a read timeout, a reset after sending) ends it ``uncertain``, never resent;
permanent ends it ``failed`` with the provider's code and suppresses the address when the provider says so
(Twilio 21610). A sender booked out by the pacer gives back the rest of the group the same way. Anything
unexpected (the database gone) gives back the rows not yet handed off before it propagates.

:func:`deliver` is the same path for one id.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, select
from sqlalchemy.orm import Session

from outreach.core.clock import travel, utcnow
from outreach.core.errors import (
    AmbiguousProviderError,
    PermanentProviderError,
    TemplateError,
    TransientProviderError,
)
from outreach.core.models import (
    AUTO_REPLY,
    Candidate,
    Channel,
    Enrollment,
    Job,
    MessageStatus,
    OutboundMessage,
    SuppressionScope,
)
from outreach.core.sql import one_of
from outreach.domain.campaigns import Category
from outreach.domain.render import sms_segments
from outreach.domain.tokens import reply_address
from outreach.pipeline import outbox
from outreach.pipeline.context import build_context
from outreach.pipeline.links import LinkSet
from outreach.pipeline.outbox import STOP_REFUSED, pending_again, refused
from outreach.pipeline.services import Services
from outreach.pipeline.suppression import Suppress, suppress
from outreach.policy.base import Stage as PolicyStage
from outreach.policy.bulk import PolicyReads
from outreach.policy.consent import with_opt_out_hint
from outreach.policy.engine import Outcome as Verdict
from outreach.providers.base import EmailMessage, SendResult, SmsMessage

# The transitions live in outreach.pipeline.outbox; STOP_REFUSED, pending_again and refused stay importable from here.
__all__ = [
    "NOT_PENDING",
    "RECORD_EVERY",
    "STOP_REFUSED",
    "Outcome",
    "backoff",
    "build_context",
    "claim",
    "deliver",
    "deliver_group",
    "pending_again",
    "refused",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Outcome:
    """What happened to one delivery attempt; ``retry_in`` (seconds) asks the caller to try again later."""

    status: str
    retry_in: float | None = None
    provider_message_id: str | None = None


def claim(session: Session, outbox_id: str, now: datetime, lease: timedelta) -> OutboundMessage | None:
    """One row claimed and handed off at once (:func:`outreach.pipeline.outbox.claim`, then
    :func:`outreach.pipeline.outbox.hand_off`: ``sending``, counted in ``attempts``, no claim marker): what a worker
    leaves behind when it stops right before the provider call. Returns the row, or None if it was not pending and due.
    :func:`deliver_group` claims and hands off in two steps instead."""
    connection = session.connection()
    if not outbox.claim(connection, [outbox_id], now, lease):
        return None
    outbox.hand_off(connection, [outbox_id], now + lease, now)
    return session.get(OutboundMessage, outbox_id, populate_existing=True)


NOT_PENDING = Outcome("not-pending")

#: Accepted sends wait for their ``sent`` record in memory at most this many at a time (and never past the group's
#: end; on PostgreSQL only until the next hand-off): a worker killed in between leaves at most this many rows
#: ``uncertain`` instead of ``sent``.
RECORD_EVERY = 8


def backoff(attempt: int) -> float:
    """Exponential with jitter, 2 s … 5 min, when the provider gave no reset time of its own."""
    base = min(2.0**attempt, 300.0)
    return base * random.uniform(0.8, 1.2)


def deliver(runtime: Services, outbox_id: str, now: datetime | None = None) -> Outcome:
    """Deliver one outbox row (a group of one); ``not-pending`` when it was not pending and due."""
    return deliver_group(runtime, [outbox_id], now)[outbox_id]


def deliver_group(runtime: Services, outbox_ids: Sequence[str], now: datetime | None = None) -> dict[str, Outcome]:
    """Deliver a group of outbox rows (module docstring); the outcome of each id, ``not-pending`` for rows that
    were not pending and due (sent already, another worker's, deferred)."""
    ids = list(dict.fromkeys(outbox_ids))
    outcomes = dict.fromkeys(ids, NOT_PENDING)
    if not ids:
        return outcomes
    with travel(now):
        return _deliver_group(runtime, ids, now or utcnow(), outcomes)


def _deliver_group(
    runtime: Services, ids: list[str], now: datetime, outcomes: dict[str, Outcome]
) -> dict[str, Outcome]:
    # One pooled connection for the whole group: one checkout instead of one per step.
    with runtime.engine.connect() as connection:
        sends = _claim_and_prepare(runtime, connection, ids, now, outcomes)
        if sends:
            # Each hand-off and each record is one statement that must be durable on its own: no BEGIN/COMMIT
            # round trips around them.
            connection.execution_options(isolation_level="AUTOCOMMIT")
            _send_all(runtime, connection, sends, now, outcomes)
    return outcomes


# -- 1. claim, check, render ---------------------------------------------------------------------------------


@dataclass
class _Send:
    """One allowed, rendered row of the group, waiting for its hand-off and provider call."""

    id: str
    attempts: int  # attempts before this one
    payload: EmailMessage | SmsMessage
    locale: str
    segments: int | None
    handed_off: bool = False


def _lock_people(
    session: Session, postgres: bool, ids: Sequence[str]
) -> dict[str, tuple[Candidate, Enrollment | None, Job | None]]:
    """Lock the claimed rows' candidates (in id order, so caps hold under concurrency and groups do not deadlock)
    and read each row's enrollment and job in the same statement; by outbox id."""
    om = OutboundMessage
    query = (
        select(
            om.id,
            Candidate,
            Enrollment.id,
            Enrollment.status,
            Enrollment.exit_reason,
            Enrollment.context,
            Job,
        )
        .select_from(om)
        .join(Candidate, Candidate.id == om.candidate_id)
        .outerjoin(Enrollment, Enrollment.id == om.enrollment_id)
        .outerjoin(Job, Job.id == Enrollment.job_id)
        .where(one_of(session, om.id, ids))
        .order_by(Candidate.id)
    )
    if postgres:
        query = query.with_for_update(key_share=True, of=Candidate)
    people: dict[str, tuple[Candidate, Enrollment | None, Job | None]] = {}
    for outbox_id, candidate, enrollment_id, status, exit_reason, context, job in session.execute(query):
        enrollment = (
            None
            if enrollment_id is None
            else Enrollment(id=enrollment_id, status=status, exit_reason=exit_reason, context=context or {})
        )
        people[outbox_id] = (candidate, enrollment, job)
    return people


def _claim_and_prepare(
    runtime: Services, connection: Connection, ids: Sequence[str], now: datetime, outcomes: dict[str, Outcome]
) -> list[_Send]:
    """Transaction 1: claim, lock, rules, render, tracked links. Returns what may go out, in sending order."""
    settings = runtime.settings
    policy = runtime.policy
    postgres = connection.dialect.name == "postgresql"
    ready: list[tuple[Any, Any]] = []
    with connection.begin():
        claimed = outbox.claim(connection, ids, now, timedelta(seconds=settings.lease_seconds))
        if not claimed:
            return []
        claimed_ids = [row.id for row in claimed]
        with Session(bind=connection, autoflush=False, expire_on_commit=False) as session:
            people = _lock_people(session, postgres, claimed_ids)
            candidates = {candidate.id: candidate for candidate, _, _ in people.values()}
            channels = {row.channel for row in claimed}
            # The engine's rules run on reads shared by the group.
            reads = PolicyReads.load(session, policy, candidates.values(), channels, now, exclude=claimed_ids)
            links = LinkSet(runtime)
            stopped: list[dict[str, Any]] = []
            # Rows of one candidate one after the other, so the caps count the earlier ones that go out.
            for row in sorted(claimed, key=lambda r: (r.candidate_id, r.id)):
                candidate, enrollment, job = people[row.id]
                state = None if enrollment is None else (enrollment.status, enrollment.exit_reason)
                subject = policy.subject(
                    candidate,
                    channel=row.channel,
                    category=row.category,
                    campaign=row.campaign,
                    now=now,
                    stage=PolicyStage.SEND,
                    message_id=row.id,
                    locked=True,
                    enrollment_state=state,
                )
                verdict = Verdict(reads.evaluate(session, subject, candidate, state))
                decision = verdict.decision
                if not decision.allowed:
                    stopped.append(outbox.refused(row.id, verdict, row.not_before, now))
                    outcomes[row.id] = Outcome(verdict.status.value)
                    continue
                message = outbox.detached(row)
                context = build_context(runtime.settings, policy.calendar, message, candidate, enrollment, job)
                validity = policy.sms_validity(subject) if row.channel == Channel.SMS.value else None
                try:
                    draft = _compose(runtime, links, message, candidate, context, validity)
                except TemplateError as exc:
                    outbox.fail(
                        connection, [row.id], now, rule="template", code="template", detail=str(exc), sent_at=None
                    )
                    log.error("template failed", extra={"outbox_id": row.id, "template": row.template})
                    outcomes[row.id] = Outcome(MessageStatus.FAILED.value)
                    continue
                reads.count(subject)
                ready.append((row, draft))
            links.store(session)
            outbox.refuse(connection, stopped)
    return [_Send(row.id, row.attempts, *draft()) for row, draft in ready]


def _compose(
    runtime: Services,
    links: LinkSet,
    message: OutboundMessage,
    candidate: Candidate,
    context: dict[str, Any],
    validity: int | None,
) -> Any:
    """Render the message for its provider; returns a function giving (payload, locale, SMS segments) once
    ``links`` are stored."""
    settings = runtime.settings
    outbox_id = message.id
    if message.channel == Channel.EMAIL.value:
        rendered = runtime.renderer.render_email(message.template, candidate.locale, context)
        # Click tracking (outreach.pipeline.links): links become signed /r/ redirects if the campaign tracks clicks.
        tracked = links.email(message, rendered, context)
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
        reply_to = reply_address(settings, outbox_id) or settings.email_reply_to or None

        def email() -> tuple[EmailMessage, str, int | None]:
            out = tracked()
            payload = EmailMessage(
                message_id=outbox_id,
                to=candidate.email or "",
                subject=out.subject,
                text=out.text,
                html=out.html,
                from_email=settings.email_from,
                reply_to=reply_to,
                categories=(message.campaign, message.template),
                custom_args={"outreach_id": outbox_id},
                headers=headers,
            )
            return payload, out.locale, None

        return email
    sms = runtime.renderer.render_sms(message.template, candidate.locale, context)
    tracked_body = links.sms(message, sms.text, context)  # click tracking (outreach.pipeline.links)
    nurture = message.category == Category.NURTURE.value
    callback = f"{settings.public_url}/webhooks/twilio/status?outreach_id={outbox_id}"

    def text() -> tuple[SmsMessage, str, int | None]:
        body = tracked_body()
        if nurture:
            body = with_opt_out_hint(body, sms.locale)
        payload = SmsMessage(
            message_id=outbox_id,
            to=candidate.phone or "",
            body=body,
            status_callback=callback,
            validity_period=validity,
        )
        return payload, sms.locale, sms_segments(body)[1]

    return text


# -- 2. hand-off and provider call, 3. record ----------------------------------------------------------------


@dataclass
class _Recorder:
    """Accepted sends waiting for their ``sent`` record (one statement for all of them)."""

    connection: Connection
    sent_at: datetime
    rows: list[dict[str, Any]] = field(default_factory=list)

    def add(self, send: _Send, result: SendResult) -> None:
        payload = send.payload
        self.rows.append(
            {
                "id": send.id,
                "provider": result.provider,
                "provider_message_id": result.provider_message_id,
                "locale": send.locale,
                "segments": send.segments,
                "subject": payload.subject if isinstance(payload, EmailMessage) else None,
                "body": payload.text if isinstance(payload, EmailMessage) else payload.body,
            }
        )
        if len(self.rows) >= RECORD_EVERY:
            self.flush()

    def flush(self) -> None:
        if not self.rows:
            return
        rows, self.rows = sorted(self.rows, key=lambda r: str(r["id"])), []
        outbox.record_sent(self.connection, rows, self.sent_at, utcnow())

    def hand_off(self, outbox_id: str, lease_until: datetime, now: datetime, body: str | None = None) -> Any:
        """The hand-off of ``outbox_id`` (its row, or None when it is no longer claimed), storing ``body`` (an SMS's
        text, which a provider lookup matches). On PostgreSQL the sends accepted since the last one are recorded in
        the same statement (a data-modifying CTE): one commit per message, and a worker killed after a send leaves
        at most that one row unrecorded."""
        if self.connection.dialect.name != "postgresql":
            handed = outbox.hand_off(self.connection, [outbox_id], lease_until, now, body=body)
            return handed[0] if handed else None
        rows, self.rows = self.rows, []
        try:
            handed = outbox.hand_off(
                self.connection, [outbox_id], lease_until, now, records=rows, sent_at=self.sent_at, body=body
            )
        except BaseException:
            self.rows = rows + self.rows  # not recorded: the caller's error handling tries again
            raise
        return handed[0] if handed else None


def _send_all(
    runtime: Services, connection: Connection, sends: Sequence[_Send], now: datetime, outcomes: dict[str, Outcome]
) -> None:
    """Hand off and send each row in turn, recording the accepted ones every few sends and at the end."""
    recorder = _Recorder(connection, now)
    queue: Iterator[_Send] = iter(sends)
    try:
        for send in queue:
            answer = _send_one(runtime, connection, send, recorder)
            if answer is None:
                continue  # no longer ours: the sweeper took it back
            outcome, group_waits = answer
            outcomes[send.id] = outcome
            if group_waits and outcome.retry_in is not None:
                # The sender is booked out or the provider rate limits us: the rest of the group waits as well.
                rest = [later.id for later in queue]
                outbox.give_back(connection, rest, utcnow(), outcome.retry_in)
                outcomes.update(dict.fromkeys(rest, Outcome(MessageStatus.PENDING.value, retry_in=outcome.retry_in)))
                break
    except BaseException:
        # Rows not yet handed off were never offered to a provider: give them back rather than leave them to the
        # sweeper. Those already sent keep their record if it can still be written.
        untouched = [send.id for send in sends if not send.handed_off]
        try:
            outbox.give_back(connection, untouched, utcnow(), 0.0)
        except Exception:  # the database is gone: the sweeper returns them after their lease
            log.warning("could not give back a group's unsent rows after an error", exc_info=True)
        try:
            recorder.flush()
        except Exception:  # the database is gone: provider events reconcile them once they are uncertain
            log.warning("could not record a group's sent rows after an error", exc_info=True)
        raise
    recorder.flush()


def _send_one(
    runtime: Services, connection: Connection, send: _Send, recorder: _Recorder
) -> tuple[Outcome, bool] | None:
    """Hand off and send one row: (its outcome, whether the rest of the group must wait as well), or None when the
    row is no longer ours to send."""
    settings = runtime.settings
    payload = send.payload
    email = isinstance(payload, EmailMessage)
    provider_name = runtime.providers.email.name if email else runtime.providers.sms.name
    rate = runtime.policy.spec.rate_limits.get(provider_name)
    if rate is not None:
        sender = settings.email_from if email else (settings.sms_from or settings.twilio_messaging_service_sid)
        booking = runtime.pacer.book(f"{provider_name}:{sender}", rate, cost=float(send.segments or 1))
        if not booking.granted:
            # The sender is booked out for a while: give the slot back and come back when it frees.
            outbox.give_back(connection, [send.id], utcnow(), booking.wait)
            return Outcome(MessageStatus.PENDING.value, retry_in=booking.wait), True
        if booking.wait > 0:
            time.sleep(booking.wait)

    started = utcnow()
    # An SMS's text goes with its hand-off: Twilio's Messages list tells ours by it (outreach.pipeline.reconcile).
    sms_text = payload.body if isinstance(payload, SmsMessage) else None
    handed = recorder.hand_off(send.id, started + timedelta(seconds=settings.lease_seconds), started, sms_text)
    if handed is None:
        return None
    send.handed_off = True
    attempt = send.attempts + 1
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
        outbox.uncertain(
            connection,
            [send.id],
            utcnow(),
            provider=exc.provider,
            reason=f"{exc.provider} call failed after the request was sent ({str(exc)[:200]}); it may have "
            "been accepted: reconcile from provider events, do not resend",
            code=exc.code or "ambiguous",
            detail=str(exc),
            subject=payload.subject if isinstance(payload, EmailMessage) else None,
            body=payload.text if isinstance(payload, EmailMessage) else payload.body,
            locale=send.locale,
            segments=send.segments,
        )
        log.warning("provider answer lost; message uncertain", extra={"outbox_id": send.id, "provider": exc.provider})
        return Outcome(MessageStatus.UNCERTAIN.value), False
    except TransientProviderError as exc:
        code = exc.code or str(exc.status or "network")
        if attempt >= settings.max_retries:
            outbox.fail(connection, [send.id], utcnow(), rule="retries", code=code, detail=str(exc))
            return Outcome(MessageStatus.FAILED.value), False
        delay = exc.retry_after if exc.retry_after is not None else backoff(attempt)
        outbox.give_back(
            connection, [send.id], utcnow(), delay, attempted=True, error_code=code, error_detail=str(exc)[:500]
        )
        log.warning(
            "provider busy; retrying",
            extra={"outbox_id": send.id, "provider": exc.provider, "status": exc.status, "delay": delay},
        )
        # Rate limited: the provider refuses this account's sends until its reset, so the group waits too.
        waits = exc.status == 429 or exc.retry_after is not None
        return Outcome(MessageStatus.PENDING.value, retry_in=delay), waits
    except PermanentProviderError as exc:
        outbox.fail(
            connection,
            [send.id],
            utcnow(),
            rule="provider",
            code=exc.code or str(exc.status),
            detail=str(exc),
            provider=exc.provider,
        )
        if exc.suppress:
            channel = Channel.EMAIL.value if email else Channel.SMS.value
            refused_for_good = Suppress(
                channel, payload.to, f"{exc.provider} {exc.code}", "provider", SuppressionScope.PROVIDER.value
            )
            with Session(bind=connection) as session:
                suppress(session, [refused_for_good], utcnow(), cancel=False)
        log.warning(
            "provider refused message", extra={"outbox_id": send.id, "provider": exc.provider, "code": exc.code}
        )
        return Outcome(MessageStatus.FAILED.value), False
    recorder.add(send, result)
    return Outcome(MessageStatus.SENT.value, provider_message_id=result.provider_message_id), False
