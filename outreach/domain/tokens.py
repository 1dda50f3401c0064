"""HMAC-signed tokens we put in links (unsubscribe, reply routing). Opaque ids inside, never personal data."""

from __future__ import annotations

import base64
import hashlib
import hmac
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


def unsubscribe_url(settings: Settings, channel: str, candidate_id: int) -> str:
    token = sign(settings, "unsubscribe", f"{channel}:{candidate_id}")
    return f"{settings.public_url}/unsubscribe/{token}"


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
