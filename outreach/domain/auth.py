"""API keys and roles.

Two roles: ``hr`` reads and writes everything; ``ops`` reads metrics, message statuses, alerts and campaigns and
never sees personal data. A key is ``ork_`` plus 32 random bytes (URL-safe base64); only its SHA-256 is stored
(the key has 256 bits of entropy, so a fast hash is enough and a slow one would only cost every request). The key
itself is shown once, when it is created.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from outreach.core.clock import utcnow
from outreach.core.errors import NotFoundError, ValidationError
from outreach.core.models import ApiKey

KEY_PREFIX = "ork_"
#: How much of a key listings show, so people can tell keys apart without seeing them.
SHOWN_CHARS = 12
#: ``last_used_at`` is written at most this often per key, so reads do not turn into writes.
LAST_USED_RESOLUTION = timedelta(minutes=1)


class Role(StrEnum):
    HR = "hr"
    OPS = "ops"


@dataclass(frozen=True)
class Principal:
    """Who is calling: the key's id, name and role (never the key)."""

    key_id: int
    name: str
    role: Role

    @property
    def label(self) -> str:
        """How records name the person behind a change (``assessed_by``, ``changed_by``)."""
        return f"api:{self.name}"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def parse_role(value: str) -> Role:
    try:
        return Role(value.strip().lower())
    except ValueError:
        known = ", ".join(r.value for r in Role)
        raise ValidationError("role", f"unknown role {value!r}; use one of: {known}") from None


def create_key(session: Session, role: Role | str, name: str | None = None) -> tuple[ApiKey, str]:
    """Store a new key's hash and return the row with the key in clear (the only time it exists)."""
    role = parse_role(role) if isinstance(role, str) else role
    label = (name or "").strip() or f"{role.value}-key"
    if len(label) > 128:
        raise ValidationError("name", "a key's name is at most 128 characters")
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    row = ApiKey(name=label, role=role.value, prefix=key[:SHOWN_CHARS], key_hash=hash_key(key))
    session.add(row)
    session.flush()
    return row, key


def authenticate(session: Session, key: str, now: datetime | None = None) -> Principal | None:
    """The principal for a presented key, or None when it is unknown or revoked."""
    if not key.startswith(KEY_PREFIX) or len(key) > 200:
        return None
    digest = hash_key(key)
    row = session.scalar(select(ApiKey).where(ApiKey.key_hash == digest))
    if row is None or row.revoked_at is not None or not hmac.compare_digest(row.key_hash, digest):
        return None
    now = now or utcnow()
    if row.last_used_at is None or now - row.last_used_at >= LAST_USED_RESOLUTION:
        session.execute(update(ApiKey).where(ApiKey.id == row.id).values(last_used_at=now))
    return Principal(key_id=row.id, name=row.name, role=Role(row.role))


def list_keys(session: Session) -> list[ApiKey]:
    return list(session.scalars(select(ApiKey).order_by(ApiKey.id)))


def revoke_key(session: Session, ident: str) -> ApiKey:
    """Revoke by numeric id or by the shown prefix; revoking twice is harmless."""
    ident = ident.strip()
    query = (
        select(ApiKey).where(ApiKey.id == int(ident))
        if ident.isdigit()
        else select(ApiKey).where(ApiKey.prefix == ident)
    )
    rows = list(session.scalars(query))
    if not rows:
        raise NotFoundError(f"no API key {ident!r}")
    if len(rows) > 1:
        raise ValidationError("key", f"{ident!r} matches {len(rows)} keys; give the numeric id")
    row = rows[0]
    if row.revoked_at is None:
        row.revoked_at = utcnow()
    return row


def has_keys(session: Session) -> bool:
    return session.scalar(select(ApiKey.id).limit(1)) is not None
