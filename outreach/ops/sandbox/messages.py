"""What the sandbox keeps of each message it accepted (:class:`SandboxMessage`), and the JSON its answers are."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any, Literal

from outreach.core.clock import utcnow

__all__ = ["Provider", "SandboxMessage", "to_json"]

Provider = Literal["sendgrid", "twilio"]


@dataclass(frozen=True)
class SandboxMessage:
    """One message the sandbox accepted: one per SendGrid personalization, one per Twilio request.

    ``id`` is the id the provider call returned: SendGrid's ``X-Message-Id`` (shared by every personalization
    of one request, told apart by ``personalization_index``) or Twilio's ``SM…`` sid.
    """

    id: str
    provider: Provider
    channel: Literal["email", "sms"]
    to: str
    from_: str
    subject: str = ""
    text: str = ""
    html: str = ""
    body: str = ""
    custom_args: dict[str, str] = field(default_factory=dict)
    categories: list[str] = field(default_factory=list)
    headers: dict[str, str] = field(default_factory=dict)
    status_callback: str | None = None
    validity_period: int | None = None
    received_at: datetime = field(default_factory=utcnow)
    personalization_index: int = 0
    reply_to: str | None = None
    template_id: str | None = None
    segments: int = 0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready copy; ``received_at`` becomes an ISO 8601 string."""
        data = asdict(self)
        data["received_at"] = self.received_at.isoformat()
        return data


def to_json(data: Any) -> bytes:
    """``data`` as compact JSON bytes: the body of every JSON answer the sandbox gives."""
    return json.dumps(data, separators=(",", ":")).encode()
