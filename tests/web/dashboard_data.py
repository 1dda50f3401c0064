"""A small, known history for the dashboard tests, and the figures it must show, computed here from the history.

The expected figures are counted from the flags this module chose while writing the rows, not by calling
:mod:`outreach.ops.analytics`, so the pages are checked against an independent count. Every candidate carries
canary personal data (name, address, phone, message text) that the ``ops`` role must never see.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy.orm import Session

from outreach.core.models import (
    Alert,
    Candidate,
    CandidateEvent,
    DeliveryEvent,
    InboundMessage,
    OutboundMessage,
    StageChange,
)
from outreach.ops.analytics import FUNNEL_STAGES
from outreach.pipeline.delivery import deliver
from outreach.service.runtime import Runtime
from tests.helpers import add_candidate, add_job, fire

CANARY_NAME = "Zebulon Canaryfield"
CANARY_DOMAIN = "canary-mail.example"
CANARY_PHONE = "+447911123456"
CANARY_BODY = "canary-body-text"
CANARY_SUBJECT = "canary-subject-line"
CANARY_ERROR = f"mailbox zebulon@{CANARY_DOMAIN} rejected"
#: Strings that must appear nowhere on an ``ops`` page (the phone also without its plus).
CANARIES = (CANARY_NAME, "Zebulon", CANARY_DOMAIN, CANARY_PHONE, CANARY_PHONE[1:], CANARY_BODY, CANARY_SUBJECT)

SOURCES = ("linkedin", "referral", "job_board")
N_CANDIDATES = 24
#: How far candidate ``i`` got: an index into FUNNEL_STAGES, by ``i % 12``.
FURTHEST = (0, 1, 1, 2, 2, 3, 3, 3, 4, 4, 5, 5)
#: What happens to outbox row ``k`` (two per candidate), by ``k % 8``.
OUTCOMES = (
    "clicked",  # delivered email, opened, clicked
    "opted_out",  # delivered email, opened, then an unsubscribe event
    "replied",  # delivered SMS, a real reply
    "auto_replied",  # delivered email, an out-of-office only (not a reply)
    "bounced",  # email, hard bounce
    "sent",  # SMS accepted, no news since
    "held",  # deferred by quiet hours: never went out
    "suppressed",  # dropped by consent: never went out
)
SMS_OUTCOMES = frozenset({"replied", "sent"})
PENDING_DUE = 3
PENDING_LAG = timedelta(minutes=10)
PIPELINE_ID = "pipe-1"


@dataclass
class Expected:
    messages: int = 0
    delivered: int = 0
    emails_delivered: int = 0
    opened: int = 0
    clicked: int = 0
    replied: int = 0
    opted_out: int = 0
    bounced: int = 0
    held: int = 0
    due_pending: int = 0
    first_contact_breached: int = 0
    first_contact_met: int = 0
    open_alerts: int = 0
    #: Transactional messages a rule dropped: the first scheduler pass raises a message_failed alert for each.
    dropped_transactional: int = 0
    #: source -> counts reaching each funnel stage
    funnel: dict[str, list[int]] = field(default_factory=dict)
    #: outbox ids worth opening: a held one, a suppressed one, a bounced one (with a canary error text)
    held_id: str = ""
    suppressed_id: str = ""
    bounced_id: str = ""
    pipeline_ids: list[str] = field(default_factory=list)

    def rate(self, numerator: int, denominator: int) -> str:
        return "—" if denominator == 0 else f"{numerator / denominator * 100:.1f}%"

    @property
    def delivery_rate(self) -> str:
        return self.rate(self.delivered, self.messages)

    @property
    def open_rate(self) -> str:
        return self.rate(self.opened, self.emails_delivered)

    @property
    def click_rate(self) -> str:
        return self.rate(self.clicked, self.delivered)

    @property
    def reply_rate(self) -> str:
        return self.rate(self.replied, self.delivered)

    @property
    def opt_out_rate(self) -> str:
        return self.rate(self.opted_out, self.delivered)

    @property
    def bounce_rate(self) -> str:
        return self.rate(self.bounced, self.messages)


def seed(runtime: Runtime, now: datetime, *, pipeline: bool = True) -> Expected:
    """Write the history (and, with ``pipeline``, send two real messages to the sandbox); return the figures."""
    expected = Expected(funnel={source: [0] * len(FUNNEL_STAGES) for source in SOURCES})
    k = 0
    with Session(runtime.engine) as session, session.begin():
        for i in range(N_CANDIDATES):
            source = SOURCES[i % 3]
            furthest = FURTHEST[i % 12]
            candidate = Candidate(
                external_id=f"cand-{i:02d}",
                name=f"{CANARY_NAME} {i}",
                email=f"zebulon{i}@{CANARY_DOMAIN}",
                phone=CANARY_PHONE,
                source=source,
                stage=FUNNEL_STAGES[furthest],
                created_at=now - timedelta(days=9),
            )
            session.add(candidate)
            session.flush()
            applied_at = now - timedelta(days=8, hours=i)
            session.add(CandidateEvent(candidate_id=candidate.id, type="applied", occurred_at=applied_at))
            for step in range(furthest):
                session.add(
                    StageChange(
                        candidate_id=candidate.id,
                        from_stage=FUNNEL_STAGES[step],
                        to_stage=FUNNEL_STAGES[step + 1],
                        changed_by="event:test",
                        changed_at=applied_at + timedelta(hours=step + 1),
                    )
                )
            for stage in range(furthest + 1):
                expected.funnel[source][stage] += 1
            # Candidates 0, 4, 8 … are first contacted 60 hours after applying: a breach of the 48-hour promise.
            delay = timedelta(hours=60) if i % 4 == 0 else timedelta(hours=2)
            first_sent: datetime | None = None
            for step in range(2):
                outcome = OUTCOMES[k % len(OUTCOMES)]
                sent_at = applied_at + delay + timedelta(hours=step)
                message = _message(session, candidate, k, step, outcome, sent_at, expected)
                if message.sent_at is not None and first_sent is None:
                    first_sent = message.sent_at
                k += 1
            if first_sent is not None and first_sent <= applied_at + timedelta(hours=48):
                expected.first_contact_met += 1
            else:
                expected.first_contact_breached += 1
            if i < PENDING_DUE:
                session.add(
                    OutboundMessage(
                        candidate_id=candidate.id,
                        campaign="offer_followup",
                        step=5,
                        channel="email",
                        template="offer_followup/nudge",
                        category="transactional",
                        status="pending",
                        not_before=now - PENDING_LAG,
                        created_at=now - PENDING_LAG,
                    )
                )
                expected.due_pending += 1
            if i % 6 == 0:
                session.add(
                    Alert(
                        kind="offer_unanswered",
                        candidate_id=candidate.id,
                        campaign="offer_followup",
                        message=f"offer_followup step 1: offer unanswered ({candidate.external_id})",
                        created_at=now - timedelta(hours=i + 1),
                        resolved_at=now if i == 0 else None,
                    )
                )
                expected.open_alerts += 0 if i == 0 else 1
    if pipeline:
        add_candidate(
            runtime,
            PIPELINE_ID,
            name=f"{CANARY_NAME} Pipeline",
            email=f"pipeline@{CANARY_DOMAIN}",
            phone=CANARY_PHONE,
            source="careers_site",
        )
        add_job(runtime)
        fire(runtime, PIPELINE_ID, "applied", at=now - timedelta(hours=2), job="j-1")
        runtime.scheduler.tick(now)
        expected.open_alerts += expected.dropped_transactional
        with Session(runtime.engine) as session:
            ids = [
                m.id
                for m in session.query(OutboundMessage).join(Candidate).filter(Candidate.external_id == PIPELINE_ID)
            ]
        for outbox_id in ids:
            assert deliver(runtime, outbox_id).status == "sent"
        expected.pipeline_ids = ids
        expected.messages += len(ids)  # accepted by the sandbox; no event comes back (public_url goes nowhere)
        expected.first_contact_met += 1
    return expected


def _message(
    session: Session, candidate: Candidate, k: int, step: int, outcome: str, sent_at: datetime, expected: Expected
) -> OutboundMessage:
    channel = "sms" if outcome in SMS_OUTCOMES else "email"
    went_out = outcome not in ("held", "suppressed")
    status = {
        "held": "held",
        "suppressed": "suppressed",
        "bounced": "bounced",
        "sent": "sent",
    }.get(outcome, "delivered")
    message = OutboundMessage(
        candidate_id=candidate.id,
        campaign="jd_intro" if step == 0 else "offer_followup",
        step=step,
        channel=channel,
        template=f"jd_intro/{channel}",
        category="transactional",
        status=status,
        locale="en",
        provider=("twilio" if channel == "sms" else "sendgrid") if went_out else None,
        subject=f"{CANARY_SUBJECT} {k}" if channel == "email" else None,
        body=f"{CANARY_BODY} for {candidate.name}",
        created_at=sent_at - timedelta(minutes=5),
        not_before=sent_at - timedelta(minutes=5),
        sent_at=sent_at if went_out else None,
    )
    if outcome == "held":
        message.rule, message.reason = "quiet_hours", "sms quiet hours 21:00-08:00 Europe/London; due at 08:00"
        message.not_before = sent_at + timedelta(days=30)
        expected.held += 1
    elif outcome == "suppressed":
        message.rule, message.reason = "consent", "address suppressed: unsubscribed"
        expected.dropped_transactional += 1
    elif outcome == "bounced":
        message.error_code, message.error_detail = "bounce", CANARY_ERROR
    session.add(message)
    session.flush()
    if outcome == "held":
        expected.held_id = expected.held_id or message.id
    elif outcome == "suppressed":
        expected.suppressed_id = expected.suppressed_id or message.id
    elif outcome == "bounced":
        expected.bounced_id = expected.bounced_id or message.id
    if not went_out:
        return message
    expected.messages += 1
    events: list[str] = []
    if outcome in ("clicked", "opted_out", "replied", "auto_replied"):
        events.append("delivered")
        expected.delivered += 1
        expected.emails_delivered += channel == "email"
    if outcome in ("clicked", "opted_out"):
        events.append("opened")
        expected.opened += 1
    if outcome == "clicked":
        events.append("clicked")
        expected.clicked += 1
    if outcome == "opted_out":
        events.append("unsubscribed")
        expected.opted_out += 1
    if outcome == "bounced":
        events.append("bounced")
        expected.bounced += 1
    for n, kind in enumerate(events):
        session.add(
            DeliveryEvent(
                message_id=message.id,
                provider=message.provider or "sendgrid",
                provider_event_id=f"ev-{k}-{kind}",
                type=kind,
                occurred_at=sent_at + timedelta(minutes=n + 1),
                raw={"email": candidate.email},
            )
        )
    if outcome in ("replied", "auto_replied"):
        session.add(
            InboundMessage(
                candidate_id=candidate.id,
                channel=channel,
                provider=message.provider or "sendgrid",
                provider_message_id=f"in-{k}",
                from_address=candidate.phone if channel == "sms" else candidate.email,
                body=f"{CANARY_BODY} reply from {candidate.name}",
                kind="reply" if outcome == "replied" else "auto_reply",
                in_reply_to=message.id,
                received_at=sent_at + timedelta(hours=1),
            )
        )
        expected.replied += outcome == "replied"
    return message
