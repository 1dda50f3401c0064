"""Settle ``uncertain`` outbox rows by asking the provider, before a person is asked to.

A row is ``uncertain`` when its request went out and the answer never came back: the call failed after sending (rule
``ambiguous``) or the worker died during it (the sweeper's ``lease``). Provider events usually settle it; when none
come (the worker died before the request left, the webhooks are down), every scheduler pass asks the provider, in
its sweep and before the alerts (:meth:`Reconciler.run`):

1. **Which rows.** Up to ``OUTREACH_RECONCILE_BATCH`` uncertain rows whose channel's provider can be asked and whose
   next lookup is due (:func:`outreach.pipeline.outbox.claim_lookups`: an uncertain row's ``not_before`` is its next
   lookup, at once when it becomes uncertain), oldest first, from the last :data:`LOOKBACK`.
2. **Ask** (:meth:`outreach.providers.base.LooksUp.look_up`): SendGrid's Email Activity API by our ``outreach_id``
   custom arg (only where the account has it, ``OUTREACH_SENDGRID_EMAIL_ACTIVITY``); Twilio's Messages list for the
   recipient and our sender since the hand-off, where the SMS's text (stored at its hand-off) tells ours apart.
3. **Decide** (:func:`decide`):

   - *found*: ``sent`` with the provider's id (:func:`outreach.pipeline.outbox.record_found`).
   - *absent*: the provider answered completely, nothing it holds is ours, and every other message it holds for the
     recipient since the hand-off is one another outbox row recorded. That is proof only once the provider's
     visibility delay (``OUTREACH_PROVIDER_VISIBILITY_DELAY``) has passed since the row became uncertain, which is
     after its hand-off: then the row is ``pending`` again and enqueued (:func:`outreach.pipeline.outbox.send_again`),
     to be sent once more. Before that, the next lookup waits for the delay.
   - *can't tell*: the lookup failed or the account cannot answer, or (once the delay has passed) the recipient has
     a message from us that no row accounts for. The row is alerted as before (``message_uncertain``, with the reason)
     and asked again after :data:`RETRY_AFTER`; the alert resolves itself if a later lookup settles the row.

While lookups may still settle a row (for :data:`GRACE` after the delay) it is not alerted: :attr:`Reconciled.settling`
tells :func:`outreach.pipeline.message_alerts.alert_messages` which rows to leave alone.

**Races.** Every decision is written only if the row is still ``uncertain`` from the attempt that was looked up
(``attempts`` counts hand-offs): a provider event that settled it meanwhile wins, and a row sent again and uncertain
from a later attempt is not touched by a stale answer. A late provider *acceptance* (a request still on its way
through the provider when the worker died) is what the visibility delay covers: the delay starts when the row became
uncertain, which is after the lease ran out or the call gave up, and the decision to send again is taken only on an
answer asked after it. A late *event* for a row sent again still moves it forward (events move ``pending`` rows to
``sent``), so it is not claimed a second time if the event comes first. Two schedulers do not ask about the same row
at once: the claim moves its ``not_before`` (and skips locked rows). What the delay cannot cover is a provider that
lists a message later than the delay says, or a worker frozen for longer than its lease plus the delay before its
request leaves: set the delay well above the provider's worst listing lag.

A pass spends at most :data:`PASS_BUDGET` seconds on lookups; the rows it did not reach are asked about on the next.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal

from sqlalchemy import Engine, select

from outreach.core.clock import utcnow
from outreach.core.config import Settings
from outreach.core.errors import ConfigurationError
from outreach.core.models import Candidate, Channel, OutboundMessage
from outreach.core.sql import one_of
from outreach.pipeline import outbox
from outreach.providers.base import LooksUp, Lookup, LookupAnswer, Providers

__all__ = [
    "GRACE",
    "LOOKBACK",
    "PASS_BUDGET",
    "RETRY_AFTER",
    "Decision",
    "Reconciled",
    "Reconciler",
    "decide",
]

log = logging.getLogger(__name__)

#: How long a lookup that could not tell waits before the next.
RETRY_AFTER = timedelta(minutes=1)
#: How long rows claimed for a lookup are left alone if the pass that claimed them dies first.
LOOKUP_LEASE = timedelta(minutes=2)
#: How long after the visibility delay the lookups have to settle a row before it is alerted all the same.
GRACE = timedelta(minutes=2)
#: Rows uncertain for longer than this are a person's (providers keep their lists for days, not forever).
LOOKBACK = timedelta(days=7)
#: Seconds a pass spends on lookups at most (each is bounded by ``OUTREACH_PROVIDER_TIMEOUT``).
PASS_BUDGET = 10.0


@dataclass(frozen=True)
class Decision:
    """What a lookup's answer means for the row: ``found`` (with the provider's id), ``absent`` or ``unknown``
    (with why); ``failed`` when the lookup itself gave no answer (rather than one that left the row unsettled)."""

    kind: Literal["found", "absent", "unknown"]
    provider_message_id: str = ""
    why: str = ""
    failed: bool = False


def decide(answer: LookupAnswer, accounted: Collection[str]) -> Decision:
    """The decision for one row from the provider's ``answer`` and the provider ids other outbox rows recorded
    (``accounted``). A sighting matched by our id is ours whatever else recorded its id (a SendGrid request's id is
    shared by all its rows); one matched by its text is ours unless another row recorded it (the same text sent
    before); any other sighting no row accounts for may be ours in a form we cannot recognise."""
    if answer.problem is not None:
        return Decision("unknown", why=answer.problem, failed=True)
    for sighting in answer.sightings:
        if sighting.match == "id" or (sighting.match == "body" and sighting.provider_message_id not in accounted):
            return Decision("found", sighting.provider_message_id)
    strangers = [s for s in answer.sightings if s.provider_message_id not in accounted]
    if strangers:
        return Decision("unknown", why=f"{len(strangers)} other message(s) to the recipient since the hand-off")
    return Decision("absent")


@dataclass
class Reconciled:
    """What one pass did, and what the alerts must know."""

    found: list[str] = field(default_factory=list)
    #: Rows proven absent and ``pending`` again: enqueue them.
    resent: list[str] = field(default_factory=list)
    #: Rows the provider does not list yet, asked again once the visibility delay has passed.
    waiting: int = 0
    #: Rows a lookup could not settle this pass, with why (alerted).
    cannot_tell: dict[str, str] = field(default_factory=dict)
    #: Per channel whose provider is asked: rows uncertain since after this instant are left to the lookups.
    settling: dict[str, datetime] = field(default_factory=dict)


class Reconciler:
    """The lookups of one scheduler. ``providers`` builds the process's providers when first needed (a scheduler
    without provider credentials then just alerts, as without lookups)."""

    def __init__(self, engine: Engine, settings: Settings, providers: Callable[[], Providers]) -> None:
        self.engine = engine
        self.settings = settings
        self._providers = providers
        self._unavailable = False

    def _askable(self) -> dict[str, LooksUp]:
        """The providers that can be asked, by channel."""
        if not self.settings.reconcile_lookups or self._unavailable:
            return {}
        try:
            providers = self._providers()
        except ConfigurationError as exc:
            self._unavailable = True
            log.warning("provider lookups are off: the providers cannot be built", extra={"reason": str(exc)})
            return {}
        found: dict[str, LooksUp] = {Channel.EMAIL.value: providers.email, Channel.SMS.value: providers.sms}
        return {channel: provider for channel, provider in found.items() if provider.can_look_up}

    def run(self, now: datetime) -> Reconciled:
        """One pass (module docstring)."""
        result = Reconciled()
        askable = self._askable()
        if not askable:
            return result
        delay = timedelta(seconds=self.settings.provider_visibility_delay)
        result.settling = dict.fromkeys(askable, now - delay - GRACE)
        limit = max(0, self.settings.reconcile_batch)
        with self.engine.begin() as connection:
            rows = outbox.claim_lookups(connection, list(askable), now, now + LOOKUP_LEASE, now - LOOKBACK, limit)
            addresses = self._addresses(connection, rows)
        if not rows:
            return result
        started = time.monotonic()
        for position, row in enumerate(rows):
            if time.monotonic() - started > PASS_BUDGET:
                self._release(rows[position:], now)
                break
            self._settle(row, askable[row.channel], addresses.get(row.candidate_id), now, delay, result)
        if result.found or result.resent or result.cannot_tell:
            log.info(
                "uncertain messages looked up",
                extra={
                    "found": len(result.found),
                    "resent": len(result.resent),
                    "waiting": result.waiting,
                    "cannot_tell": len(result.cannot_tell),
                },
            )
        return result

    @staticmethod
    def _addresses(connection: Any, rows: Sequence[Any]) -> dict[int, tuple[str | None, str | None]]:
        """Each row's candidate's email and phone, by candidate id."""
        wanted = sorted({row.candidate_id for row in rows})
        if not wanted:
            return {}
        found = connection.execute(
            select(Candidate.id, Candidate.email, Candidate.phone).where(one_of(connection, Candidate.id, wanted))
        )
        return {candidate_id: (email, phone) for candidate_id, email, phone in found}

    def _release(self, rows: Sequence[Any], now: datetime) -> None:
        """Rows claimed but not asked about in this pass: due again at once."""
        with self.engine.begin() as connection:
            for row in rows:
                outbox.look_again(connection, row.id, row.attempts, now)

    def _settle(
        self,
        row: Any,
        provider: LooksUp,
        address: tuple[str | None, str | None] | None,
        now: datetime,
        delay: timedelta,
        result: Reconciled,
    ) -> None:
        to = None if address is None else address[0 if row.channel == Channel.EMAIL.value else 1]
        # When the provider was asked, at the earliest: the pass's instant, or the clock if that is earlier (a pass
        # run as if later). An absence proves something only if this is past the visibility delay.
        asked_at = min(now, utcnow())
        if not to:
            decision = Decision("unknown", why="the candidate has no address on this channel any more", failed=True)
        else:
            # The claim time: the hand-off (and so the provider's receipt) came after it.
            since = row.sent_at or row.updated_at - timedelta(seconds=self.settings.lease_seconds)
            body = row.body if row.channel == Channel.SMS.value else None
            answer = provider.look_up(Lookup(message_id=row.id, to=to, since=since, body=body))
            decision = decide(answer, self._accounted(row, answer))
        proof_from = row.updated_at + delay
        with self.engine.begin() as connection:
            if decision.kind == "found":
                if outbox.record_found(
                    connection,
                    row.id,
                    row.attempts,
                    now,
                    provider=provider.name,
                    provider_message_id=decision.provider_message_id,
                ):
                    result.found.append(row.id)
                    log.info("uncertain message found at the provider", extra={"outbox_id": row.id})
            elif decision.kind == "absent" and asked_at >= proof_from:
                reason = (
                    f"{provider.name} never got it (looked up {int((asked_at - row.updated_at).total_seconds())} s "
                    "after the send was cut short): sent again"
                )
                if outbox.send_again(connection, row.id, row.attempts, now, reason=reason):
                    result.resent.append(row.id)
                    log.warning("uncertain message absent at the provider; sending again", extra={"outbox_id": row.id})
            elif not decision.failed and asked_at < proof_from:
                # Not listed (or not recognisable) yet: only an answer after the visibility delay proves anything.
                outbox.look_again(connection, row.id, row.attempts, proof_from)
                result.waiting += 1
            else:
                outbox.look_again(connection, row.id, row.attempts, now + RETRY_AFTER)
                result.cannot_tell[row.id] = decision.why[:200]

    def _accounted(self, row: Any, answer: LookupAnswer) -> set[str]:
        """The provider ids of ``answer`` that another outbox row recorded (not matched by our id)."""
        ids = sorted({s.provider_message_id for s in answer.sightings if s.match != "id"})
        if not ids:
            return set()
        with self.engine.connect() as connection:
            found = connection.execute(
                select(OutboundMessage.provider_message_id).where(
                    one_of(connection, OutboundMessage.provider_message_id, ids), OutboundMessage.id != row.id
                )
            )
            return {provider_id for (provider_id,) in found if provider_id}
