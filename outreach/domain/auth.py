"""API keys and roles.

Two roles: ``hr`` reads and writes everything; ``ops`` reads metrics, message statuses, alerts and campaigns and
never sees personal data. A key is ``ork_`` plus 32 random bytes (URL-safe base64); only its SHA-256 is stored
(the key has 256 bits of entropy, so a fast hash is enough and a slow one would only cost every request). The key
itself is shown once, when it is created.

**Dashboard sessions.** Logging in to the dashboard with a key opens a session: a random id
(``secrets.token_urlsafe``, 256 bits) that goes into the browser's cookie, stored here by its SHA-256 only, with the
key it belongs to and its role. The key never leaves the login form. A session ends at logout (its row is deleted),
as soon as its key is revoked, after ``idle`` without a request, or ``lifetime`` after the login, whichever is first;
each is checked on every request, against the one clock.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum

from sqlalchemy import delete, or_, select, update
from sqlalchemy.orm import Session

from outreach.core.clock import utcnow
from outreach.core.errors import NotFoundError, ValidationError
from outreach.core.models import ApiKey, DashboardSession

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


@dataclass(frozen=True)
class SessionLimits:
    """How long a dashboard session lasts: ``idle`` without a request, ``lifetime`` after the login at most."""

    idle: timedelta
    lifetime: timedelta


def open_dashboard_session(
    session: Session, principal: Principal, limits: SessionLimits, now: datetime | None = None
) -> str:
    """A new session for ``principal``'s key; returns its id in clear (for the cookie; only its hash is stored).

    Sessions that have ended on their own are deleted on the way, so the table holds live ones only.
    """
    now = now or utcnow()
    session.execute(
        delete(DashboardSession).where(
            or_(DashboardSession.expires_at <= now, DashboardSession.last_seen_at <= now - limits.idle)
        )
    )
    token = secrets.token_urlsafe(32)
    session.add(
        DashboardSession(
            session_hash=hash_key(token),
            key_id=principal.key_id,
            role=principal.role.value,
            created_at=now,
            last_seen_at=now,
            expires_at=now + limits.lifetime,
        )
    )
    session.flush()
    return token


def dashboard_principal(
    session: Session, token: str, limits: SessionLimits, now: datetime | None = None
) -> Principal | None:
    """The principal of a live dashboard session, or None: unknown, ended, idle too long, or its key revoked.

    Only ids this function's sibling minted are found, so an API key (which cookies from before sessions held) is
    refused like any other unknown value.
    """
    if not token or len(token) > 200:
        return None
    found = session.execute(
        select(DashboardSession, ApiKey)
        .join(ApiKey, ApiKey.id == DashboardSession.key_id)
        .where(DashboardSession.session_hash == hash_key(token))
    ).first()
    if found is None:
        return None
    row, key = found
    now = now or utcnow()
    if key.revoked_at is not None or key.role != row.role:
        return None
    if now >= row.expires_at or now - row.last_seen_at >= limits.idle:
        return None
    if now - row.last_seen_at >= LAST_USED_RESOLUTION:
        session.execute(update(DashboardSession).where(DashboardSession.id == row.id).values(last_seen_at=now))
        session.execute(update(ApiKey).where(ApiKey.id == key.id).values(last_used_at=now))
    return Principal(key_id=key.id, name=key.name, role=Role(key.role))


def close_dashboard_session(session: Session, token: str) -> None:
    """Logout: the session's row goes, so its cookie is worth nothing even if it was copied."""
    if token:
        session.execute(delete(DashboardSession).where(DashboardSession.session_hash == hash_key(token)))


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
    # Its dashboard sessions would be refused anyway (the key is checked on every request); drop them.
    session.execute(delete(DashboardSession).where(DashboardSession.key_id == row.id))
    return row


def has_keys(session: Session) -> bool:
    return session.scalar(select(ApiKey.id).limit(1)) is not None
