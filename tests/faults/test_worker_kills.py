"""Issue 7, item 1: worker processes SIGKILLed again and again while 1,000 messages go out.

Nothing is lost and nothing is sent twice. A send whose provider call was in flight at the kill ends
``uncertain`` (the sweeper, after the lease) and is never sent again; when the provider did accept it, its
events (SendGrid: our id in the custom args; Twilio: the status callback) reconcile it to sent or delivered.
To make sure that case happens every run, some kills are timed while a deliberately slow provider call
(the sandbox's ``slow`` fault, longer than the lease) is in flight. Every provider call takes
``PROVIDER_LATENCY`` (the real APIs answer in 100-300 ms): without it the grouped sends finish 1,000 messages in
a couple of seconds, before the kills begin, and most kills would land between sends.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable

import pytest

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

pytestmark = pytest.mark.timeout(240)

THREADS = 4
#: Seconds each provider call takes: 2 processes x 4 threads then send about 50 messages a second, so 1,000 take
#: about 20 s and the kills (one every 1.5-3 s) fall throughout the run.
PROVIDER_LATENCY = 0.15


def _slow_in_flight(stack: Stack, provider: str, before: int) -> Callable[[], bool]:
    def taken() -> bool:
        return int(stack.sandbox.stats()[provider]["faults_served"].get("slow", 0)) > before

    return taken


def test_sigkilled_workers_lose_nothing_and_send_nothing_twice(make_stack: Callable[..., Stack]) -> None:
    messages = size("kill_messages", 1000)
    kills_wanted = size("kills", 8)
    stack = make_stack(
        campaign=MIXED_CAMPAIGN, lease_seconds=3.0, provider_timeout=10.0, provider_latency=PROVIDER_LATENCY
    )
    seed_enrollments(stack.runtime, messages // 2)  # an email and an SMS each

    stack.spawn("scheduler", scheduler_argv())
    groups = [stack.spawn(f"workers-{n}", worker_argv(stack.settings.queue_name, 1, THREADS)) for n in range(2)]
    rng = random.Random(7)
    kills = 0
    in_flight_kills = 0
    deadline = time.monotonic() + 150
    wait_until(lambda: stack.outbox_rows() >= messages, 60, "the scheduler to write the outbox", check=stack.check)
    wait_until(lambda: len(stack.sandbox.messages()) > 0, 60, "the first sends", check=stack.check)

    while stack.unfinished() and time.monotonic() < deadline:
        if kills < kills_wanted:
            if kills % 4 == 1:
                # A provider call that is certainly in flight at the kill: hold it longer than the lease.
                provider = "twilio" if kills % 8 == 5 else "sendgrid"
                served = int(stack.sandbox.stats()[provider]["faults_served"].get("slow", 0))
                stack.sandbox.fail(provider, "slow", delay=6.0)  # type: ignore[arg-type]
                try:
                    wait_until(_slow_in_flight(stack, provider, served), 10, "a slow call", interval=0.05)
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

    # The sweeper turns rows left ``sending`` into ``uncertain`` after the lease; events then reconcile them.
    wait_until(settled(stack), 90, "every row to settle and every accepted message to be reconciled", check=stack.check)
    counts = count(stack, kills=kills, in_flight_kills=in_flight_kills)
    counts.show("sigkill workers")

    assert counts.expected == messages
    assert counts.duplicated == 0
    assert counts.lost == 0
    assert counts.failed == 0
    assert counts.unreconciled == 0
    # Only sends in flight at a kill can end uncertain: at most one per worker thread per kill.
    assert counts.uncertain <= kills * THREADS
    assert counts.sent + counts.uncertain == messages
    assert in_flight_kills >= 1 and counts.reconciled >= 1, "no in-flight send was reconciled from provider events"
