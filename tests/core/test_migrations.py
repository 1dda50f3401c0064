"""The migrations build exactly the schema the models describe, on both databases, from one head."""

from __future__ import annotations

from typing import Any

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory

from outreach.core.db import alembic_config, get_engine
from outreach.core.models import Base

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
