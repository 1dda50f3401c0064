"""What the inbound handlers ask of the process's wiring, on top of the send pipeline's :class:`Services`.

The out-of-hours auto-reply is a planner the handlers call, not a module they import: the runtime provides
:func:`outreach.inbound.autoreply.plan_auto_reply`, and a test or a tool may provide another.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from outreach.pipeline.services import Services

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from outreach.core.models import Candidate, InboundMessage


class AutoReplyPlanner(Protocol):
    def __call__(
        self, session: Session, runtime: Services, candidate: Candidate, channel: str, inbound: InboundMessage
    ) -> str | None:
        """Queue the auto-reply to ``inbound`` in the caller's transaction; its outbox id, or None when none is due."""


class InboundServices(Services, Protocol):
    @property
    def auto_reply(self) -> AutoReplyPlanner: ...
