"""The one rule at the door: what any input must be before it may reach the database.

Every way data comes in — the API's bodies, paths and queries, the CLI, CSV imports, the providers' webhooks and
inbound mail — goes through the helpers here, so a value the database cannot hold is turned away (or mended) where
it enters, with the field named, instead of failing the write later as a 500, a half-done send or a stuck row.

**Text.** PostgreSQL stores no NUL (U+0000) in ``text`` or ``json``, and a lone UTF-16 surrogate (U+D800-U+DFFF,
what a JSON ``"\\udc80"`` parses to) cannot be written as UTF-8 at all. Input that people or their systems send us
(API bodies, the CLI, CSV) is *cleaned*: a NUL is refused (422 naming the field), a lone surrogate becomes U+FFFD,
the replacement character. Payloads a provider signs or relays (SendGrid events, inbound mail) are *scrubbed*:
both become U+FFFD, because refusing a genuine notification only makes the provider post it again for days.
Keys of nested data count as text too.

**Integers** fit their column: :data:`Int32` for ``integer`` columns (salaries, the 32-bit row ids).

**Instants** lie between :data:`~outreach.core.clock.EARLIEST` and :data:`~outreach.core.clock.LATEST` (1970-2999,
:func:`~outreach.core.clock.check_instant`): far enough for any real date, near enough that adding half a year or
converting to UTC never overflows ``datetime``.

Models of input derive from :class:`InputModel`, which cleans every field's raw value before any other check;
:func:`validate` turns pydantic's errors into one :class:`~outreach.core.errors.ValidationError` that names each
field and never repeats the value (values are personal data).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Annotated, Any, TypeVar

from pydantic import AfterValidator, BaseModel, Field, field_validator
from pydantic import ValidationError as PydanticError

from outreach.core.clock import check_instant
from outreach.core.errors import ValidationError

__all__ = [
    "INT32_MAX",
    "InputModel",
    "Instant",
    "Int32",
    "RowId",
    "UTCInstant",
    "clean_data",
    "clean_text",
    "problems",
    "scrub_data",
    "scrub_text",
    "validate",
]

NUL = "\x00"
NO_NUL = "must not contain NUL characters"
REPLACEMENT = "\ufffd"
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")

#: The largest value of an ``integer`` column (PostgreSQL's int4; the tables' ids are ``integer`` too).
INT32_MAX = 2**31 - 1
INT32_MIN = -(2**31)


def clean_text(value: str) -> str:
    """``value`` with its lone surrogates replaced by U+FFFD; ``ValueError`` when it holds a NUL."""
    if value.isascii():
        if NUL in value:
            raise ValueError(NO_NUL)
        return value
    if NUL in value:
        raise ValueError(NO_NUL)
    return _LONE_SURROGATE.sub(REPLACEMENT, value)


def scrub_text(value: str) -> str:
    """``value`` with every NUL and lone surrogate replaced by U+FFFD (for what a provider sends)."""
    if value.isascii() and NUL not in value:
        return value
    return _UNSTORABLE.sub(REPLACEMENT, value)


def clean_data(value: Any) -> Any:
    """:func:`clean_text` applied to every string in ``value`` (nested dicts and lists, keys included): a copy."""
    return _map_strings(value, clean_text)


def scrub_data(value: Any) -> Any:
    """:func:`scrub_text` applied to every string in ``value`` (nested dicts and lists, keys included): a copy."""
    return _map_strings(value, scrub_text)


def _map_strings(value: Any, text: Callable[[str], str]) -> Any:
    """``value`` rebuilt with ``text`` applied to each string, without recursion: a payload nested a thousand
    levels deep (which the JSON parser accepts) must not end in a ``RecursionError``."""
    if isinstance(value, str):
        return text(value)
    if not isinstance(value, dict | list | tuple):
        return value
    root: dict[Any, Any] | list[Any] = {} if isinstance(value, dict) else []
    pending: list[tuple[Any, dict[Any, Any] | list[Any]]] = [(value, root)]
    while pending:
        source, target = pending.pop()
        items = source.items() if isinstance(source, dict) else enumerate(source)
        for key, item in items:
            if isinstance(item, str):
                copy: Any = text(item)
            elif isinstance(item, dict | list | tuple):
                copy = {} if isinstance(item, dict) else []
                pending.append((item, copy))
            else:
                copy = item
            if isinstance(target, dict):
                target[text(key) if isinstance(key, str) else key] = copy
            else:
                target.append(copy)
    return root


def _instant(value: datetime) -> datetime:
    return check_instant(value)


def _utc_instant(value: datetime) -> datetime:
    return check_instant(value if value.tzinfo else value.replace(tzinfo=UTC))


#: An aware instant between 1970 and 2999, in UTC ("needs a timezone offset" otherwise).
Instant = Annotated[datetime, AfterValidator(_instant)]
#: Like :data:`Instant`, but a time without an offset is taken as UTC (query strings rarely carry one).
UTCInstant = Annotated[datetime, AfterValidator(_utc_instant)]
#: What an ``integer`` column holds.
Int32 = Annotated[int, Field(ge=INT32_MIN, le=INT32_MAX)]
#: A row id (the tables' primary keys are ``integer``).
RowId = Annotated[int, Field(ge=1, le=INT32_MAX)]


class InputModel(BaseModel):
    """A model of input: every field's raw value is cleaned (:func:`clean_data`) before its own validation."""

    @field_validator("*", mode="before")
    @classmethod
    def _clean(cls, value: Any) -> Any:
        return clean_data(value)


def problems(error: PydanticError) -> list[tuple[str, str]]:
    """(field, message) for each of pydantic's errors: the dotted location, the message without the value."""
    found: list[tuple[str, str]] = []
    for item in error.errors(include_input=False, include_url=False):
        loc = [str(part) for part in item.get("loc", ()) if part not in ("body", "query", "path")]
        found.append((".".join(loc) or "(body)", str(item.get("msg", "invalid")).removeprefix("Value error, ")))
    return found or [("(body)", "invalid")]


M = TypeVar("M", bound=BaseModel)


def validate(model: type[M], data: Mapping[str, Any], context: Mapping[str, Any] | None = None) -> M:
    """``model`` from ``data``, or one :class:`ValidationError` naming every bad field."""
    try:
        return model.model_validate(data, context=dict(context) if context is not None else None)
    except PydanticError as exc:
        raise ValidationError.of(problems(exc)) from None
