"""Consent rules: suppressed addresses, withdrawn nurture consent, exited enrollments, missing addresses."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable
from functools import lru_cache

from sqlalchemy import select
from sqlalchemy.orm import Session

from outreach.core.config import get_settings
from outreach.core.models import Candidate, Enrollment, EnrollmentStatus, Suppression, SuppressionScope
from outreach.domain.campaigns import Category
from outreach.policy.base import Decision, Subject


def suppression_address(channel: str, address: str) -> str:
    """How an address is keyed in ``suppressions``: emails lowercased (providers report them so), phones E.164."""
    return address.strip().lower() if channel == "email" else address.strip()


_NURTURE = Category.NURTURE.value
_EXITED = EnrollmentStatus.EXITED.value
_NURTURE_SCOPE = SuppressionScope.NURTURE.value

#: The reason a nurture message carries when its candidate withdrew nurture consent.
NO_CONSENT_REASON = "no consent to nurture messages"


def scope_applies(scope: str, category: str) -> bool:
    """Whether a suppression of ``scope`` stops a message of ``category`` on its channel: a ``nurture`` one stops
    nurture messages only, every other scope (all email, all SMS, a provider block) stops everything."""
    return scope != _NURTURE_SCOPE or category == _NURTURE


def applying(suppressions: Iterable[tuple[str, str] | None], category: str) -> tuple[str, str] | None:
    """Of an address's suppressions (``(scope, reason)``; None: none under that key), the one that stops a message
    of ``category``: a channel-wide one before a nurture one; None when none does."""
    found = None
    for suppression in suppressions:
        if suppression is not None and scope_applies(suppression[0], category):
            if suppression[0] != _NURTURE_SCOPE:
                return suppression
            found = found or suppression
    return found


def suppressed_reason(scope: str, reason: str) -> str:
    """The reason a message stopped by a suppression of ``scope`` (recorded for ``reason``) carries."""
    if scope == _NURTURE_SCOPE:
        return f"address suppressed for nurture: {reason}"
    return f"address suppressed: {reason}"


#: Suppressions kept after an erasure are stored under a keyed hash of the address, with this prefix.
HASH_PREFIX = "hmac:"


def address_hash(key: bytes, channel: str, address: str) -> str:
    """The keyed hash an erased address stays suppressed under (stable for one secret key, useless without it)."""
    return _hashed(_keyed(key), channel, suppression_address(channel, address))


@lru_cache(maxsize=8)
def _keyed(key: bytes) -> hmac.HMAC:
    """The HMAC state after the key, kept per key: each address then only copies it (the key schedule once)."""
    return hmac.new(key, digestmod=hashlib.sha256)


def _hashed(keyed: hmac.HMAC, channel: str, normalised: str) -> str:
    mac = keyed.copy()
    mac.update(f"suppression\n{channel}\n{normalised}".encode())
    return HASH_PREFIX + mac.hexdigest()


class SuppressionRule:
    """An address that opted out, bounced hard or complained is never written to again on that channel; one that
    only unsubscribed from nurture gets no more nurture messages (:func:`scope_applies`).

    The address is looked up in clear and under its keyed hash, so an opt-out outlives the candidate's erasure.
    """

    name = "suppression"

    def __init__(self, key: bytes | None = None) -> None:
        self._key = key

    def lookup_keys(self, channel: str, address: str) -> tuple[str, str]:
        """The keys an address is suppressed under: in clear, and hashed (as erasure leaves it)."""
        key = self._key if self._key is not None else get_settings().signing_key
        plain = suppression_address(channel, address)
        return plain, _hashed(_keyed(key), channel, plain)

    def check(self, session: Session, subject: Subject) -> Decision:
        if not subject.address:
            return self.decide(subject, None)
        found = session.execute(
            select(Suppression.scope, Suppression.reason).where(
                Suppression.channel == subject.channel,
                Suppression.address.in_(self.lookup_keys(subject.channel, subject.address)),
            )
        ).all()
        return self.decide(subject, applying(((s, r) for s, r in found), subject.category))

    def decide(self, subject: Subject, suppression: tuple[str, str] | None) -> Decision:
        """The decision once the address's suppression that applies to the subject's category is known, as
        ``(scope, reason)`` (None: none applies); the bulk reader (:class:`outreach.policy.bulk.PolicyReads`) asks
        this too, with its own reads."""
        if not subject.address:
            return Decision.suppress(
                "address", f"candidate has no {'email' if subject.channel == 'email' else 'phone'}"
            )
        if suppression is not None:
            return Decision.suppress(self.name, suppressed_reason(*suppression))
        return Decision.allow()


class NurtureConsentRule:
    """Nurture goes only to candidates who agreed to hear from us (and did not take it back since)."""

    name = "consent"

    def check(self, session: Session, subject: Subject) -> Decision:
        if subject.category != _NURTURE:
            return Decision.allow()
        consent = subject.nurture_consent
        if consent is None:
            consent = session.scalar(select(Candidate.nurture_consent).where(Candidate.id == subject.candidate_id))
        return self.decide(subject, bool(consent))

    def decide(self, subject: Subject, consent: bool) -> Decision:
        """The decision once the candidate's current consent is known."""
        if subject.category != _NURTURE or consent:
            return Decision.allow()
        return Decision.suppress(self.name, NO_CONSENT_REASON)


class EnrollmentActiveRule:
    """A message whose enrollment has exited (stage changed, replied) is not sent."""

    name = "exit"

    def __init__(self, enrollment_id: int | None) -> None:
        self.enrollment_id = enrollment_id

    def check(self, session: Session, subject: Subject) -> Decision:
        if self.enrollment_id is None:
            return Decision.allow()
        row = subject.enrollment_state
        if row is None:
            found = session.execute(
                select(Enrollment.status, Enrollment.exit_reason).where(Enrollment.id == self.enrollment_id)
            ).first()
            row = None if found is None else (found[0], found[1])
        return self.decide(row)

    @classmethod
    def decide(cls, state: tuple[str, str | None] | None) -> Decision:
        """The decision for an enrollment in ``state`` ((status, exit_reason); None: no enrollment)."""
        if state is not None and state[0] == _EXITED:
            return Decision.suppress(cls.name, f"enrollment exited: {state[1]}")
        return Decision.allow()


#: The opt-out line every nurture SMS ends with, by language (zh-CN carriers expect 回T退订).
OPT_OUT_HINTS = {"zh": "回T退订", "en": "Reply STOP to opt out"}


def with_opt_out_hint(body: str, locale: str) -> str:
    """``body`` ending with the opt-out hint for its language (added once, never twice)."""
    hint = OPT_OUT_HINTS.get(locale.split("-")[0].lower(), OPT_OUT_HINTS["en"])
    if body.rstrip().endswith(hint):
        return body
    separator = "" if hint == OPT_OUT_HINTS["zh"] else " "
    return f"{body.rstrip()}{separator}{hint}"
