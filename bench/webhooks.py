"""Webhook ingestion: signed SendGrid Event Webhook batches of ~1 MiB posted concurrently on loopback.

Set-up (not timed): a scratch PostgreSQL database, migrated, holding one ``sent`` email outbox row (and its
candidate) per message the events talk about; the events themselves, in SendGrid's own shapes (``processed``,
``deferred``, ``delivered``, ``open``, ``click``, hard ``bounce``, with our outbox id in the custom args, as the
service sends them), cut into JSON arrays of about 1 MiB, each signed the way SendGrid signs (ECDSA P-256 over
timestamp + body) with a key made for the run. One in twenty batches is posted a second time later in the run,
as SendGrid does when an acknowledgement is late: those events must be recognised and stored once.

Timed, twice, with the same bodies, the same client and the same concurrency:

- **baseline**: the same HTTP server (uvicorn, one process, default settings) serving a trivial ASGI app
  (:data:`trivial_app`) that reads the body and answers 200 — what HTTP on loopback costs for these bodies;
- **service**: ``outreach serve`` (uvicorn serving ``outreach.web.create_app``) on the scratch database, which
  verifies each signature, parses the batch, de-duplicates on ``sg_event_id``, stores every event and moves the
  outbox rows forward, in one transaction per batch.

The clock runs from the first request to the last response. Events per second count unique events only (the
re-posted batches are extra work, not extra credit). Afterwards every event must be in ``delivery_events``
exactly once and every outbox row must have reached the status its events imply.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import os
import queue
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy import Connection, Table, func, insert, select, text
from sqlalchemy.engine import create_engine, make_url

from bench.harness import (
    BenchmarkError,
    Figure,
    Options,
    Service,
    at_least,
    at_most,
    clean_environment,
    free_port,
    progress,
    scratch_database,
    wait_until,
)
from outreach.core.models import Base, DeliveryEvent, OutboundMessage

EVENTS_PATH = "/webhooks/sendgrid/events"
#: Every message gets processed + delivered; these shares get more (or a bounce instead of delivered).
EVERY_NTH_DEFERRED = 10
EVERY_NTH_BOUNCED = 50
EVERY_NTH_OPENED = 2
EVERY_NTH_CLICKED = 4
#: One batch in this many is posted a second time (a SendGrid retry), later in the run.
REPLAY_EVERY = 20

GOAL_EVENTS_PER_SECOND = 5_000.0
GOAL_P99_SECONDS = 1.0

ASGIReceive = Callable[[], Awaitable[MutableMapping[str, Any]]]
ASGISend = Callable[[MutableMapping[str, Any]], Awaitable[None]]


async def trivial_app(scope: MutableMapping[str, Any], receive: ASGIReceive, send: ASGISend) -> None:
    """The baseline endpoint: read the whole body, answer 200 with a tiny JSON object. Nothing else."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "http":
        return
    size = 0
    more = True
    while more:
        message = await receive()
        size += len(message.get("body", b""))
        more = bool(message.get("more_body", False))
    body = b'{"received":%d}' % size
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


# -- the events --------------------------------------------------------------------------------------------


class Signer:
    """Signs like SendGrid: ECDSA P-256 / SHA-256 over ``timestamp + body``; the public key as SendGrid shows it."""

    def __init__(self) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        der = self.key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        self.public_key = base64.b64encode(der).decode("ascii")

    def headers(self, body: bytes) -> dict[str, str]:
        stamp = str(int(time.time()))
        signature = self.key.sign(stamp.encode() + body, ec.ECDSA(hashes.SHA256()))
        return {
            "Content-Type": "application/json",
            "User-Agent": "SendGrid Event API",
            "X-Twilio-Email-Event-Webhook-Signature": base64.b64encode(signature).decode("ascii"),
            "X-Twilio-Email-Event-Webhook-Timestamp": stamp,
        }


@dataclass(frozen=True)
class Message:
    outbox_id: str
    email: str
    sg_message_id: str
    bounced: bool

    @property
    def expected_status(self) -> str:
        return "bounced" if self.bounced else "delivered"


def _messages(count: int) -> list[Message]:
    return [
        Message(
            outbox_id=f"b{index:031d}",
            email=f"bench-{index:07d}@example.org",
            sg_message_id=f"BenchMsg{index:014d}",
            bounced=index % EVERY_NTH_BOUNCED == EVERY_NTH_BOUNCED - 1,
        )
        for index in range(count)
    ]


def events_for(message: Message, index: int, start: int) -> list[dict[str, Any]]:
    """SendGrid's events for one message, in SendGrid's shapes (see tests/fixtures/sendgrid)."""
    common = {
        "email": message.email,
        "category": ["jd_intro", "jd_intro_en"],
        "sg_message_id": f"{message.sg_message_id}.filter0001.16648.5515E0B88.0",
        "outreach_id": message.outbox_id,
    }
    smtp_id = f"<{message.sg_message_id}@ismtpd-555>"
    t = start + index
    events: list[dict[str, Any]] = [
        {**common, "timestamp": t, "smtp-id": smtp_id, "event": "processed", "sg_event_id": f"p-{index}"}
    ]
    if index % EVERY_NTH_DEFERRED == 0:
        events.append(
            {
                **common,
                "timestamp": t + 30,
                "smtp-id": smtp_id,
                "event": "deferred",
                "sg_event_id": f"df-{index}",
                "response": "400 try again later",
                "attempt": "5",
            }
        )
    if message.bounced:
        events.append(
            {
                **common,
                "timestamp": t + 60,
                "smtp-id": smtp_id,
                "event": "bounce",
                "sg_event_id": f"b-{index}",
                "reason": "550 5.1.1 The email account that you tried to reach does not exist.",
                "status": "5.1.1",
                "type": "bounce",
                "bounce_classification": "Invalid Address",
            }
        )
        return events
    events.append(
        {
            **common,
            "timestamp": t + 60,
            "smtp-id": smtp_id,
            "event": "delivered",
            "sg_event_id": f"d-{index}",
            "response": "250 OK",
            "ip": "168.1.1.1",
            "tls": 1,
        }
    )
    if index % EVERY_NTH_OPENED == 0:
        events.append(
            {
                **common,
                "timestamp": t + 3600,
                "event": "open",
                "sg_event_id": f"o-{index}",
                "useragent": "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko)",
                "ip": "203.0.113.7",
                "sg_machine_open": False,
            }
        )
    if index % EVERY_NTH_CLICKED == 0:
        events.append(
            {
                **common,
                "timestamp": t + 3660,
                "event": "click",
                "sg_event_id": f"c-{index}",
                "useragent": "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko)",
                "ip": "203.0.113.7",
                "url": "https://book.example.com/backend",
                "url_offset": {"index": 0, "type": "html"},
            }
        )
    return events


def batches_of(events: Sequence[dict[str, Any]], limit: int) -> list[tuple[bytes, int]]:
    """JSON arrays of at most ``limit`` bytes (at least one event each); (body, events in it)."""
    batches: list[tuple[bytes, int]] = []
    parts: list[bytes] = []
    size = 2
    for event in events:
        encoded = json.dumps(event, separators=(",", ":")).encode()
        if parts and size + len(encoded) + 1 > limit:
            batches.append((b"[" + b",".join(parts) + b"]", len(parts)))
            parts, size = [], 2
        parts.append(encoded)
        size += len(encoded) + 1
    if parts:
        batches.append((b"[" + b",".join(parts) + b"]", len(parts)))
    return batches


def schedule(batches: Sequence[tuple[bytes, int]]) -> list[int]:
    """The order batches are posted in: each once, and every ``REPLAY_EVERY``-th again a few batches later."""
    order: list[int] = []
    replays: list[int] = []
    for index in range(len(batches)):
        order.append(index)
        if index % REPLAY_EVERY == REPLAY_EVERY - 1 or (len(batches) < REPLAY_EVERY and index == 0):
            replays.append(index)
        if replays and len(order) - order.index(replays[0]) > 4:
            order.append(replays.pop(0))
    order.extend(replays)
    return order


# -- the database ------------------------------------------------------------------------------------------


def seed(database_url: str, messages: Sequence[Message]) -> None:
    """One candidate and one ``sent`` email outbox row per message (not timed).

    The first pair is inserted through SQLAlchemy (so every column gets its model default); the others are
    copies of it made by PostgreSQL from ``generate_series``, with the per-message columns replaced: seconds
    for 50,000 pairs even on a busy machine, and no list of columns to keep in step with the models. Then both
    tables are analyzed, as they would be in a database that has been running.
    """
    engine = create_engine(database_url)
    candidates: Table = Base.metadata.tables["candidates"]
    outbox: Table = Base.metadata.tables["outbound_messages"]
    first = messages[0]
    try:
        with engine.begin() as connection:
            connection.execute(insert(candidates), {"id": 1, "external_id": _external_id(0), "email": first.email})
            connection.execute(
                insert(outbox),
                {
                    "id": first.outbox_id,
                    "candidate_id": 1,
                    "campaign": "jd_intro",
                    "step": 0,
                    "channel": "email",
                    "template": "jd_intro",
                    "category": "transactional",
                    "status": "sent",
                    "locale": "en",
                    "provider": "sendgrid",
                    "provider_message_id": first.sg_message_id,
                    "sent_at": datetime.now(UTC) - timedelta(minutes=5),
                },
            )
            # g is the candidate id; g - 1 the message's index (see _messages).
            index = "lpad((g - 1)::text, 7, '0')"
            _copy_rows(
                connection,
                candidates,
                len(messages),
                {"id": "g", "external_id": f"'bench-' || {index}", "email": f"'bench-' || {index} || '@example.org'"},
            )
            _copy_rows(
                connection,
                outbox,
                len(messages),
                {
                    "id": "'b' || lpad((g - 1)::text, 31, '0')",
                    "candidate_id": "g",
                    "provider_message_id": "'BenchMsg' || lpad((g - 1)::text, 14, '0')",
                },
            )
        with engine.begin() as connection:
            # Statistics, as autovacuum gathers them on a live database within a minute of a bulk load: without
            # them the planner takes the freshly filled tables for a few hundred rows and scans them whole.
            connection.execute(text("ANALYZE candidates, outbound_messages"))
    finally:
        engine.dispose()


def _copy_rows(connection: Connection, table: Table, count: int, replaced: dict[str, str]) -> None:
    """Rows 2..count of ``table`` as copies of the row with ``candidate_id``/``id`` 1, ``replaced`` columns
    computed from ``g``."""
    quote = connection.dialect.identifier_preparer.quote
    names = [column.name for column in table.columns]
    values = [replaced.get(name, f"e.{quote(name)}") for name in names]
    key = "candidate_id" if "candidate_id" in table.columns else "id"
    connection.execute(
        text(
            f"INSERT INTO {quote(table.name)} ({', '.join(quote(n) for n in names)}) "
            f"SELECT {', '.join(values)} FROM generate_series(2, :count) AS g, {quote(table.name)} AS e "
            f"WHERE e.{quote(key)} = 1"
        ),
        {"count": count},
    )


def _external_id(index: int) -> str:
    return f"bench-{index:07d}"


def verify(database_url: str, messages: Sequence[Message], unique_events: int) -> dict[str, int]:
    """What the database holds after the run, as correctness counts (all zero when everything is right)."""
    expected = {m.outbox_id: m.expected_status for m in messages}
    engine = create_engine(database_url)
    try:
        with engine.connect() as connection:
            stored = int(
                connection.execute(
                    select(func.count()).select_from(DeliveryEvent).where(DeliveryEvent.provider == "sendgrid")
                ).scalar_one()
            )
            distinct = int(
                connection.execute(
                    select(func.count(func.distinct(DeliveryEvent.provider_event_id))).where(
                        DeliveryEvent.provider == "sendgrid"
                    )
                ).scalar_one()
            )
            unlinked = int(
                connection.execute(
                    select(func.count()).select_from(DeliveryEvent).where(DeliveryEvent.message_id.is_(None))
                ).scalar_one()
            )
            statuses = {oid: st for oid, st in connection.execute(select(OutboundMessage.id, OutboundMessage.status))}
    finally:
        engine.dispose()
    wrong = sum(1 for outbox_id, status in expected.items() if statuses.get(outbox_id) != status)
    return {
        "lost": max(unique_events - distinct, 0),
        "duplicated": stored - distinct + max(distinct - unique_events, 0),
        "unlinked": unlinked,
        "wrong_status": wrong,
    }


# -- posting -----------------------------------------------------------------------------------------------


@dataclass
class Posted:
    """One side's run: the window, each batch's acknowledgement time, and what the server said."""

    seconds: float
    ack_seconds: list[float]
    rejected: int
    errors: list[str] = field(default_factory=list)
    summaries: list[dict[str, Any]] = field(default_factory=list)

    def p(self, quantile: float) -> float:
        ordered = sorted(self.ack_seconds)
        if not ordered:
            return 0.0
        if len(ordered) == 1:
            return ordered[0]
        return statistics.quantiles(ordered, n=100, method="inclusive")[round(quantile * 100) - 1]


def post_all(
    port: int,
    bodies: Sequence[tuple[bytes, dict[str, str]]],
    order: Sequence[int],
    concurrency: int,
    timeout: float,
) -> Posted:
    """Post ``bodies`` in ``order`` from ``concurrency`` keep-alive connections; every answer must be 200."""
    work: queue.SimpleQueue[int | None] = queue.SimpleQueue()
    for index in order:
        work.put(index)
    for _ in range(concurrency):
        work.put(None)
    lock = threading.Lock()
    acks: list[float] = []
    errors: list[str] = []
    summaries: list[dict[str, Any]] = []

    def sender() -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        try:
            while (index := work.get()) is not None:
                body, headers = bodies[index]
                began = time.perf_counter()
                try:
                    connection.request("POST", EVENTS_PATH, body=body, headers=headers)
                    response = connection.getresponse()
                    answer = response.read()
                except (OSError, http.client.HTTPException) as exc:
                    connection.close()
                    with lock:
                        errors.append(f"batch {index}: {type(exc).__name__}: {exc}")
                    continue
                took = time.perf_counter() - began
                with lock:
                    acks.append(took)
                    if response.status != 200:
                        errors.append(f"batch {index}: HTTP {response.status} {answer[:200]!r}")
                    else:
                        with contextlib.suppress(ValueError):
                            summaries.append(json.loads(answer))
        finally:
            connection.close()

    threads = [threading.Thread(target=sender, name=f"poster-{n}", daemon=True) for n in range(concurrency)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - started
    return Posted(seconds, acks, rejected=len(errors), errors=errors, summaries=summaries)


def _answers(port: int, path: str) -> Callable[[], bool]:
    def up() -> bool:
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            connection.request("GET", path)
            connection.getresponse().read()
            connection.close()
            return True
        except OSError:
            return False

    return up


def database_cpu_seconds(database_url: str) -> float | None:
    """CPU time of the PostgreSQL backends serving ``database_url`` (Linux, server on this machine; else None)."""
    name = make_url(database_url).database
    proc = Path("/proc")
    if not name or not (proc / "self" / "stat").exists():
        return None
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for entry in proc.glob("[0-9]*"):
        try:
            if f" {name} ".encode() not in (entry / "cmdline").read_bytes().replace(b"\0", b" ") + b" ":
                continue
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        total += int(fields[11]) + int(fields[12])
    return total / tick


def signature_check_seconds(signer: Signer, body: bytes) -> float:
    """The service's own signature check (``verify_sendgrid``) on one batch, in-process: the best of three."""
    from outreach.web.webhooks import WebhookSettings, verify_sendgrid

    hooks = WebhookSettings(sendgrid_public_key=signer.public_key)
    best = float("inf")
    for _ in range(3):
        headers = signer.headers(body)
        began = time.perf_counter()
        verify_sendgrid(hooks, body, headers, time.time())
        best = min(best, time.perf_counter() - began)
    return best


# -- the run -----------------------------------------------------------------------------------------------


def run(options: Options) -> list[Figure]:
    target_events = options.size("webhooks.events", 60_000, 3_000)
    batch_bytes = options.size("webhooks.batch_bytes", 1024 * 1024, 1024 * 1024)
    concurrency = options.size("webhooks.concurrency", 2, 2)
    # About 2.4 events per message with the shares above.
    messages = _messages(max(1, round(target_events / 2.4)))
    signer = Signer()

    with contextlib.ExitStack() as stack:
        logs = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="outreach-bench-")))
        database_url = stack.enter_context(scratch_database(options.postgres_url))
        # The service starts first: its start-up (seconds on a busy machine) overlaps the rest of the set-up.
        port = free_port()
        env = clean_environment(
            {
                "OUTREACH_DATABASE_URL": database_url,
                "OUTREACH_SENDGRID_WEBHOOK_PUBLIC_KEY": signer.public_key,
                "OUTREACH_BROKER_URL": options.redis_url,
                "OUTREACH_QUEUE": options.queue_name("webhooks"),
                "OUTREACH_LOG_LEVEL": "WARNING",
            }
        )
        argv = [sys.executable, "-m", "outreach", "serve", "--host", "127.0.0.1", "--port", str(port)]
        service = stack.enter_context(Service("webhook-service", argv, env, logs))

        began = time.perf_counter()
        seed(database_url, messages)
        events: list[dict[str, Any]] = []
        start = int(time.time()) - 7200
        for index, message in enumerate(messages):
            events.extend(events_for(message, index, start))
        batches = batches_of(events, batch_bytes)
        order = schedule(batches)
        unique = len(events)
        posted_events = sum(batches[i][1] for i in order)
        mean_bytes = sum(len(body) for body, _ in batches) / len(batches)
        verify_seconds = signature_check_seconds(signer, batches[0][0])
        progress(
            f"webhooks: {len(messages)} sent messages, {unique} events in {len(batches)} batches of "
            f"~{mean_bytes / 1024:.0f} KiB ({len(order) - len(batches)} posted twice), {concurrency} at a time; "
            f"set up in {time.perf_counter() - began:.1f} s"
        )
        wait_until(_answers(port, "/healthz"), timeout=120, interval=0.2, what="the service", check=service.check)

        # Baseline: the same server software, a trivial app, the same bodies and client.
        base_port = free_port()
        argv = [sys.executable, "-m", "uvicorn", "bench.webhooks:trivial_app", "--host", "127.0.0.1"]
        argv += ["--port", str(base_port), "--log-level", "warning", "--no-access-log"]
        with Service("webhook-baseline", argv, clean_environment({}), logs) as baseline_server:
            wait_until(
                _answers(base_port, "/"),
                timeout=60,
                interval=0.1,
                what="the baseline server",
                check=baseline_server.check,
            )
            signed = [(body, signer.headers(body)) for body, _ in batches]
            base_cpu = baseline_server.cpu_seconds()
            baseline = post_all(base_port, signed, order, concurrency, options.timeout)
            base_cpu_after = baseline_server.cpu_seconds()
            baseline_server.check()
        if baseline.errors:
            raise BenchmarkError(f"the baseline server refused batches: {baseline.errors[:3]}")

        # Signed now: the service refuses timestamps more than five minutes off.
        signed = [(body, signer.headers(body)) for body, _ in batches]
        progress(f"webhooks: posting {posted_events} events to the service")
        cpu_before, db_before = service.cpu_seconds(), database_cpu_seconds(database_url)
        result = post_all(port, signed, order, concurrency, options.timeout)
        cpu_after, db_after = service.cpu_seconds(), database_cpu_seconds(database_url)
        service.check()
        checks = verify(database_url, messages, unique)

    checks["rejected"] = result.rejected
    reported_stored = sum(int(s.get("stored", 0)) for s in result.summaries)
    reported_duplicates = sum(int(s.get("duplicates", 0)) for s in result.summaries)
    # Every event the server said it stored must be unique, and the replays must all be recognised.
    checks["duplicated"] = (checks["duplicated"] or 0) + max(reported_stored - unique, 0)
    details = {
        "events": unique,
        "events_posted": posted_events,
        "batches": len(batches),
        "batches_posted": len(order),
        "mean_batch_bytes": round(mean_bytes),
        "concurrency": concurrency,
        "reported_stored": reported_stored,
        "reported_duplicates": reported_duplicates,
        "service_seconds": round(result.seconds, 3),
        "baseline_seconds": round(baseline.seconds, 3),
        "p50_ack_seconds": round(result.p(0.5), 4),
        "signature_check_ms_per_batch": round(verify_seconds * 1000, 2),
        "service_cpu_us_per_event": (
            round((cpu_after - cpu_before) * 1e6 / posted_events) if cpu_before is not None and cpu_after else None
        ),
        "database_cpu_us_per_event": (
            round((db_after - db_before) * 1e6 / posted_events) if db_before is not None and db_after else None
        ),
        "errors": result.errors[:5],
    }
    if result.errors:
        progress(f"webhooks: {len(result.errors)} batch(es) failed, e.g. {result.errors[0]}")
    rate = unique / result.seconds if result.seconds > 0 else 0.0
    baseline_rate = unique / baseline.seconds if baseline.seconds > 0 else 0.0
    p99, baseline_p99 = result.p(0.99), baseline.p(0.99)
    ok = not any(checks.values())
    cpu_us = None
    if cpu_before is not None and cpu_after is not None and db_before is not None and db_after is not None:
        cpu_us = ((cpu_after - cpu_before) + (db_after - db_before)) * 1e6 / posted_events
    base_cpu_us = None
    if base_cpu is not None and base_cpu_after is not None:
        base_cpu_us = (base_cpu_after - base_cpu) * 1e6 / posted_events
    cores = os.cpu_count() or 1
    budget = cores * 1e6 / GOAL_EVENTS_PER_SECOND
    return [
        Figure(
            "webhooks.events_per_second",
            rate,
            "events/s",
            baseline_name="trivial endpoint, same server and bodies",
            baseline_value=baseline_rate,
            goal=f"≥ {GOAL_EVENTS_PER_SECOND:,.0f} events/s",
            met=at_least(rate, GOAL_EVENTS_PER_SECOND, options),
            checks=dict(checks),
            ok=ok,
            details=details,
        ),
        Figure(
            "webhooks.p99_ack",
            p99,
            "s",
            baseline_name="trivial endpoint",
            baseline_value=baseline_p99,
            goal=f"< {GOAL_P99_SECONDS:g} s per batch",
            met=None if options.smoke else p99 < GOAL_P99_SECONDS,
            checks={"rejected": result.rejected},
            ok=ok,
        ),
        Figure(
            "webhooks.cpu_per_event",
            cpu_us,
            "µs CPU/event",
            baseline_name="trivial endpoint",
            baseline_value=base_cpu_us,
            goal=f"≤ {budget:,.0f} µs ({GOAL_EVENTS_PER_SECOND:,.0f}/s on {cores} cores)",
            met=at_most(cpu_us, budget, options),
            checks={},
            ok=ok,
        ),
    ]
