"""Candidate intent: stages with their history, intent assessments, tags, and the talent-pool search.

Stages run applied → contacted → interviewing → final → offer → accepted / declined / rejected → hired or
talent_pool. ATS events move a candidate whatever their stage (the ATS is the source of truth); a person moving
one through the API may only make the moves in :data:`TRANSITIONS`. Every move writes a :class:`StageChange`.

An assessment scores every configured dimension from 1 to 5 (``campaigns/intent.yaml``; by default
career_goal_match, salary_fit and start_urgency). The level follows the mean, rounded half up to a whole score:
a mean of 3.5 or more is **high** (so 5/4/4 = 4.33 and 4/4/3 = 3.67 are high, 4/3 = 3.5 is high), 2.5 up to 3.5
is **medium** (2.5 itself is medium, 3.4 is medium), below 2.5 is **low**. The comparison is done on the sum in
whole numbers, so no float rounding can move a candidate across a boundary.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from enum import StrEnum
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator
from sqlalchemy import ColumnElement, Select, and_, cast, exists, func, literal, or_, select
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Session

from outreach.core.clock import utcnow
from outreach.core.errors import CampaignError, Problem, ValidationError
from outreach.core.inputs import INT32_MAX
from outreach.core.models import Candidate, IntentAssessment, Stage, StageChange
from outreach.domain.campaigns import load_yaml_model, parse_duration

INTENT_FILE = "intent.yaml"
DEFAULT_DIMENSIONS = ("career_goal_match", "salary_fit", "start_urgency")
SCORE_MIN, SCORE_MAX = 1, 5


class IntentLevel(StrEnum):
    HIGH = "high"
    MEDIUM = "medium"
    LOW = "low"


#: The level a candidate nobody has assessed has, wherever a level is asked for (search, campaign conditions).
UNASSESSED = "unassessed"
#: Best first: the order re-activation picks candidates in.
LEVEL_ORDER = (IntentLevel.HIGH.value, IntentLevel.MEDIUM.value, IntentLevel.LOW.value, UNASSESSED)


def level_of(candidate: Candidate) -> str:
    return candidate.intent_level or UNASSESSED


# -- configuration ---------------------------------------------------------------------------------------------

DimensionName = Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]*$", max_length=64)]


class IntentSpec(BaseModel):
    """``campaigns/intent.yaml``: what an assessment scores, and how long a talent-pool entry waits."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    dimensions: tuple[DimensionName, ...] = Field(default=DEFAULT_DIMENSIONS, min_length=1, max_length=20)
    #: The re-contact date a move to the talent pool gets unless the request names one.
    talent_pool_recontact: timedelta = timedelta(days=90)

    @field_validator("dimensions")
    @classmethod
    def _unique(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        duplicates = sorted({d for d in value if value.count(d) > 1})
        if duplicates:
            raise ValueError(f"dimension listed twice: {', '.join(duplicates)}")
        return value

    @field_validator("talent_pool_recontact", mode="before")
    @classmethod
    def _duration(cls, value: object) -> timedelta:
        return parse_duration(value)


def intent_problems(campaigns_dir: Path) -> tuple[IntentSpec, list[Problem]]:
    """The intent settings in ``campaigns_dir`` (defaults when the file is absent) and every problem in the file."""
    path = campaigns_dir / INTENT_FILE
    if not path.exists():
        return IntentSpec(), []
    spec, problems, _ = load_yaml_model(path, IntentSpec, "dimensions and talent_pool_recontact")
    return (spec or IntentSpec()), problems


@lru_cache(maxsize=16)
def _load(path: str, _mtime_ns: int) -> IntentSpec:
    spec, problems = intent_problems(Path(path))
    if problems:
        raise CampaignError(problems)
    return spec


def load_intent(campaigns_dir: Path) -> IntentSpec:
    """Load (once per version of the file) or raise :class:`CampaignError` naming the file, line and field."""
    path = campaigns_dir / INTENT_FILE
    try:
        mtime = path.stat().st_mtime_ns
    except OSError:
        mtime = 0
    return _load(str(campaigns_dir), mtime)


# -- stages ----------------------------------------------------------------------------------------------------

_S = Stage
#: The moves a person may make through the API. Declined, rejected and talent-pool candidates can start over
#: (a new application, or re-activation); hired is the end.
TRANSITIONS: Mapping[Stage, frozenset[Stage]] = {
    _S.APPLIED: frozenset({_S.CONTACTED, _S.INTERVIEWING, _S.DECLINED, _S.REJECTED, _S.TALENT_POOL}),
    _S.CONTACTED: frozenset({_S.INTERVIEWING, _S.DECLINED, _S.REJECTED, _S.TALENT_POOL}),
    _S.INTERVIEWING: frozenset({_S.FINAL, _S.OFFER, _S.DECLINED, _S.REJECTED, _S.TALENT_POOL}),
    _S.FINAL: frozenset({_S.OFFER, _S.DECLINED, _S.REJECTED, _S.TALENT_POOL}),
    _S.OFFER: frozenset({_S.ACCEPTED, _S.DECLINED, _S.REJECTED}),
    _S.ACCEPTED: frozenset({_S.HIRED, _S.DECLINED}),
    _S.DECLINED: frozenset({_S.TALENT_POOL, _S.APPLIED, _S.CONTACTED}),
    _S.REJECTED: frozenset({_S.TALENT_POOL, _S.APPLIED, _S.CONTACTED}),
    _S.TALENT_POOL: frozenset({_S.APPLIED, _S.CONTACTED, _S.INTERVIEWING}),
    _S.HIRED: frozenset(),
}

#: Declined and rejected candidates are not approached again for about six months.
RECONTACT_AFTER_DECLINE = timedelta(days=182)


def check_move(current: str, target: Stage) -> None:
    """Raise :class:`ValidationError` on ``stage`` unless a person may move a candidate ``current`` → ``target``."""
    if current == target.value:
        raise ValidationError("stage", f"the candidate is already at {target.value}")
    allowed = TRANSITIONS.get(Stage(current), frozenset()) if current in Stage._value2member_map_ else frozenset()
    if target not in allowed:
        options = ", ".join(sorted(s.value for s in allowed)) or "none (final stage)"
        raise ValidationError("stage", f"cannot move from {current} to {target.value}; from {current}: {options}")


def move_stage(
    session: Session,
    candidate: Candidate,
    to: Stage,
    *,
    by: str,
    at: datetime | None = None,
    event_id: int | None = None,
    reason: str | None = None,
) -> StageChange | None:
    """Put ``candidate`` at ``to`` and write the history row; nothing happens when they are there already."""
    if candidate.stage == to.value:
        return None
    change = StageChange(
        candidate_id=candidate.id,
        from_stage=candidate.stage,
        to_stage=to.value,
        changed_by=by[:128],
        event_id=event_id,
        reason=reason,
        changed_at=at or utcnow(),
    )
    candidate.stage = to.value
    candidate.updated_at = utcnow()
    session.add(change)
    return change


def recontact_date(to: Stage, at: datetime, spec: IntentSpec, given: datetime | None = None) -> datetime | None:
    """When a candidate moved to ``to`` at ``at`` may be approached again (None: the stage carries no date)."""
    if given is not None:
        return given
    if to is Stage.TALENT_POOL:
        return at + spec.talent_pool_recontact
    if to in (Stage.DECLINED, Stage.REJECTED):
        return at + RECONTACT_AFTER_DECLINE
    return None


# -- assessments -----------------------------------------------------------------------------------------------


def level_for(scores: Iterable[int]) -> tuple[float, IntentLevel]:
    """(mean, level): the mean rounded half up to a whole score; 4-5 high, 3 medium, 1-2 low."""
    values = list(scores)
    total, count = sum(values), len(values)
    if count == 0:
        raise ValueError("no scores")
    if 2 * total >= 7 * count:  # mean >= 3.5
        level = IntentLevel.HIGH
    elif 2 * total >= 5 * count:  # mean >= 2.5
        level = IntentLevel.MEDIUM
    else:
        level = IntentLevel.LOW
    return total / count, level


def check_scores(scores: Mapping[str, Any], spec: IntentSpec) -> dict[str, int]:
    """Every configured dimension scored with a whole number 1-5, nothing else; the error names the field."""
    for name in scores:
        if name not in spec.dimensions:
            raise ValidationError(f"scores.{name}", f"unknown dimension; score these: {', '.join(spec.dimensions)}")
    cleaned: dict[str, int] = {}
    for name in spec.dimensions:
        if name not in scores:
            raise ValidationError(f"scores.{name}", f"missing; score every dimension: {', '.join(spec.dimensions)}")
        value = scores[name]
        if isinstance(value, bool) or not isinstance(value, int) or not SCORE_MIN <= value <= SCORE_MAX:
            raise ValidationError(f"scores.{name}", f"must be a whole number from {SCORE_MIN} to {SCORE_MAX}")
        cleaned[name] = value
    return cleaned


def assess(
    session: Session,
    candidate: Candidate,
    scores: Mapping[str, Any],
    spec: IntentSpec,
    *,
    by: str,
    at: datetime | None = None,
) -> IntentAssessment:
    """Validate and store an assessment, and make it the candidate's current intent."""
    cleaned = check_scores(scores, spec)
    mean, level = level_for(cleaned.values())
    assessment = IntentAssessment(
        candidate_id=candidate.id,
        scores=cleaned,
        mean=mean,
        level=level.value,
        assessed_by=by[:128],
        assessed_at=at or utcnow(),
    )
    session.add(assessment)
    candidate.intent_level = level.value
    candidate.intent_score = mean
    candidate.updated_at = utcnow()
    session.flush()
    return assessment


# -- tags ------------------------------------------------------------------------------------------------------

_DIMENSION = re.compile(r"^[a-z][a-z0-9_]*$")
_VALUE = re.compile(r"^[^\s,:][^\s,]{0,63}$")

#: Decline reasons that become a ``decline_reason:<reason>`` tag; any other reason given becomes ``other``.
DECLINE_REASONS = ("salary", "location", "counter_offer", "timing", "role_fit", "other")


def check_tag(raw: str, field: str) -> str:
    """A ``dimension:value`` tag (``stack:java``): a lowercase dimension, a value without spaces or commas."""
    tag = raw.strip()
    dimension, sep, value = tag.partition(":")
    if not sep:
        raise ValidationError(field, "a tag is dimension:value, e.g. stack:java or status:passive")
    if not _DIMENSION.match(dimension):
        raise ValidationError(
            field, "the dimension (before the colon) must be lowercase letters, digits or _, e.g. stack:java"
        )
    if not _VALUE.match(value):
        raise ValidationError(field, "the value (after the colon) must be 1-64 characters without spaces or commas")
    return tag


def check_tag_list(values: Sequence[str], field: str = "tags") -> list[str]:
    if not values:
        raise ValidationError(field, "give at least one tag")
    out: list[str] = []
    for index, raw in enumerate(values):
        tag = check_tag(raw, f"{field}.{index}")
        if tag not in out:
            out.append(tag)
    return out


def decline_reason(reason: str | None) -> str | None:
    """The known decline reason a free-text reason names (``Salary below expectations`` → salary), or None."""
    if not reason or not reason.strip():
        return None
    text = re.sub(r"[^a-z0-9]+", "_", reason.strip().lower()).strip("_")
    for known in DECLINE_REASONS:
        if text == known or text.startswith(f"{known}_"):
            return known
    return "other"


# -- search ----------------------------------------------------------------------------------------------------


def has_tags(session: Session, tags: Sequence[str]) -> ColumnElement[bool]:
    """Every one of ``tags`` is in the candidate's tag list.

    PostgreSQL: one JSON containment, ``tags::jsonb @> '["a", "b"]'``, which the GIN index of migration 0006
    answers. SQLite has no JSON index: a scan, with a substring test before an EXISTS over ``json_each``.
    """
    if session.get_bind().dialect.name == "postgresql":
        return cast(Candidate.tags, JSONB).contains(list(tags))
    conditions: list[ColumnElement[bool]] = []
    for tag in tags:
        # The stored JSON text holds the tag exactly as json.dumps writes it: a substring test first (cheap),
        # json_each to be exact (json_each on every row costs about 10x more).
        conditions.append(func.instr(Candidate.tags, json.dumps(tag)) > 0)
        each = func.json_each(Candidate.tags).table_valued("value")
        conditions.append(exists(select(literal(1)).select_from(each).where(each.c.value == tag)))
    return and_(*conditions)


class SearchQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")

    stages: tuple[Stage, ...] = ()
    tags_all: tuple[str, ...] = ()
    tags_any: tuple[str, ...] = ()
    intent: tuple[str, ...] = ()
    recontact_before: datetime | None = None
    recontact_after: datetime | None = None
    source: str | None = None
    limit: int = Field(default=100, ge=1, le=1000)
    cursor: str | None = None


def encode_cursor(candidate_id: int) -> str:
    return base64.urlsafe_b64encode(f"c{candidate_id}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> int:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        if not raw.startswith("c") or not raw[1:].isdigit() or not 0 <= int(raw[1:]) <= INT32_MAX:
            raise ValueError(cursor)
        return int(raw[1:])
    except ValueError:
        raise ValidationError("cursor", "not a cursor this API returned; pass next_cursor unchanged") from None


def search_query(session: Session, query: SearchQuery) -> Select[Candidate]:
    """The SELECT for a search, in id order from the cursor on (keyset paging: cost stays flat deep in the list)."""
    statement = select(Candidate).where(Candidate.erased_at.is_(None))
    if query.stages:
        statement = statement.where(Candidate.stage.in_([s.value for s in query.stages]))
    if query.tags_all:
        statement = statement.where(has_tags(session, query.tags_all))
    if query.tags_any:
        statement = statement.where(or_(*(has_tags(session, [tag]) for tag in query.tags_any)))
    if query.intent:
        levels = [level for level in query.intent if level != UNASSESSED]
        conditions: list[ColumnElement[bool]] = []
        if levels:
            conditions.append(Candidate.intent_level.in_(levels))
        if UNASSESSED in query.intent:
            conditions.append(Candidate.intent_level.is_(None))
        statement = statement.where(or_(*conditions))
    if query.recontact_before is not None:
        statement = statement.where(Candidate.recontact_at < query.recontact_before)
    if query.recontact_after is not None:
        statement = statement.where(Candidate.recontact_at >= query.recontact_after)
    if query.source is not None:
        statement = statement.where(Candidate.source == query.source)
    if query.cursor:
        statement = statement.where(Candidate.id > decode_cursor(query.cursor))
    return statement.order_by(Candidate.id).limit(query.limit + 1)


def search(session: Session, query: SearchQuery) -> tuple[list[Candidate], str | None]:
    """One page of candidates and the cursor of the next page (None on the last)."""
    found = list(session.scalars(search_query(session, query)))
    more = len(found) > query.limit
    page = found[: query.limit]
    return page, (encode_cursor(page[-1].id) if more and page else None)


def parse_levels(raw: Sequence[str], field: str = "intent") -> tuple[str, ...]:
    """``high,medium`` (comma-separated and/or repeated) → the levels, checked."""
    levels: list[str] = []
    for item in raw:
        for part in item.split(","):
            level = part.strip().lower()
            if not level:
                continue
            if level not in LEVEL_ORDER:
                raise ValidationError(field, f"unknown intent level; use {', '.join(LEVEL_ORDER)}")
            if level not in levels:
                levels.append(level)
    return tuple(levels)


__all__ = [
    "DECLINE_REASONS",
    "DEFAULT_DIMENSIONS",
    "LEVEL_ORDER",
    "TRANSITIONS",
    "UNASSESSED",
    "IntentLevel",
    "IntentSpec",
    "SearchQuery",
    "assess",
    "check_move",
    "check_tag_list",
    "decline_reason",
    "has_tags",
    "intent_problems",
    "level_for",
    "level_of",
    "load_intent",
    "move_stage",
    "recontact_date",
    "search",
]
