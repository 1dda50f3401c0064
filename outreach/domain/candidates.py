"""Candidates and jobs coming in from the ATS, HR, the API or a CSV file: validated, then upserted.

Validation uses the field's own libraries (email-validator, phonenumbers, zoneinfo) and every error names the
field; values are never echoed back in messages, because they are personal data.
"""

from __future__ import annotations

import functools
import re
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import phonenumbers
from email_validator import EmailNotValidError, validate_email
from pydantic import ConfigDict, Field, ValidationInfo, field_validator
from sqlalchemy import select
from sqlalchemy.orm import Session

from outreach.core.clock import utcnow
from outreach.core.config import Settings, get_settings
from outreach.core.errors import ValidationError
from outreach.core.inputs import InputModel, Int32, validate
from outreach.core.models import Candidate, Job
from outreach.core.sql import insert_ignore

_TAG = re.compile(r"^[a-z0-9_]+(:[^\s:,][^\s,]{0,63})?$")


def _settings(info: ValidationInfo) -> Settings:
    context = info.context or {}
    settings = context.get("settings")
    return settings if isinstance(settings, Settings) else get_settings()


def normalise_email(value: str) -> str:
    try:
        return validate_email(value.strip(), check_deliverability=False).normalized
    except EmailNotValidError:
        raise ValueError("not a valid email address") from None


def normalise_phone(value: str, default_region: str) -> str:
    """E.164, using the company's default region for numbers written without a country code."""
    try:
        number = phonenumbers.parse(value, default_region if not value.strip().startswith("+") else None)
    except phonenumbers.NumberParseException:
        raise ValueError("not a phone number; use E.164, e.g. +8613800138000") from None
    if not phonenumbers.is_valid_number(number):
        raise ValueError("not a valid phone number for its country; use E.164, e.g. +8613800138000")
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


def check_timezone(value: str) -> str:
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError("unknown IANA timezone, e.g. Asia/Shanghai or Europe/Berlin") from None
    return value


def check_locale(value: str, supported: tuple[str, ...]) -> str:
    """Accept a supported locale or a regional variant of one (en-GB for en); templates fall back by language."""
    languages = {loc.split("-")[0].lower() for loc in supported}
    match = re.fullmatch(r"([a-zA-Z]{2,3})(?:[-_]([A-Za-z]{2,4}))?", value.strip())
    if not match or match.group(1).lower() not in languages:
        raise ValueError(f"unsupported locale; supported: {', '.join(supported)}")
    language, region = match.group(1).lower(), match.group(2)
    for loc in supported:
        if loc.lower() == value.strip().lower().replace("_", "-"):
            return loc
    return f"{language}-{region.upper() if len(region) == 2 else region.title()}" if region else language


def check_tags(values: list[str]) -> list[str]:
    cleaned: list[str] = []
    for index, raw in enumerate(values):
        tag = raw.strip()
        key, sep, rest = tag.partition(":")
        tag = key.lower() + sep + rest
        if not _TAG.match(tag):
            raise ValueError(f"tag {index} must look like `key` or `key:value` (e.g. stack:java)")
        if tag not in cleaned:
            cleaned.append(tag)
    return cleaned


class CandidateIn(InputModel):
    """A candidate as the ATS sends it. Unknown fields are refused so typos do not vanish silently."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    external_id: str = Field(min_length=1, max_length=128)
    name: str = Field(default="", max_length=200)
    email: str | None = Field(default=None, max_length=320)
    phone: str | None = Field(default=None, max_length=64)
    locale: str | None = Field(default=None, max_length=16)
    timezone: str | None = Field(default=None, max_length=64)
    source: str | None = Field(default=None, max_length=64)
    tags: list[str] = Field(default_factory=list, max_length=100)
    nurture_consent: bool | None = None
    data: dict[str, Any] | None = None

    @field_validator("email")
    @classmethod
    def _email(cls, value: str | None) -> str | None:
        return normalise_email(value) if value else None

    @field_validator("phone")
    @classmethod
    def _phone(cls, value: str | None, info: ValidationInfo) -> str | None:
        return normalise_phone(value, _settings(info).default_phone_region) if value else None

    @field_validator("timezone")
    @classmethod
    def _timezone(cls, value: str | None) -> str | None:
        return check_timezone(value) if value else None

    @field_validator("locale")
    @classmethod
    def _locale(cls, value: str | None, info: ValidationInfo) -> str | None:
        return check_locale(value, _settings(info).locales) if value else None

    @field_validator("tags")
    @classmethod
    def _tags(cls, value: list[str]) -> list[str]:
        return check_tags(value)


class JobIn(InputModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    external_id: str = Field(min_length=1, max_length=128)
    title: str = Field(min_length=1, max_length=200)
    department: str | None = Field(default=None, max_length=200)
    location: str | None = Field(default=None, max_length=200)
    description: str = Field(default="", max_length=20000)
    salary_min: Int32 | None = Field(default=None, ge=0)
    salary_max: Int32 | None = Field(default=None, ge=0)
    booking_url: str | None = Field(default=None, max_length=500, pattern=r"^https?://\S+$")
    tags: list[str] = Field(default_factory=list, max_length=100)

    @field_validator("tags")
    @classmethod
    def _tags(cls, value: list[str]) -> list[str]:
        return check_tags(value)

    @field_validator("salary_max")
    @classmethod
    def _range(cls, value: int | None, info: ValidationInfo) -> int | None:
        low = info.data.get("salary_min")
        if value is not None and low is not None and value < low:
            raise ValueError("must not be below salary_min")
        return value


def parse_candidate(payload: dict[str, Any], settings: Settings | None = None) -> CandidateIn:
    """Validate a raw mapping, raising :class:`ValidationError` that names every bad field (the first as
    ``field``)."""
    return validate(CandidateIn, payload, {"settings": settings or get_settings()})


def upsert_candidate(session: Session, data: CandidateIn, settings: Settings | None = None) -> Candidate:
    """Insert or update by ``external_id``; fields left out keep their stored value."""
    return save_candidate(session, data, settings)[0]


def save_candidate(session: Session, data: CandidateIn, settings: Settings | None = None) -> tuple[Candidate, bool]:
    """:func:`upsert_candidate`, and whether this call created the row.

    One ``INSERT … ON CONFLICT DO NOTHING`` decides, so callers racing with the same new ``external_id`` create it
    exactly once: on PostgreSQL the others wait for the first one's commit, then find its row (locked, so their
    updates apply one after another) and update it. Reading first and inserting after let every racer insert.
    """
    settings = settings or get_settings()
    now = utcnow()
    created = insert_ignore(
        session,
        Candidate,
        {
            "external_id": data.external_id,
            "name": data.name,
            "email": data.email,
            "phone": data.phone,
            "locale": data.locale or settings.default_locale,
            "timezone": data.timezone,
            "source": data.source,
            "tags": list(data.tags),
            "nurture_consent": bool(data.nurture_consent),
            "data": dict(data.data or {}),
            "created_at": now,
            "updated_at": now,
        },
    )
    candidate = session.scalars(
        select(Candidate).where(Candidate.external_id == data.external_id).with_for_update()
    ).one()
    if not created:
        given = data.model_dump(exclude_unset=True)
        for name in ("name", "email", "phone", "locale", "timezone", "source", "nurture_consent"):
            if name in given and given[name] is not None:
                setattr(candidate, name, given[name])
        if "tags" in given:
            candidate.tags = list(data.tags)
        if data.data:
            candidate.data = {**candidate.data, **data.data}
        candidate.updated_at = now
        session.flush()
    return candidate, created


def upsert_job(session: Session, data: JobIn) -> Job:
    """Insert or replace by ``external_id``."""
    return save_job(session, data)[0]


def save_job(session: Session, data: JobIn) -> tuple[Job, bool]:
    """:func:`upsert_job`, and whether this call created the row (atomically, as :func:`save_candidate`)."""
    values = data.model_dump()
    now = utcnow()
    created = insert_ignore(session, Job, {**values, "created_at": now, "updated_at": now})
    job = session.scalars(select(Job).where(Job.external_id == data.external_id).with_for_update()).one()
    if not created:
        for name, value in values.items():
            setattr(job, name, value)
        job.updated_at = now
        session.flush()
    return job, created


def add_tags(candidate: Candidate, *tags: str) -> None:
    """Add tags, replacing any tag with the same key for single-valued keys such as decline_reason."""
    current = list(candidate.tags)
    for tag in check_tags(list(tags)):
        key = tag.partition(":")[0]
        if key in SINGLE_VALUED_TAG_KEYS:
            current = [t for t in current if t.partition(":")[0] != key]
        if tag not in current:
            current.append(tag)
    candidate.tags = current


SINGLE_VALUED_TAG_KEYS = {"decline_reason", "status"}


def candidate_timezone(candidate: Candidate, settings: Settings) -> ZoneInfo:
    """The candidate's own timezone, else one inferred from the phone's country, else the company's."""
    return zone_for(candidate.timezone, candidate.phone, settings.company_timezone)


def zone_for(timezone: str | None, phone: str | None, company_timezone: str) -> ZoneInfo:
    """:func:`candidate_timezone` from the facts alone (the bulk paths hold rows, not candidates); worked out
    once per (timezone or phone, company timezone) per process."""
    return _zone_for(timezone or None, None if timezone else (phone or None), company_timezone)


@functools.lru_cache(maxsize=4096)
def _zone_for(timezone: str | None, phone: str | None, company_timezone: str) -> ZoneInfo:
    if timezone:
        return ZoneInfo(timezone)
    if phone:
        try:
            from phonenumbers import timezone as phone_timezones

            zones = phone_timezones.time_zones_for_number(phonenumbers.parse(phone))
            if zones and zones[0] != "Etc/Unknown":
                return ZoneInfo(zones[0])
        except (phonenumbers.NumberParseException, ZoneInfoNotFoundError):
            pass
    return ZoneInfo(company_timezone)


def slug(text: str, limit: int = 48) -> str:
    """A tag-safe value from free text (the decline reason becomes ``decline_reason:<slug>``)."""
    cleaned = re.sub(r"[\s,:]+", "_", text.strip().lower())
    cleaned = re.sub(r"[^\w\-.]", "", cleaned)
    return cleaned[:limit].strip("_") or "unspecified"


def as_utc(value: datetime) -> datetime:
    from datetime import UTC

    if value.tzinfo is None:
        raise ValidationError("occurred_at", "needs a timezone offset, e.g. 2026-11-25T10:00:00+08:00")
    return value.astimezone(UTC)
