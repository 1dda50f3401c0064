"""Small builders shared by tests (fakes over mocks: real rows, real sandbox)."""

from __future__ import annotations

import base64
from datetime import datetime
from typing import Any

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy.orm import Session

from outreach.core.clock import utcnow
from outreach.core.models import Candidate, Enrollment, Job, MessageStatus, OutboundMessage
from outreach.domain.candidates import CandidateIn, JobIn, upsert_candidate, upsert_job
from outreach.pipeline.enrollment import EventIn, record_event
from outreach.service.runtime import Runtime


def add_candidate(runtime: Runtime, external_id: str = "c-1", **fields: Any) -> Candidate:
    data: dict[str, Any] = {
        "external_id": external_id,
        "name": "Alex Morgan",
        "email": f"{external_id}@example.org",
        "phone": "+8613800138000",
        "locale": "en",
        "timezone": "Asia/Shanghai",
        "source": "linkedin",
        "tags": ["stack:python"],
    }
    stage = fields.pop("stage", None)
    data.update(fields)
    with Session(runtime.engine, expire_on_commit=False) as session, session.begin():
        candidate = upsert_candidate(session, CandidateIn.model_validate(data), runtime.settings)
        if stage is not None:
            candidate.stage = stage
        return candidate


def past_nurture_send(
    candidate_id: int, sent_at: datetime, status: str = MessageStatus.DELIVERED.value
) -> OutboundMessage:
    """An earlier nurture email to the candidate (what the nurture frequency caps count); add it to a session."""
    return OutboundMessage(
        candidate_id=candidate_id,
        campaign="quarterly_nurture",
        step=0,
        channel="email",
        template="quarterly_nurture",
        category="nurture",
        status=status,
        sent_at=sent_at,
    )


def add_job(runtime: Runtime, external_id: str = "j-1", **fields: Any) -> Job:
    data: dict[str, Any] = {
        "external_id": external_id,
        "title": "Backend Engineer",
        "department": "Platform",
        "location": "Shanghai",
        "description": "Build the services our recruiters rely on.",
        "booking_url": "https://book.example.com/backend",
        "tags": ["stack:python"],
    }
    data.update(fields)
    with Session(runtime.engine, expire_on_commit=False) as session, session.begin():
        return upsert_job(session, JobIn.model_validate(data))


def fire(
    runtime: Runtime,
    external_id: str,
    event_type: str,
    *,
    at: datetime | None = None,
    job: str | None = None,
    reason: str | None = None,
    data: dict[str, Any] | None = None,
) -> list[Enrollment]:
    event = EventIn.model_validate(
        {"type": event_type, "job_id": job, "reason": reason, "occurred_at": at, "data": data or {}}
    )
    with Session(runtime.engine, expire_on_commit=False) as session, session.begin():
        _, enrollments = record_event(
            session,
            runtime.campaigns,
            external_id,
            event,
            company_tz=runtime.settings.company_timezone,
            calendar=runtime.policy.calendar,
        )
    return enrollments


def resolved_links(runtime: Runtime, text: str) -> list[str]:
    """The destinations behind the tracked ``/r/`` links in ``text`` (without recording a click)."""
    import re

    from outreach.core.models import TrackedLink
    from outreach.pipeline.links import link_id_from_token

    destinations = []
    with Session(runtime.engine) as session:
        for token in re.findall(r"/r/([A-Za-z0-9_\-]+\.[A-Za-z0-9_\-]+)", text):
            link_id = link_id_from_token(runtime.settings, token)
            link = session.get(TrackedLink, link_id) if link_id is not None else None
            if link is not None:
                destinations.append(link.url)
    return destinations


def api_key(runtime: Runtime, role: str = "hr", name: str | None = None) -> str:
    """A fresh API key of ``role`` on the runtime's database (the clear key; only its hash is stored)."""
    from outreach.domain.auth import create_key

    with Session(runtime.engine) as session, session.begin():
        _, key = create_key(session, role, name)
    return key


def api_client(runtime: Runtime, role: str = "hr", app: Any = None, **kwargs: Any) -> Any:
    """A TestClient on ``create_app(runtime)`` (or ``app``) that sends a new ``role`` key with every request."""
    from fastapi.testclient import TestClient

    from outreach.web import create_app

    headers = {**kwargs.pop("headers", {}), "Authorization": f"Bearer {api_key(runtime, role)}"}
    return TestClient(app if app is not None else create_app(runtime), headers=headers, **kwargs)


def wait_until_a_session_waits_for_a_lock(engine: Any, timeout: float = 10.0) -> None:
    """Block until another PostgreSQL session of this database is waiting for a row lock (what a test of
    "the second one waits" must see happen, rather than sleep and hope)."""
    import time

    from sqlalchemy import text

    deadline = time.monotonic() + timeout
    with engine.connect() as connection:
        while True:
            waiting = connection.execute(
                text(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                    "AND wait_event_type = 'Lock' AND pid <> pg_backend_pid()"
                )
            ).scalar_one()
            connection.rollback()
            if waiting:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"no session waited for a lock within {timeout} s")
            time.sleep(0.01)


#: Where the service is public in the web tests (Twilio signs this URL) and the inbound-parse token they use.
PUBLIC_URL = "https://hooks.example.com"
INBOUND_TOKEN = "inbound-test-token"


class Signer:
    """Signs like SendGrid: ECDSA P-256 / SHA-256 over timestamp + body, base64 DER; the key as SendGrid shows it."""

    def __init__(self) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        der = self.key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        self.public_key = base64.b64encode(der).decode("ascii")

    def headers(self, body: bytes, timestamp: int | None = None) -> dict[str, str]:
        stamp = str(int(utcnow().timestamp()) if timestamp is None else timestamp)
        signature = self.key.sign(stamp.encode() + body, ec.ECDSA(hashes.SHA256()))
        return {
            "Content-Type": "application/json",
            "X-Twilio-Email-Event-Webhook-Signature": base64.b64encode(signature).decode("ascii"),
            "X-Twilio-Email-Event-Webhook-Timestamp": stamp,
        }
