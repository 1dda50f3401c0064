"""The tables. The database is the source of truth; the broker only wakes workers.

All datetimes are stored as naive UTC (SQLite keeps no offsets); :class:`UTCDateTime` converts at the edge so
Python code only ever sees aware UTC datetimes.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    DateTime,
    ForeignKey,
    Index,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from outreach.core.clock import utcnow

#: The category of an out-of-hours auto-reply's outbox row (campaign messages carry their campaign's category).
AUTO_REPLY = "auto_reply"


def new_id() -> str:
    """Opaque ids we mint ourselves; safe to hand to providers (custom args, callback URLs)."""
    return uuid.uuid4().hex


class UTCDateTime(TypeDecorator[datetime]):
    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column; attach a timezone first")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC)


NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map: ClassVar[dict[Any, Any]] = {datetime: UTCDateTime(), dict[str, Any]: JSON, list[str]: JSON}


class Stage(StrEnum):
    APPLIED = "applied"
    CONTACTED = "contacted"
    INTERVIEWING = "interviewing"
    FINAL = "final"
    OFFER = "offer"
    ACCEPTED = "accepted"
    DECLINED = "declined"
    REJECTED = "rejected"
    HIRED = "hired"
    TALENT_POOL = "talent_pool"


class EnrollmentStatus(StrEnum):
    ACTIVE = "active"
    COMPLETED = "completed"
    EXITED = "exited"


class MessageStatus(StrEnum):
    """The outbox status machine.

    pending → sending → sent → delivered; sending → failed; pending → held (deferred by a rule) → pending;
    pending → suppressed / skipped / cancelled (never sent, with a rule and reason); sent → bounced / undelivered.
    ``uncertain`` marks a send whose provider call may or may not have happened (the worker died mid-call);
    it is reconciled from provider events, never blindly resent.
    """

    PENDING = "pending"
    HELD = "held"
    SENDING = "sending"
    SENT = "sent"
    DELIVERED = "delivered"
    FAILED = "failed"
    BOUNCED = "bounced"
    UNDELIVERED = "undelivered"
    SUPPRESSED = "suppressed"
    SKIPPED = "skipped"
    CANCELLED = "cancelled"
    UNCERTAIN = "uncertain"


#: The ``rule`` a ``sending`` row carries while a worker holds it in a group or batch it has claimed but has not yet
#: handed to the provider (:func:`outreach.pipeline.outbox.claim`). The hand-off clears it in the statement that
#: makes the attempt durable (and counts it in ``attempts``), so a ``sending`` row whose lease ran out still marked
#: ``claimed`` never reached a provider: the sweeper puts it back to ``pending`` instead of ``uncertain``.
CLAIMED_RULE = "claimed"


class Channel(StrEnum):
    EMAIL = "email"
    SMS = "sms"


class SuppressionScope(StrEnum):
    """What a suppression stops on its channel.

    ``nurture``: nurture messages only (a one-click unsubscribe from a nurture mail); mail about an application or
    offer still goes. ``email`` / ``sms``: everything on that channel, as the candidate asked (the unsubscribe
    page's "stop everything", an SMS opt-out keyword). ``provider``: everything on that channel, because the
    provider will not deliver there (hard bounce, spam report, the provider's own unsubscribe list, Twilio 21610).
    """

    NURTURE = "nurture"
    EMAIL = "email"
    SMS = "sms"
    PROVIDER = "provider"


class Candidate(Base):
    __tablename__ = "candidates"

    id: Mapped[int] = mapped_column(primary_key=True)
    external_id: Mapped[str] = mapped_column(String(128), unique=True)
    name: Mapped[str] = mapped_column(String(200), default="")
    email: Mapped[str | None] = mapped_column(String(320))
    phone: Mapped[str | None] = mapped_column(String(20))
    locale: Mapped[str] = mapped_column(String(16), default="en")
    timezone: Mapped[str | None] = mapped_column(String(64))
    source: Mapped[str | None] = mapped_column(String(64))
    tags: Mapped[list[str]] = mapped_column(default=list)
    stage: Mapped[str] = mapped_column(String(32), default=Stage.APPLIED.value)
    nurture_consent: Mapped[bool] = mapped_column(default=False)
    recontact_at: Mapped[datetime | None]
    #: The latest intent assessment's level (high / medium / low) and mean score; None until assessed.
    intent_level: Mapped[str | None] = mapped_column(String(8))
    intent_score: Mapped[float | None]
    #: Set when the candidate's personal data was erased; the row stays so aggregate metrics stay intact.
    erased_at: Mapped[datetime | None]
    last_reply_at: Mapped[datetime | None]
    last_click_at: Mapped[datetime | None]
    data: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)

    __table_args__ = (
        Index("ix_candidates_stage", "stage"),
        Index("ix_candidates_intent", "intent_level", "recontact_at"),
    )


class StageChange(Base):
    """One move of a candidate between stages: the history behind the funnel."""

    __tablename__ = "stage_changes"

    id: Mapped[int] = mapped_column(primary_key=True)
    candidate_id: Mapped[int] = mapped_column(ForeignKey("candidates.id", ondelete="CASCADE"))
    from_stage: Mapped[str | None] = mapped_column(String(32))
    to_stage: Mapped[str] = mapped_column(String(32))
    #: What moved them: ``event:<type>`` for an ATS event, ``api:<key name>`` for a person through the API.
    changed_by: Mapped[str] = mapped_column(String(128))
    event_id: Mapped[int | None] = mapped_column(ForeignKey("candidate_events.id", ondelete="SET NULL"))
    #: Why, when a person gave a reason through the API.
    reason: Mapped[str | None] = mapped_column(String(500))
    changed_at: Mapped[datetime] = mapped_column(default=utcnow)

    __table_args__ = (
        Index("ix_stage_changes_candidate", "candidate_id", "changed_at"),
        Index("ix_stage_changes_to_stage", "to_stage", "changed_at"),
    )


class IntentAssessment(Base):
    """Scores 1-5 on the configured dimensions, by a person, at a time; the level follows the mean."""

    __tablename__ = "intent_assessments"

    id: Mapped[int] = mapped_column(primary_key=True)
    candidate_id: Mapped[int] = mapped_column(ForeignKey("candidates.id", ondelete="CASCADE"))
    scores: Mapped[dict[str, Any]] = mapped_column(default=dict)
    mean: Mapped[float]
    level: Mapped[str] = mapped_column(String(8))
    assessed_by: Mapped[str] = mapped_column(String(128))
    assessed_at: Mapped[datetime] = mapped_column(default=utcnow)

    __table_args__ = (Index("ix_intent_assessments_candidate", "candidate_id", "assessed_at"),)


class ApiKey(Base):
    """A key for the API and dashboard. Only a hash is stored; the key itself is shown once, at creation."""

    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(128))
    role: Mapped[str] = mapped_column(String(16))
    #: The key's first characters, shown in listings so people can tell keys apart.
    prefix: Mapped[str] = mapped_column(String(16))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_used_at: Mapped[datetime | None]
    revoked_at: Mapped[datetime | None]


class DashboardSession(Base):
    """A dashboard login: its cookie holds a random id, this row only that id's hash.

    It ends at logout (the row is deleted), when its key is revoked, after a spell of idleness or at ``expires_at``,
    whichever comes first.
    """

    __tablename__ = "dashboard_sessions"

    id: Mapped[int] = mapped_column(primary_key=True)
    session_hash: Mapped[str] = mapped_column(String(64), unique=True)
    key_id: Mapped[int] = mapped_column(ForeignKey("api_keys.id", ondelete="CASCADE"), index=True)
    #: The key's role when the session began; a session whose key has another role by now is refused.
    role: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    #: Written at most once a minute (``outreach.domain.auth.LAST_USED_RESOLUTION``); idleness counts from it.
    last_seen_at: Mapped[datetime]
    #: The absolute end, however busy the session is.
    expires_at: Mapped[datetime]


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[int] = mapped_column(primary_key=True)
    external_id: Mapped[str] = mapped_column(String(128), unique=True)
    title: Mapped[str] = mapped_column(String(200))
    department: Mapped[str | None] = mapped_column(String(200))
    location: Mapped[str | None] = mapped_column(String(200))
    description: Mapped[str] = mapped_column(Text, default="")
    salary_min: Mapped[int | None]
    salary_max: Mapped[int | None]
    booking_url: Mapped[str | None] = mapped_column(String(500))
    tags: Mapped[list[str]] = mapped_column(default=list)
    status: Mapped[str] = mapped_column(String(16), default="open")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class CandidateEvent(Base):
    """What happened to a candidate in the ATS: the history that triggers campaigns."""

    __tablename__ = "candidate_events"

    id: Mapped[int] = mapped_column(primary_key=True)
    candidate_id: Mapped[int] = mapped_column(ForeignKey("candidates.id", ondelete="CASCADE"), index=True)
    type: Mapped[str] = mapped_column(String(32))
    job_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id", ondelete="SET NULL"))
    reason: Mapped[str | None] = mapped_column(String(500))
    data: Mapped[dict[str, Any]] = mapped_column(default=dict)
    occurred_at: Mapped[datetime]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Enrollment(Base):
    """A candidate walking through one campaign. ``next_run_at`` is when the next step is due."""

    __tablename__ = "enrollments"

    id: Mapped[int] = mapped_column(primary_key=True)
    candidate_id: Mapped[int] = mapped_column(ForeignKey("candidates.id", ondelete="CASCADE"))
    campaign: Mapped[str] = mapped_column(String(64))
    dedupe_key: Mapped[str] = mapped_column(String(128))
    job_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id", ondelete="SET NULL"))
    event_id: Mapped[int | None] = mapped_column(ForeignKey("candidate_events.id", ondelete="SET NULL"))
    stage_at_start: Mapped[str] = mapped_column(String(32))
    current_step: Mapped[int] = mapped_column(default=0)
    status: Mapped[str] = mapped_column(String(16), default=EnrollmentStatus.ACTIVE.value)
    next_run_at: Mapped[datetime | None]
    anchor_at: Mapped[datetime]
    last_step_at: Mapped[datetime | None]
    exit_reason: Mapped[str | None] = mapped_column(String(200))
    context: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)

    candidate: Mapped[Candidate] = relationship(lazy="joined")

    __table_args__ = (
        UniqueConstraint("campaign", "candidate_id", "dedupe_key", name="uq_enrollments_campaign_candidate_key"),
        # The due scan: cost grows with due work, not with the table.
        Index("ix_enrollments_due", "status", "next_run_at"),
        Index("ix_enrollments_candidate", "candidate_id", "status"),
    )


class OutboundMessage(Base):
    """The outbox: one row per enrollment × step × channel. ``id`` is the opaque id providers echo back."""

    __tablename__ = "outbound_messages"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    enrollment_id: Mapped[int | None] = mapped_column(ForeignKey("enrollments.id", ondelete="CASCADE"))
    candidate_id: Mapped[int] = mapped_column(ForeignKey("candidates.id", ondelete="CASCADE"))
    campaign: Mapped[str] = mapped_column(String(64))
    step: Mapped[int]
    channel: Mapped[str] = mapped_column(String(8))
    template: Mapped[str] = mapped_column(String(128))
    category: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16), default=MessageStatus.PENDING.value)
    not_before: Mapped[datetime] = mapped_column(default=utcnow)
    enqueued_at: Mapped[datetime | None]
    lease_until: Mapped[datetime | None]
    attempts: Mapped[int] = mapped_column(default=0)
    locale: Mapped[str | None] = mapped_column(String(16))
    provider: Mapped[str | None] = mapped_column(String(16))
    provider_message_id: Mapped[str | None] = mapped_column(String(128))
    rule: Mapped[str | None] = mapped_column(String(64))
    reason: Mapped[str | None] = mapped_column(String(500))
    error_code: Mapped[str | None] = mapped_column(String(32))
    error_detail: Mapped[str | None] = mapped_column(String(500))
    segments: Mapped[int | None]
    #: What went out, for the conversation view (subject for email; the text part or the SMS body).
    subject: Mapped[str | None] = mapped_column(String(998))
    body: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    sent_at: Mapped[datetime | None]
    delivered_at: Mapped[datetime | None]

    __table_args__ = (
        UniqueConstraint("enrollment_id", "step", "channel", name="uq_outbound_messages_enrollment_step_channel"),
        Index("ix_outbound_messages_status_not_before", "status", "not_before"),
        Index("ix_outbound_messages_candidate", "candidate_id", "created_at"),
        Index("ix_outbound_messages_provider_id", "provider_message_id"),
    )


class DeliveryEvent(Base):
    """A provider event in our vocabulary, with the raw payload kept. Idempotent on the provider's identity."""

    __tablename__ = "delivery_events"

    id: Mapped[int] = mapped_column(primary_key=True)
    message_id: Mapped[str | None] = mapped_column(ForeignKey("outbound_messages.id", ondelete="CASCADE"), index=True)
    provider: Mapped[str] = mapped_column(String(16))
    provider_event_id: Mapped[str] = mapped_column(String(200))
    type: Mapped[str] = mapped_column(String(16))
    occurred_at: Mapped[datetime]
    raw: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    __table_args__ = (UniqueConstraint("provider", "provider_event_id", name="uq_delivery_events_provider_event"),)


def _whole_channel(context: Any) -> str:
    """A suppression written without a scope stops everything on its channel (``email`` or ``sms``)."""
    return str(context.get_current_parameters()["channel"])


class Suppression(Base):
    """An address we must not write to again on that channel (opt-out, hard bounce, spam report …), or, with scope
    ``nurture``, not with nurture messages. One row per address and channel: a wider scope replaces ``nurture``."""

    __tablename__ = "suppressions"

    id: Mapped[int] = mapped_column(primary_key=True)
    channel: Mapped[str] = mapped_column(String(8))
    address: Mapped[str] = mapped_column(String(320))
    reason: Mapped[str] = mapped_column(String(64))
    source: Mapped[str | None] = mapped_column(String(64))
    #: A :class:`SuppressionScope`; the whole channel when not given.
    scope: Mapped[str] = mapped_column(String(16), default=_whole_channel)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    confirmed_at: Mapped[datetime | None]

    __table_args__ = (UniqueConstraint("channel", "address", name="uq_suppressions_channel_address"),)


class Alert(Base):
    """Something a person in HR should look at (an offer unanswered for 3 days, an unanswered reply …)."""

    __tablename__ = "alerts"

    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[str] = mapped_column(String(64))
    candidate_id: Mapped[int | None] = mapped_column(ForeignKey("candidates.id", ondelete="CASCADE"))
    enrollment_id: Mapped[int | None] = mapped_column(ForeignKey("enrollments.id", ondelete="CASCADE"))
    campaign: Mapped[str | None] = mapped_column(String(64))
    #: The outbound message the alert is about, for alerts raised once per message (``message_failed``,
    #: ``message_uncertain``).
    outbox_id: Mapped[str | None] = mapped_column(String(32))
    message: Mapped[str] = mapped_column(String(500))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    resolved_at: Mapped[datetime | None]

    __table_args__ = (
        UniqueConstraint("enrollment_id", "kind", name="uq_alerts_enrollment_kind"),
        UniqueConstraint("outbox_id", "kind", name="uq_alerts_outbox_kind"),
        Index("ix_alerts_open", "resolved_at", "created_at"),
    )


class CampaignRun(Base):
    """One firing of a cron campaign; the unique key lets only one scheduler fire it."""

    __tablename__ = "campaign_runs"

    id: Mapped[int] = mapped_column(primary_key=True)
    campaign: Mapped[str] = mapped_column(String(64))
    fire_at: Mapped[datetime]
    enrolled: Mapped[int] = mapped_column(default=0)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    __table_args__ = (UniqueConstraint("campaign", "fire_at", name="uq_campaign_runs_campaign_fire_at"),)


class InboundMessage(Base):
    """Something a candidate (or a machine pretending to be one) sent us: a reply, a keyword, an auto-reply."""

    __tablename__ = "inbound_messages"

    id: Mapped[int] = mapped_column(primary_key=True)
    candidate_id: Mapped[int | None] = mapped_column(ForeignKey("candidates.id", ondelete="CASCADE"), index=True)
    channel: Mapped[str] = mapped_column(String(8))
    provider: Mapped[str] = mapped_column(String(16))
    provider_message_id: Mapped[str] = mapped_column(String(200))
    from_address: Mapped[str] = mapped_column(String(320))
    to_address: Mapped[str | None] = mapped_column(String(320))
    subject: Mapped[str | None] = mapped_column(String(500))
    body: Mapped[str] = mapped_column(Text, default="")
    kind: Mapped[str] = mapped_column(String(16))  # reply, opt_out, opt_in, help, auto_reply, unmatched
    in_reply_to: Mapped[str | None] = mapped_column(ForeignKey("outbound_messages.id", ondelete="SET NULL"))
    received_at: Mapped[datetime]
    #: When a person (or a message of ours that is not an auto-reply) answered it; None while waiting.
    answered_at: Mapped[datetime | None]
    raw: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    __table_args__ = (
        UniqueConstraint("provider", "provider_message_id", name="uq_inbound_messages_provider_message"),
        Index("ix_inbound_messages_from", "channel", "from_address", "received_at"),
    )


class TrackedLink(Base):
    """A link in a message we sent; ``/r/{token}`` redirects only to links recorded here (no open redirect)."""

    __tablename__ = "tracked_links"

    id: Mapped[int] = mapped_column(primary_key=True)
    message_id: Mapped[str] = mapped_column(ForeignKey("outbound_messages.id", ondelete="CASCADE"))
    position: Mapped[int]
    name: Mapped[str | None] = mapped_column(String(64))
    url: Mapped[str] = mapped_column(String(2000))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    __table_args__ = (UniqueConstraint("message_id", "position", name="uq_tracked_links_message_position"),)


class LinkClick(Base):
    __tablename__ = "link_clicks"

    id: Mapped[int] = mapped_column(primary_key=True)
    link_id: Mapped[int] = mapped_column(ForeignKey("tracked_links.id", ondelete="CASCADE"))
    candidate_id: Mapped[int] = mapped_column(ForeignKey("candidates.id", ondelete="CASCADE"))
    name: Mapped[str | None] = mapped_column(String(64))
    clicked_at: Mapped[datetime] = mapped_column(default=utcnow)

    __table_args__ = (Index("ix_link_clicks_candidate_name", "candidate_id", "name", "clicked_at"),)
