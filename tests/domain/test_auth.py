"""API keys: shown once, stored as a hash, revocable; roles parsed strictly. Dashboard sessions: random ids stored as
hashes, ended by logout, revocation, idleness or age."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from outreach.core.clock import utcnow
from outreach.core.errors import NotFoundError, ValidationError
from outreach.core.models import ApiKey, DashboardSession
from outreach.domain.auth import (
    KEY_PREFIX,
    Principal,
    Role,
    SessionLimits,
    authenticate,
    close_dashboard_session,
    create_key,
    dashboard_principal,
    hash_key,
    list_keys,
    open_dashboard_session,
    revoke_key,
)
from outreach.service.runtime import Runtime


def test_a_key_is_stored_only_as_its_hash(runtime: Runtime) -> None:
    with Session(runtime.engine, expire_on_commit=False) as session, session.begin():
        row, key = create_key(session, "hr", "recruiting-lead")
    assert key.startswith(KEY_PREFIX) and len(key) > 40
    with Session(runtime.engine) as session:
        stored = session.scalars(select(ApiKey)).one()
        columns = [getattr(stored, c.key) for c in ApiKey.__table__.columns]
    assert key not in [str(v) for v in columns]
    assert stored.key_hash == hash_key(key) and stored.prefix == key[:12]
    assert row.name == "recruiting-lead" and row.role == "hr"


def test_authenticate_finds_the_role_and_records_use_at_most_once_a_minute(runtime: Runtime) -> None:
    with Session(runtime.engine) as session, session.begin():
        _, key = create_key(session, Role.OPS)
    now = utcnow()
    with Session(runtime.engine) as session, session.begin():
        principal = authenticate(session, key, now)
    assert principal is not None and principal.role is Role.OPS and principal.label == "api:ops-key"
    with Session(runtime.engine) as session, session.begin():
        authenticate(session, key, now + timedelta(seconds=30))
        used = session.scalars(select(ApiKey.last_used_at)).one()
    assert used is not None and abs((used - now).total_seconds()) < 1


@pytest.mark.parametrize("presented", ["", "Bearer", "ork_", "ork_" + "A" * 43, "x" * 500, "ork_" + "x" * 300])
def test_unknown_or_malformed_keys_are_refused(runtime: Runtime, presented: str) -> None:
    with Session(runtime.engine) as session, session.begin():
        create_key(session, "hr")
        assert authenticate(session, presented) is None


def test_revoked_keys_stop_working_by_id_or_prefix(runtime: Runtime) -> None:
    with Session(runtime.engine, expire_on_commit=False) as session, session.begin():
        first, first_key = create_key(session, "hr")
        _, second_key = create_key(session, "ops")
    with Session(runtime.engine) as session, session.begin():
        revoke_key(session, str(first.id))
        revoke_key(session, second_key[:12])
        revoke_key(session, str(first.id))  # twice is harmless
    with Session(runtime.engine) as session, session.begin():
        assert authenticate(session, first_key) is None
        assert authenticate(session, second_key) is None
        assert all(k.revoked_at is not None for k in list_keys(session))
        with pytest.raises(NotFoundError):
            revoke_key(session, "999")


def test_roles_are_checked_and_names_bounded(runtime: Runtime) -> None:
    with Session(runtime.engine) as session, session.begin():
        with pytest.raises(ValidationError) as error:
            create_key(session, "admin")
        assert error.value.field == "role"
        with pytest.raises(ValidationError) as error:
            create_key(session, "hr", "n" * 129)
        assert error.value.field == "name"


LIMITS = SessionLimits(idle=timedelta(hours=12), lifetime=timedelta(days=7))


def _login(runtime: Runtime, role: str = "hr") -> tuple[str, Principal, str]:
    """A key, its principal and a session of it opened now."""
    with Session(runtime.engine) as session, session.begin():
        _, key = create_key(session, role)
        principal = authenticate(session, key)
        assert principal is not None
        return key, principal, open_dashboard_session(session, principal, LIMITS)


def _who(runtime: Runtime, token: str, at: timedelta = timedelta(0)) -> Principal | None:
    with Session(runtime.engine) as session, session.begin():
        return dashboard_principal(session, token, LIMITS, utcnow() + at)


def test_a_session_is_a_random_id_stored_as_its_hash(runtime: Runtime) -> None:
    key, principal, token = _login(runtime, "ops")
    _, _, second = _login(runtime, "ops")
    assert token != second and token != key and len(token) >= 43
    assert _who(runtime, token) == principal
    with Session(runtime.engine) as session:
        hashes = set(session.scalars(select(DashboardSession.session_hash)))
    assert hashes == {hash_key(token), hash_key(second)}
    # A key is not a session, nor is anything else that happens to be presented.
    for presented in (key, "", "x" * 500, token + "x"):
        assert _who(runtime, presented) is None


def test_a_session_ends_when_idle_or_old_and_seeing_it_keeps_it_alive(runtime: Runtime) -> None:
    _, principal, token = _login(runtime)
    assert _who(runtime, token, timedelta(hours=11, minutes=59)) == principal  # seen: idleness restarts here
    assert _who(runtime, token, timedelta(hours=23, minutes=58)) == principal
    assert _who(runtime, token, timedelta(hours=36)) is None  # 12 h after it was last seen
    _, principal, busy = _login(runtime)
    for hour in range(10, 7 * 24, 10):
        assert _who(runtime, busy, timedelta(hours=hour)) == principal, hour
    assert _who(runtime, busy, timedelta(days=7)) is None


def test_last_seen_is_written_at_most_once_a_minute(runtime: Runtime) -> None:
    _, _, token = _login(runtime)
    opened = utcnow()
    _who(runtime, token, timedelta(seconds=30))
    with Session(runtime.engine) as session:
        first = session.scalars(select(DashboardSession.last_seen_at)).one()
    assert abs((first - opened).total_seconds()) < 1  # 30 seconds later: not written
    _who(runtime, token, timedelta(minutes=2))
    with Session(runtime.engine) as session:
        later = session.scalars(select(DashboardSession.last_seen_at)).one()
    assert later - first >= timedelta(minutes=2) - timedelta(seconds=1)


def test_a_revoked_key_or_a_changed_role_ends_its_sessions(runtime: Runtime) -> None:
    _, principal, token = _login(runtime)
    # Checked on every request, even when the key was revoked behind revoke_key's back.
    with Session(runtime.engine) as session, session.begin():
        session.execute(update(ApiKey).where(ApiKey.id == principal.key_id).values(revoked_at=utcnow()))
    assert _who(runtime, token) is None
    _, principal, token = _login(runtime)
    with Session(runtime.engine) as session, session.begin():
        session.execute(update(ApiKey).where(ApiKey.id == principal.key_id).values(role="ops"))
    assert _who(runtime, token) is None
    _, principal, token = _login(runtime)
    with Session(runtime.engine) as session, session.begin():
        revoke_key(session, str(principal.key_id))
    with Session(runtime.engine) as session:
        assert session.scalars(select(DashboardSession).where(DashboardSession.key_id == principal.key_id)).all() == []


def test_closing_ends_one_session_and_opening_forgets_ended_ones(runtime: Runtime) -> None:
    _, principal, token = _login(runtime)
    with Session(runtime.engine) as session, session.begin():
        other = open_dashboard_session(session, principal, LIMITS)
        close_dashboard_session(session, token)
        close_dashboard_session(session, "")  # nothing to close: harmless
    assert _who(runtime, token) is None
    assert _who(runtime, other) == principal
    with Session(runtime.engine) as session, session.begin():
        open_dashboard_session(session, principal, LIMITS, utcnow() + timedelta(hours=13))
    with Session(runtime.engine) as session:
        assert hash_key(other) not in set(session.scalars(select(DashboardSession.session_hash)))
