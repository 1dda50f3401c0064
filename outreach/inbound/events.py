"""Provider events applied to the outbox: stored once each, and moving each message's status forward only.

:func:`ingest` takes the events the parsers in :mod:`outreach.inbound.provider_events` made, stores them
(idempotently, on the provider's own event identity) and moves the outbox rows they belong to, records the
suppressions they call for and the candidates' latest clicks and replies.

The outbox status only moves forward
------------------------------------

Each event implies an outbox status: ``queued``/``sent``/``deferred`` → ``sent``; ``delivered`` and the
engagement events (``opened``, ``clicked``, ``unsubscribed``, ``complained``, ``replied``: each proves the
message arrived) → ``delivered``; ``bounced`` → ``bounced``; ``undelivered`` → ``undelivered``; ``failed`` and
``dropped`` → ``failed``. A row moves only to a status of higher rank::

    pending = held  <  sending = uncertain  <  sent  <  delivered  <  failed = bounced = undelivered

So a late ``sent`` never overwrites ``delivered`` and nothing goes back to ``sent``. ``bounced`` (and the other
terminal failures) outrank ``delivered`` on purpose: SendGrid reports asynchronous bounces after the receiving
server first accepted the message, and Twilio's carrier receipts can turn a delivery into ``undelivered``. The
first terminal status wins. ``suppressed``, ``skipped`` and ``cancelled`` are our own decisions and are never
changed by provider events. An ``uncertain`` row (the worker died during the provider call) that gets any event
naming it is reconciled to the event's status, as is a ``pending`` or ``sending`` row: the provider has the
message, so it must not be sent again. The moves of a batch are one conditional ``UPDATE … WHERE <rank of
the current status> < <rank of the target>``, so concurrent batches cannot move a row backwards.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, cast

from sqlalchemy import JSON, Integer, String, Table, Text, bindparam, case, func, or_, select, update
from sqlalchemy import cast as sql_cast
from sqlalchemy.orm import Session
from sqlalchemy.types import TypeEngine

from outreach.core.clock import utcnow
from outreach.core.models import Candidate, Channel, DeliveryEvent, MessageStatus, OutboundMessage, UTCDateTime
from outreach.core.sql import chunks, insert_ignore_many, json_document, json_records
from outreach.inbound.provider_events import PROVIDER_CHANNEL, EventType, NormalizedEvent
from outreach.pipeline.suppression import Suppress, suppress

__all__ = ["STATUS_RANK", "IngestResult", "implied_status", "ingest"]

log = logging.getLogger(__name__)

#: The outbox status each event implies.
_IMPLIED_STATUS: Mapping[EventType, MessageStatus] = {
    EventType.QUEUED: MessageStatus.SENT,
    EventType.SENT: MessageStatus.SENT,
    EventType.DEFERRED: MessageStatus.SENT,
    EventType.DELIVERED: MessageStatus.DELIVERED,
    EventType.OPENED: MessageStatus.DELIVERED,
    EventType.CLICKED: MessageStatus.DELIVERED,
    EventType.UNSUBSCRIBED: MessageStatus.DELIVERED,
    EventType.COMPLAINED: MessageStatus.DELIVERED,
    EventType.REPLIED: MessageStatus.DELIVERED,
    EventType.BOUNCED: MessageStatus.BOUNCED,
    EventType.UNDELIVERED: MessageStatus.UNDELIVERED,
    EventType.FAILED: MessageStatus.FAILED,
    EventType.DROPPED: MessageStatus.FAILED,
}

_TERMINAL_RANK = 4

#: How far along the outbox status machine a status is; statuses missing here are never moved by events.
STATUS_RANK: Mapping[str, int] = {
    MessageStatus.PENDING.value: 0,
    MessageStatus.HELD.value: 0,
    MessageStatus.SENDING.value: 1,
    MessageStatus.UNCERTAIN.value: 1,
    MessageStatus.SENT.value: 2,
    MessageStatus.DELIVERED.value: 3,
    MessageStatus.FAILED.value: _TERMINAL_RANK,
    MessageStatus.BOUNCED.value: _TERMINAL_RANK,
    MessageStatus.UNDELIVERED.value: _TERMINAL_RANK,
}

#: Per event type, the rank of the status it implies and the text stored for it (looked up for every event of
#: a batch: an enum's ``.value`` is a descriptor call, a dict lookup is not).
_TYPE_RANK: Mapping[EventType, int] = {t: STATUS_RANK[_IMPLIED_STATUS[t].value] for t in EventType}
_TYPE_TEXT: Mapping[EventType, str] = {t: t.value for t in EventType}

# Rows per multi-row INSERT and ids per IN list: well under PostgreSQL's and SQLite's bind-parameter limits.
_CHUNK = 500


@dataclass
class IngestResult:
    received: int = 0
    stored: int = 0
    duplicates: int = 0
    unmatched: int = 0  # new events that name no outbox row we know
    updated: int = 0  # outbox rows whose status moved
    suppressed: int = 0  # new suppression rows
    cancelled: int = 0  # queued messages that became ``suppressed``
    message_ids: list[str] = field(default_factory=list)  # outbox rows the new events belong to

    def summary(self) -> dict[str, int]:
        return {
            "received": self.received,
            "stored": self.stored,
            "duplicates": self.duplicates,
            "unmatched": self.unmatched,
            "updated": self.updated,
            "suppressed": self.suppressed,
            "cancelled": self.cancelled,
        }


def implied_status(event_type: EventType) -> MessageStatus:
    return _IMPLIED_STATUS[event_type]


# -- ingesting ------------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Row:
    id: str
    candidate_id: int
    channel: str
    provider: str | None
    provider_message_id: str | None


def _key(event: NormalizedEvent) -> tuple[str, str]:
    return (event.provider, event.provider_event_id)


def _one_of(session: Session, column: Any, values: Sequence[Any]) -> Iterator[Any]:
    """``column IN values`` as few conditions with short SQL: on PostgreSQL one ``column IN (SELECT … FROM
    json_array_elements_text(:values))`` (one cached statement, one round trip, the values written by the JSON
    encoder rather than escaped one by one by the driver's array adapter), elsewhere IN lists of at most
    ``_CHUNK`` values."""
    if not values:
        return
    if session.get_bind().dialect.name == "postgresql":
        document = bindparam(None, json_document(list(values)), type_=Text)
        elements = func.json_array_elements_text(sql_cast(document, JSON)).table_valued("value")
        # Text compares with a VARCHAR column as it is (a cast to VARCHAR(n) would cut longer values short).
        value = elements.c.value if isinstance(column.type, String) else sql_cast(elements.c.value, column.type)
        yield column.in_(select(value))
        return
    for chunk in chunks(values, _CHUNK):
        yield column.in_(chunk)


def _load_rows(session: Session, events: Sequence[NormalizedEvent]) -> dict[tuple[str, str], _Row]:
    """The outbox row each event belongs to: by our outbox id first, else by the provider's message id.

    Read without locks: the columns read here never change once a row exists. The rows whose status moves are
    locked later, just before the move (:func:`_lock_in_order`), so a concurrent batch naming the same messages
    waits only for the other's last statements, not for its whole transaction.
    """
    columns = (
        OutboundMessage.id,
        OutboundMessage.candidate_id,
        OutboundMessage.channel,
        OutboundMessage.provider,
        OutboundMessage.provider_message_id,
    )
    by_id: dict[str, _Row] = {}
    wanted = sorted({e.outbox_id for e in events if e.outbox_id})
    for condition in _one_of(session, OutboundMessage.id, wanted):
        for found in session.execute(select(*columns).where(condition)):
            by_id[found[0]] = _Row(*found)
    by_provider_id: dict[tuple[str, str], _Row] = {}
    fallback = sorted(
        {
            e.provider_message_id
            for e in events
            if e.provider_message_id and (e.outbox_id is None or e.outbox_id not in by_id)
        }
    )
    for condition in _one_of(session, OutboundMessage.provider_message_id, fallback):
        for values in session.execute(select(*columns).where(condition)):
            candidate_row = _Row(*values)
            assert candidate_row.provider_message_id is not None
            # A row without a provider (never recorded) still matches; one of another provider does not.
            for provider in (candidate_row.provider,) if candidate_row.provider else tuple(PROVIDER_CHANNEL):
                by_provider_id[(provider, candidate_row.provider_message_id)] = candidate_row
    linked: dict[tuple[str, str], _Row] = {}
    for event in events:
        row = by_id.get(event.outbox_id) if event.outbox_id else None
        if row is None and event.provider_message_id:
            row = by_provider_id.get((event.provider, event.provider_message_id))
        # Our id on the wrong channel (an SMS row named by an email event) is not a match.
        if row is not None and row.channel == event.channel:
            linked[_key(event)] = row
    return linked


def _sort_key(event: NormalizedEvent) -> tuple[datetime, str]:
    return (event.occurred_at, event.provider_event_id)


@dataclass
class _Move:
    """What one batch's new events say about one outbox row."""

    target: MessageStatus
    deciding: NormalizedEvent
    first_seen: datetime
    delivered_at: datetime | None


def _plan_moves(new_events: Iterable[tuple[NormalizedEvent, _Row]]) -> dict[str, tuple[_Move, _Row]]:
    by_row: dict[str, list[NormalizedEvent]] = {}
    rows: dict[str, _Row] = {}
    for event, row in new_events:
        by_row.setdefault(row.id, []).append(event)
        rows[row.id] = row
    moves: dict[str, tuple[_Move, _Row]] = {}
    rank_of, delivered_rank = _TYPE_RANK, STATUS_RANK[MessageStatus.DELIVERED.value]
    for row_id, events in by_row.items():
        # Highest rank wins; among equals the earliest (so the first terminal outcome is the one kept).
        deciding = min(events, key=lambda e: (-rank_of[e.type], e.occurred_at, e.provider_event_id))
        delivered = [e.occurred_at for e in events if rank_of[e.type] == delivered_rank]
        moves[row_id] = (
            _Move(
                _IMPLIED_STATUS[deciding.type],
                deciding,
                min(e.occurred_at for e in events),
                min(delivered) if delivered else None,
            ),
            rows[row_id],
        )
    return moves


#: The rank of a status in SQL (``STATUS_RANK``); statuses that events never change rank above everything.
_NEVER_MOVED = _TERMINAL_RANK + 1


def _lock_in_order(session: Session, key: Any, ids: Sequence[Any]) -> None:
    """PostgreSQL: lock the rows whose ``key`` is one of ``ids``, in key order, ``FOR NO KEY UPDATE`` (what an
    UPDATE that changes no key column takes anyway), so that two transactions touching some of the same rows
    queue up instead of deadlocking. It does not conflict with the ``FOR KEY SHARE`` locks that foreign-key
    checks take, so a batch inserting events of these messages is not held up by it. SQLite has one writer:
    nothing to do.
    """
    if not ids or session.get_bind().dialect.name != "postgresql":
        return
    for condition in _one_of(session, key, sorted(ids)):
        session.execute(select(key).where(condition).order_by(key).with_for_update(key_share=True)).all()


def _apply_moves(session: Session, moves: Mapping[str, tuple[_Move, _Row]], now: datetime) -> int:
    """One UPDATE for every move of the batch; each row only moves when its current status ranks lower.

    The condition is evaluated on the row as it is when the UPDATE reaches it (PostgreSQL re-checks it after
    waiting for a concurrent writer), so a row never moves backwards, whatever else commits meanwhile.
    """
    table = cast(Table, OutboundMessage.__table__)
    c = table.c
    params: list[dict[str, Any]] = []
    for row_id in sorted(moves):
        move, _ = moves[row_id]
        event = move.deciding
        rank = STATUS_RANK[move.target.value]
        terminal = rank == _TERMINAL_RANK
        params.append(
            {
                "b_id": row_id,
                "b_status": move.target.value,
                "b_rank": rank,
                "b_sent_at": move.first_seen,
                "b_delivered_at": move.delivered_at,
                "b_provider": event.provider,
                "b_provider_message_id": event.provider_message_id,
                # A terminal status records the provider's reason; any other clears an earlier one.
                "b_error_code": event.error_code if terminal else None,
                "b_error_detail": event.detail if terminal else None,
            }
        )
    if not params:
        return 0
    types: dict[str, TypeEngine[Any]] = {
        "b_id": c.id.type,
        "b_status": c.status.type,
        "b_rank": Integer(),
        "b_sent_at": UTCDateTime(),
        "b_delivered_at": UTCDateTime(),
        "b_provider": c.provider.type,
        "b_provider_message_id": c.provider_message_id.type,
        "b_error_code": c.error_code.type,
        "b_error_detail": c.error_detail.type,
    }
    # PostgreSQL: one UPDATE … FROM json_to_recordset (see insert_ignore_many); the rows are already locked, in
    # id order, by _lock_in_order. SQLite: an executemany of the same UPDATE.
    source = json_records(session, types, params) if session.get_bind().dialect.name == "postgresql" else None

    def given(name: str) -> Any:
        return source.c[name] if source is not None else bindparam(name, type_=types[name])

    current_rank = case(STATUS_RANK, value=c.status, else_=_NEVER_MOVED)
    statement = (
        update(table)
        .where(c.id == given("b_id"), current_rank < given("b_rank"))
        .values(
            status=given("b_status"),
            updated_at=now,
            lease_until=None,
            # The worker may have died (or still be waiting) before it recorded these: fill them in.
            sent_at=func.coalesce(c.sent_at, given("b_sent_at")),
            provider=func.coalesce(c.provider, given("b_provider")),
            provider_message_id=func.coalesce(c.provider_message_id, given("b_provider_message_id")),
            delivered_at=func.coalesce(c.delivered_at, given("b_delivered_at")),
            error_code=given("b_error_code"),
            error_detail=given("b_error_detail"),
        )
    )
    result = session.execute(statement) if source is not None else session.execute(statement, params)
    return max(int(getattr(result, "rowcount", 0) or 0), 0)


def _suppress(session: Session, events: Sequence[NormalizedEvent], now: datetime, result: IngestResult) -> None:
    """Record suppressions and end the queued messages to those addresses (a suppression applies at once)."""
    entries = [
        Suppress(event.channel, event.recipient, event.suppress_reason, event.provider, "provider")
        for event in sorted(events, key=_sort_key)
        if event.suppress_reason is not None and event.recipient
    ]
    done = suppress(session, entries, now)
    result.suppressed += done.written
    result.cancelled += len(done.cancelled)
    # An unsubscribe or a spam report by email is the same as the one-click unsubscribe link: no more nurture.
    withdrawn = sorted(
        {e.address.strip().lower() for e in entries if e.channel == Channel.EMAIL.value and e.reason in _NO_NURTURE}
    )
    for chunk in chunks(withdrawn, _CHUNK):
        session.execute(
            update(Candidate)
            .where(func.lower(Candidate.email).in_(chunk), Candidate.nurture_consent.is_(True))
            .values(nurture_consent=False)
            .execution_options(synchronize_session=False)
        )


_NO_NURTURE = frozenset({"unsubscribed", "complained"})


def _touch_candidates(
    session: Session, column: str, linked: Iterable[tuple[NormalizedEvent, _Row]], kind: EventType
) -> None:
    """``Candidate.<column>`` becomes the latest time of ``kind`` events (never earlier than it was)."""
    latest: dict[int, datetime] = {}
    for event, row in linked:
        if event.type is kind and (row.candidate_id not in latest or latest[row.candidate_id] < event.occurred_at):
            latest[row.candidate_id] = event.occurred_at
    if not latest:
        return
    table = cast(Table, Candidate.__table__)
    target = table.c[column]
    params = [{"b_id": candidate_id, "b_at": at} for candidate_id, at in sorted(latest.items())]
    if session.get_bind().dialect.name == "postgresql":
        # One UPDATE … FROM json_to_recordset, after locking the candidates in id order (see _lock_in_order).
        _lock_in_order(session, table.c.id, list(latest))
        source = json_records(session, {"b_id": table.c.id.type, "b_at": UTCDateTime()}, params)
        session.execute(
            update(table)
            .where(table.c.id == source.c.b_id, or_(target.is_(None), target < source.c.b_at))
            .values({column: source.c.b_at})
        )
        return
    when = bindparam("b_at", type_=UTCDateTime())
    session.execute(
        update(table)
        .where(table.c.id == bindparam("b_id"), or_(target.is_(None), target < when))
        .values({column: when}),
        params,
    )


def ingest(session: Session, events: Sequence[NormalizedEvent], now: datetime | None = None) -> IngestResult:
    """Store ``events`` and apply them, in the caller's transaction. Replaying a batch changes nothing.

    Only events new to ``delivery_events`` (unique on provider and the provider's event id) have effects, so
    a batch delivered twice, or shuffled, leaves the same state as once. Set-based: a handful of statements
    per batch whatever its size.
    """
    now = now or utcnow()
    result = IngestResult(received=len(events))
    unique: dict[tuple[str, str], NormalizedEvent] = {}
    for event in events:
        unique.setdefault(_key(event), event)
    if not unique:
        return result
    linked = _load_rows(session, list(unique.values()))

    rows = []
    for key in sorted(unique):  # one order for every batch: concurrent inserts take their index locks alike
        event, row = unique[key], linked.get(key)
        rows.append(
            {
                "message_id": row.id if row is not None else None,
                "provider": event.provider,
                "provider_event_id": event.provider_event_id,
                "type": _TYPE_TEXT[event.type],
                "occurred_at": event.occurred_at,
                "raw": event.raw,
                "created_at": now,
            }
        )
    written = {
        (provider, event_id)
        for provider, event_id in insert_ignore_many(
            session, DeliveryEvent, rows, DeliveryEvent.provider, DeliveryEvent.provider_event_id
        )
    }
    new = [event for key, event in unique.items() if key in written]
    result.stored = len(new)
    result.duplicates = result.received - result.stored
    new_linked = [(event, linked[key]) for key, event in unique.items() if key in written and key in linked]
    result.unmatched = len(new) - len(new_linked)
    if not new:
        return result

    moves = _plan_moves(new_linked)
    result.message_ids = sorted(moves)
    _lock_in_order(session, OutboundMessage.id, result.message_ids)
    result.updated = _apply_moves(session, moves, now)
    _suppress(session, new, now, result)
    _touch_candidates(session, "last_click_at", new_linked, EventType.CLICKED)
    _touch_candidates(session, "last_reply_at", new_linked, EventType.REPLIED)
    return result
