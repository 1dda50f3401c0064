"""Uncertain messages settled by asking the provider (outreach.pipeline.reconcile), through the real SDKs against the
sandbox: found → sent, proven absent after the visibility delay → sent again exactly once, can't tell → the alert.

Each test makes jd_intro's email and SMS for one candidate and sends them through the real delivery path with a
sandbox fault that cuts the answer off: ``accept_reset`` (the provider has the message) or ``reset`` (it never got
it). The scheduler's sweep then looks them up. The clock stands still unless a test moves it.
"""

from __future__ import annotations

from collections import Counter
from datetime import timedelta
from urllib.parse import parse_qs, urlsplit

import pytest
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from outreach.core.clock import FixedClock, TravelClock, set_clock
from outreach.core.models import Alert, Candidate, OutboundMessage
from outreach.inbound.events import ingest
from outreach.inbound.provider_events import parse_twilio_status
from outreach.ops.sandbox import SandboxMessage, SandboxServer
from outreach.pipeline import outbox
from outreach.pipeline.delivery import deliver
from outreach.pipeline.message_alerts import ALERT_UNCERTAIN
from outreach.pipeline.reconcile import GRACE, RETRY_AFTER, Decision, decide
from outreach.pipeline.scheduler import TickResult
from outreach.providers.base import Lookup, LookupAnswer, SendResult, Sighting, SmsMessage, SmsProvider
from outreach.service.runtime import Runtime
from tests.conftest import DEFAULT_NOW
from tests.helpers import add_candidate, add_job, fire

DELAY = timedelta(seconds=600)  # OUTREACH_PROVIDER_VISIBILITY_DELAY's default


@pytest.fixture
def clock(service_clock: TravelClock | None) -> FixedClock:
    fixed = FixedClock(DEFAULT_NOW)
    set_clock(fixed)
    return fixed


def messages(runtime: Runtime, clock: FixedClock, **settings: object) -> tuple[str, str]:
    """jd_intro's email and SMS for one candidate, due now: (email id, SMS id). ``settings`` first."""
    runtime.settings = runtime.settings.with_overrides(**settings)
    add_candidate(runtime)
    add_job(runtime)
    fire(runtime, "c-1", "applied", at=clock.now(), job="j-1")
    runtime.scheduler.tick(clock.advance(timedelta(minutes=6)))
    with Session(runtime.engine) as session:
        found = session.execute(select(OutboundMessage.channel, OutboundMessage.id).order_by(OutboundMessage.step))
        ids = {channel: outbox_id for channel, outbox_id in found}
    return ids["email"], ids["sms"]


def cut_off(runtime: Runtime, sandbox: SandboxServer, outbox_id: str, fault: str) -> None:
    """Send ``outbox_id`` with the sandbox ``fault`` cutting the answer off: the row ends ``uncertain``."""
    channel = row(runtime, outbox_id).channel
    sandbox.fail("sendgrid" if channel == "email" else "twilio", fault)
    assert deliver(runtime, outbox_id).status == "uncertain"


def row(runtime: Runtime, outbox_id: str) -> OutboundMessage:
    with Session(runtime.engine, expire_on_commit=False) as session:
        found = session.get(OutboundMessage, outbox_id)
        assert found is not None
        return found


def phone_of_the_candidate(runtime: Runtime) -> str:
    with Session(runtime.engine) as session:
        phone = session.scalar(select(Candidate.phone))
    assert phone
    return str(phone)


def sweep(runtime: Runtime, clock: FixedClock) -> TickResult:
    result = TickResult()
    runtime.scheduler.sweep(clock.now(), result)
    return result


def alerts(runtime: Runtime) -> dict[str, Alert]:
    with Session(runtime.engine, expire_on_commit=False) as session:
        found = session.scalars(select(Alert).where(Alert.kind == ALERT_UNCERTAIN))
        return {alert.outbox_id or "": alert for alert in found}


def outbox_id_of(record: SandboxMessage) -> str | None:
    if record.channel == "email":
        return record.custom_args.get("outreach_id")
    return parse_qs(urlsplit(record.status_callback or "").query).get("outreach_id", [None])[0]


def lookups(sandbox: SandboxServer) -> Counter[str]:
    """The lookups each provider answered so far (the sandbox is shared by the tests: compare two of these)."""
    stats = sandbox.stats()
    return Counter({provider: int(stats[provider]["lookups"]) for provider in ("sendgrid", "twilio")})


def received(sandbox: SandboxServer) -> Counter[str | None]:
    """How many times the sandbox accepted each outbox id."""
    return Counter(outbox_id_of(record) for record in sandbox.messages())


# -- found ------------------------------------------------------------------------------------------------


def test_found_at_the_provider_is_recorded_sent_and_never_alerted(
    runtime: Runtime, sandbox: SandboxServer, clock: FixedClock
) -> None:
    email, sms = messages(runtime, clock, sendgrid_email_activity=True)
    cut_off(runtime, sandbox, email, "accept_reset")
    cut_off(runtime, sandbox, sms, "accept_reset")
    assert {row(runtime, i).status for i in (email, sms)} == {"uncertain"}
    before = lookups(sandbox)

    result = sweep(runtime, clock)

    assert (result.found, result.resent, result.alerts) == (2, 0, 0)
    ids = {outbox_id_of(record): record.id for record in sandbox.messages()}
    for outbox_id in (email, sms):
        settled = row(runtime, outbox_id)
        assert (settled.status, settled.rule, settled.error_code) == ("sent", "ambiguous", None)
        assert settled.provider_message_id == ids[outbox_id] and "found by a lookup" in (settled.reason or "")
    assert alerts(runtime) == {}
    assert received(sandbox) == Counter({email: 1, sms: 1})
    assert lookups(sandbox) - before == Counter({"sendgrid": 1, "twilio": 1})


class Killed(BaseException):
    """The worker process dies (SIGKILL) right where it is."""


class DiesAfterSending(SmsProvider):
    """Twilio, in a worker killed the moment Twilio accepted the SMS: the answer is never recorded."""

    name = "twilio"

    def __init__(self, twilio: SmsProvider) -> None:
        self.twilio = twilio

    def send_sms(self, message: SmsMessage) -> SendResult:
        self.twilio.send_sms(message)
        raise Killed

    @property
    def can_look_up(self) -> bool:
        return self.twilio.can_look_up

    def look_up(self, lookup: Lookup) -> LookupAnswer:
        return self.twilio.look_up(lookup)


def test_an_sms_whose_worker_died_is_found_by_the_text_stored_at_its_hand_off(
    runtime: Runtime, sandbox: SandboxServer, clock: FixedClock
) -> None:
    _, sms = messages(runtime, clock)
    twilio = runtime.providers.sms
    runtime.providers.sms = DiesAfterSending(twilio)
    with pytest.raises(Killed):
        deliver(runtime, sms)
    runtime.providers.sms = twilio
    handed_off = row(runtime, sms)
    assert (handed_off.status, handed_off.rule, handed_off.body) == ("sending", None, sandbox.messages()[0].body)

    clock.advance(timedelta(seconds=runtime.settings.lease_seconds + 1))
    result = sweep(runtime, clock)  # the lease ran out: uncertain, then looked up in the same pass

    assert (result.uncertain, result.found) == (1, 1)
    settled = row(runtime, sms)
    assert (settled.status, settled.rule, settled.provider_message_id) == ("sent", "lease", sandbox.messages()[0].id)
    assert received(sandbox) == Counter({sms: 1}) and alerts(runtime) == {}


def test_a_late_listing_within_the_delay_is_found_not_sent_again(
    runtime: Runtime, sandbox: SandboxServer, clock: FixedClock
) -> None:
    """The provider took the message but lists it only 5 minutes later: the lookups before that see nothing, and
    only an answer after the visibility delay could send it again; by then it is listed."""
    email, sms = messages(runtime, clock, sendgrid_email_activity=True)
    sandbox.set_lookups("twilio", "on", delay=300)
    sandbox.set_lookups("sendgrid", "on", delay=300)
    cut_off(runtime, sandbox, email, "accept_reset")
    cut_off(runtime, sandbox, sms, "accept_reset")

    before = lookups(sandbox)
    first = sweep(runtime, clock)
    assert (first.found, first.resent, first.alerts) == (0, 0, 0)
    assert {row(runtime, i).status for i in (email, sms)} == {"uncertain"}
    assert {row(runtime, i).not_before for i in (email, sms)} == {row(runtime, email).updated_at + DELAY}
    clock.advance(DELAY - timedelta(seconds=1))
    assert sweep(runtime, clock).found == 0  # not due again yet
    assert lookups(sandbox) - before == Counter({"sendgrid": 1, "twilio": 1})

    clock.advance(timedelta(seconds=1))
    assert sweep(runtime, clock).found == 2
    assert {row(runtime, i).status for i in (email, sms)} == {"sent"}
    assert received(sandbox) == Counter({email: 1, sms: 1}) and alerts(runtime) == {}


# -- absent -----------------------------------------------------------------------------------------------


def test_absent_after_the_visibility_delay_is_sent_again_exactly_once(
    runtime: Runtime, sandbox: SandboxServer, clock: FixedClock
) -> None:
    email, sms = messages(runtime, clock, sendgrid_email_activity=True)
    cut_off(runtime, sandbox, email, "reset")
    cut_off(runtime, sandbox, sms, "reset")
    queued: list[str] = runtime.queued  # type: ignore[attr-defined]
    queued.clear()

    # Not listed, but too early to prove anything: wait, and no alert while the lookups may still settle it.
    early = sweep(runtime, clock)
    assert (early.found, early.resent, early.alerts) == (0, 0, 0)
    assert alerts(runtime) == {} and {row(runtime, i).status for i in (email, sms)} == {"uncertain"}

    clock.advance(DELAY)
    result = sweep(runtime, clock)

    assert (result.resent, sorted(queued)) == (2, sorted((email, sms)))
    assert sorted(result.requeued) == sorted((email, sms))
    for outbox_id in (email, sms):
        again = row(runtime, outbox_id)
        assert (again.status, again.attempts, again.rule) == ("pending", 1, None)
        assert "never got it" in (again.reason or "")
    for outbox_id in (email, sms):
        assert deliver(runtime, outbox_id).status == "sent"
        assert deliver(runtime, outbox_id).status == "not-pending"
    assert received(sandbox) == Counter({email: 1, sms: 1})
    assert {row(runtime, i).attempts for i in (email, sms)} == {2}
    clock.advance(DELAY)
    later = sweep(runtime, clock)
    assert (later.found, later.resent, later.alerts) == (0, 0, 0) and alerts(runtime) == {}


class EventDuringLookup(SmsProvider):
    """Twilio, whose status callback for the message arrives while the lookup is on its way back."""

    name = "twilio"

    def __init__(self, twilio: SmsProvider, runtime: Runtime) -> None:
        self.twilio = twilio
        self.runtime = runtime

    def send_sms(self, message: SmsMessage) -> SendResult:
        return self.twilio.send_sms(message)

    @property
    def can_look_up(self) -> bool:
        return True

    def look_up(self, lookup: Lookup) -> LookupAnswer:
        answer = self.twilio.look_up(lookup)
        event = parse_twilio_status({"MessageSid": "SM" + "7" * 32, "MessageStatus": "delivered"}, lookup.message_id)
        with Session(self.runtime.engine) as session, session.begin():
            ingest(session, [event])
        return answer


def test_an_event_that_settles_the_row_during_the_lookup_wins(
    runtime: Runtime, sandbox: SandboxServer, clock: FixedClock
) -> None:
    _, sms = messages(runtime, clock)
    cut_off(runtime, sandbox, sms, "reset")
    runtime.providers.sms = EventDuringLookup(runtime.providers.sms, runtime)
    clock.advance(DELAY)

    result = sweep(runtime, clock)

    assert (result.resent, result.found) == (0, 0)
    settled = row(runtime, sms)
    assert (settled.status, settled.provider_message_id) == ("delivered", "SM" + "7" * 32)


def test_a_stale_answer_does_not_touch_a_later_attempt(runtime: Runtime, clock: FixedClock) -> None:
    """A lookup is about one attempt: once the row was sent again (and is uncertain again), an answer about the
    first attempt changes nothing; nor does one about a row no longer uncertain."""
    _, sms = messages(runtime, clock)
    with runtime.engine.begin() as connection:
        connection.execute(
            update(OutboundMessage)
            .where(OutboundMessage.id == sms)
            .values(status="uncertain", rule="lease", attempts=2, updated_at=clock.now())
        )
        assert not outbox.send_again(connection, sms, 1, clock.now(), reason="stale")
        assert not outbox.record_found(connection, sms, 1, clock.now(), provider="twilio", provider_message_id="SM1")
        assert outbox.record_found(connection, sms, 2, clock.now(), provider="twilio", provider_message_id="SM2")
        assert not outbox.send_again(connection, sms, 2, clock.now(), reason="after it was found")
    assert (row(runtime, sms).status, row(runtime, sms).provider_message_id) == ("sent", "SM2")


def test_two_schedulers_do_not_ask_about_the_same_row(runtime: Runtime, clock: FixedClock) -> None:
    email, sms = messages(runtime, clock)
    now = clock.now()
    with runtime.engine.begin() as connection:
        connection.execute(
            update(OutboundMessage).where(OutboundMessage.id.in_([email, sms])).values(status="uncertain")
        )
        first = outbox.claim_lookups(connection, ["email", "sms"], now, now + GRACE, now - DELAY, 10)
        second = outbox.claim_lookups(connection, ["email", "sms"], now, now + GRACE, now - DELAY, 10)
    assert sorted(r.id for r in first) == sorted((email, sms)) and second == []
    assert {row(runtime, i).updated_at for i in (email, sms)} == {now}  # the visibility delay's start stays


# -- can't tell -------------------------------------------------------------------------------------------


def test_a_failing_lookup_alerts_at_once_and_a_later_answer_settles_it(
    runtime: Runtime, sandbox: SandboxServer, clock: FixedClock
) -> None:
    _, sms = messages(runtime, clock)
    cut_off(runtime, sandbox, sms, "reset")
    sandbox.set_lookups("twilio", "fail")

    result = sweep(runtime, clock)

    assert (result.found, result.resent, result.alerts) == (0, 0, 1)
    alert = alerts(runtime)[sms]
    assert "could not settle it (the Messages list answered HTTP 500)" in alert.message
    assert "+86" not in alert.message and alert.resolved_at is None
    assert row(runtime, sms).not_before == clock.now() + RETRY_AFTER
    assert sweep(runtime, clock).alerts == 0  # one alert per message

    sandbox.set_lookups("twilio", "on")
    clock.advance(DELAY)
    settled = sweep(runtime, clock)
    assert settled.resent == 1 and row(runtime, sms).status == "pending"
    assert alerts(runtime)[sms].resolved_at == clock.now()


def test_an_unrecognised_message_to_the_number_cannot_tell_once_the_delay_has_passed(
    runtime: Runtime, sandbox: SandboxServer, clock: FixedClock
) -> None:
    """The number got a message from us since the hand-off that no row recorded and that does not carry our text
    (Twilio may have changed it): it may be ours, so it is not sent again; once another row accounts for it, the
    absence is proven."""
    _, sms = messages(runtime, clock)
    cut_off(runtime, sandbox, sms, "reset")
    stranger = runtime.providers.sms.send_sms(
        SmsMessage(message_id="f" * 32, to=phone_of_the_candidate(runtime), body="A different text.")
    )
    assert sweep(runtime, clock).alerts == 0  # before the delay: wait

    clock.advance(DELAY)
    result = sweep(runtime, clock)
    assert (result.resent, result.alerts) == (0, 1)
    assert "1 other message(s) to the recipient since the hand-off" in alerts(runtime)[sms].message

    with Session(runtime.engine) as session, session.begin():
        earlier = row(runtime, sms)
        session.add(
            OutboundMessage(
                candidate_id=earlier.candidate_id,
                campaign="jd_intro",
                step=9,
                channel="sms",
                template="jd_nudge",
                category="transactional",
                status="delivered",
                provider="twilio",
                provider_message_id=stranger.provider_message_id,
            )
        )
    clock.advance(RETRY_AFTER)
    assert sweep(runtime, clock).resent == 1
    assert row(runtime, sms).status == "pending" and alerts(runtime)[sms].resolved_at is not None


def test_without_lookups_a_person_is_alerted_as_before(
    runtime: Runtime, sandbox: SandboxServer, clock: FixedClock
) -> None:
    """SendGrid's Email Activity is off by default (a paid add-on): its uncertain email is alerted at once, while
    Twilio, which can always be asked, settles its SMS. With lookups off, both wait for a person."""
    email, sms = messages(runtime, clock)
    cut_off(runtime, sandbox, email, "accept_reset")
    cut_off(runtime, sandbox, sms, "accept_reset")
    before = lookups(sandbox)

    result = sweep(runtime, clock)

    assert (result.found, result.alerts) == (1, 1)
    assert list(alerts(runtime)) == [email] and row(runtime, sms).status == "sent"
    assert "it is never resent automatically" in alerts(runtime)[email].message
    assert lookups(sandbox) - before == Counter({"twilio": 1})


def test_with_lookups_off_nothing_is_asked(runtime: Runtime, sandbox: SandboxServer, clock: FixedClock) -> None:
    email, sms = messages(runtime, clock, reconcile_lookups=False, sendgrid_email_activity=True)
    cut_off(runtime, sandbox, email, "reset")
    cut_off(runtime, sandbox, sms, "reset")
    clock.advance(DELAY)
    before = lookups(sandbox)

    result = sweep(runtime, clock)

    assert (result.found, result.resent, result.alerts) == (0, 0, 2)
    assert sorted(alerts(runtime)) == sorted((email, sms))
    assert lookups(sandbox) == before


def test_lookups_are_bounded_per_pass(runtime: Runtime, sandbox: SandboxServer, clock: FixedClock) -> None:
    email, sms = messages(runtime, clock, sendgrid_email_activity=True, reconcile_batch=1)
    cut_off(runtime, sandbox, email, "accept_reset")
    cut_off(runtime, sandbox, sms, "accept_reset")
    before = lookups(sandbox)
    assert sweep(runtime, clock).found == 1
    assert sum((lookups(sandbox) - before).values()) == 1
    assert sweep(runtime, clock).found == 1
    assert lookups(sandbox) - before == Counter({"sendgrid": 1, "twilio": 1})


# -- the decision ---------------------------------------------------------------------------------------------


def test_decide() -> None:
    ours, other = Sighting("SM1", "body"), Sighting("SM2", "none")
    assert decide(LookupAnswer(problem="HTTP 500"), set()) == Decision("unknown", why="HTTP 500", failed=True)
    assert decide(LookupAnswer(()), set()) == Decision("absent")
    assert decide(LookupAnswer((other, ours)), set()) == Decision("found", "SM1")
    # Our text, but another row recorded that message: the same text sent before.
    assert decide(LookupAnswer((ours,)), {"SM1"}).kind == "absent"
    assert decide(LookupAnswer((other,)), set()).kind == "unknown"
    assert decide(LookupAnswer((other,)), {"SM2"}).kind == "absent"
    # Matched by our id (SendGrid): ours even when a batch sibling recorded the same request id.
    assert decide(LookupAnswer((Sighting("X1", "id"),)), {"X1"}) == Decision("found", "X1")
