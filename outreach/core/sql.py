"""Bulk SQL helpers shared by every module that writes or filters many rows at once, on both dialects.

- :func:`one_of` / :func:`any_of`: ``column IN (…)``, as one array parameter on PostgreSQL.
- :func:`insert_ignore` / :func:`insert_ignore_many`: ``INSERT … ON CONFLICT DO NOTHING`` returning what was
  written; many rows go to PostgreSQL as one JSON document (:func:`json_records`). :func:`insert_or_replace_many`:
  the same, replacing conflicting rows that meet a condition.
- :func:`chunks`: slices of a list for databases without arrays.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from datetime import datetime
from typing import Any, TypeVar, cast

import orjson
from sqlalchemy import JSON, Connection, Table, Text, any_, bindparam, column, func, select
from sqlalchemy import cast as sql_cast
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session
from sqlalchemy.types import TypeEngine

T = TypeVar("T")

#: Ids per statement on databases without arrays (SQLite's limit on bound parameters is far above it).
CHUNK = 1000


def is_postgres(where: Session | Connection) -> bool:
    dialect = where.dialect if isinstance(where, Connection) else where.get_bind().dialect
    return dialect.name == "postgresql"


def array_of(column_type: TypeEngine[Any]) -> TypeEngine[Any]:
    """PostgreSQL's array of ``column_type``, one instance per column type: a fresh type object per statement
    would make SQLAlchemy work out its cache key (inspecting the type's constructor) on every execution."""
    found = _ARRAYS.get(id(column_type))
    if found is None or found[0] is not column_type:
        found = _ARRAYS[id(column_type)] = (column_type, postgresql.ARRAY(column_type))
    return found[1]


_ARRAYS: dict[int, tuple[TypeEngine[Any], TypeEngine[Any]]] = {}


def one_of(session: Session | Connection, column: Any, values: Collection[Any]) -> Any:
    """``column IN values``; on PostgreSQL ``column = ANY(:array)``: one parameter instead of a thousand, so the
    statement stays small and cheap to build (the batch and scheduler paths filter on up to 1000 ids)."""
    if is_postgres(session):
        return column == any_(bindparam(None, list(values), type_=array_of(column.type)))
    return column.in_(list(values))


def any_of(postgres: bool, column: Any, name: str) -> Any:
    """``column IN :name`` with the values given at execution (a list): ``= ANY(:name)`` on PostgreSQL, an
    expanding ``IN`` elsewhere. For statements built once and executed many times."""
    if postgres:
        return column == any_(bindparam(name, type_=array_of(column.type)))
    return column.in_(bindparam(name, expanding=True))


def insert_ignore(session: Session, model: type[Any], values: dict[str, Any]) -> bool:
    """INSERT … ON CONFLICT DO NOTHING on both dialects; True when a row was written."""
    dialect = session.get_bind().dialect.name
    statement: Any
    if dialect == "postgresql":
        statement = postgresql.insert(model).values(**values).on_conflict_do_nothing()
    else:
        statement = sqlite.insert(model).values(**values).on_conflict_do_nothing()
    # RETURNING rather than rowcount: drivers disagree on rowcount after ON CONFLICT DO NOTHING.
    primary_key = model.__table__.primary_key.columns.values()[0]
    return session.execute(statement.returning(primary_key)).first() is not None


def chunks(items: Sequence[T], size: int = CHUNK) -> Iterator[Sequence[T]]:
    """``items`` in slices of at most ``size``."""
    for start in range(0, len(items), size):
        yield items[start : start + size]


def insert_ignore_many(
    session: Session, model: type[Any], rows: Sequence[dict[str, Any]], *returning: Any
) -> list[Any]:
    """INSERT … ON CONFLICT DO NOTHING RETURNING for many rows; the rows actually written.

    PostgreSQL: one ``INSERT … SELECT … FROM json_to_recordset(:records)``, the rows sent as one JSON document
    (see :func:`json_records`): a short statement the driver parses once and caches, one round trip for the whole
    batch, and the encoding done by the C JSON encoder. A multi-row ``VALUES`` list instead is a statement
    thousands of placeholders long that psycopg re-parses in Python on every call, and array parameters are
    escaped element by element in Python: for webhook batches either was the largest single cost of ingestion.
    The records keep the rows' order, so concurrent batches still take their index locks in the same order.

    SQLite: one cached statement run as an executemany, which SQLAlchemy batches into multi-row INSERTs.
    Every row must have the same keys.
    """
    return _insert_many(session, model, rows, returning, None)


def insert_or_replace_many(
    session: Session,
    model: type[Any],
    rows: Sequence[dict[str, Any]],
    *returning: Any,
    conflict: Sequence[str],
    replace: Sequence[str],
    when: Callable[[Table, Any], Any],
) -> list[Any]:
    """Like :func:`insert_ignore_many`, but a row that conflicts (on the unique columns ``conflict``) with a stored
    row for which ``when(table, excluded)`` holds replaces that row's ``replace`` columns (``INSERT … ON CONFLICT
    (…) DO UPDATE … WHERE …``); the rows written or replaced. No two rows may share their ``conflict`` values."""
    return _insert_many(session, model, rows, returning, (conflict, replace, when))


_Replace = tuple[Sequence[str], Sequence[str], Callable[[Table, Any], Any]]


def _insert_many(
    session: Session, model: type[Any], rows: Sequence[dict[str, Any]], returning: tuple[Any, ...], on: _Replace | None
) -> list[Any]:
    if not rows:
        return []
    table = cast(Table, model.__table__)
    statement: Any
    if session.get_bind().dialect.name == "postgresql":
        names = list(rows[0])
        source = json_records(session, {name: table.c[name].type for name in names}, rows)
        statement = _on_conflict(
            postgresql.insert(table).from_select(names, select(*(source.c[name] for name in names))), table, on
        )
        return list(session.execute(statement.returning(*returning)).all())
    statement = _on_conflict(sqlite.insert(table), table, on)
    return list(session.execute(statement.returning(*returning), list(rows)).all())


def _on_conflict(statement: Any, table: Table, on: _Replace | None) -> Any:
    if on is None:
        return statement.on_conflict_do_nothing()
    conflict, replace, when = on
    excluded = statement.excluded
    return statement.on_conflict_do_update(
        index_elements=list(conflict),
        set_={name: excluded[name] for name in replace},
        where=when(table, excluded),
    )


def _json_scalar(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} cannot go into a JSON record")


def json_document(records: Sequence[Mapping[str, Any]]) -> str:
    """``records`` as one JSON text. orjson writes a webhook batch (1 MiB of payloads, a few datetimes per row)
    about 15 times faster than the standard library, which called ``_json_scalar`` for every datetime.

    What orjson refuses — a lone surrogate, an integer beyond 64 bits, a key that is not a string — goes through
    the standard library's encoder instead (ASCII escapes, as SQLAlchemy's JSON type writes them), as every batch
    did before: nothing that was storable stops being so. Naive datetimes (what the column types' bind
    processing produces) come out as ISO 8601 without an offset from either encoder.
    """
    try:
        return orjson.dumps(records, default=_json_scalar).decode("utf-8")
    except TypeError:  # orjson.JSONEncodeError is a TypeError
        return json.dumps(records, default=_json_scalar, separators=(",", ":"))


def json_records(session: Session, types: Mapping[str, TypeEngine[Any]], rows: Sequence[Mapping[str, Any]]) -> Any:
    """``json_to_recordset(:records) AS records(name type, …)`` holding ``rows``, one column per key of ``types``.

    Each value first goes through its column type's own bind processing (``UTCDateTime`` makes naive UTC), so
    what is stored is what an ordinary parameter would have stored; JSON columns go in as JSON values.
    """
    dialect = session.get_bind().dialect
    names = list(types)
    processors: dict[str, Any] = {}
    for name, column_type in types.items():
        if not isinstance(column_type, JSON):
            processor = column_type.bind_processor(dialect)
            if processor is not None:
                processors[name] = processor
    if any(len(row) != len(names) for row in rows):
        raise ValueError("every row of one statement must have the same columns")
    records: list[Mapping[str, Any]] = list(rows)
    if processors:
        # A batch repeats values (one ``created_at`` for all its rows, events of the same second): each distinct
        # value is processed once.
        done: dict[tuple[str, Any], Any] = {}
        records = []
        for row in rows:
            record = dict(row)
            for name, processor in processors.items():
                key = (name, record[name])
                if key in done:
                    record[name] = done[key]
                else:
                    record[name] = done[key] = processor(record[name])
            records.append(record)
    document = json_document(records)
    return (
        func.json_to_recordset(sql_cast(bindparam("records", document, type_=Text), JSON))
        .table_valued(*(column(name, column_type) for name, column_type in types.items()))
        .render_derived(name="records", with_types=True)
    )
