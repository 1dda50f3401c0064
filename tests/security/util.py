"""Helpers for the security tests: what the database holds, to prove an attack changed nothing."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from outreach.core.models import Base
from outreach.service.runtime import Runtime


def table_counts(runtime: Runtime) -> dict[str, int]:
    with Session(runtime.engine) as session:
        return {
            table.name: int(session.scalar(select(func.count()).select_from(table)) or 0)
            for table in Base.metadata.sorted_tables
        }


def snapshot(runtime: Runtime) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table, in a stable order: equal snapshots mean nothing was written."""
    with Session(runtime.engine) as session:
        out: dict[str, list[tuple[Any, ...]]] = {}
        for table in Base.metadata.sorted_tables:
            rows = session.execute(select(table)).all()
            out[table.name] = sorted((tuple(row) for row in rows), key=repr)
        return out


def changed_rows(before: dict[str, list[tuple[Any, ...]]], after: dict[str, list[tuple[Any, ...]]]) -> int:
    """How many rows differ between two snapshots (added, removed or modified)."""
    total = 0
    for name in before.keys() | after.keys():
        old, new = set(map(repr, before.get(name, []))), set(map(repr, after.get(name, [])))
        total += len(old ^ new)
    return total
