"""The event data contract: what ``data`` each ATS event carries, declared in ``campaigns/events.yaml``.

The file is reviewed like the campaigns beside it. Per event type it declares the fields of ``data``: a type, whether
it is required, an example, and for objects their fields, for lists their items::

    offer_accepted:
      description: The candidate accepted; the offer letter goes out within 24 hours.
      data:
        start_date: {type: date, required: true, example: "2027-03-01"}
        hr_contact:
          type: object
          required: true
          fields:
            name: {type: string, required: true, example: 李娜}
            email: {type: email, example: li.na@example.com}

Types: ``string``, ``date`` (``2027-03-01``), ``datetime`` (ISO 8601 with an offset), ``email``, ``phone``
(international, or a mainland China number), ``url`` (http or https), ``money`` (``{amount, currency, period}``),
``number``, ``boolean``, ``object`` (with ``fields``) and ``list`` (with ``items``). A field's spec may be just its
type (``position: string``).

The API, ``outreach event`` and the CSV import check an event's data against it at the door and report every problem
at once (:meth:`EventContract.check`); ``campaigns validate`` fails when a template reads a field the contract does not
declare. Data the contract does not name is kept with the event, but no template may read it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import date, datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import phonenumbers
import yaml
from email_validator import EmailNotValidError, validate_email
from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic import ValidationError as PydanticError

from outreach.core.errors import CampaignError, Problem
from outreach.domain.campaigns import EventType, field_line

__all__ = [
    "EVENTS_FILE",
    "EventContract",
    "EventSpec",
    "FieldSpec",
    "contract_problems",
    "load_event_contract",
]

EVENTS_FILE = "events.yaml"

FieldType = Literal[
    "string", "date", "datetime", "email", "phone", "url", "money", "number", "boolean", "object", "list"
]

#: Money is paid once or per period.
MONEY_PERIODS = ("once", "hour", "day", "week", "month", "year")
#: Far beyond any salary or bonus in any currency; larger is a unit mistake (or an attack on the formatter).
MAX_AMOUNT = 10**12
MAX_STRING = 10_000
MAX_ITEMS = 200
_CURRENCY = re.compile(r"^[A-Z]{3}$")
_NAME = re.compile(r"^[a-z][a-z0-9_]{0,63}$")


class FieldSpec(BaseModel):
    """One field of an event's data."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: FieldType
    required: bool = False
    description: str | None = None
    example: Any = None
    fields: dict[str, FieldSpec] | None = None
    items: FieldSpec | None = None

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        return {"type": value} if isinstance(value, str) else value

    @model_validator(mode="after")
    def _shape(self) -> FieldSpec:
        if self.type == "object" and not self.fields:
            raise ValueError("an object needs its `fields`")
        if self.type != "object" and self.fields is not None:
            raise ValueError("only an object has `fields`")
        if self.type == "list" and self.items is None:
            raise ValueError("a list needs its `items`")
        if self.type != "list" and self.items is not None:
            raise ValueError("only a list has `items`")
        for name in self.fields or {}:
            if not _NAME.match(name):
                raise ValueError(f"field name {name!r}: lower-case letters, digits and _ only")
        if self.example is not None and (problems := _check(self, self.example, "example")):
            raise ValueError("; ".join(f"{where}: {message}" for where, message in problems))
        return self


class EventSpec(BaseModel):
    """What one event type carries."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    description: str | None = None
    data: dict[str, FieldSpec] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _names(self) -> EventSpec:
        for name in self.data:
            if not _NAME.match(name):
                raise ValueError(f"field name {name!r}: lower-case letters, digits and _ only")
        return self


@dataclass(frozen=True)
class EventContract:
    """Every event type's data fields. Event types it does not name carry no declared data."""

    events: Mapping[str, EventSpec] = field(default_factory=dict)
    source: Path | None = None

    def fields(self, event_type: str) -> Mapping[str, FieldSpec]:
        spec = self.events.get(event_type)
        return spec.data if spec is not None else {}

    def check(self, event_type: str, data: Mapping[str, Any]) -> list[tuple[str, str]]:
        """Every problem with ``data`` for ``event_type``, as ``(field, message)`` with ``data.``-rooted paths.

        The messages name what was expected, never the value sent (it is personal data)."""
        return _check_fields(self.fields(event_type), data, "data")

    def example(self, event_type: str, *, required_only: bool = False) -> dict[str, Any]:
        """The declared examples as one ``data`` object (only the required fields, recursively, if asked)."""
        return _example_of(self.fields(event_type), required_only)

    def declared(self, event_type: str, path: tuple[str, ...]) -> bool:
        """Whether ``data.<path>`` names a declared field (``[]`` stands for any item of a list)."""
        fields: Mapping[str, FieldSpec] | None = self.fields(event_type)
        spec: FieldSpec | None = None
        for part in path:
            if part == "[]":
                if spec is None or spec.items is None:
                    return False
                spec = spec.items
                fields = spec.fields
                continue
            if spec is not None and spec.type == "money" and part in ("amount", "currency", "period"):
                return True
            if fields is None or part not in fields:
                return False
            spec = fields[part]
            fields = spec.fields
        return True

    def required(self, event_type: str) -> tuple[str, ...]:
        return tuple(name for name, spec in self.fields(event_type).items() if spec.required)


def _example_of(fields: Mapping[str, FieldSpec], required_only: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, spec in fields.items():
        if required_only and not spec.required:
            continue
        if spec.type == "object" and spec.fields:
            if spec.example is not None and not required_only:
                out[name] = spec.example
            else:
                out[name] = _example_of(spec.fields, required_only)
        elif spec.example is not None:
            out[name] = spec.example
    return out


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, str | list | dict) and not value)


def _check_fields(fields: Mapping[str, FieldSpec], data: Any, where: str) -> list[tuple[str, str]]:
    if not isinstance(data, Mapping):
        return [(where, "must be an object")]
    problems: list[tuple[str, str]] = []
    for name, spec in fields.items():
        value = data.get(name)
        path = f"{where}.{name}"
        if _missing(value):
            if spec.required:
                problems.append((path, f"required ({_describe(spec)}; the templates print it)"))
            continue
        problems.extend(_check(spec, value, path))
    return problems


def _describe(spec: FieldSpec) -> str:
    if spec.type == "object" and spec.fields:
        required = [name for name, sub in spec.fields.items() if sub.required]
        return "an object" + (f" with {', '.join(required)}" if required else "")
    if spec.type == "list" and spec.items is not None:
        return f"a list of {_describe(spec.items)}"
    return {
        "string": "text",
        "date": "a date like 2027-03-01",
        "datetime": "a date and time with an offset, like 2027-03-01T09:30:00+08:00",
        "email": "an email address",
        "phone": "a phone number",
        "url": "an http(s) link",
        "money": "money as {amount, currency, period}",
        "number": "a number",
        "boolean": "true or false",
    }.get(spec.type, spec.type)


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "text"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, Mapping):
        return "an object"
    return type(value).__name__


def _check(spec: FieldSpec, value: Any, path: str) -> list[tuple[str, str]]:
    expected = f"expected {_describe(spec)}, got {_kind(value)}"
    kind = spec.type
    if kind == "object":
        if not isinstance(value, Mapping):
            return [(path, expected)]
        return _check_fields(spec.fields or {}, value, path)
    if kind == "list":
        if not isinstance(value, list):
            return [(path, expected)]
        if len(value) > MAX_ITEMS:
            return [(path, f"at most {MAX_ITEMS} items")]
        assert spec.items is not None
        problems: list[tuple[str, str]] = []
        for index, item in enumerate(value):
            problems.extend(_check(spec.items, item, f"{path}[{index}]"))
        return problems
    if kind == "money":
        return _check_money(value, path, expected)
    if kind == "boolean":
        return [] if isinstance(value, bool) else [(path, expected)]
    if kind == "number":
        if isinstance(value, bool) or not isinstance(value, int | float):
            return [(path, expected)]
        if not math.isfinite(value) or abs(value) > MAX_AMOUNT:
            return [(path, f"a number between -{MAX_AMOUNT:,} and {MAX_AMOUNT:,}")]
        return []
    if not isinstance(value, str):
        return [(path, expected)]
    if "\x00" in value:
        return [(path, "contains a NUL character")]
    if len(value) > MAX_STRING:
        return [(path, f"at most {MAX_STRING:,} characters")]
    return [] if _TEXT_CHECKS[kind](value.strip()) else [(path, f"expected {_describe(spec)}")]


def _check_money(value: Any, path: str, expected: str) -> list[tuple[str, str]]:
    if not isinstance(value, Mapping):
        return [(path, expected)]
    problems: list[tuple[str, str]] = []
    amount = value.get("amount")
    if isinstance(amount, bool) or not isinstance(amount, int | float):
        problems.append((f"{path}.amount", "required: a number"))
    elif not math.isfinite(amount) or not 0 <= amount <= MAX_AMOUNT:
        problems.append((f"{path}.amount", f"a number from 0 to {MAX_AMOUNT:,}"))
    currency = value.get("currency")
    if not isinstance(currency, str) or not _CURRENCY.match(currency):
        problems.append((f"{path}.currency", "required: a three-letter ISO 4217 code such as CNY"))
    period = value.get("period", "once")
    if period not in MONEY_PERIODS:
        problems.append((f"{path}.period", f"one of {', '.join(MONEY_PERIODS)}"))
    return problems


def _is_date(text: str) -> bool:
    try:
        date.fromisoformat(text)
    except ValueError:
        return False
    return len(text) == 10


def _is_datetime(text: str) -> bool:
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        return False
    return parsed.tzinfo is not None and 1970 <= parsed.year <= 2999


def _is_email(text: str) -> bool:
    try:
        validate_email(text, check_deliverability=False)
    except EmailNotValidError:
        return False
    return True


def _is_phone(text: str) -> bool:
    try:
        number = phonenumbers.parse(text, "CN")
    except phonenumbers.NumberParseException:
        return False
    return bool(phonenumbers.is_possible_number(number))


def _is_url(text: str) -> bool:
    try:
        parts = urlsplit(text)
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.hostname)


_TEXT_CHECKS = {
    "string": lambda text: True,
    "date": _is_date,
    "datetime": _is_datetime,
    "email": _is_email,
    "phone": _is_phone,
    "url": _is_url,
}


def contract_problems(path: Path) -> tuple[EventContract | None, list[Problem]]:
    """The contract in ``path`` and every problem, with its line; None when the file does not exist (a campaigns
    folder from before the contract: event data is then stored unchecked and templates may read any of it)."""
    if not path.exists():
        return None, []
    file = str(path)
    try:
        text = path.read_text(encoding="utf-8")
        raw = yaml.safe_load(text)
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        return EventContract(source=path), [Problem(file, None, "(file)", f"not readable YAML: {exc}")]
    if raw is None:
        return EventContract(source=path), []
    if not isinstance(raw, dict):
        return EventContract(source=path), [Problem(file, 1, "(file)", "must map event types to their data")]
    known = {event.value for event in EventType}
    events: dict[str, EventSpec] = {}
    problems: list[Problem] = []
    for name, body in raw.items():
        if name not in known:
            problems.append(
                Problem(file, field_line(path, (name,)), str(name), f"no such event; one of {', '.join(sorted(known))}")
            )
            continue
        try:
            events[name] = EventSpec.model_validate(body or {})
        except PydanticError as exc:
            for error in exc.errors():
                loc = (name, *error["loc"])
                where = ".".join(str(part) for part in loc if part not in ("function-after[_shape(), FieldSpec]",))
                message = str(error["msg"]).removeprefix("Value error, ")
                problems.append(Problem(file, field_line(path, loc), where, message))
    return EventContract(events=events, source=path), problems


@lru_cache(maxsize=8)
def _load(path: str, _mtime_ns: int) -> EventContract | None:
    contract, problems = contract_problems(Path(path))
    if problems:
        raise CampaignError(problems)
    return contract


def load_event_contract(campaigns_dir: Path) -> EventContract | None:
    """``events.yaml`` in ``campaigns_dir`` (once per version of the file; None without one), or raise
    :class:`CampaignError`."""
    path = campaigns_dir / EVENTS_FILE
    try:
        mtime = path.stat().st_mtime_ns
    except OSError:
        mtime = 0
    return _load(str(path), mtime)
