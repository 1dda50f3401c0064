"""Issue 7, item 1, and issue 15 (no message left for a person): worker processes SIGKILLed again and again while
1,000 messages go out.

Nothing is lost and nothing is sent twice. A send whose provider call was in flight at the kill ends ``uncertain``
(the sweeper, after the lease). When the provider did accept it, its events (SendGrid: our id in the custom args;
Twilio: the status callback) or a provider lookup reconcile it to sent or delivered; when it never got there, the
lookup proves it absent once the visibility delay has passed and it is sent again, once
(:mod:`outreach.pipeline.reconcile`). With lookups on, nothing is left ``uncertain`` and no person is alerted; with
them off, what is left is counted: each such message is one ``message_uncertain`` alert for a person.

To make sure both cases happen every run, some kills are timed while a deliberately slow provider call is in flight
(the sandbox's ``slow`` fault, longer than the lease: the provider accepts after the worker died) or a hanging one
(``hang``: the provider drops the request, the message never arrives). Every provider call takes ``latency``
(the real APIs answer in 100-300 ms): without it the grouped sends finish 1,000 messages in a couple of seconds,
before the kills begin, and most kills would land between sends. The sandbox lists an accepted message in its
lookups only a second later, as the real APIs lag.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable

import pytest
from sqlalchemy import func, select

from outreach.core.models import Alert, OutboundMessage
from outreach.pipeline.message_alerts import ALERT_UNCERTAIN
from tests.faults.conftest import (
    MIXED_CAMPAIGN,
    Stack,
    count,
    scheduler_argv,
    seed_enrollments,
    settled,
    size,
    wait_until,
    worker_argv,
)

#: A soak's sizes (tests/faults/README.md) make the run longer: the marker outranks ``--timeout``.
pytestmark = pytest.mark.timeout(300 + 6 * size("kills", 8) + size("kill_messages", 1000) // 10)

THREADS = 4
#: Milliseconds each provider call takes: 2 processes x 4 threads then send about 50 messages a second, so 1,000
#: take about 20 s and the kills (one every 1.5-3 s) fall throughout the run. A soak with many kills raises it.
PROVIDER_LATENCY_MS = 150
#: Seconds after which a provider lookup's "absent" is proof (the setting; the sandbox lists within a second).
VISIBILITY_DELAY = 10.0
SANDBOX_LISTING_LAG = 1.0


def _fault_in_flight(stack: Stack, provider: str, kind: str, before: int) -> Callable[[], bool]:
    def taken() -> bool:
        return int(stack.sandbox.stats()[provider]["faults_served"].get(kind, 0)) > before

    return taken


def _open_alerts(stack: Stack) -> int:
    with stack.engine.connect() as connection:
        query = select(func.count()).where(Alert.kind == ALERT_UNCERTAIN, Alert.resolved_at.is_(None))
        return int(connection.execute(query).scalar_one())


def _uncertain(stack: Stack) -> int:
    return int(stack.statuses()["uncertain"])


@pytest.mark.parametrize("lookups", ["on", "off"])
def test_sigkilled_workers_lose_nothing_and_send_nothing_twice(make_stack: Callable[..., Stack], lookups: str) -> None:
    messages = size("kill_messages", 1000)
    kills_wanted = size("kills", 8)
    stack = make_stack(
        campaign=MIXED_CAMPAIGN,
        lease_seconds=3.0,
        provider_timeout=10.0,
        provider_latency=size("kill_latency_ms", PROVIDER_LATENCY_MS) / 1000,
    )
    stack.sandbox.lookup_delay = SANDBOX_LISTING_LAG
    seed_enrollments(stack.runtime, messages // 2)  # an email and an SMS each

    settings = {
        "OUTREACH_RECONCILE_LOOKUPS": "true" if lookups == "on" else "false",
        "OUTREACH_SENDGRID_EMAIL_ACTIVITY": "true",  # the account has the add-on; the switch above decides
        "OUTREACH_PROVIDER_VISIBILITY_DELAY": str(VISIBILITY_DELAY),
    }
    stack.spawn("scheduler", scheduler_argv(), stack.env(**settings))
    groups = [stack.spawn(f"workers-{n}", worker_argv(stack.settings.queue_name, 1, THREADS)) for n in range(2)]
    rng = random.Random(7)
    kills = 0
    in_flight_kills = 0
    deadline = time.monotonic() + 150 + 3 * kills_wanted
    wait_until(lambda: stack.outbox_rows() >= messages, 60, "the scheduler to write the outbox", check=stack.check)
    wait_until(lambda: len(stack.sandbox.messages()) > 0, 60, "the first sends", check=stack.check)

    while stack.unfinished() and time.monotonic() < deadline:
        if kills < kills_wanted:
            if kills % 4 == 1:
                # A provider call certainly in flight at the kill, held longer than the lease: one the provider
                # accepts after the worker died (slow), or one it never accepts (hang).
                kind = "slow" if in_flight_kills % 2 == 0 else "hang"
                provider = "twilio" if kills % 8 == 5 else "sendgrid"
                served = int(stack.sandbox.stats()[provider]["faults_served"].get(kind, 0))
                stack.sandbox.fail(provider, kind, delay=6.0)  # type: ignore[arg-type]
                try:
                    wait_until(_fault_in_flight(stack, provider, kind, served), 10, f"a {kind} call", interval=0.05)
                except AssertionError:
                    pass  # no call of that provider any more: the fault stays queued, harmless
                else:
                    for group in groups:
                        group.kill()
                    kills += len(groups)
                    in_flight_kills += 1
                    for group in groups:
                        group.start()
                    continue
            time.sleep(rng.uniform(1.5, 3.0))
            victim = rng.choice(groups)
            victim.kill()
            kills += 1
            victim.start()
        else:
            time.sleep(0.5)
        stack.check()

    # The sweeper turns rows left ``sending`` into ``uncertain`` after the lease; events and lookups then settle them
    # (a proven absence only after the visibility delay, and the message sent again).
    wait_until(settled(stack), 90, "every row to settle and every accepted message to be reconciled", check=stack.check)
    if lookups == "on":
        wait_until(lambda: _uncertain(stack) == 0 and settled(stack)(), 90, "the lookups", check=stack.check)
    else:
        time.sleep(2 * stack.settings.tick_interval)  # a pass or two to raise the alerts
    with stack.engine.connect() as connection:
        resent = int(connection.execute(select(func.count()).where(OutboundMessage.attempts > 1)).scalar_one())
        found = int(
            connection.execute(
                select(func.count()).where(OutboundMessage.reason.like("%found by a lookup%"))
            ).scalar_one()
        )
    alerts = _open_alerts(stack)
    counts = count(
        stack,
        kills=kills,
        in_flight_kills=in_flight_kills,
        lookups=lookups,
        found_by_lookup=found,
        sent_again=resent,
        needs_a_person=alerts,
    )
    counts.show(f"sigkill workers, lookups {lookups}")

    assert counts.expected == messages
    assert counts.duplicated == 0
    assert counts.lost == 0
    assert counts.failed == 0
    assert counts.unreconciled == 0
    assert in_flight_kills >= 2, "no kill landed while a provider call was in flight"
    # Only sends in flight at a kill can end uncertain: at most one per worker thread per kill.
    assert counts.uncertain <= kills * THREADS
    assert in_flight_kills >= 1 and counts.reconciled >= 1, "no in-flight send was reconciled"
    if lookups == "on":
        # The hanging call never reached the provider: proven absent and sent again, exactly once.
        assert (counts.sent, counts.uncertain, alerts) == (messages, 0, 0)
        assert resent >= 1
    else:
        assert counts.sent + counts.uncertain == messages
        assert counts.uncertain >= 1 and resent == 0 and found == 0
        # Every message left uncertain is transactional: each waits for a person, one alert each.
        assert alerts == counts.uncertain
