"""Database and driver errors quote what was being written — the duplicate key, the JSON PostgreSQL could not read,
the statement's parameters — so no log line may carry their text, only their class and SQLSTATE.

Canaries (tests/security/conftest.py) go into the key of a unique violation, a JSON document with a lone surrogate
escape, and a parameter the driver cannot encode; every way such an error reaches a log (a traceback, a ``%s``
argument, the record's message) is tried in this process, and a separate worker process whose write of a sent
row fails (a trigger raises a unique violation on the canary's key) must keep its whole log free of them.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from dramatiq.brokers.redis import RedisBroker
from sqlalchemy import insert, select, text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import StatementError
from sqlalchemy.orm import Session

from outreach.core.logs import KeyValueFormatter, safe_traceback
from outreach.core.models import Candidate, OutboundMessage
from outreach.ops.sandbox import SandboxServer
from outreach.service.broker import enqueue_deliveries
from outreach.service.runtime import Runtime
from tests.conftest import REDIS_URL, ROOT, make_settings, worker_env
from tests.helpers import add_candidate, add_job, fire
from tests.security.conftest import CANARY_EMAIL, CANARY_NAME, CANARY_TEXT, LogSink, leaks


def database_errors(engine: Engine) -> Iterator[BaseException]:
    """Three real errors whose text carries a canary."""
    try:  # a unique violation: DETAIL names the key
        with Session(engine) as session, session.begin():
            session.execute(insert(Candidate).values(external_id=CANARY_NAME, name=CANARY_NAME, tags=[], data={}))
    except StatementError as exc:
        yield exc
    try:  # JSON the server cannot read: CONTEXT quotes the document
        with engine.begin() as connection:
            connection.execute(text("SELECT CAST(:doc AS jsonb)"), {"doc": f'{{"body": "{CANARY_TEXT} \\udc80"}}'})
    except StatementError as exc:
        yield exc
    try:  # a lone surrogate the driver cannot encode (its message names the character, not the text)
        with engine.begin() as connection:
            connection.execute(text("SELECT CAST(:body AS text)"), {"body": f"{CANARY_TEXT} \udc80"})
    except (StatementError, UnicodeError) as exc:
        yield exc


def test_database_errors_are_logged_by_class_and_sqlstate_only(pg_runtime: Runtime, all_logs: LogSink) -> None:
    add_candidate(pg_runtime, CANARY_NAME, name=CANARY_NAME, email=CANARY_EMAIL)
    errors = list(database_errors(pg_runtime.engine))
    assert len(errors) == 3
    raw = "\n".join(logging.Formatter().formatException((type(e), e, e.__traceback__)) for e in errors)
    assert len(leaks(raw)) >= 2, "the errors must carry the canaries, or this test proves nothing"

    worker = logging.getLogger("dramatiq.worker.WorkerThread")
    ours = logging.getLogger("outreach.pipeline.delivery")
    for error in errors:
        # How a worker reports a failed actor, how our code logs one, and the less careful ways.
        worker.error("Failed to process message %s with unhandled exception.", "msg-1", exc_info=error)
        try:
            raise RuntimeError("could not record the send") from error
        except RuntimeError:
            ours.warning("could not record a group's sent rows after an error", exc_info=True)
        ours.error("write failed: %s (%r)", error, error)
        logging.getLogger("some.library").error(error)

    logged = all_logs.text
    assert leaks(logged) == [], [line for line in all_logs.lines if leaks(line)][:3]
    assert "IntegrityError: database error withheld (UniqueViolation, SQLSTATE 23505)" in logged
    assert "(InvalidTextRepresentation, SQLSTATE 22P02)" in logged  # the JSON refused
    assert "could not record the send" in logged and "Traceback (most recent call last)" in logged
    # The formatter withholds the text too, for a record made before the scrubbing was installed.
    formatted = KeyValueFormatter().formatException((type(errors[0]), errors[0], errors[0].__traceback__))
    assert leaks(formatted) == [] and formatted == safe_traceback(errors[0])


@pytest.fixture
def trigger_refusing_sent_rows(pg_database_url: str, pg_runtime: Runtime) -> Iterator[None]:
    """A trigger that turns the write of a sent row into a unique violation on the candidate's key (the canary)."""
    with pg_runtime.engine.begin() as connection:
        connection.execute(
            text(
                """
                CREATE FUNCTION refuse_sent() RETURNS trigger LANGUAGE plpgsql AS $$
                BEGIN
                    IF NEW.status = 'sent' THEN
                        INSERT INTO candidates (external_id, name, locale, tags, stage, nurture_consent, data,
                                                created_at, updated_at)
                        SELECT external_id, name, locale, tags, stage, nurture_consent, data, created_at, updated_at
                        FROM candidates WHERE id = NEW.candidate_id;
                    END IF;
                    RETURN NEW;
                END $$;
                CREATE TRIGGER refuse_sent BEFORE UPDATE ON outbound_messages
                    FOR EACH ROW EXECUTE FUNCTION refuse_sent();
                """
            )
        )
    yield
    with pg_runtime.engine.begin() as connection:
        connection.execute(text("DROP TRIGGER refuse_sent ON outbound_messages; DROP FUNCTION refuse_sent()"))


@pytest.mark.slow
@pytest.mark.usefixtures("trigger_refusing_sent_rows")
def test_a_worker_process_log_holds_no_database_error_text(pg_database_url: str, sandbox: SandboxServer) -> None:
    queue = f"outreach_test_{uuid.uuid4().hex[:8]}"
    runtime = Runtime(make_settings(pg_database_url, broker_url=REDIS_URL, queue_name=queue), sandbox_url=sandbox.url)
    held: list[str] = []
    runtime.enqueue_override = held.extend
    add_job(runtime)
    add_candidate(runtime, CANARY_NAME, name=CANARY_NAME, email=CANARY_EMAIL)
    fire(runtime, CANARY_NAME, "applied", job="j-1")
    runtime.scheduler.tick()
    assert len(held) == 1

    env = worker_env(pg_database_url, queue, sandbox.url, OUTREACH_LOG_LEVEL="INFO")
    command = [sys.executable, "-m", "dramatiq", "workers.main", "--processes", "1", "--threads", "1"]
    command += ["--queues", queue]
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    broker = RedisBroker(url=REDIS_URL)  # type: ignore[no-untyped-call]
    output = ""
    try:
        enqueue_deliveries(held, broker=broker, queue_name=queue)
        deadline = time.monotonic() + 120
        while not sandbox.messages() or broker.do_qsize(queue):  # sent, then the failed write retried
            assert process.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        time.sleep(3)  # the retries of the failed actor (backoff from one second) log as well
    finally:
        process.terminate()
        output = process.communicate(timeout=30)[0]
        broker.flush_all()
        broker.close()
    with Session(runtime.engine) as session:
        status: Any = session.scalar(select(OutboundMessage.status))
    assert status != "sent"  # the write was refused, so the error did happen
    assert "SQLSTATE 23505" in output, output[-3000:]
    assert leaks(output) == [], [line for line in output.splitlines() if leaks(line)][:3]
