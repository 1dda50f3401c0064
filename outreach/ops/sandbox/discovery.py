"""How the other commands of the same folder find a running sandbox: a small state file under the data folder.

``outreach up`` and ``outreach sandbox`` write ``.outreach/sandbox.json`` in the service's data folder (the SQLite
database's folder, or the current one for a server database) while their sandbox runs: its URL, the process, the
public URL of the service that receives its webhooks and, for ``up``, a fingerprint of the database that service
uses. ``outreach event``, ``tick``, ``scheduler``, ``worker`` and ``serve`` read it when no provider credentials are
set, and believe it only when the sandbox answers there and (for ``up``) the database is theirs: a file left by a
process that died is harmless, and a sandbox of another checkout is never used.

``outreach sandbox`` also keeps its SendGrid signing key there (``sandbox-signing-key.pem``, readable by its owner
only), so a restarted sandbox signs as before and an API that took the key once keeps accepting its events.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import urllib.request
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from outreach.core.db import normalise_url
from outreach.core.errors import ConfigurationError

__all__ = [
    "STATE_FOLDER",
    "RunningSandbox",
    "data_folder",
    "find_sandbox",
    "published",
    "read_state",
    "sandbox_public_key",
    "signing_key",
]

#: The folder, inside the data folder, that holds what the processes of one checkout share (ignored by git).
STATE_FOLDER = ".outreach"
_STATE_FILE = "sandbox.json"
_KEY_FILE = "sandbox-signing-key.pem"
#: How long a probe waits for the sandbox to answer: it runs on this machine, or it is not there.
PROBE_TIMEOUT = 2.0


@dataclass(frozen=True)
class RunningSandbox:
    """A sandbox as its state file records it."""

    #: Where both SDKs send (``http://127.0.0.1:8025``).
    url: str
    #: The process serving it.
    pid: int
    #: ``up`` or ``sandbox``: the command that started it.
    owner: str
    #: The public URL of the service that receives its webhooks (SendGrid events, Twilio status callbacks).
    public_url: str | None = None
    #: A fingerprint of the database of that service (``up`` only; a standalone sandbox has none of its own).
    database: str | None = None


def data_folder(database_url: str) -> Path:
    """The folder the service keeps its local data in: the SQLite database file's, otherwise the current one."""
    try:
        url = make_url(database_url)
    except ArgumentError:
        return Path.cwd()
    if url.get_backend_name() == "sqlite" and url.database and url.database != ":memory:":
        return Path(url.database).resolve().parent
    return Path.cwd()


def database_fingerprint(database_url: str) -> str:
    """Which database a process uses, without writing its URL (it may hold a password) anywhere."""
    try:
        normal = normalise_url(database_url)
    except ArgumentError:
        normal = database_url
    if normal.startswith("sqlite:///") and normal not in {"sqlite://", "sqlite:///:memory:"}:
        normal = "sqlite:///" + str(Path(normal.removeprefix("sqlite:///")).resolve())
    return hashlib.sha256(normal.encode()).hexdigest()[:16]


def _state_path(folder: Path) -> Path:
    return folder / STATE_FOLDER / _STATE_FILE


def read_state(folder: Path) -> RunningSandbox | None:
    """What the state file in ``folder`` says, or None when there is none (or it is unreadable)."""
    try:
        raw = json.loads(_state_path(folder).read_text(encoding="utf-8"))
        return RunningSandbox(
            url=str(raw["url"]),
            pid=int(raw["pid"]),
            owner=str(raw["owner"]),
            public_url=raw.get("public_url"),
            database=raw.get("database"),
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


@contextlib.contextmanager
def published(folder: Path, sandbox: RunningSandbox, *, replace_running: bool = False) -> Iterator[Path | None]:
    """Write the state file for the duration of the block (its path), then remove it unless another process has
    replaced it meanwhile. A process killed outright leaves it behind; readers check that the sandbox answers.

    A sandbox already recorded there and answering is kept (the block gets None) unless ``replace_running``:
    ``outreach up`` takes the file over, since only its own sandbox posts events its API can verify.
    """
    path = _state_path(folder)
    current = read_state(folder)
    if not replace_running and current is not None and current.pid != sandbox.pid and answers(current.url):
        yield None
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{_STATE_FILE}.{os.getpid()}")
    partial.write_text(json.dumps(asdict(sandbox), indent=2) + "\n", encoding="utf-8")
    partial.replace(path)
    try:
        yield path
    finally:
        current = read_state(folder)
        if current is not None and current.pid == sandbox.pid:
            with contextlib.suppress(OSError):
                path.unlink()


def _get(url: str, timeout: float) -> bytes:
    # The sandbox is local (or named explicitly): never ask a proxy for it.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=timeout) as answer:
        body: bytes = answer.read()
        return body


def answers(url: str, timeout: float = PROBE_TIMEOUT) -> bool:
    """Whether a sandbox answers at ``url``."""
    try:
        _get(f"{url.rstrip('/')}/_sandbox/stats", timeout)
    except (OSError, ValueError):
        return False
    return True


def sandbox_public_key(url: str, timeout: float = PROBE_TIMEOUT) -> str:
    """The key the sandbox at ``url`` signs its SendGrid events with (``OUTREACH_SENDGRID_WEBHOOK_PUBLIC_KEY``'s
    form); :class:`ConfigurationError` when it does not answer."""
    try:
        key = json.loads(_get(f"{url.rstrip('/')}/_sandbox/sendgrid-public-key", timeout))["public_key"]
    except (OSError, ValueError, KeyError, TypeError):
        raise ConfigurationError(f"the sandbox at {url} does not answer") from None
    return str(key)


def find_sandbox(database_url: str) -> RunningSandbox:
    """The sandbox running for this data folder (and, under ``up``, this database), answering at its URL.

    Raises :class:`ConfigurationError` saying why there is none, in words fit for one line.
    """
    folder = data_folder(database_url)
    found = read_state(folder)
    if found is None:
        raise ConfigurationError(f"no `outreach up` or `outreach sandbox` is running for {folder}")
    if found.database is not None and found.database != database_fingerprint(database_url):
        raise ConfigurationError(
            f"the `outreach up` running for {folder} uses another database (its OUTREACH_DATABASE_URL differs)"
        )
    if not answers(found.url):
        raise ConfigurationError(
            f"the sandbox that `outreach {found.owner}` recorded in {_state_path(folder)} does not answer at"
            f" {found.url} (it has stopped)"
        )
    return found


def signing_key(folder: Path) -> ec.EllipticCurvePrivateKey:
    """The standalone sandbox's SendGrid signing key for this data folder, made on first use (owner-only file)."""
    path = folder / STATE_FOLDER / _KEY_FILE
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP256R1):
            return key
    except (OSError, ValueError, TypeError):
        pass
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{_KEY_FILE}.{os.getpid()}")
    with contextlib.suppress(FileNotFoundError):
        partial.unlink()
    descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(pem)
    partial.replace(path)
    return key
