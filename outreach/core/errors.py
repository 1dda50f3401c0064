"""One exception tree for the whole service.

::

    OutreachError
    ├── ConfigurationError        a setting is wrong; the process should not start
    ├── CampaignError             a campaign or policy file is invalid (carries every problem found)
    ├── TemplateError             a template is missing, uses an unknown variable or breaks the sandbox
    ├── ValidationError           input from the API, CLI or CSV is invalid (names the field)
    ├── NotFoundError             a candidate, job or message does not exist
    └── ProviderError             a provider call failed (provider, status, code)
        ├── TransientProviderError    safe to retry: 429, 5xx, connect timeouts, connections never opened
        │   └── AmbiguousProviderError    the request left and no answer came back: it may have been sent
        └── PermanentProviderError    retrying cannot help: invalid address, unsubscribed, bad request

Messages never contain personal data: they name fields, ids and provider codes, not values.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


class OutreachError(Exception):
    """Root of every error this service raises on purpose."""


class ConfigurationError(OutreachError):
    pass


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a campaign file: where it is and what to do about it."""

    file: str
    line: int | None
    field: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{where}: {self.field}: {self.message}"


class CampaignError(OutreachError):
    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


class TemplateError(OutreachError):
    def __init__(self, template: str, message: str) -> None:
        self.template = template
        super().__init__(f"template {template}: {message}")


class ValidationError(OutreachError):
    """Bad input, naming the field; ``errors`` holds every problem found (the first is ``field``/``message``)."""

    def __init__(self, field: str, message: str, *, more: Sequence[tuple[str, str]] = ()) -> None:
        self.field = field
        self.message = message
        self.errors: list[tuple[str, str]] = [(field, message), *more]
        super().__init__("; ".join(f"{where}: {what}" for where, what in self.errors))

    @classmethod
    def of(cls, errors: Sequence[tuple[str, str]]) -> ValidationError:
        """One error for several problems (at least one)."""
        (field, message), *more = errors
        return cls(field, message, more=more)


class NotFoundError(OutreachError):
    pass


class ProviderError(OutreachError):
    def __init__(
        self,
        provider: str,
        message: str,
        *,
        status: int | None = None,
        code: str | None = None,
    ) -> None:
        self.provider = provider
        self.status = status
        self.code = code
        detail = ", ".join(
            part for part in (f"status {status}" if status else "", f"code {code}" if code else "") if part
        )
        super().__init__(f"{provider}: {message}" + (f" ({detail})" if detail else ""))


class TransientProviderError(ProviderError):
    """Retry later; ``retry_after`` (seconds) is the provider's own hint when it gave one."""

    def __init__(
        self,
        provider: str,
        message: str,
        *,
        status: int | None = None,
        code: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(provider, message, status=status, code=code)
        self.retry_after = retry_after


class AmbiguousProviderError(TransientProviderError):
    """The request was (or may have been) sent and no answer came back: a read timeout while the provider was
    still working, a connection reset or closed after the request went out. The provider may have accepted the
    message, so it must not be sent again on our own: delivery ends the row ``uncertain`` and the provider's
    events reconcile it (or a person decides, after an alert).

    It stays a :class:`TransientProviderError` for code that only knows the two outcomes, which treats it as it
    did before (a retry); code that sends must ask for this class first.
    """


class PermanentProviderError(ProviderError):
    """Do not retry. ``suppress`` says the address itself must not be used again (e.g. Twilio 21610)."""

    def __init__(
        self,
        provider: str,
        message: str,
        *,
        status: int | None = None,
        code: str | None = None,
        suppress: bool = False,
    ) -> None:
        super().__init__(provider, message, status=status, code=code)
        self.suppress = suppress
