"""The process's wiring: settings, database, campaigns, templates, providers and the enqueue function.

Built lazily once per process from the environment (workers) or explicitly (``outreach up``, tests). Nothing
here holds request state; every piece is safe to share between threads.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import cached_property
from typing import TYPE_CHECKING

from sqlalchemy import Engine

from outreach.core.clock import TravelClock, set_clock
from outreach.core.config import Settings, get_settings
from outreach.core.db import get_engine
from outreach.core.errors import CampaignError
from outreach.domain.campaigns import CampaignSet
from outreach.domain.render import Renderer
from outreach.inbound.autoreply import plan_auto_reply
from outreach.inbound.services import AutoReplyPlanner
from outreach.providers import Providers, build_providers

if TYPE_CHECKING:
    from outreach.pipeline.scheduler import Scheduler
    from outreach.policy.engine import PolicyEngine
    from outreach.policy.pacing import Pacer

Enqueue = Callable[[Sequence[str]], None]


@dataclass
class Runtime:
    settings: Settings
    sandbox_url: str | None = None
    enqueue_override: Enqueue | None = None
    enqueue_batch_override: Enqueue | None = None
    #: The out-of-hours auto-reply the inbound handlers call (a test may give another planner).
    auto_reply: AutoReplyPlanner = plan_auto_reply
    #: Where the scheduler's outbox ids come from (None: random ids; the simulator passes a seeded source).
    new_id: Callable[[], str] | None = None

    def __post_init__(self) -> None:
        # OUTREACH_SANDBOX_URL stands in for the providers while their credentials are not both set.
        if self.sandbox_url is None and self.settings.sandbox_url and not self.settings.has_all_credentials:
            self.sandbox_url = self.settings.sandbox_url

    @cached_property
    def engine(self) -> Engine:
        return get_engine(self.settings.database_url)

    @cached_property
    def campaigns(self) -> CampaignSet:
        from outreach.service.validation import validate_all

        campaigns, problems = validate_all(self.settings.campaigns_dir, self.settings.templates_dir)
        if problems or campaigns is None:
            raise CampaignError(problems)
        return campaigns

    @cached_property
    def renderer(self) -> Renderer:
        return Renderer(self.settings.templates_dir, default_locale=self.settings.default_locale)

    @cached_property
    def providers(self) -> Providers:
        return build_providers(self.settings, sandbox_url=self.sandbox_url)

    @cached_property
    def policy(self) -> PolicyEngine:
        from outreach.policy.config import load_policies
        from outreach.policy.engine import PolicyEngine

        return PolicyEngine(load_policies(self.settings.campaigns_dir), self.settings)

    @cached_property
    def pacer(self) -> Pacer:
        """Provider pacing shared through Redis when the broker is Redis, else per process."""
        from outreach.policy.pacing import LocalPacer, RedisPacer

        if self.settings.broker_url.startswith(("redis://", "rediss://")):
            return RedisPacer(self.settings.broker_url)
        return LocalPacer()

    @cached_property
    def scheduler(self) -> Scheduler:
        from outreach.pipeline.reconcile import Reconciler
        from outreach.pipeline.scheduler import Scheduler

        # Code that collects ids through ``enqueue_override`` alone sees nurture rows there too, one by one.
        batching = self.enqueue_override is None or self.enqueue_batch_override is not None
        return Scheduler(
            self.engine,
            self.campaigns,
            self.settings,
            self.enqueue,
            policy=self.policy,
            enqueue_batch=self.enqueue_batch if batching else None,
            checks=(self._unanswered_replies,),
            new_id=self.new_id,
            # The providers are built when first asked (``outreach up`` points them at its sandbox after this).
            reconciler=Reconciler(self.engine, self.settings, lambda: self.providers),
        )

    def _unanswered_replies(self, now: datetime) -> int:
        from outreach.inbound.conversation import alert_unanswered_replies

        return alert_unanswered_replies(self.engine, now, self.settings, self.policy)

    def enqueue(self, outbox_ids: Sequence[str]) -> None:
        if not outbox_ids:
            return
        if self.enqueue_override is not None:
            self.enqueue_override(outbox_ids)
            return
        from outreach.service.broker import enqueue_deliveries

        enqueue_deliveries(outbox_ids, queue_name=self.settings.queue_name)

    def enqueue_batch(self, outbox_ids: Sequence[str]) -> None:
        """Wake one worker for a batch of nurture email rows (:mod:`outreach.pipeline.batch`)."""
        if not outbox_ids:
            return
        if self.enqueue_batch_override is not None:
            self.enqueue_batch_override(outbox_ids)
            return
        from outreach.service.broker import enqueue_batch

        enqueue_batch(outbox_ids, queue_name=self.settings.queue_name)


_runtime: Runtime | None = None
_runtime_lock = threading.Lock()


_frozen = threading.Event()


def freeze_startup_heap() -> None:
    """Move what start-up left on the heap (modules, classes, campaigns, templates, caches: about 120,000
    objects) out of the cyclic garbage collector's sight, once per process.

    Without it every full collection walks all of them again: about 80 ms, triggered every webhook batch or two
    in the service (a third of its CPU per event in the webhook benchmark) and every nurture batch or so in a
    worker (about 15% of its CPU per recipient). Garbage is collected first, so nothing unreachable is kept;
    objects made later are collected as usual.
    """
    if _frozen.is_set():
        return
    _frozen.set()
    gc.collect()
    gc.freeze()


def get_runtime() -> Runtime:
    global _runtime
    with _runtime_lock:
        if _runtime is None:
            _runtime = Runtime(get_settings())
            start_clock(_runtime.settings)
        return _runtime


def start_clock(settings: Settings) -> None:
    """Move this process's clock to ``OUTREACH_CLOCK_START`` when it is set (it runs on from there)."""
    if settings.clock_start is not None:
        set_clock(TravelClock(settings.clock_start))


def set_runtime(runtime: Runtime | None) -> None:
    global _runtime
    with _runtime_lock:
        _runtime = runtime
