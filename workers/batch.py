"""The batch actor: one message carries the outbox ids of up to 1000 nurture emails (never their payloads).

:func:`outreach.pipeline.batch.deliver_batch` claims the rows still pending, runs every rule per recipient and sends
them with SendGrid personalizations. A retry runs the same ids again and claims only the rows still pending, so what was
sent (or may have been) is never sent twice.
"""

from __future__ import annotations

import dramatiq
from dramatiq import Broker

from outreach.pipeline.batch import deliver_batch
from outreach.service.broker import BATCH_ACTOR, declare_actor
from outreach.service.runtime import get_runtime


def deliver_batch_message(outbox_ids: list[str]) -> None:
    outcome = deliver_batch(get_runtime(), outbox_ids)
    if outcome.retry_in is not None:
        # A second past the rows' own not_before, so the retry finds them due.
        raise dramatiq.Retry("provider asked us to wait", delay=max(1, int((outcome.retry_in + 1) * 1000)))


def declare_batch_actor(
    broker: Broker, queue_name: str, options: dict[str, object]
) -> dict[str, dramatiq.Actor[..., None]]:
    """Declare the batch actor on ``broker`` with the delivery actor's retry options."""
    return {BATCH_ACTOR: declare_actor(broker, deliver_batch_message, BATCH_ACTOR, queue_name, options)}
