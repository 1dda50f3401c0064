"""HMAC-signed tokens we put in links (unsubscribe, reply routing). Opaque ids inside, never personal data."""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from datetime import UTC, datetime, timedelta
from functools import lru_cache

from outreach.core.config import Settings


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@lru_cache(maxsize=8)
def _keyed(key: bytes) -> hmac.HMAC:
    """The HMAC state after the key, kept per key (a nurture batch signs a link per recipient)."""
    return hmac.new(key, digestmod=hashlib.sha256)


def _mac(settings: Settings, purpose: str, payload: str) -> bytes:
    mac = _keyed(settings.signing_key).copy()
    mac.update(f"{purpose}\n{payload}".encode())
    return mac.digest()[:16]


def sign(settings: Settings, purpose: str, payload: str) -> str:
    return f"{_b64(payload.encode())}.{_b64(_mac(settings, purpose, payload))}"


def verify(settings: Settings, purpose: str, token: str) -> str | None:
    """The payload if ``token`` was minted by us for ``purpose``; None for anything forged or malformed."""
    try:
        body, mac = token.split(".", 1)
        payload = _unb64(body).decode()
        given = _unb64(mac)
    except (ValueError, UnicodeDecodeError):
        return None
    # Only the canonical spelling: base64's unused trailing bits would otherwise give one MAC several spellings.
    if _b64(given) != mac or _b64(payload.encode()) != body:
        return None
    return payload if hmac.compare_digest(given, _mac(settings, purpose, payload)) else None


#: How long an unsubscribe link works after the message carrying it was rendered. Generous on purpose: RFC 8058
#: links must keep working while the mail is likely to be read (and laws ask for at least 30 days); a nurture mail
#: goes out at most every 60 days, so a candidate always holds a working link.
UNSUBSCRIBE_VALIDITY = timedelta(days=180)

_OUTBOX_ID = re.compile(r"[0-9a-f]{32}")
_SECONDS = re.compile(r"[0-9]{1,11}")  # until the year 5138: within what datetime takes


def unsubscribe_url(settings: Settings, outbox_id: str, issued_at: datetime) -> str:
    """The one-click unsubscribe link of the message stored as ``outbox_id`` (a random id: the link names no
    candidate and no address), rendered at ``issued_at``; it works for :data:`UNSUBSCRIBE_VALIDITY`."""
    token = sign(settings, "unsubscribe", f"{outbox_id}:{int(issued_at.timestamp())}")
    return f"{settings.public_url}/unsubscribe/{token}"


def unsubscribe_message_id(settings: Settings, token: str, now: datetime) -> str | None:
    """The outbox id an unsubscribe token names, if we minted it less than :data:`UNSUBSCRIBE_VALIDITY` before
    ``now``; None for anything forged, damaged or expired, and for the old tokens that named a candidate."""
    payload = verify(settings, "unsubscribe", token)
    if payload is None:
        return None
    outbox_id, _, issued = payload.partition(":")
    if not _OUTBOX_ID.fullmatch(outbox_id) or not _SECONDS.fullmatch(issued):
        return None
    if datetime.fromtimestamp(int(issued), UTC) < now - UNSUBSCRIBE_VALIDITY:
        return None
    return outbox_id


def reply_address(settings: Settings, outbox_id: str) -> str | None:
    """``replies+<signed outbox id>@domain`` from ``OUTREACH_EMAIL_REPLY_TO``, so a reply finds its message even
    when it comes from another address; None when no reply-to address is configured."""
    base = settings.email_reply_to
    if not base or "@" not in base:
        return None
    name, _, address = base.rpartition("<")
    address = address.rstrip(">").strip() if name or "<" in base else base.strip()
    local, _, domain = address.partition("@")
    return f"{local}+{sign(settings, 'reply', outbox_id)}@{domain}"


def outbox_id_from_reply_address(settings: Settings, address: str) -> str | None:
    """The outbox id in a reply address we minted, or None (forged, damaged or not ours)."""
    local = address.strip().strip("<>").partition("@")[0]
    _, plus, token = local.partition("+")
    return verify(settings, "reply", token) if plus else None
