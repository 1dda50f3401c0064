"""A nurture run end to end, batched: recipients per second next to bare Dramatiq's messages per second.

Set-up (not timed): the bare Dramatiq no-op side of :mod:`bench.bare` runs first with the same broker and worker
settings. Then a scratch PostgreSQL database gets, by ``generate_series``, N talent-pool candidates with nurture
consent (two in three read English, one in three Chinese) and one pending ``quarterly_nurture`` email row each,
as the scheduler writes them; the ids are grouped by locale into batch messages of up to 1000 (what
:meth:`outreach.pipeline.scheduler.Scheduler.run_due` puts on the queue) and staged on Redis. The campaigns are the
shipped ones with the shipped policies, except that nurture email may go at any hour (the run must not depend on
the time of day). The sandbox runs as its own process and keeps who got what, not every recipient's body.

Timed: from releasing the batch messages to the workers (``workers``, the service's own actors) until every row
is ``sent``: claim, every policy rule per recipient, one rendering per locale, one SendGrid request per 1000
recipients through the SDK's client to the sandbox, rows recorded. Then each outbox id must have reached the
sandbox exactly once, in as many requests as there were batches.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from sqlalchemy import Engine, String, any_, bindparam, create_engine, exists, func, select, text
from sqlalchemy.dialects.postgresql import ARRAY

from bench.bare import run_bare
from bench.harness import (
    ROOT,
    BenchmarkError,
    Config,
    Figure,
    Measurement,
    Options,
    at_least,
    cpu_per_message,
    dramatiq_workers,
    fresh_queue,
    get_json,
    progress,
    scratch_database,
    wait_drained,
    wait_until,
)
from bench.stack import (
    SANDBOX_TOKEN,
    alive,
    count_duplicated,
    failing_fast,
    sandbox_received,
    start_sandbox,
    worker_environment,
)
from outreach.core.clock import utcnow
from outreach.core.models import MessageStatus, OutboundMessage
from outreach.providers.sendgrid_payload import MAX_PERSONALIZATIONS
from outreach.service.broker import BATCH_ACTOR

POLL_INTERVAL = 0.05
WARMUP_RECIPIENTS = 200
WARMUP_BATCH = 50


def seed(engine: Engine, count: int) -> dict[str, list[str]]:
    """``count`` consenting talent-pool candidates with a pending quarterly_nurture row; outbox ids by locale."""
    # The service's clock, not the database's: a run under a moved clock (faketime) seeds rows due at its time.
    now = "CAST(:now AS timestamp)"
    at = utcnow().replace(tzinfo=None)
    with engine.begin() as connection:
        connection.execute(
            text(
                f"""
                INSERT INTO candidates (external_id, name, email, locale, timezone, tags, stage, nurture_consent,
                                        data, created_at, updated_at)
                SELECT 'nurture-' || g, 'Candidate' || g || ' Example', 'nurture-' || g || '@example.org',
                       CASE WHEN g % 3 = 0 THEN 'zh-CN' ELSE 'en' END, 'Asia/Shanghai', '[]'::json, 'talent_pool',
                       true, '{{}}'::json, {now}, {now}
                FROM generate_series(1, :n) AS g
                """
            ),
            {"n": count, "now": at},
        )
        connection.execute(
            text(
                f"""
                INSERT INTO enrollments (candidate_id, campaign, dedupe_key, stage_at_start, current_step, status,
                                         next_run_at, anchor_at, context, created_at, updated_at)
                SELECT id, 'quarterly_nurture', 'cron:bench', 'talent_pool', 1, 'completed', NULL, {now},
                       '{{}}'::json, {now}, {now}
                FROM candidates
                """
            ),
            {"now": at},
        )
        connection.execute(
            text(
                f"""
                INSERT INTO outbound_messages (id, enrollment_id, candidate_id, campaign, step, channel, template,
                                               category, status, not_before, enqueued_at, attempts, created_at,
                                               updated_at)
                SELECT md5(e.id::text || ':' || random()::text), e.id, e.candidate_id, 'quarterly_nurture', 0,
                       'email', 'quarterly_nurture', 'nurture', 'pending', {now} - interval '1 minute', {now}, 0,
                       {now}, {now}
                FROM enrollments AS e
                """
            ),
            {"now": at},
        )
        rows = connection.execute(
            text(
                "SELECT m.id, c.locale FROM outbound_messages AS m JOIN candidates AS c ON c.id = m.candidate_id "
                "ORDER BY c.id"
            )
        ).all()
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        for table in ("candidates", "enrollments", "outbound_messages"):
            connection.execute(text(f"VACUUM ANALYZE {table}"))
    by_locale: dict[str, list[str]] = {}
    for outbox_id, locale in rows:
        by_locale.setdefault(locale, []).append(outbox_id)
    return by_locale


def campaigns_any_hour(target: Path) -> Path:
    """The shipped campaigns and policies, with nurture email allowed at any hour."""
    shutil.copytree(ROOT / "campaigns", target)
    policies = target / "policies.yaml"
    data: dict[str, Any] = yaml.safe_load(policies.read_text(encoding="utf-8"))
    data["quiet_hours"]["email"]["nurture"] = {"hours": "any"}
    policies.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    return target


def _chunks(ids: list[str], size: int) -> list[list[str]]:
    return [ids[start : start + size] for start in range(0, len(ids), size)]


_UNFINISHED = (MessageStatus.PENDING.value, MessageStatus.SENDING.value)
_FINISHED_OK = (*_UNFINISHED, MessageStatus.SENT.value)
_WRONG = tuple(status.value for status in MessageStatus if status.value not in _FINISHED_OK)


def unfinished(engine: Engine, among: list[str] | None = None) -> bool:
    """Whether a row (of ``among``, if given) is still pending or sending. An ``EXISTS`` on the status index, so
    polling it costs the database next to nothing while 100,000 rows are being sent (a ``count(*)`` would
    read every unfinished entry of the index, 20 times a second, on the cores the run is measured on)."""
    query = select(OutboundMessage.id).where(OutboundMessage.status.in_(_UNFINISHED))
    if among is not None:
        query = query.where(OutboundMessage.id == any_(bindparam("among", among, type_=ARRAY(String))))
    with engine.connect() as connection:
        return connection.execute(select(exists(query))).scalar_one()


def failures(engine: Engine) -> str:
    with engine.connect() as connection:
        # Looked up on the status index first; grouped (a scan of the table) only when there is something to say.
        if not connection.execute(select(exists().where(OutboundMessage.status.in_(_WRONG)))).scalar_one():
            return ""
        rows = connection.execute(
            select(OutboundMessage.status, OutboundMessage.rule, OutboundMessage.error_code, func.count())
            .where(OutboundMessage.status.not_in(_FINISHED_OK))
            .group_by(OutboundMessage.status, OutboundMessage.rule, OutboundMessage.error_code)
            .limit(5)
        )
        return "; ".join(f"{n}x {status} {rule or ''} {code or ''}".strip() for status, rule, code, n in rows)


def measure(options: Options, config: Config, recipients: int) -> Measurement:
    with contextlib.ExitStack() as stack:
        queue = stack.enter_context(fresh_queue(options.redis_url, options.queue_name("nurture")))
        logs = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="outreach-bench-")))
        campaigns = campaigns_any_hour(logs / "campaigns")
        database_url = stack.enter_context(scratch_database(options.postgres_url))
        engine = create_engine(database_url)
        stack.callback(engine.dispose)

        began = time.perf_counter()
        by_locale = seed(engine, recipients + WARMUP_RECIPIENTS)
        setup_seconds = time.perf_counter() - began
        english = by_locale["en"]
        warmup_ids, by_locale["en"] = english[:WARMUP_RECIPIENTS], english[WARMUP_RECIPIENTS:]
        warmup = _chunks(warmup_ids, WARMUP_BATCH)
        batches = [chunk for ids in by_locale.values() for chunk in _chunks(ids, MAX_PERSONALIZATIONS)]
        measured_ids = [i for ids in by_locale.values() for i in ids]
        progress(f"nurture: {recipients:,} recipients in {len(batches)} batches (set-up {setup_seconds:.1f} s)")

        # This module's own sandbox (see _serve_sandbox), which does not keep 100,000 bodies.
        sandbox, sandbox_url = start_sandbox(
            stack, logs, name="nurture-sandbox", command=("bench.nurture", "--sandbox")
        )
        env = worker_environment(
            database_url,
            options.redis_url,
            queue.name,
            sandbox_url,
            OUTREACH_CAMPAIGNS_DIR=str(campaigns),
            OUTREACH_TEMPLATES_DIR=str(ROOT / "templates"),
        )
        staged = queue.stage(BATCH_ACTOR, ((ids,) for ids in [*warmup, *batches]))
        staged_warmup, staged_measured = staged[: len(warmup)], staged[len(warmup) :]
        workers = stack.enter_context(
            dramatiq_workers("nurture-workers", "workers.main", queue.name, config, env, logs)
        )

        check = alive(workers, sandbox)

        def all_sent(among: list[str] | None) -> Callable[[], bool]:
            return failing_fast(lambda: not unfinished(engine, among), lambda: failures(engine), "nurture rows")

        queue.release(staged_warmup)
        wait_until(all_sent(warmup_ids), timeout=120, interval=POLL_INTERVAL, what="warm-up", check=check)
        progress("nurture: workers warmed up; timing")
        cpu_before = workers.cpu_seconds(), sandbox.cpu_seconds()
        started = time.perf_counter()
        queue.release(staged_measured)
        finished = wait_until(
            all_sent(None), timeout=options.timeout, interval=POLL_INTERVAL, what="the nurture run", check=check
        )
        worker_cpu = cpu_per_message(cpu_before[0], workers.cpu_seconds(), recipients)
        sandbox_cpu = cpu_per_message(cpu_before[1], sandbox.cpu_seconds(), recipients)
        if failed := failures(engine):
            raise BenchmarkError(f"nurture rows ended other than sent: {failed}")
        wait_drained(queue, timeout=60, interval=POLL_INTERVAL, check=check)
        progress(f"nurture: {recipients:,} sent in {finished - started:.1f} s; checking each reached the sandbox once")
        stats = get_json(f"{sandbox_url}/_sandbox/stats")
        received = sandbox_received(sandbox_url)
        expected = set(warmup_ids) | set(measured_ids)
        with engine.connect() as connection:
            sent = int(
                connection.execute(
                    select(func.count()).where(OutboundMessage.status == MessageStatus.SENT.value)
                ).scalar_one()
            )
        lost = max(len(expected - received.keys()), len(expected) - sent)
        duplicated = count_duplicated(received, expected)
        requests = int(stats["sendgrid"]["requests"])
        expected_requests = len(warmup) + len(batches)
        check()
        return Measurement(
            "nurture",
            recipients,
            finished - started,
            lost=lost,
            duplicated=duplicated,
            details={
                "batches": len(batches),
                "sandbox_requests": requests,
                "expected_requests": expected_requests,
                "extra_requests": max(0, requests - expected_requests),
                "setup_seconds": round(setup_seconds, 2),
                "worker_cpu_ms_per_recipient": worker_cpu,
                "sandbox_cpu_ms_per_recipient": sandbox_cpu,
            },
        )
    raise AssertionError("unreachable")  # pragma: no cover


def run(options: Options) -> list[Figure]:
    recipients = options.size("nurture.recipients", 100_000, 2_000)
    bare_messages = options.size("nurture.bare_messages", 10_000, 200)
    config = Config.of(options, bare_messages, warmup=options.processes * options.threads * 4)
    progress(f"nurture: bare Dramatiq baseline, {bare_messages:,} no-op messages")
    bare = run_bare(config)
    nurture = measure(options, config, recipients)
    ratio = nurture.rate / bare.rate if bare.rate else None
    return [
        Figure(
            name=f"nurture run, {recipients:,} recipients batched (SendGrid personalizations)",
            value=nurture.rate,
            unit="recipients/s",
            baseline_name="bare Dramatiq no-op",
            baseline_value=bare.rate,
            ratio=ratio,
            goal="≥ 15× bare Dramatiq",
            met=at_least(ratio, 15.0, options),
            checks={
                "lost": nurture.lost,
                "duplicated": nurture.duplicated,
                "extra_requests": nurture.details["extra_requests"],
            },
            details={"bare": bare.to_dict(), **nurture.to_dict()},
        )
    ]


def _serve_sandbox(port: int) -> None:
    """The sandbox for this benchmark: SendGrid only, keeping who got what but not 100,000 bodies."""
    from outreach.ops.sandbox import SandboxServer

    server = SandboxServer("127.0.0.1", port, twilio_auth_token=SANDBOX_TOKEN, keep_bodies=False).start()
    try:
        while True:
            time.sleep(3600)
    finally:
        server.stop()


if __name__ == "__main__":  # pragma: no cover - the runner imports run(); this starts the sandbox process
    parser = argparse.ArgumentParser(prog="python -m bench.nurture")
    parser.add_argument("--sandbox", type=int, metavar="PORT", help="serve the benchmark's sandbox on PORT")
    parser.add_argument("--smoke", action="store_true", help="run the smoke size on its own")
    arguments = parser.parse_args()
    if arguments.sandbox:
        _serve_sandbox(arguments.sandbox)
    else:
        for figure in run(Options(smoke=arguments.smoke)):
            print(figure.to_dict())
