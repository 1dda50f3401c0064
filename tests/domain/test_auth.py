"""API keys: shown once, stored as a hash, revocable; roles parsed strictly."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from outreach.core.clock import utcnow
from outreach.core.errors import NotFoundError, ValidationError
from outreach.core.models import ApiKey
from outreach.domain.auth import KEY_PREFIX, Role, authenticate, create_key, hash_key, list_keys, revoke_key
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
