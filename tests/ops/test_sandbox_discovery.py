"""How the commands of one data folder find the sandbox that ``outreach up`` or ``outreach sandbox`` runs there."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from outreach.core.errors import ConfigurationError
from outreach.ops.sandbox import SandboxServer
from outreach.ops.sandbox.discovery import (
    STATE_FOLDER,
    RunningSandbox,
    data_folder,
    database_fingerprint,
    find_sandbox,
    published,
    read_state,
    sandbox_public_key,
    signing_key,
)


def test_the_data_folder_is_the_sqlite_files_or_the_current_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert data_folder(f"sqlite:///{tmp_path / 'x' / 'outreach.db'}") == tmp_path / "x"
    monkeypatch.chdir(tmp_path)
    assert data_folder("sqlite:///outreach.core.db") == tmp_path
    assert data_folder("sqlite://") == tmp_path
    assert data_folder("postgresql://outreach@db/outreach") == tmp_path
    assert data_folder("not a url") == tmp_path


def test_the_fingerprint_names_the_database_without_its_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    relative, absolute = "sqlite:///outreach.core.db", f"sqlite:///{tmp_path / 'outreach.core.db'}"
    assert database_fingerprint(relative) == database_fingerprint(absolute)
    secret = "postgresql://outreach:s3cret@db/outreach"
    assert database_fingerprint(secret) == database_fingerprint("postgresql+psycopg://outreach:s3cret@db/outreach")
    assert database_fingerprint(secret) != database_fingerprint("postgresql://outreach:s3cret@db/other")
    assert "s3cret" not in database_fingerprint(secret)


def test_a_running_sandbox_is_found_and_forgotten_when_it_stops(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'outreach.db'}"
    with pytest.raises(ConfigurationError, match=f"no `outreach up` or `outreach sandbox` is running for {tmp_path}"):
        find_sandbox(url)
    with SandboxServer() as sandbox:
        record = RunningSandbox(sandbox.url, os.getpid(), "up", "http://127.0.0.1:8123", database_fingerprint(url))
        with published(tmp_path, record) as path:
            assert path == tmp_path / STATE_FOLDER / "sandbox.json"
            assert read_state(tmp_path) == record
            assert find_sandbox(url) == record
            assert sandbox_public_key(sandbox.url) == sandbox.sendgrid_public_key
            # Another database in the same folder is not this `up`'s business.
            with pytest.raises(ConfigurationError, match="uses another database"):
                find_sandbox(f"sqlite:///{tmp_path / 'other.db'}")
        assert read_state(tmp_path) is None  # removed when the block ends
        with published(tmp_path, record):
            pass
        # A record left behind by a process that died (written again by hand) is not believed.
        (tmp_path / STATE_FOLDER / "sandbox.json").write_text(
            f'{{"url": "{sandbox.url}", "pid": 1, "owner": "sandbox"}}', encoding="utf-8"
        )
    with pytest.raises(ConfigurationError, match="does not answer"):
        find_sandbox(url)


def test_a_running_sandbox_keeps_its_record_unless_up_takes_it_over(tmp_path: Path) -> None:
    with SandboxServer() as first, SandboxServer() as second:
        mine = RunningSandbox(first.url, 1, "sandbox", "http://127.0.0.1:8000")
        theirs = RunningSandbox(second.url, 2, "sandbox", "http://127.0.0.1:8000")
        with published(tmp_path, mine):
            with published(tmp_path, theirs) as path:
                assert path is None
                assert read_state(tmp_path) == mine
            up = RunningSandbox(second.url, 3, "up", "http://127.0.0.1:8000")
            with published(tmp_path, up, replace_running=True):
                assert read_state(tmp_path) == up
            assert read_state(tmp_path) is None
        # The first one's end leaves a record that is not its own alone.
        with published(tmp_path, mine):
            (tmp_path / STATE_FOLDER / "sandbox.json").write_text(
                f'{{"url": "{second.url}", "pid": 2, "owner": "sandbox"}}', encoding="utf-8"
            )
        assert read_state(tmp_path) == RunningSandbox(second.url, 2, "sandbox")


def test_unreadable_records_are_no_records(tmp_path: Path) -> None:
    (tmp_path / STATE_FOLDER).mkdir()
    for text in ("", "{", "[]", '{"url": "x"}', '{"url": "x", "pid": "one", "owner": "up"}'):
        (tmp_path / STATE_FOLDER / "sandbox.json").write_text(text, encoding="utf-8")
        assert read_state(tmp_path) is None, text


def test_the_signing_key_is_kept_for_the_owner_alone(tmp_path: Path) -> None:
    key = signing_key(tmp_path)
    path = tmp_path / STATE_FOLDER / "sandbox-signing-key.pem"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert signing_key(tmp_path).private_numbers() == key.private_numbers()
    # A restarted sandbox signs with the same key, so an API that took its public key once keeps verifying.
    with SandboxServer(signing_key=key) as one, SandboxServer(signing_key=signing_key(tmp_path)) as two:
        assert one.sendgrid_public_key == two.sendgrid_public_key
    path.write_text("not a key", encoding="utf-8")
    assert signing_key(tmp_path).private_numbers() != key.private_numbers()
