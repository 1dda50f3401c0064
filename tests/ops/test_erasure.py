"""Erasure: the candidate's personal data leaves every table and the sandbox; opt-outs and metrics survive."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from outreach.core.models import (
    Base,
    Candidate,
    DeliveryEvent,
    InboundMessage,
    OutboundMessage,
    StageChange,
    Suppression,
)
from outreach.ops.sandbox import SandboxServer
from outreach.pipeline.delivery import deliver
from outreach.policy.consent import HASH_PREFIX
from outreach.service.runtime import Runtime
from tests.helpers import add_candidate, add_job, api_client, fire

T0 = datetime(2026, 11, 25, 2, 0, tzinfo=UTC)
NAME = "Ottoline Vandermeer"
EMAIL = "ottoline.vandermeer@example.net"
PHONE = "+8613722223333"
CANARIES = ("ottoline", "vandermeer", "13722223333")


def everything_in_the_database(runtime: Runtime) -> str:
    """Every row of every table as text, lowercased (what a canary must not appear in)."""
    chunks = []
    with runtime.engine.connect() as connection:
        for table in Base.metadata.sorted_tables:
            for row in connection.execute(text(f'SELECT * FROM "{table.name}"')):
                chunks.append(repr(tuple(row)))
    return "\n".join(chunks).lower()


def statuses(runtime: Runtime) -> list[tuple[str, str, str]]:
    with Session(runtime.engine) as session:
        rows = session.execute(
            select(OutboundMessage.campaign, OutboundMessage.channel, OutboundMessage.status).order_by(
                OutboundMessage.created_at, OutboundMessage.step
            )
        )
        return [tuple(r) for r in rows]  # type: ignore[misc]


def history_with_canaries(runtime: Runtime, sandbox: SandboxServer) -> None:
    """Mail and SMS sent through the sandbox, a provider event, a reply and an email opt-out."""
    add_candidate(runtime, "c-1", name=NAME, email=EMAIL, phone=PHONE, data={"note": f"{NAME} prefers calls"})
    add_job(runtime)
    fire(runtime, "c-1", "applied", at=T0, job="j-1", data={"referrer": NAME})
    runtime.scheduler.tick(T0 + timedelta(hours=1))
    with Session(runtime.engine) as session:
        ids = list(session.scalars(select(OutboundMessage.id)))
        candidate_id = session.scalar(select(OutboundMessage.candidate_id))
    assert {deliver(runtime, i).status for i in ids} == {"sent"}
    assert len(sandbox.wait_for(2, timeout=5)) == 2
    with Session(runtime.engine) as session, session.begin():
        session.add(
            DeliveryEvent(
                message_id=ids[0],
                provider="sendgrid",
                provider_event_id="ev-1",
                type="delivered",
                occurred_at=T0,
                raw={"email": EMAIL, "event": "delivered"},
            )
        )
        session.add(
            InboundMessage(
                candidate_id=candidate_id,
                channel="email",
                provider="sendgrid",
                provider_message_id="in-1",
                from_address=EMAIL,
                to_address="jobs@example.com",
                subject="Re: your application",
                body=f"Thanks! {NAME}, {PHONE}",
                kind="reply",
                received_at=T0,
            )
        )
        session.add(Suppression(channel="email", address=EMAIL, reason="unsubscribe", source="link"))
        session.add(
            StageChange(
                candidate_id=candidate_id,
                from_stage="applied",
                to_stage="contacted",
                changed_by="api:lead",
                reason=f"phoned {NAME}",
            )
        )


def test_erasure_removes_every_trace_and_keeps_the_opt_out(runtime: Runtime, sandbox: SandboxServer) -> None:
    runtime.sandbox_url = sandbox.url
    history_with_canaries(runtime, sandbox)
    before = statuses(runtime)
    assert all(c in everything_in_the_database(runtime) for c in CANARIES)  # the scan can see them

    client = api_client(runtime)
    assert api_client(runtime, "ops").delete("/api/v1/candidates/c-1").status_code == 403
    answer = client.delete("/api/v1/candidates/c-1")
    assert answer.status_code == 200, answer.text
    counts = answer.json()["counts"]
    assert counts["messages"] == 2 and counts["inbound"] == 1 and counts["suppressions_hashed"] == 1
    assert counts["sandbox_records"] == 2

    dump = everything_in_the_database(runtime)
    print(f"erasure: {len(dump)} characters scanned, canaries found: {[c for c in CANARIES if c in dump]}")
    assert not [c for c in CANARIES if c in dump], [line for line in dump.splitlines() if "ottoline" in line][:3]
    assert sandbox.messages() == []
    # Aggregates stay: the same messages with the same statuses, still counted.
    assert statuses(runtime) == before
    with Session(runtime.engine) as session:
        assert session.scalar(select(func.count()).select_from(DeliveryEvent)) == 1
        [kept] = session.scalars(select(Suppression.address))
    assert kept.startswith(HASH_PREFIX)
    assert client.get("/api/v1/candidates/c-1").status_code == 404
    assert client.delete("/api/v1/candidates/c-1").status_code == 404


def test_the_opted_out_address_stays_suppressed_for_a_new_enrollment(runtime: Runtime, sandbox: SandboxServer) -> None:
    history_with_canaries(runtime, sandbox)
    with Session(runtime.engine) as session:
        erased_id = session.scalar(select(Candidate.id).where(Candidate.external_id == "c-1"))
    assert api_client(runtime).delete("/api/v1/candidates/c-1").status_code == 200
    sandbox.clear()
    # The same person applies again (a new ATS record, same email, no fresh consent to mail).
    add_candidate(runtime, "c-2", name="O. V.", email=EMAIL.upper(), phone=None)
    fire(runtime, "c-2", "applied", at=T0 + timedelta(days=1), job="j-1")
    runtime.scheduler.tick(T0 + timedelta(days=1, hours=1))
    with Session(runtime.engine) as session:
        new = list(
            session.scalars(
                select(OutboundMessage.id).where(
                    OutboundMessage.channel == "email", OutboundMessage.candidate_id != erased_id
                )
            )
        )
    for outbox_id in new:
        deliver(runtime, outbox_id)  # caught when scheduled or when sent: either way, never sent
    with Session(runtime.engine) as session:
        rows = [session.get(OutboundMessage, i) for i in new]
    assert [(r.status, r.rule) for r in rows if r is not None] == [("suppressed", "suppression")]
    assert sandbox.messages() == []


def test_erasing_an_unknown_candidate_is_404_and_writes_nothing(runtime: Runtime) -> None:
    add_candidate(runtime, "c-1", name=NAME, email=EMAIL)
    before = everything_in_the_database(runtime)
    assert api_client(runtime).delete("/api/v1/candidates/nobody").status_code == 404
    assert "ottoline" in everything_in_the_database(runtime)
    assert len(everything_in_the_database(runtime)) >= len(before) - 200  # only the new key's row differs


def test_erasing_again_keeps_the_wider_suppression_of_an_address(runtime: Runtime) -> None:
    client = api_client(runtime)
    add_candidate(runtime, "c-1", name=NAME, email=EMAIL)
    with Session(runtime.engine) as session, session.begin():
        session.add(Suppression(channel="email", address=EMAIL, reason="unsubscribed", source="link", scope="nurture"))
    assert client.delete("/api/v1/candidates/c-1").status_code == 200
    # The same address comes back on a new record and bounces hard; that record is erased too.
    add_candidate(runtime, "c-2", name=NAME, email=EMAIL)
    with Session(runtime.engine) as session, session.begin():
        session.add(Suppression(channel="email", address=EMAIL, reason="bounced", source="sendgrid", scope="provider"))
    assert client.delete("/api/v1/candidates/c-2").status_code == 200
    with Session(runtime.engine) as session:
        [kept] = session.scalars(select(Suppression))
        assert kept.address.startswith(HASH_PREFIX)
        assert (kept.scope, kept.reason, kept.source) == ("provider", "bounced", "sendgrid")
