"""What the rest of the service sees of an email or SMS provider.

:class:`EmailProvider` and :class:`SmsProvider` are the interfaces delivery calls. Real providers build
on :class:`ProviderPipeline`, which fixes the order of one send (build the payload → post it → read the
provider's message id out of the answer) and funnels every failure of the post through one ``map_error``
hook, so each provider only fills in the steps that differ. Errors leave a provider as
:class:`~outreach.core.errors.TransientProviderError` (its subclass
:class:`~outreach.core.errors.AmbiguousProviderError` when the request went out and the answer never came: the message
may have been accepted) or :class:`~outreach.core.errors.PermanentProviderError`, and never carry personal data
(addresses, numbers, bodies) in their text.

Both interfaces can also be asked what the provider holds of one message we may have sent (:meth:`LooksUp.look_up`,
for :mod:`outreach.pipeline.reconcile`): by default a provider cannot tell; SendGrid (Email Activity) and Twilio (the
Messages list) answer.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Generic, Literal, TypeVar

from outreach.core.errors import PermanentProviderError, ProviderError

__all__ = [
    "EmailMessage",
    "EmailProvider",
    "LooksUp",
    "Lookup",
    "LookupAnswer",
    "ProviderPipeline",
    "Providers",
    "SendResult",
    "Sighting",
    "SmsMessage",
    "SmsProvider",
    "redact",
]


@dataclass(frozen=True)
class EmailMessage:
    """One rendered email for one recipient."""

    message_id: str  # our opaque outbox id (hex); goes into custom_args as {"outreach_id": message_id}
    to: str
    subject: str
    text: str
    html: str
    from_email: str  # may be "Name <addr>"
    reply_to: str | None = None
    categories: tuple[str, ...] = ()  # opaque: campaign and template names only
    custom_args: Mapping[str, str] = field(default_factory=dict)  # opaque ids only, never personal data
    headers: Mapping[str, str] = field(default_factory=dict)  # e.g. List-Unsubscribe


@dataclass(frozen=True)
class SmsMessage:
    """One rendered SMS for one recipient."""

    message_id: str
    to: str  # E.164
    body: str
    status_callback: str | None = None
    validity_period: int | None = None  # seconds, Twilio ValidityPeriod


@dataclass(frozen=True)
class SendResult:
    provider: str
    provider_message_id: str


@dataclass(frozen=True)
class Lookup:
    """One message we may have handed to a provider, as a lookup asks for it."""

    message_id: str  # our outbox id
    to: str  # the address or number it went to
    since: datetime  # it was handed over no earlier than this (our clock)
    body: str | None = None  # the SMS text, when known


@dataclass(frozen=True)
class Sighting:
    """A message the provider holds for the lookup's recipient: ``id`` when it carries our outbox id, ``body`` when
    it carries our text, ``none`` when it is another message to the same recipient (maybe one of our others)."""

    provider_message_id: str
    match: Literal["id", "body", "none"]


@dataclass(frozen=True)
class LookupAnswer:
    """What the provider answered: its sightings, complete for the recipient and the time since the hand-off, or
    the ``problem`` that kept it from telling (the answer is then worth nothing either way)."""

    sightings: tuple[Sighting, ...] = ()
    problem: str | None = None


class LooksUp:
    """Asking the provider what it holds of one message. By default a provider cannot tell."""

    name: str

    @property
    def can_look_up(self) -> bool:
        """Whether :meth:`look_up` can answer at all (the account has the API, the setting is on)."""
        return False

    def look_up(self, lookup: Lookup) -> LookupAnswer:
        """What the provider holds for ``lookup``; never raises for provider trouble (that is a ``problem``)."""
        return LookupAnswer(problem=f"{self.name} cannot look messages up")


class EmailProvider(LooksUp, ABC):
    """Sends one email. Implementations raise only Transient/PermanentProviderError for provider failures."""

    name: str

    @abstractmethod
    def send_email(self, message: EmailMessage) -> SendResult:
        """Hand ``message`` to the provider and return the provider's id for it."""


class SmsProvider(LooksUp, ABC):
    """Sends one SMS. Implementations raise only Transient/PermanentProviderError for provider failures."""

    name: str

    @abstractmethod
    def send_sms(self, message: SmsMessage) -> SendResult:
        """Hand ``message`` to the provider and return the provider's id for it."""


@dataclass
class Providers:
    email: EmailProvider
    sms: SmsProvider


MessageT = TypeVar("MessageT")
PayloadT = TypeVar("PayloadT")
ResponseT = TypeVar("ResponseT")


class ProviderPipeline(ABC, Generic[MessageT, PayloadT, ResponseT]):
    """The fixed steps of one send; subclasses fill in the hooks.

    :meth:`run` calls :meth:`build_payload`, then :meth:`post`, then :meth:`parse_result`. Anything
    :meth:`post` raises that is not already a :class:`ProviderError` goes to :meth:`map_error`; exceptions it
    does not recognise (``None``) propagate unchanged, because they are bugs, not provider trouble.
    """

    name: str

    def run(self, message: MessageT) -> SendResult:
        payload = self.build_payload(message)
        try:
            response = self.post(payload)
        except ProviderError:
            raise
        except Exception as exc:
            error = self.map_error(exc)
            if error is None:
                raise
            # The SDKs' own exception text can quote the recipient (Twilio's 21211 names the number), so the
            # original is not chained: tracebacks in our logs must stay free of personal data.
            raise error from None
        provider_message_id = self.parse_result(response)
        if not provider_message_id:
            # The provider accepted the message; retrying could send it twice, so this must not be transient.
            raise PermanentProviderError(self.name, "accepted without returning a message id")
        return SendResult(provider=self.name, provider_message_id=provider_message_id)

    @abstractmethod
    def build_payload(self, message: MessageT) -> PayloadT:
        """Turn our message into what the provider's SDK call takes."""

    @abstractmethod
    def post(self, payload: PayloadT) -> ResponseT:
        """Make the one provider call; let the SDK's exceptions escape for :meth:`map_error`."""

    @abstractmethod
    def parse_result(self, response: ResponseT) -> str:
        """The provider's message id from a successful answer ("" when it is missing)."""

    @abstractmethod
    def map_error(self, exc: Exception) -> ProviderError | None:
        """Classify a failed call as transient or permanent; ``None`` when it is not the provider's fault."""


_EMAIL_ADDRESS = re.compile(r"[^\s@'\"<>()\[\],;:]+@[^\s@'\"<>()\[\],;:]+")
_PHONE_NUMBER = re.compile(r"\+?\d[\d ().-]{5,}\d")


def redact(text: str, limit: int = 300) -> str:
    """Provider error text with email addresses and phone numbers taken out, cut to ``limit`` characters."""
    cleaned = _PHONE_NUMBER.sub("[number]", _EMAIL_ADDRESS.sub("[address]", text))
    return cleaned if len(cleaned) <= limit else cleaned[: limit - 1] + "…"
