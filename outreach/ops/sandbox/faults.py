"""Faults the sandbox injects on request: which exist for which provider, and the errors they answer.

Faults are queued with :meth:`~outreach.ops.sandbox.server.SandboxServer.fail` (or ``POST /_sandbox/faults``);
each one is consumed by the next request to that provider's send endpoint:

===============  ==============================================================================
kind             effect
===============  ==============================================================================
``429``          rate limited (SendGrid: ``X-RateLimit-*`` headers; Twilio: code 20429)
``500``          internal server error with the provider's error body
``slow``         wait ``delay`` seconds, then answer normally (the message *is* accepted)
``reset``        read the request, then reset the connection without answering (nothing accepted)
``hang``         wait ``delay`` seconds, then reset the connection (nothing accepted): a provider that hangs
``accept_reset`` accept the message (record it, post its webhooks), then reset the connection without answering
``21211``        Twilio only: 400, invalid ``To`` number
``21610``        Twilio only: 400, recipient unsubscribed (replied STOP)
``undelivered``  Twilio only: accepted, then status callbacks ``sent`` → ``undelivered`` (30003)
``failed``       Twilio only: accepted, then status callback ``failed`` (30008)
``bounce``       SendGrid only: accepted, then events ``processed`` → ``bounce``
``dropped``      SendGrid only: accepted, then events ``processed`` → ``dropped``
===============  ==============================================================================

The connection-level ones (``reset``, ``hang``, ``slow``, ``accept_reset``) are played by the request handler
(:mod:`outreach.ops.sandbox.server`); the delivery outcomes (``undelivered`` … ``dropped``) by the webhooks each
provider posts back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from outreach.core.clock import utcnow
from outreach.ops.sandbox import sendgrid, twilio
from outreach.ops.sandbox.messages import to_json

__all__ = ["KINDS", "Fault", "FaultKind", "Rejection", "checked", "sendgrid_rejection", "twilio_rejection"]

FaultKind = Literal[
    "429",
    "500",
    "slow",
    "reset",
    "hang",
    "accept_reset",
    "21211",
    "21610",
    "undelivered",
    "failed",
    "bounce",
    "dropped",
    "400",
]

_COMMON_FAULTS = frozenset({"429", "500", "slow", "reset", "hang", "accept_reset"})
#: The kinds each provider knows.
KINDS: dict[str, frozenset[str]] = {
    "sendgrid": _COMMON_FAULTS | {"bounce", "dropped", "400"},
    "twilio": _COMMON_FAULTS | {"21211", "21610", "undelivered", "failed"},
}

#: What a fault answers instead of the provider: HTTP status, body and extra headers.
Rejection = tuple[int, bytes, list[tuple[str, str]]]


@dataclass(frozen=True)
class Fault:
    """One queued fault: its kind, the rate-limit reset of a ``429`` and the wait of ``slow`` and ``hang``."""

    kind: str
    reset_after: float
    delay: float


def checked(provider: str, kind: str, times: int, *, reset_after: float, delay: float) -> Fault:
    """The fault to queue ``times`` of; ``ValueError`` for an unknown provider or kind, or a negative number."""
    if provider not in KINDS:
        raise ValueError(f"unknown provider {provider!r}; expected one of {sorted(KINDS)}")
    if kind not in KINDS[provider]:
        raise ValueError(f"unknown fault {kind!r} for {provider}; expected one of {sorted(KINDS[provider])}")
    if times < 0 or reset_after < 0 or delay < 0:
        raise ValueError("times, reset_after and delay must not be negative")
    return Fault(kind, float(reset_after), float(delay))


def sendgrid_rejection(fault: Fault) -> Rejection | None:
    """The error SendGrid answers for ``fault`` (``429``, ``500``, ``400``: a request it refuses for good); ``None``
    for one that lets the request in."""
    if fault.kind == "429":
        reset = math.ceil(utcnow().timestamp() + fault.reset_after)
        return (
            429,
            to_json({"errors": [sendgrid.error("too many requests")]}),
            [
                ("X-RateLimit-Limit", "600"),
                ("X-RateLimit-Remaining", "0"),
                ("X-RateLimit-Reset", str(reset)),
            ],
        )
    if fault.kind == "500":
        return 500, to_json({"errors": [sendgrid.error("Internal Server Error")]}), []
    if fault.kind == "400":
        refused = sendgrid.error("Does not contain a valid address.", "personalizations.0.to.0.email")
        return 400, to_json({"errors": [refused]}), []
    return None


def twilio_rejection(fault: Fault, to: str) -> Rejection | None:
    """The error Twilio answers for ``fault`` (``429``, ``500``, ``21211``, ``21610``) to a message for ``to``;
    ``None`` for one that lets the request in."""
    rejection: tuple[int, int, str] | None = None
    if fault.kind == "429":
        rejection = (429, 20429, "Too Many Requests")
    elif fault.kind == "500":
        rejection = (500, 20500, "An internal server error has occurred")
    elif fault.kind == "21211":
        rejection = (400, 21211, f"The 'To' number {to} is not a valid phone number.")
    elif fault.kind == "21610":
        rejection = (400, 21610, "Attempt to send to unsubscribed recipient")
    if rejection is None:
        return None
    status, code, message = rejection
    return status, twilio.error(code, message, status), []
