"""The outbox state machine: every transition of an outbound row, as plain functions over a connection.

Both ways of calling a provider go through these functions and nothing else writes a row in flight:
:mod:`outreach.pipeline.delivery` (one request per message, SMS and email) and :mod:`outreach.pipeline.batch` (one
SendGrid request for many nurture emails). The sweeper (:meth:`outreach.pipeline.scheduler.Scheduler.sweep`) uses the
two sweeps, and :mod:`outreach.pipeline.reconcile` the last four (an uncertain row and the provider's lookups).

::

    pending ──claim──▶ sending, rule 'claimed' ──hand_off──▶ sending ──record_sent──▶ sent ◀──record_found──┐
       ▲                 │  │  │                              │  │  └──uncertain──▶ uncertain ─────────────┘
       └──give_back──────┘  │  └──refuse──▶ held / suppressed  │  └──fail──▶ failed     │  (claim_lookups,
       └──give_back(attempted=True) (the provider did not take it, the attempt stays counted)   look_again)
       └──send_again (the provider proved it never got it) ─────────────────────────────┘
                            └──fail (template)──▶ failed         skipped / cancelled

- :func:`claim`: ``pending`` and due → ``sending`` with the claim marker ``rule = 'claimed'``
  (:data:`outreach.core.models.CLAIMED_RULE`), a lease and a provisional ``sent_at`` (caps count the row from now on);
  ``attempts`` is not touched. Rows another worker is claiming are skipped (``SKIP LOCKED`` on PostgreSQL).
- :func:`hand_off`: the marker cleared, ``attempts + 1``, the lease renewed, for one row or for all the rows of one
  request in one statement; committed *before* the provider call. Only rows still claimed are handed off (the
  sweeper may have taken one back).
- :func:`record_sent`: what the provider accepted becomes ``sent`` with its provider id and what went out; a row a
  provider event already moved on keeps its status and only gains the send's facts.
- :func:`fail`, :func:`uncertain`: a final outcome other than ``sent`` (an ambiguous provider error is
  ``uncertain``: the request went out, the answer did not come back).
- :func:`refuse`: what the rules decided at the send stage (held until a time, suppressed, skipped, cancelled).
- :func:`give_back`: ``pending`` again after a delay, the marker cleared. Rows never handed off (the default: only
  rows still claimed are touched, no attempt was counted), or, with ``attempted=True``, rows the provider did not
  take (a transient error; the attempt stays counted).
- :func:`sweep_claimed`, :func:`sweep_lost`: a ``sending`` row whose lease ran out still marked ``claimed`` never
  reached a provider and goes back to ``pending``; one without the marker may have and becomes ``uncertain``.
- :func:`claim_lookups`, :func:`look_again`: which ``uncertain`` rows a provider lookup asks about now (for an
  uncertain row ``not_before`` is its next lookup), and when the next one comes.
- :func:`record_found`: an ``uncertain`` row the provider's lookup found becomes ``sent`` with the provider's id.
- :func:`send_again`: an ``uncertain`` row the provider proved it never got (a complete answer, asked after its
  visibility delay) is ``pending`` again, the attempt counted. Both only touch the row still uncertain from the
  attempt the lookup was about, so a provider event that settled it first wins.

The statements keep their tricks: built once where they can be (module constants, ``lru_cache``), the claim of a
batch looks each id up on the primary key (a lateral ``SKIP LOCKED`` lookup), and on PostgreSQL many ``sent``
records are one ``UPDATE … FROM json_to_recordset``, ridden along with the next row's hand-off where the caller
wants it (a data-modifying CTE), or, for a batch, filled in by the database from the shared texts.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import lru_cache
from typing import Any

from sqlalchemy import (
    JSON,
    Connection,
    String,
    Text,
    any_,
    bindparam,
    case,
    cast,
    column,
    func,
    literal,
    or_,
    select,
    true,
    update,
)
from sqlalchemy.dialects import postgresql
from sqlalchemy.orm import Session

from outreach.core.models import CLAIMED_RULE, Base, Channel, MessageStatus, OutboundMessage, UTCDateTime
from outreach.core.sql import CHUNK, any_of, array_of, chunks, one_of
from outreach.policy.engine import Outcome as Verdict
from outreach.providers.base import redact
from outreach.providers.sendgrid_payload import substitute

__all__ = [
    "CLAIMED_COLUMNS",
    "STOP_REFUSED",
    "SharedSend",
    "claim",
    "claim_lookups",
    "fail",
    "give_back",
    "hand_off",
    "look_again",
    "pending_again",
    "record_found",
    "record_sent",
    "refuse",
    "refused",
    "send_again",
    "sweep_claimed",
    "sweep_lost",
    "uncertain",
]

#: A connection, or a session (its connection is used, in its transaction).
Db = Connection | Session

_OUTBOX = Base.metadata.tables["outbound_messages"]
_ENROLLMENTS = Base.metadata.tables["enrollments"]
_IN_FLIGHT = (MessageStatus.SENDING.value, MessageStatus.UNCERTAIN.value)
_PENDING = MessageStatus.PENDING.value
_SENDING = MessageStatus.SENDING.value

#: What :func:`claim` returns of each row, in this order (a batch claim adds its enrollment's status, exit reason,
#: job id and context text after these).
CLAIMED_COLUMNS = (
    "id",
    "candidate_id",
    "enrollment_id",
    "campaign",
    "step",
    "template",
    "category",
    "channel",
    "attempts",
    "created_at",
    "not_before",
)

#: What the template context and link tracking read of a claimed row.
_MESSAGE_FIELDS = (
    "id",
    "candidate_id",
    "enrollment_id",
    "campaign",
    "step",
    "channel",
    "template",
    "category",
    "created_at",
)


def detached(row: Any) -> OutboundMessage:
    """A claimed row (a result row of :func:`claim`, or anything with those attributes) as the template context and
    link tracking see it: an :class:`OutboundMessage` attached to no session."""
    return OutboundMessage(**{name: getattr(row, name) for name in _MESSAGE_FIELDS})


#: Facts about a send worth keeping even when a provider event already moved the row on.
_SEND_FACTS = ("provider", "provider_message_id", "locale", "segments", "subject", "body")


def _connection(db: Db) -> Connection:
    return db if isinstance(db, Connection) else db.connection()


def _postgres(db: Db) -> bool:
    return _connection(db).dialect.name == "postgresql"


# -- claim ----------------------------------------------------------------------------------------------------


def _claim_values(now: Any, lease_until: Any) -> dict[str, Any]:
    """``pending`` → ``sending``, marked claimed: what every claim writes (attempts are counted at hand-off)."""
    return {
        "status": _SENDING,
        "rule": CLAIMED_RULE,
        "lease_until": lease_until,
        # Provisional: caps count rows being sent by this time, so a racing worker sees these.
        "sent_at": now,
        "updated_at": now,
    }


def claim(db: Db, ids: Sequence[str], now: datetime, lease: timedelta, *, batch: bool = False) -> list[Any]:
    """Every row of ``ids`` still ``pending`` and due: ``sending``, marked claimed, leased for ``lease``, not yet
    counted as an attempt. Returns the claimed rows (:data:`CLAIMED_COLUMNS`).

    ``batch``: the shape :mod:`outreach.pipeline.batch` wants: email rows only, each id looked up on its own, and each
    row followed by its enrollment's status, exit reason, job id and context (as stored text), read in the same
    statement on PostgreSQL."""
    connection = _connection(db)
    postgres = connection.dialect.name == "postgresql"
    if batch:
        return _claim_batch(connection, postgres, ids, now, lease)
    table = _OUTBOX
    due = [one_of(connection, table.c.id, ids), table.c.status == _PENDING, table.c.not_before <= now]
    condition: list[Any]
    if postgres:
        # Rows another worker is claiming right now (an overlapping group, a retried message) are theirs; taken
        # in id order, so groups queue up behind each other instead of deadlocking.
        pick = select(table.c.id).where(*due).order_by(table.c.id).with_for_update(skip_locked=True)
        condition = [table.c.id.in_(pick.scalar_subquery())]
    else:
        condition = due  # one writer at a time: the update is the claim
    statement = (
        update(table)
        .where(*condition)
        .values(**_claim_values(now, now + lease))
        .returning(*(table.c[name] for name in CLAIMED_COLUMNS))
    )
    return list(connection.execute(statement).all())


@lru_cache(maxsize=2)
def _claim_batch_statement(postgres: bool) -> Any:
    """Pending, due email rows among ``claim_ids`` become ``sending`` and claimed; on PostgreSQL the claimed rows
    come back joined to their enrollments, in one statement. Built once, so SQLAlchemy's statement cache finds it
    without walking it again."""
    table = _OUTBOX
    now = bindparam("claim_now", type_=table.c.not_before.type)
    values = _claim_values(now, bindparam("claim_lease", type_=table.c.lease_until.type))
    returned = [table.c[name] for name in CLAIMED_COLUMNS]
    if not postgres:
        pick = select(table.c.id).where(
            table.c.id.in_(bindparam("claim_ids", expanding=True)),
            table.c.status == _PENDING,
            table.c.not_before <= now,
            table.c.channel == Channel.EMAIL.value,
        )
        return update(table).where(table.c.id.in_(pick.scalar_subquery())).values(**values).returning(*returned)
    # Each id looked up on the primary key and locked in the order given (sorted: batches and single sends queue
    # up behind each other instead of deadlocking); rows a retried copy of this batch (or a single send) is
    # claiming right now are theirs and skipped. A lateral lookup per id rather than ``id = ANY(:ids)``, which
    # the planner may answer with a scan of the whole table once it holds some 100,000 rows.
    given = func.unnest(bindparam("claim_ids", type_=array_of(table.c.id.type))).table_valued("id")
    given = given.render_derived(name="given")
    row = table.alias("pending_row")
    due = (
        select(row.c.id)
        .where(
            row.c.id == given.c.id,
            row.c.status == _PENDING,
            row.c.not_before <= now,
            row.c.channel == Channel.EMAIL.value,
        )
        .with_for_update(skip_locked=True)
        .lateral("due")
    )
    picked = select(due.c.id).select_from(given).join(due, true())
    claimed = (
        update(table)
        .where(table.c.id == any_(func.array(picked.scalar_subquery())))
        .values(**values)
        .returning(*returned)
        .cte("claimed")
    )
    enrollments = _ENROLLMENTS
    return select(*(claimed.c[name] for name in CLAIMED_COLUMNS), *_enrollment_facts()).select_from(
        claimed.outerjoin(enrollments, enrollments.c.id == claimed.c.enrollment_id)
    )


def _enrollment_facts() -> tuple[Any, ...]:
    # The context as its stored text: recipients are grouped by it, and only a group's exemplar needs it parsed.
    enrollments = _ENROLLMENTS
    return (enrollments.c.status, enrollments.c.exit_reason, enrollments.c.job_id, cast(enrollments.c.context, Text))


@lru_cache(maxsize=1)
def _enrollments_statement() -> Any:
    enrollments = _ENROLLMENTS
    return select(enrollments.c.id, *_enrollment_facts()).where(
        enrollments.c.id.in_(bindparam("enrollments", expanding=True))
    )


def _claim_batch(
    connection: Connection, postgres: bool, ids: Sequence[str], now: datetime, lease: timedelta
) -> list[Any]:
    claiming = {"claim_ids": list(ids), "claim_now": now, "claim_lease": now + lease}
    if postgres:
        return list(connection.execute(_claim_batch_statement(True), claiming).all())
    plain = connection.execute(_claim_batch_statement(False), claiming).all()
    found: dict[Any, Any] = {}
    wanted = sorted({row.enrollment_id for row in plain if row.enrollment_id is not None})
    for chunk in chunks(wanted, CHUNK):
        for row in connection.execute(_enrollments_statement(), {"enrollments": list(chunk)}):
            found[row[0]] = tuple(row[1:])
    return [(*row, *found.get(row.enrollment_id, (None, None, None, None))) for row in plain]


# -- hand-off -------------------------------------------------------------------------------------------------


def _hand_off_values() -> dict[str, Any]:
    return {
        "rule": None,
        "attempts": _OUTBOX.c.attempts + 1,
        "lease_until": bindparam("h_lease", type_=UTCDateTime()),
        "updated_at": bindparam("h_now", type_=UTCDateTime()),
    }


_STILL_CLAIMED = (_OUTBOX.c.status == _SENDING, _OUTBOX.c.rule == CLAIMED_RULE)

#: One row's hand-off (the single path's, once per message), with the text about to go out when given (``h_body``:
#: an SMS's, which a provider lookup matches if the worker dies before the answer is recorded).
_HAND_OFF = (
    update(_OUTBOX)
    .where(_OUTBOX.c.id == bindparam("h_id"), *_STILL_CLAIMED)
    .values(**_hand_off_values(), body=func.coalesce(bindparam("h_body", type_=Text()), _OUTBOX.c.body))
    .returning(_OUTBOX.c.id)
)


@lru_cache(maxsize=2)
def _hand_off_many(postgres: bool) -> Any:
    """The hand-off of every row of one request (``h_ids``), in one statement. Built once. On PostgreSQL the ids
    are joined as a table (``UPDATE … FROM unnest(:ids)``), so each is looked up on the primary key; ``id =
    ANY(:ids)`` may be planned as a scan of the whole outbox once it holds some 100,000 rows."""
    if not postgres:
        return (
            update(_OUTBOX)
            .where(any_of(postgres, _OUTBOX.c.id, "h_ids"), *_STILL_CLAIMED)
            .values(**_hand_off_values())
            .returning(_OUTBOX.c.id)
        )
    given = func.unnest(bindparam("h_ids", type_=array_of(_OUTBOX.c.id.type))).table_valued("id")
    given = given.render_derived(name="given")
    return (
        update(_OUTBOX)
        .where(_OUTBOX.c.id == given.c.id, *_STILL_CLAIMED)
        .values(**_hand_off_values())
        .returning(_OUTBOX.c.id)
    )


def hand_off(
    db: Db,
    ids: Sequence[str],
    lease_until: datetime,
    now: datetime,
    *,
    records: Sequence[Mapping[str, Any]] = (),
    sent_at: datetime | None = None,
    body: str | None = None,
) -> list[str]:
    """Hand the claimed rows ``ids`` to the provider: the marker cleared, the attempt counted, the lease renewed to
    ``lease_until``. Returns the ids handed off: a row no longer claimed (the sweeper took it back after its lease
    ran out) is not, and must not be sent. Commit it before calling the provider. ``body``: for one row, the text
    about to go out, stored now (an SMS's: :mod:`outreach.pipeline.reconcile` matches it at the provider).

    ``records`` (rows for :func:`record_sent`, sent as of ``sent_at``) are recorded first; on PostgreSQL, for one
    row, in the same statement (a data-modifying CTE): one commit per message."""
    if not ids:
        return []
    connection = _connection(db)
    postgres = connection.dialect.name == "postgresql"
    params: dict[str, Any] = {"h_lease": lease_until, "h_now": now, "h_body": body}
    if records:
        if postgres and len(ids) == 1:
            params.update(h_id=ids[0], **_record_params(records, sent_at or now, now))
            return [row[0] for row in connection.execute(_HAND_OFF_RECORDING, params)]
        record_sent(connection, records, sent_at or now, now)
    if len(ids) == 1:
        return [row[0] for row in connection.execute(_HAND_OFF, {**params, "h_id": ids[0]})]
    return [row[0] for row in connection.execute(_hand_off_many(postgres), {**params, "h_ids": list(ids)})]


# -- record sent ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SharedSend:
    """One request's ``sent`` record for all its rows: the provider's answer, and the texts with substitution tags
    that each row's ``substitutions`` (tag → value, applied in order) fill in."""

    provider: str
    provider_message_id: str
    locale: str
    subject: str
    text: str
    rows: Sequence[tuple[str, Mapping[str, str]]]  # (outbox id, substitutions)

    def plain(self) -> list[dict[str, Any]]:
        """The same record as :func:`record_sent`'s plain rows, each text substituted here."""
        return [
            {
                "id": outbox_id,
                "provider": self.provider,
                "provider_message_id": self.provider_message_id,
                "locale": self.locale,
                "segments": None,
                "subject": substitute(self.subject, substitutions),
                "body": substitute(self.text, substitutions),
            }
            for outbox_id, substitutions in self.rows
        ]


_RECORD_COLUMNS: dict[str, Any] = {
    "id": String(),
    "provider": String(),
    "provider_message_id": String(),
    "locale": String(),
    "segments": postgresql.INTEGER(),
    "subject": Text(),
    "body": Text(),
}


def _sent_values(given: Mapping[str, Any]) -> dict[str, Any]:
    """The values of a ``sent`` record, from ``given`` (expressions for provider, provider_message_id, locale and,
    where known, segments, subject and body). A row still in flight becomes ``sent`` (the claim time stands as the
    send time: caps counted the row from then on, and must keep agreeing); a row a provider event already moved on
    keeps its status and only gains the send's facts."""
    c = _OUTBOX.c
    in_flight = or_(*(c.status == status for status in _IN_FLIGHT))  # no IN list: it may run as an executemany
    sent_at = bindparam("r_sent_at", type_=UTCDateTime())
    values: dict[str, Any] = {
        "status": case((in_flight, MessageStatus.SENT.value), else_=c.status),
        "sent_at": case((in_flight, sent_at), else_=c.sent_at),
        "error_code": case((in_flight, None), else_=c.error_code),
        "error_detail": case((in_flight, None), else_=c.error_detail),
        "provider": given["provider"],
        "provider_message_id": given["provider_message_id"],
        "locale": given["locale"],
        "lease_until": None,
        "updated_at": bindparam("r_now", type_=UTCDateTime()),
    }
    for name in ("segments", "subject", "body"):
        if name in given:
            values[name] = func.coalesce(given[name], c[name])
    return values


def _record_statement(postgres: bool) -> Any:
    """The ``sent`` update for many rows: on PostgreSQL one ``UPDATE … FROM json_to_recordset(:records)`` (one
    short statement and one commit for the lot), elsewhere an executemany of the same update. Built once."""
    c = _OUTBOX.c
    if postgres:
        source = (
            func.json_to_recordset(cast(bindparam("records", type_=Text), JSON))
            .table_valued(*(column(name, kind) for name, kind in _RECORD_COLUMNS.items()))
            .render_derived(name="records", with_types=True)
        )
        given = {name: source.c[name] for name in _RECORD_COLUMNS}
    else:
        given = {name: bindparam(f"r_{name}", type_=c[name].type) for name in _RECORD_COLUMNS}
    return update(_OUTBOX).where(c.id == given["id"]).values(**_sent_values(given))


_RECORD = {postgres: _record_statement(postgres) for postgres in (True, False)}
#: PostgreSQL: the hand-off of the next row with the record of the rows sent before it, in one statement.
_HAND_OFF_RECORDING = _HAND_OFF.add_cte(_RECORD[True].returning(_OUTBOX.c.id).cte("recorded"))


def _record_params(rows: Sequence[Mapping[str, Any]], sent_at: datetime, now: datetime) -> dict[str, Any]:
    ordered = sorted(rows, key=lambda r: str(r["id"]))
    return {"records": json.dumps(ordered, separators=(",", ":")), "r_sent_at": sent_at, "r_now": now}


def _json_rows(width: int) -> Any:
    """The rows of the JSON parameter ``sent_rows`` (an array of arrays of strings) as columns ``v0`` …"""
    element = func.json_array_elements(cast(bindparam("sent_rows", type_=Text), JSON)).table_valued(
        "value", name="sent_row"
    )
    values = (element.c.value.op("->>")(literal(position)).label(f"v{position}") for position in range(width))
    return select(*values).select_from(element).subquery("sent")


@lru_cache(maxsize=32)
def _record_filled(used: tuple[str, ...], in_subject: tuple[str, ...], in_text: tuple[str, ...]) -> Any:
    """PostgreSQL: subject and body filled in from ``sent_subject``/``sent_text``, replacing the tags each holds
    (in the order :func:`substitute` follows) by the row's values, which come in the order of ``used``."""
    rows = _json_rows(len(used) + 1)
    value = {tag: rows.c[f"v{position}"] for position, tag in enumerate(used, start=1)}
    subject: Any = bindparam("sent_subject", type_=Text)
    body: Any = bindparam("sent_text", type_=Text)
    for tag in in_subject:
        subject = func.replace(subject, literal(tag, Text), value[tag])
    for tag in in_text:
        body = func.replace(body, literal(tag, Text), value[tag])
    given = {
        "provider": bindparam("sent_provider", type_=_OUTBOX.c.provider.type),
        "provider_message_id": bindparam("sent_provider_id", type_=_OUTBOX.c.provider_message_id.type),
        "locale": bindparam("sent_locale", type_=_OUTBOX.c.locale.type),
        "subject": subject,
        "body": body,
    }
    return update(_OUTBOX).where(_OUTBOX.c.id == rows.c.v0).values(**_sent_values(given))


def _record_shared(connection: Connection, shared: SharedSend, sent_at: datetime, now: datetime) -> bool:
    """PostgreSQL: the shared subject and text go once, each row's substitution values in one JSON document, and
    the database fills them in (``replace`` in the order :func:`substitute` follows, so the stored text is what the
    recipient got) instead of a thousand bodies crossing the wire. False when the rows' substitutions cannot be
    filled that way (their keys differ, or a value could make a tag)."""
    tags = tuple(shared.rows[0][1])
    if not all(tuple(s) == tags and not any("%" in v for v in s.values()) for _, s in shared.rows):
        return False
    # No value can make a tag (they all have a ``%``), so only the tags the texts hold need replacing.
    in_subject = tuple(tag for tag in tags if tag in shared.subject)
    in_text = tuple(tag for tag in tags if tag in shared.text)
    used = tuple(tag for tag in tags if tag in in_subject or tag in in_text)
    values = [[outbox_id, *(s[tag] for tag in used)] for outbox_id, s in shared.rows]
    params = {
        "sent_provider": shared.provider,
        "sent_provider_id": shared.provider_message_id,
        "sent_locale": shared.locale,
        "sent_subject": shared.subject,
        "sent_text": shared.text,
        "sent_rows": json.dumps(values, ensure_ascii=False),
        "r_sent_at": sent_at,
        "r_now": now,
    }
    connection.execute(_record_filled(used, in_subject, in_text), params)
    return True


def record_sent(db: Db, sent: Sequence[Mapping[str, Any]] | SharedSend, sent_at: datetime, now: datetime) -> None:
    """Rows the provider accepted: ``sent`` as of ``sent_at`` (the claim time) with what went out. ``sent`` is
    either plain rows (id, provider, provider_message_id, locale, segments, subject, body) or one request's
    :class:`SharedSend`. A row a provider event already moved on (it may, the moment the provider accepts) keeps
    its status and only gains the send's facts. One statement for the lot."""
    connection = _connection(db)
    postgres = connection.dialect.name == "postgresql"
    if isinstance(sent, SharedSend):
        if not sent.rows or (postgres and _record_shared(connection, sent, sent_at, now)):
            return
        rows: Sequence[Mapping[str, Any]] = sent.plain()
    else:
        rows = sent
    if not rows:
        return
    if postgres:
        connection.execute(_RECORD[True], _record_params(rows, sent_at, now))
    else:
        fixed = {"r_sent_at": sent_at, "r_now": now}
        connection.execute(_RECORD[False], [{**fixed, **{f"r_{k}": v for k, v in row.items()}} for row in rows])


# -- other final outcomes -------------------------------------------------------------------------------------


def _finish(connection: Connection, ids: Sequence[str], now: datetime, values: Mapping[str, Any]) -> None:
    """Rows in flight get ``values``; a row the provider's webhook already moved on (it may, the moment the
    provider accepts) keeps its status and gains only what we alone know (:data:`_SEND_FACTS`)."""
    table = _OUTBOX
    done = connection.execute(
        update(table)
        .where(one_of(connection, table.c.id, ids), table.c.status.in_(_IN_FLIGHT))
        .values(lease_until=None, updated_at=now, **values)
        .returning(table.c.id)
    )
    missing = set(ids) - {row[0] for row in done}
    facts = {k: v for k, v in values.items() if k in _SEND_FACTS and v is not None}
    if missing and facts:
        connection.execute(
            update(table)
            .where(one_of(connection, table.c.id, sorted(missing)))
            .values(lease_until=None, updated_at=now, **facts)
        )


#: The reason a failed row gives, in words, before the error's own detail.
_FAILED_BECAUSE = {
    "template": "the template could not be rendered",
    "retries": "the provider kept failing until the retries ran out",
    "provider": "the provider refused the message",
}


def fail(
    db: Db,
    ids: Sequence[str],
    now: datetime,
    *,
    rule: str,
    code: str,
    detail: str,
    provider: str | None = None,
    **facts: Any,
) -> None:
    """Rows in flight end ``failed`` by ``rule`` (``template``, ``retries``, ``provider``) with the error's code
    and detail, and a reason in words (the detail with addresses and numbers taken out); ``facts`` are other
    columns to set (``sent_at=None`` for a row that never went out)."""
    if not ids:
        return
    detail = redact(detail, 500)
    values: dict[str, Any] = {
        "status": MessageStatus.FAILED.value,
        "rule": rule,
        "reason": f"{_FAILED_BECAUSE.get(rule, rule)}: {detail}"[:500],
        "error_code": code[:32],
        "error_detail": detail,
        **facts,
    }
    if provider is not None:
        values["provider"] = provider
    _finish(_connection(db), ids, now, values)


def uncertain(
    db: Db,
    ids: Sequence[str],
    now: datetime,
    *,
    provider: str,
    reason: str,
    code: str,
    detail: str,
    **facts: Any,
) -> None:
    """The request went out and no answer came back (an ambiguous provider error): the provider may have the
    messages. Sending them again could reach a candidate twice, so the rows wait, ``uncertain``, for the provider's
    events (which name our ids) to reconcile them; the sweeper alerts a person when none come. ``facts``: what
    went out (subject, body, locale, segments)."""
    if not ids:
        return
    values = {
        "status": MessageStatus.UNCERTAIN.value,
        "rule": "ambiguous",
        "reason": reason[:500],
        "provider": provider,
        "error_code": code[:32],
        "error_detail": detail[:500],
        **facts,
    }
    _finish(_connection(db), ids, now, values)


#: Rows the rules refused (held, suppressed, skipped, cancelled) end here, one parameter set per row
#: (:func:`refused`).
STOP_REFUSED = (
    update(_OUTBOX)
    .where(_OUTBOX.c.id == bindparam("s_id"))
    .values(
        status=bindparam("s_status"),
        rule=bindparam("s_rule"),
        reason=bindparam("s_reason"),
        not_before=bindparam("s_not_before"),
        enqueued_at=None,
        sent_at=None,
        lease_until=None,
        updated_at=bindparam("s_now"),
    )
)


def refused(outbox_id: str, verdict: Verdict, not_before: datetime, now: datetime) -> dict[str, Any]:
    """:data:`STOP_REFUSED`'s parameters for a row the rules refused: a held row waits until the rule's time."""
    decision = verdict.decision
    held = verdict.status is MessageStatus.HELD
    return {
        "s_id": outbox_id,
        "s_status": verdict.status.value,
        "s_rule": decision.rule,
        "s_reason": decision.reason,
        "s_not_before": decision.until if held and decision.until else not_before,
        "s_now": now,
    }


def refuse(db: Db, stopped: Sequence[Mapping[str, Any]]) -> None:
    """Claimed rows the rules refused at the send stage: their status (held, suppressed, skipped, cancelled), rule
    and reason; a held row is due again at the rule's time. ``stopped``: :func:`refused` of each, one statement."""
    if stopped:
        _connection(db).execute(STOP_REFUSED, list(stopped))


# -- give back ------------------------------------------------------------------------------------------------


def pending_again(now: datetime, delay: float) -> dict[str, Any]:
    """The values that put a ``sending`` row back to ``pending``, due (and marked enqueued for) ``delay`` seconds
    from ``now``; the caller's wake-up message or the sweeper picks it up then."""
    retry_at = now + timedelta(seconds=delay)
    return {
        "status": _PENDING,
        "not_before": retry_at,
        "enqueued_at": retry_at,
        "lease_until": None,
        "sent_at": None,
        "updated_at": now,
    }


def give_back(
    db: Db, ids: Sequence[str], now: datetime, delay: float, *, attempted: bool = False, **values: Any
) -> None:
    """Rows back to ``pending``, due after ``delay`` seconds, the marker cleared. By default only rows still
    claimed (never handed off: no attempt was counted, no provider saw them), so a caller may name every row it
    did not send; ``attempted=True`` for handed-off rows the provider did not take (a transient error: the
    attempt stays counted). ``values``: more columns to set (the error's code and detail)."""
    if not ids:
        return
    connection = _connection(db)
    table = _OUTBOX
    condition = [one_of(connection, table.c.id, ids), table.c.status == _SENDING]
    if not attempted:
        condition.append(table.c.rule == CLAIMED_RULE)
    connection.execute(update(table).where(*condition).values(**pending_again(now, delay), rule=None, **values))


# -- the sweeper ----------------------------------------------------------------------------------------------


def sweep_claimed(db: Db, now: datetime) -> list[str]:
    """``sending`` rows whose lease ran out still marked claimed: the worker stopped before the hand-off, no
    provider saw them. Back to ``pending`` (enqueued now); returns their ids."""
    table = _OUTBOX
    rows = _connection(db).execute(
        update(table)
        .where(table.c.status == _SENDING, table.c.lease_until < now, table.c.rule == CLAIMED_RULE)
        .values(
            status=_PENDING,
            rule=None,
            reason=None,
            lease_until=None,
            sent_at=None,
            enqueued_at=now,
            updated_at=now,
        )
        .returning(table.c.id)
    )
    return [row[0] for row in rows]


def sweep_lost(db: Db, now: datetime) -> int:
    """``sending`` rows whose lease ran out after their hand-off: the worker stopped during (or right after) the
    provider call, which may have sent them. ``uncertain``, never resent; returns how many. Run after
    :func:`sweep_claimed`."""
    table = _OUTBOX
    lost = _connection(db).execute(
        update(table)
        .where(table.c.status == _SENDING, table.c.lease_until < now)
        .values(
            status=MessageStatus.UNCERTAIN.value,
            rule="lease",
            reason="the worker stopped during the send; reconcile from provider events, do not resend",
            updated_at=now,
        )
    )
    return int(getattr(lost, "rowcount", 0) or 0)


# -- reconciliation: an uncertain row and the provider's word ------------------------------------------------

_UNCERTAIN = MessageStatus.UNCERTAIN.value


def claim_lookups(
    db: Db, channels: Sequence[str], now: datetime, until: datetime, since: datetime, limit: int
) -> list[Any]:
    """Up to ``limit`` ``uncertain`` rows of ``channels`` due for a provider lookup, oldest first: for an uncertain
    row ``not_before`` is when it may next be looked up (at once when it became uncertain). Only rows that became
    uncertain after ``since``. Their ``not_before`` moves to ``until``, so another scheduler leaves them alone
    meanwhile (and skips them while they are locked, on PostgreSQL); ``updated_at`` stays: it is when the row became
    uncertain, where the provider's visibility delay starts. Returns each row's id, candidate_id, channel, attempts,
    provider, body, sent_at and updated_at, oldest first."""
    if not channels or limit <= 0:
        return []
    connection = _connection(db)
    table = _OUTBOX
    pick = (
        select(table.c.id)
        .where(
            table.c.status == _UNCERTAIN,
            table.c.not_before <= now,
            table.c.updated_at > since,
            table.c.channel.in_(sorted(channels)),
        )
        .order_by(table.c.updated_at, table.c.id)
        .limit(limit)
    )
    picked: Any = table.c.id.in_(pick.scalar_subquery())
    if connection.dialect.name == "postgresql":
        # Evaluated once (an ARRAY(…) init plan): as ``id IN (…)`` the planner may run the locking subquery again for
        # each row it updates, and each run skips the rows the update already changed: the limit would not hold.
        picked = table.c.id == any_(func.array(pick.with_for_update(skip_locked=True).scalar_subquery()))
    columns = ("id", "candidate_id", "channel", "attempts", "provider", "body", "sent_at", "updated_at")
    rows = connection.execute(
        update(table)
        .where(picked, table.c.status == _UNCERTAIN)
        .values(not_before=until, updated_at=table.c.updated_at)
        .returning(*(table.c[name] for name in columns))
    ).all()
    return sorted(rows, key=lambda row: (row.updated_at, row.id))


def _same_uncertain(outbox_id: str, attempts: int) -> tuple[Any, ...]:
    """The row ``outbox_id`` still ``uncertain`` from the same attempt: what a lookup decided was about it. A provider
    event may have settled it meanwhile, or it may have been sent again and be uncertain from a later attempt."""
    table = _OUTBOX
    return table.c.id == outbox_id, table.c.status == _UNCERTAIN, table.c.attempts == attempts


def look_again(db: Db, outbox_id: str, attempts: int, at: datetime) -> None:
    """The next lookup of an ``uncertain`` row (of that attempt) not before ``at``."""
    table = _OUTBOX
    _connection(db).execute(
        update(table).where(*_same_uncertain(outbox_id, attempts)).values(not_before=at, updated_at=table.c.updated_at)
    )


def record_found(
    db: Db, outbox_id: str, attempts: int, now: datetime, *, provider: str, provider_message_id: str
) -> bool:
    """An ``uncertain`` row (of that attempt) a provider lookup found: ``sent`` with the provider's id, as of its claim
    time like any send. Its rule stays (why it was uncertain); the reason says how it was settled. False when it was
    no longer uncertain (an event settled it first, and wins)."""
    table = _OUTBOX
    done = _connection(db).execute(
        update(table)
        .where(*_same_uncertain(outbox_id, attempts))
        .values(
            status=MessageStatus.SENT.value,
            provider=provider,
            provider_message_id=provider_message_id[:128],
            reason=f"{provider} had it (found by a lookup): sent",
            error_code=None,
            error_detail=None,
            lease_until=None,
            sent_at=func.coalesce(table.c.sent_at, now),
            updated_at=now,
        )
        .returning(table.c.id)
    )
    return done.first() is not None


def send_again(db: Db, outbox_id: str, attempts: int, now: datetime, *, reason: str) -> bool:
    """An ``uncertain`` row (of that attempt) the provider proved it never got: ``pending`` again, due (and marked
    enqueued) now, to be sent once more; the attempt stays counted. Call it only on the provider's complete answer,
    asked once its visibility delay had passed since the row became uncertain. False when it was no longer
    uncertain."""
    done = _connection(db).execute(
        update(_OUTBOX)
        .where(*_same_uncertain(outbox_id, attempts))
        .values(**pending_again(now, 0.0), rule=None, reason=reason[:500])
        .returning(_OUTBOX.c.id)
    )
    return done.first() is not None


# -- suppressed while queued ----------------------------------------------------------------------------------


def suppress_queued(
    db: Db, channel: str, candidates: Any, now: datetime, *, rule: str, reason: str, category: str | None = None
) -> list[str]:
    """The ``channel`` messages still queued (``pending`` or ``held``) for the candidates ``candidates`` selects
    (only those of ``category``, when given) become ``suppressed`` with ``rule`` and ``reason``
    (:mod:`outreach.pipeline.suppression` calls this); their ids."""
    statement = (
        update(_OUTBOX)
        .where(
            _OUTBOX.c.status.in_([MessageStatus.PENDING.value, MessageStatus.HELD.value]),
            _OUTBOX.c.channel == channel,
            _OUTBOX.c.candidate_id.in_(candidates),
            *([_OUTBOX.c.category == category] if category is not None else []),
        )
        .values(
            status=MessageStatus.SUPPRESSED.value,
            rule=rule,
            reason=reason,
            lease_until=None,
            updated_at=now,
        )
        .returning(_OUTBOX.c.id)
    )
    return [row[0] for row in _connection(db).execute(statement)]
