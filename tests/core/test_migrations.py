"""The migrations build exactly the schema the models describe, on both databases, from one head; data
migrations give existing rows what they mean."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, inspect, text
from sqlalchemy.engine import make_url

from outreach.core.db import alembic_config, get_engine, normalise_url, upgrade
from outreach.core.models import Base
from tests.conftest import POSTGRES_URL, require_server

#: Expression indexes only PostgreSQL can build; the migrations create them there, the models cannot say them.
POSTGRES_ONLY_INDEXES = {"ix_candidates_tags_gin"}


def _meaningful(diff: list[Any]) -> list[Any]:
    """Drop the known, harmless differences: UTCDateTime is a DateTime decorator the migrations spell plainly,
    and the PostgreSQL-only expression indexes."""
    flat: list[Any] = []
    for entry in diff:
        flat.extend(entry if isinstance(entry, list) else [entry])
    return [
        d
        for d in flat
        if not (d[0] == "modify_type" and "DateTime" in repr(d[-1]) + repr(d[-2]))
        and not (d[0] == "remove_index" and d[1].name in POSTGRES_ONLY_INDEXES)
    ]


def test_one_head(database_url: str) -> None:
    heads = ScriptDirectory.from_config(alembic_config(database_url)).get_heads()
    assert len(heads) == 1, f"migrations have several heads: {heads}; chain the newest onto the previous one"


def test_migrated_schema_matches_the_models(database_url: str) -> None:
    with get_engine(database_url).connect() as connection:
        diff = compare_metadata(MigrationContext.configure(connection), Base.metadata)
    assert _meaningful(diff) == []


@pytest.fixture(params=["sqlite", "postgres"])
def blank_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database of its own, for migrating step by step."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'steps.db'}"
        return
    require_server("PostgreSQL", POSTGRES_URL, 5432)
    name = f"outreach_steps_{uuid.uuid4().hex[:10]}"
    admin = create_engine(normalise_url(POSTGRES_URL), isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(normalise_url(POSTGRES_URL)).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


#: Suppressions as 0007 stored them (channel, address, reason, source) and the scope 0008 gives each.
SUPPRESSIONS_BEFORE_0008 = [
    (("email", "link@example.org", "unsubscribed", "link"), "nurture"),
    (("sms", "+8613800138001", "unsubscribed", "link"), "nurture"),
    (("email", "bounce@example.org", "bounced", "sendgrid"), "provider"),
    (("email", "spam@example.org", "complained", "sendgrid"), "provider"),
    (("email", "sg-unsub@example.org", "unsubscribed", "sendgrid"), "provider"),
    (("sms", "+8613800138002", "unsubscribed", "twilio"), "provider"),
    (("sms", "+8613800138003", "twilio 21610", "provider"), "provider"),
    (("sms", "+8613800138004", "opt_out", "keyword"), "sms"),
    (("email", "hmac:0123abcd", "bounced", None), "email"),
    (("email", "by-hand@example.org", "asked by phone", "hr"), "email"),
]


SCOPES = "SELECT address, scope FROM suppressions"


def test_0008_gives_existing_suppressions_their_scope(blank_url: str) -> None:
    upgrade(blank_url, "0007")
    engine = create_engine(normalise_url(blank_url))
    try:
        with engine.begin() as connection:
            for (channel, address, reason, source), _ in SUPPRESSIONS_BEFORE_0008:
                connection.execute(
                    text(
                        "INSERT INTO suppressions (channel, address, reason, source, created_at)"
                        " VALUES (:channel, :address, :reason, :source, CURRENT_TIMESTAMP)"
                    ),
                    {"channel": channel, "address": address, "reason": reason, "source": source},
                )
        upgrade(blank_url, "0008")
        with engine.connect() as connection:
            scopes = {address: scope for address, scope in connection.execute(text(SCOPES))}
            assert not next(c for c in inspect(connection).get_columns("suppressions") if c["name"] == "scope")[
                "nullable"
            ]
        assert scopes == {row[1]: scope for row, scope in SUPPRESSIONS_BEFORE_0008}
        # Down and up again: the column goes, the rows stay, and the scopes come back the same.
        command.downgrade(alembic_config(blank_url), "0007")
        with engine.connect() as connection:
            assert "scope" not in {c["name"] for c in inspect(connection).get_columns("suppressions")}
            assert connection.execute(text("SELECT count(*) FROM suppressions")).scalar() == len(scopes)
        upgrade(blank_url, "head")
        with engine.connect() as connection:
            assert {address: scope for address, scope in connection.execute(text(SCOPES))} == scopes
    finally:
        engine.dispose()


def test_0007_gives_alerts_raised_per_message_their_outbox_id(blank_url: str) -> None:
    """Before 0007 a per-message alert named its row at the end of its text; a duplicate keeps only its text."""
    upgrade(blank_url, "0006")
    engine = create_engine(normalise_url(blank_url))
    texts = [
        ("message_uncertain", "jd_intro step 1 email: may or may not have been sent [outbox 3f2a9c]"),
        ("message_uncertain", "jd_intro step 1 email: the same row again [outbox 3f2a9c]"),
        ("message_uncertain", "offer_letter step 1 email: lost answer [outbox 77aa01]"),
        ("offer_unanswered", "c-9 has not answered the offer for 3 days"),
    ]
    try:
        with engine.begin() as connection:
            for kind, message in texts:
                connection.execute(
                    text("INSERT INTO alerts (kind, message, created_at) VALUES (:kind, :message, CURRENT_TIMESTAMP)"),
                    {"kind": kind, "message": message},
                )
        upgrade(blank_url, "0007")
        with engine.connect() as connection:
            keys = [row[0] for row in connection.execute(text("SELECT outbox_id FROM alerts ORDER BY id"))]
        assert keys == ["3f2a9c", None, "77aa01", None]
        command.downgrade(alembic_config(blank_url), "0006")
        upgrade(blank_url, "head")
    finally:
        engine.dispose()


def test_0009_adds_dashboard_sessions_and_a_downgrade_ends_them(blank_url: str) -> None:
    upgrade(blank_url, "0009")
    engine = create_engine(normalise_url(blank_url))
    try:
        with engine.begin() as connection:
            assert "dashboard_sessions" in inspect(connection).get_table_names()
            connection.execute(
                text(
                    "INSERT INTO api_keys (name, role, prefix, key_hash, created_at)"
                    " VALUES ('k', 'hr', 'ork_abc', 'h', CURRENT_TIMESTAMP)"
                )
            )
            connection.execute(
                text(
                    "INSERT INTO dashboard_sessions (session_hash, key_id, role, created_at, last_seen_at, expires_at)"
                    " SELECT 's', id, role, CURRENT_TIMESTAMP, CURRENT_TIMESTAMP, CURRENT_TIMESTAMP FROM api_keys"
                )
            )
        command.downgrade(alembic_config(blank_url), "0008")
        with engine.connect() as connection:
            assert "dashboard_sessions" not in inspect(connection).get_table_names()
            assert connection.execute(text("SELECT count(*) FROM api_keys")).scalar() == 1
        upgrade(blank_url, "head")
    finally:
        engine.dispose()
