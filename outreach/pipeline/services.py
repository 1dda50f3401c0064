"""What the send pipeline and the inbound handlers ask of the process's wiring: a narrow, typed view.

:class:`outreach.service.runtime.Runtime` provides it (the service wires itself there, once); the modules that send and
receive messages only see this Protocol, so none of them reaches into the runtime or imports anything above it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from outreach.core.config import Settings
    from outreach.domain.campaigns import CampaignSet
    from outreach.domain.render import Renderer
    from outreach.policy.engine import PolicyEngine
    from outreach.policy.pacing import Pacer
    from outreach.providers import Providers


class Services(Protocol):
    @property
    def settings(self) -> Settings: ...

    @property
    def engine(self) -> Engine: ...

    @property
    def campaigns(self) -> CampaignSet: ...

    @property
    def renderer(self) -> Renderer: ...

    @property
    def providers(self) -> Providers: ...

    @property
    def policy(self) -> PolicyEngine: ...

    @property
    def pacer(self) -> Pacer: ...

    def enqueue(self, outbox_ids: Sequence[str]) -> None:
        """Wake workers for these committed outbox rows."""
