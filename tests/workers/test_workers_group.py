"""The group actor: rows the provider turned away for now are woken again at their reset time by a group message
of their own (the rows already sent are never part of it); the single-id actor still retries its one row."""

from __future__ import annotations

from collections.abc import Iterator

import dramatiq
import pytest
from dramatiq import Message
from dramatiq.brokers.stub import StubBroker
from dramatiq.common import dq_name

from outreach.ops.sandbox import SandboxServer
from outreach.service import broker as broker_module
from outreach.service.broker import GROUP_ACTOR
from outreach.service.runtime import Runtime
from tests.conftest import install_workers
from tests.pipeline.test_delivery_group import emails, queue, received


@pytest.fixture
def stub(runtime: Runtime) -> Iterator[StubBroker]:
    previous = broker_module.installed_broker()
    broker = StubBroker()
    broker.emit_after("process_boot")
    install_workers(broker)
    broker.declare_queue(runtime.settings.queue_name)
    yield broker
    broker.close()
    broker_module._installed = previous
    if previous is not None:
        dramatiq.set_broker(previous)


def delayed(broker: StubBroker, queue_name: str) -> list[Message[object]]:
    waiting = broker.queues[dq_name(queue_name)]
    found: list[Message[object]] = []
    while not waiting.empty():
        found.append(Message.decode(waiting.get_nowait()))
    return found


def test_rate_limited_rows_come_back_as_a_delayed_group_of_their_own(
    runtime: Runtime, sandbox: SandboxServer, stub: StubBroker
) -> None:
    from workers.actors import deliver_messages

    ids = emails(queue(runtime, 3))
    sandbox.fail("sendgrid", "500")  # the first send only: that row alone is retried
    deliver_messages(ids)
    retried = delayed(stub, runtime.settings.queue_name)
    assert len(retried) == 1 and retried[0].actor_name == GROUP_ACTOR
    (again,) = retried[0].args
    assert len(again) == 1 and again[0] in ids
    assert sum(received(sandbox).values()) == 2 and again[0] not in received(sandbox)
    assert retried[0].options["eta"] > 0


def test_the_single_id_actor_still_retries_its_row(runtime: Runtime, sandbox: SandboxServer, stub: StubBroker) -> None:
    from workers.actors import deliver_message

    ids = emails(queue(runtime, 1))
    sandbox.fail("sendgrid", "429", reset_after=2)
    with pytest.raises(dramatiq.Retry):
        deliver_message(ids[0])
    assert delayed(stub, runtime.settings.queue_name) == []
