"""Signed link tokens: links already in candidates' inboxes must keep working across releases."""

from __future__ import annotations

from outreach.core.config import Secret, Settings
from outreach.domain.tokens import sign, verify

SETTINGS = Settings(secret_key=Secret("k" * 32))
#: Minted by an earlier release with the key above; changing how tokens are made must keep this one valid.
MINTED = "ZW1haWw6NDI.qGcoM4zXMytybnl7YK90NA"


def test_a_token_from_an_earlier_release_still_verifies() -> None:
    assert sign(SETTINGS, "unsubscribe", "email:42") == MINTED
    assert verify(SETTINGS, "unsubscribe", MINTED) == "email:42"


def test_tokens_are_bound_to_their_purpose_and_key() -> None:
    assert verify(SETTINGS, "reply", MINTED) is None
    assert verify(Settings(secret_key=Secret("o" * 32)), "unsubscribe", MINTED) is None
    body, mac = MINTED.split(".")
    flipped = mac[:-2] + ("B" if mac[-2] == "A" else "A") + mac[-1]
    assert verify(SETTINGS, "unsubscribe", f"{body}.{flipped}") is None
    assert verify(SETTINGS, "unsubscribe", "no-dot") is None


def test_keys_do_not_leak_between_settings() -> None:
    """The keyed HMAC state is cached per key: two keys in one process sign differently."""
    other = Settings(secret_key=Secret("o" * 32))
    assert sign(other, "unsubscribe", "email:42") != MINTED
    assert sign(SETTINGS, "unsubscribe", "email:42") == MINTED
