"""The shape of a SendGrid v3 ``mail/send`` body, for the code that builds one and the sandbox that checks it.

SendGrid's own rules (its limits per request and per personalization, how substitution tags are filled in, the
header naming an accepted request) and ours (the custom arg carrying the outbox id) in one place, as plain dicts
and strings, without the SDK: :mod:`outreach.providers.sendgrid` builds a body for one message,
:mod:`outreach.pipeline.batch` one for up to :data:`MAX_PERSONALIZATIONS` recipients, and the local sandbox
(:mod:`outreach.ops.sandbox.sendgrid`) accepts or rejects them and records what each recipient got by the same
rules.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Mapping
from email.utils import parseaddr
from typing import Any

__all__ = [
    "MAX_PERSONALIZATIONS",
    "MAX_PERSONALIZATION_BYTES",
    "MESSAGE_ID_HEADER",
    "OUTBOX_ID_ARG",
    "address_field",
    "content",
    "personalization_bytes",
    "substitute",
]

#: SendGrid's limits: personalizations per request, and bytes of substitutions, headers and custom args in one.
MAX_PERSONALIZATIONS = 1000
MAX_PERSONALIZATION_BYTES = 10_000

#: The custom arg that carries our outbox id (opaque, no personal data); SendGrid returns it on every event.
OUTBOX_ID_ARG = "outreach_id"

#: The answer header naming an accepted request; every personalization of that request shares it.
MESSAGE_ID_HEADER = "X-Message-Id"

#: Characters that make an address more than a bare ``local@domain`` (a display name, a comment, a list ...).
_NOT_BARE = re.compile(r"""[\s<>"(),;:\[\]\\]""")


def address_field(value: str) -> dict[str, str]:
    """A v3 ``{"email", "name"}`` object from ``Name <email>`` or a bare address."""
    if not _NOT_BARE.search(value):
        return {"email": value}  # what parseaddr answers for a bare address, without its tokenizer
    return dict(_parsed(value))  # a copy: the caller may change it


@functools.lru_cache(maxsize=256)
def _parsed(value: str) -> tuple[tuple[str, str], ...]:
    """``Name <email>`` parsed once per process (the sender and reply-to addresses of every message)."""
    name, email = parseaddr(value)
    # Leave malformed addresses as they are: SendGrid's own validation gives the better error.
    result = {"email": email or value.strip()}
    if name:
        result["name"] = name
    return tuple(result.items())


def content(text: str, html: str) -> list[dict[str, str]]:
    """The ``content`` blocks of a message: SendGrid requires text/plain before text/html and rejects empty ones."""
    return [{"type": kind, "value": value} for kind, value in (("text/plain", text), ("text/html", html)) if value]


def personalization_bytes(personalization: Mapping[str, Any]) -> int:
    """Bytes SendGrid counts against one personalization's limit (its substitutions, custom args and headers)."""
    counted = {key: personalization.get(key) for key in ("substitutions", "custom_args", "headers")}
    return len(json.dumps(counted, ensure_ascii=False).encode("utf-8"))


def substitute(text: str, substitutions: Mapping[str, str]) -> str:
    """``text`` with each tag replaced by its value, in the order given (what SendGrid does)."""
    for tag, value in substitutions.items():
        if tag in text:
            text = text.replace(tag, value)
    return text
