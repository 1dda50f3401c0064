"""The provider sandbox on its own: the SendGrid and Twilio wire formats, faults, control endpoints, HTML."""

from __future__ import annotations

import base64
import copy
import json
import re
import socket
import threading
import time
from collections.abc import Iterator
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from python_http_client.exceptions import BadRequestsError
from sendgrid import SendGridAPIClient
from twilio.base.exceptions import TwilioRestException
from twilio.rest import Client

from outreach.core.clock import utcnow
from outreach.ops.sandbox import SandboxMessage, SandboxServer, sms_segments

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
ACCOUNT_SID = "AC" + "3" * 32
TOKEN = "sandbox-test-token"


def fixture(name: str) -> Any:
    return json.loads((FIXTURES / name).read_text(encoding="utf-8"))


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.setenv(name, "127.0.0.1,localhost")


@pytest.fixture
def server() -> Iterator[SandboxServer]:
    with SandboxServer(twilio_auth_token=TOKEN) as running:
        yield running


def sendgrid(server: SandboxServer) -> SendGridAPIClient:
    return SendGridAPIClient(api_key="SG.sandbox-tests", host=server.url)


def twilio(server: SandboxServer) -> Client:
    client = Client(ACCOUNT_SID, TOKEN)
    client.edge = client.region = None
    client.api.base_url = server.url
    return client


def basic(user: str, password: str = TOKEN) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def minimal_mail(**changes: Any) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "personalizations": [{"to": [{"email": "ana@example.org"}]}],
        "from": {"email": "talent@example.com"},
        "subject": "Hello",
        "content": [{"type": "text/plain", "value": "Hi"}],
    }
    payload.update(changes)
    return payload


# -- SendGrid ----------------------------------------------------------------------------------------------


def test_three_personalizations_are_three_records_sharing_the_message_id(server: SandboxServer) -> None:
    response = sendgrid(server).send(fixture("sendgrid/mail_send_three_personalizations.json"))

    assert response.status_code == 202 and response.body == b""
    message_id = response.headers["X-Message-Id"]
    assert re.fullmatch(r"[A-Za-z0-9_-]{22}", message_id)
    ana, bo, chen = server.wait_for(3, timeout=2)
    assert {r.id for r in (ana, bo, chen)} == {message_id}
    assert [r.personalization_index for r in (ana, bo, chen)] == [0, 1, 2]
    assert [r.to for r in (ana, bo, chen)] == ["ana@example.org", "bo@example.org", "chen@example.cn"]
    # Each personalization gets its own subject, substitutions, custom args and headers on top of the shared.
    assert ana.subject == "Hello Ana, about the Backend Engineer role"
    assert bo.subject == "Hi Bo, the QA Engineer role"
    assert chen.text == "Hi Chen, we think you would like the Data Engineer role."
    assert chen.html == "<p>Hi Chen, we think you would like the <b>Data Engineer</b> role.</p>"
    assert ana.custom_args == {"campaign": "jd_intro", "outreach_id": "8f14e45fceea167a5a36dedd4bea2543"}
    assert bo.headers == {
        "List-Unsubscribe": "<https://outreach.example.com/u/opaque-token>",
        "X-Outreach-Step": "2",
    }
    assert ana.from_ == "Talent Team <talent@example.com>" and ana.reply_to == "recruiting@example.com"
    assert ana.categories == ["jd_intro", "jd_intro_en"]


@pytest.mark.parametrize(
    ("payload", "fields"),
    [
        (minimal_mail(personalizations=[]), ["personalizations"]),
        (minimal_mail(personalizations=[{"subject": "x"}]), ["personalizations.0.to"]),
        (minimal_mail(personalizations=[{"to": [{"email": "nope"}]}]), ["personalizations.0.to.0.email"]),
        (minimal_mail(**{"from": {"name": "No address"}}), ["from.email"]),
        (minimal_mail(subject=""), ["subject"]),
        (minimal_mail(content=[]), ["content"]),
        (minimal_mail(content=[{"type": "text/plain", "value": ""}]), ["content.0.value"]),
        (
            minimal_mail(content=[{"type": "text/html", "value": "<p>x</p>"}, {"type": "text/plain", "value": "x"}]),
            ["content.0.type"],
        ),
        (minimal_mail(categories=[f"c{i}" for i in range(11)]), ["categories"]),
        (minimal_mail(custom_args={"attempt": 2}), ["custom_args"]),
        (minimal_mail(subject="", content=[], personalizations=[{}]), ["personalizations.0.to", "subject", "content"]),
    ],
)
def test_invalid_mail_is_400_with_sendgrid_error_objects(
    server: SandboxServer, payload: dict[str, Any], fields: list[str]
) -> None:
    with pytest.raises(BadRequestsError) as caught:
        sendgrid(server).client.mail.send.post(request_body=payload)
    errors = caught.value.to_dict["errors"]
    assert [e["field"] for e in errors] == fields
    documented = fixture("sendgrid/mail_send_400.json")["errors"][0]
    assert all(set(e) == set(documented) and e["message"] for e in errors)
    assert server.messages() == []


def test_template_id_stands_in_for_subject_and_content(server: SandboxServer) -> None:
    payload = minimal_mail(template_id="d-0123456789abcdef0123456789abcdef")
    del payload["subject"], payload["content"]
    assert sendgrid(server).send(payload).status_code == 202
    assert server.wait_for(1, timeout=2)[0].template_id == "d-0123456789abcdef0123456789abcdef"


def test_more_than_1000_personalizations_are_rejected(server: SandboxServer) -> None:
    many = [{"to": [{"email": f"p{i}@example.org"}]} for i in range(1001)]
    with pytest.raises(BadRequestsError) as caught:
        sendgrid(server).send(minimal_mail(personalizations=many))
    assert caught.value.to_dict["errors"][0]["field"] == "personalizations"


def test_mail_send_needs_a_bearer_token(server: SandboxServer) -> None:
    response = httpx.post(f"{server.url}/v3/mail/send", json=minimal_mail())
    assert response.status_code == 401
    assert response.json() == fixture("sendgrid/mail_send_401.json")
    assert server.messages() == []


def test_body_that_is_not_json_is_a_bad_request(server: SandboxServer) -> None:
    response = httpx.post(f"{server.url}/v3/mail/send", content=b"{nope", headers={"Authorization": "Bearer SG.x"})
    assert response.status_code == 400
    assert response.json() == {"errors": [{"message": "Bad Request", "field": None, "help": None}]}


def test_sendgrid_rate_limit_answer(server: SandboxServer) -> None:
    server.fail("sendgrid", "429", reset_after=5)
    response = httpx.post(f"{server.url}/v3/mail/send", json=minimal_mail(), headers={"Authorization": "Bearer x"})
    assert response.status_code == 429
    assert response.json() == fixture("sendgrid/mail_send_429.json")
    assert response.headers["X-RateLimit-Remaining"] == "0"
    assert int(response.headers["X-RateLimit-Limit"]) > 0
    assert 4 <= int(response.headers["X-RateLimit-Reset"]) - utcnow().timestamp() <= 6


# -- Twilio ------------------------------------------------------------------------------------------------


def test_created_message_has_the_documented_shape(server: SandboxServer) -> None:
    response = httpx.post(
        f"{server.url}/2010-04-01/Accounts/{ACCOUNT_SID}/Messages.json",
        data={"To": "+14155550100", "From": "+15005550006", "Body": "Hi Ana"},
        headers=basic(ACCOUNT_SID),
    )
    assert response.status_code == 201
    message = response.json()
    assert set(fixture("twilio/message_created.json")) <= set(message)
    assert re.fullmatch(r"SM[0-9a-f]{32}", message["sid"])
    assert (message["status"], message["num_segments"], message["direction"]) == ("queued", "1", "outbound-api")
    assert (message["to"], message["from"], message["body"]) == ("+14155550100", "+15005550006", "Hi Ana")
    assert message["account_sid"] == ACCOUNT_SID and message["api_version"] == "2010-04-01"
    assert message["uri"] == f"/2010-04-01/Accounts/{ACCOUNT_SID}/Messages/{message['sid']}.json"
    assert abs(parsedate_to_datetime(message["date_created"]).timestamp() - utcnow().timestamp()) < 60


def test_sdk_create_through_a_messaging_service(server: SandboxServer) -> None:
    service = "MG" + "4" * 32
    created = twilio(server).messages.create(to="+14155550100", messaging_service_sid=service, body="Hi")
    assert created.status == "accepted" and created.from_ is None
    assert created.messaging_service_sid == service and created.num_segments == "1"
    assert server.wait_for(1, timeout=2)[0].from_ == service


def test_twilio_needs_the_account_sid_as_basic_auth_user(server: SandboxServer) -> None:
    url = f"{server.url}/2010-04-01/Accounts/{ACCOUNT_SID}/Messages.json"
    data = {"To": "+14155550100", "From": "+15005550006", "Body": "Hi"}
    for headers in ({}, basic("AC" + "9" * 32), basic(ACCOUNT_SID, ""), {"Authorization": "Basic !!"}):
        response = httpx.post(url, data=data, headers=headers)
        assert response.status_code == 401
        assert response.json() == fixture("twilio/error_20003.json")
    assert server.messages() == []


@pytest.mark.parametrize(
    ("params", "code"),
    [
        ({"From": "+15005550006", "Body": "Hi"}, 21604),
        ({"To": "+14155550100", "Body": "Hi"}, 21603),
        ({"To": "0014155550100", "From": "+15005550006", "Body": "Hi"}, 21211),
        ({"To": "+14155550100", "From": "+1-500", "Body": "Hi"}, 21212),
        ({"To": "+14155550100", "From": "+15005550006"}, 21602),
        ({"To": "+14155550100", "From": "+15005550006", "Body": "x" * 1601}, 21617),
        ({"To": "+14155550100", "From": "+15005550006", "Body": "Hi", "StatusCallback": "ftp://x"}, 21609),
    ],
)
def test_invalid_messages_are_400_with_twilio_codes(server: SandboxServer, params: dict[str, str], code: int) -> None:
    response = httpx.post(
        f"{server.url}/2010-04-01/Accounts/{ACCOUNT_SID}/Messages.json", data=params, headers=basic(ACCOUNT_SID)
    )
    assert response.status_code == 400
    body = response.json()
    assert (body["code"], body["status"], body["more_info"]) == (
        code,
        400,
        f"https://www.twilio.com/docs/errors/{code}",
    )
    assert server.messages() == []


def test_twilio_fault_bodies_match_the_documented_errors(server: SandboxServer) -> None:
    for kind, name in (("429", "error_20429.json"), ("21610", "error_21610.json")):
        server.fail("twilio", kind)
        with pytest.raises(TwilioRestException) as caught:
            twilio(server).messages.create(to="+14155550100", from_="+15005550006", body="Hi")
        documented = fixture(f"twilio/{name}")
        assert (caught.value.status, caught.value.code) == (documented["status"], documented["code"])
        assert documented["message"] in caught.value.msg


def test_alphanumeric_sender_and_unicode_segments(server: SandboxServer) -> None:
    # "ü" and "ß" are both in the GSM-7 alphabet: 180 septets make two 153-septet segments.
    created = twilio(server).messages.create(to="+447700900123", from_="Outreach", body="Grüße " * 30)
    assert created.num_segments == "2"
    record = server.wait_for(1, timeout=2)[0]
    assert (record.from_, record.segments) == ("Outreach", 2)


@pytest.mark.parametrize(
    ("body", "segments"),
    [
        ("a" * 160, 1),
        ("a" * 161, 2),
        ("a" * 306, 2),
        ("a" * 307, 3),
        ("€" * 80, 1),  # extension characters take two septets
        ("€" * 81, 2),
        ("你" * 70, 1),
        ("你" * 71, 2),
        ("😀" * 35, 1),  # outside the BMP: two UTF-16 code units each
        ("😀" * 36, 2),
    ],
)
def test_sms_segments(body: str, segments: int) -> None:
    assert sms_segments(body) == segments


def test_status_callback_to_a_dead_receiver_does_not_break_the_sandbox(server: SandboxServer) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{probe.getsockname()[1]}/status"
    client = twilio(server)
    for _ in range(3):
        client.messages.create(to="+14155550100", from_="+15005550006", body="Hi", status_callback=dead)
    assert len(server.wait_for(3, timeout=2)) == 3
    assert httpx.get(f"{server.url}/_sandbox/stats").json()["twilio"]["messages"] == 3


# -- control endpoints, records, lifecycle -------------------------------------------------------------------


def test_control_endpoints(server: SandboxServer) -> None:
    queued = httpx.post(f"{server.url}/_sandbox/faults", json={"provider": "twilio", "kind": "21610", "times": 2})
    assert queued.status_code == 201 and queued.json()["queued"] == 2
    client = twilio(server)
    for _ in range(2):
        with pytest.raises(TwilioRestException):
            client.messages.create(to="+14155550100", from_="+15005550006", body="Hi")
    client.messages.create(to="+14155550100", from_="+15005550006", body="Hi")

    stats = httpx.get(f"{server.url}/_sandbox/stats").json()
    assert stats["messages"] == 1
    assert stats["twilio"] == {
        "requests": 3,
        "messages": 1,
        "rejected": 2,
        "faults_served": {"21610": 2},
        "faults_pending": 0,
        "lookups": 0,
    }
    listed = httpx.get(f"{server.url}/_sandbox/messages").json()
    assert [(m["provider"], m["channel"], m["to"], m["body"]) for m in listed] == [
        ("twilio", "sms", "+14155550100", "Hi")
    ]
    assert listed[0]["received_at"].endswith("+00:00")

    assert httpx.delete(f"{server.url}/_sandbox/messages").status_code == 204
    assert httpx.get(f"{server.url}/_sandbox/messages").json() == []
    key = httpx.get(f"{server.url}/_sandbox/sendgrid-public-key").json()["public_key"]
    assert key == server.sendgrid_public_key


@pytest.mark.parametrize(
    "body",
    [
        {"provider": "sendgrid", "kind": "21610"},
        {"provider": "twilio", "kind": "bounce"},
        {"provider": "ses", "kind": "500"},
        {"provider": "twilio", "kind": "500", "times": -1},
        {"provider": "twilio", "kind": "slow", "delay": "soon"},
        ["not", "an", "object"],
    ],
)
def test_invalid_fault_requests_are_400(server: SandboxServer, body: Any) -> None:
    response = httpx.post(f"{server.url}/_sandbox/faults", json=body)
    assert response.status_code == 400 and response.json()["error"]


def test_fail_validates_its_arguments(server: SandboxServer) -> None:
    with pytest.raises(ValueError, match="unknown fault"):
        server.fail("sendgrid", "21211")
    with pytest.raises(ValueError, match="unknown provider"):
        server.fail("mailgun", "500")  # type: ignore[arg-type]


def test_faults_are_consumed_in_order_and_clear_drops_the_rest(server: SandboxServer) -> None:
    server.fail("sendgrid", "500")
    server.fail("sendgrid", "429", times=2)
    statuses = [
        httpx.post(f"{server.url}/v3/mail/send", json=minimal_mail(), headers={"Authorization": "Bearer x"}).status_code
        for _ in range(3)
    ]
    assert statuses == [500, 429, 429]
    server.fail("sendgrid", "500", times=3)
    server.clear()
    assert sendgrid(server).send(minimal_mail()).status_code == 202


def test_wait_for_times_out_with_a_count(server: SandboxServer) -> None:
    started = time.monotonic()
    with pytest.raises(TimeoutError, match="received 0 message"):
        server.wait_for(1, timeout=0.1)
    assert time.monotonic() - started < 1


def test_records_are_json_serialisable(server: SandboxServer) -> None:
    sendgrid(server).send(minimal_mail(custom_args={"outreach_id": "abc"}, categories=["jd_intro"]))
    (record,) = server.wait_for(1, timeout=2)
    data = json.loads(json.dumps(record.to_dict()))
    assert data["from_"] == "talent@example.com" and data["custom_args"] == {"outreach_id": "abc"}
    assert set(data) == set(SandboxMessage.__dataclass_fields__)


def test_stop_closes_kept_alive_connections() -> None:
    sandbox = SandboxServer().start()
    with httpx.Client() as client:
        assert client.get(f"{sandbox.url}/_sandbox/stats").status_code == 200
        url = sandbox.url
        sandbox.stop()
        with pytest.raises(httpx.TransportError):
            client.get(f"{url}/_sandbox/stats")
    with pytest.raises(RuntimeError):
        _ = sandbox.url


# -- HTML --------------------------------------------------------------------------------------------------


def test_html_pages_escape_what_they_show(server: SandboxServer) -> None:
    evil = "<script>alert('subject')</script>"
    mail = minimal_mail(
        subject=f"{evil} Offer",
        content=[
            {"type": "text/plain", "value": "Plain <b>text</b>"},
            {"type": "text/html", "value": '<p onclick="x()">Hello</p><script>alert("body")</script>'},
        ],
    )
    mail["personalizations"][0]["custom_args"] = {"outreach_id": '"><script>'}
    sendgrid(server).send(mail)
    twilio(server).messages.create(to="+14155550100", from_="+15005550006", body="SMS <i>body</i>")
    server.wait_for(2, timeout=2)

    index = httpx.get(f"{server.url}/")
    assert index.status_code == 200 and index.headers["Content-Type"].startswith("text/html")
    assert "default-src 'none'" in index.headers["Content-Security-Policy"]
    assert "<script>" not in index.text and "&lt;script&gt;alert(&#x27;subject&#x27;)" in index.text
    # Newest first, like Mailpit.
    assert index.text.index("SMS &lt;i&gt;body") < index.text.index("Offer")

    email_page = httpx.get(f"{server.url}/messages/0").text
    assert "<script>" not in email_page
    match = re.search(r'<iframe sandbox srcdoc="([^"]*)"></iframe>', email_page)
    assert match is not None
    assert "&lt;p onclick=&quot;x()&quot;&gt;Hello" in match.group(1)
    assert "Plain &lt;b&gt;text&lt;/b&gt;" in email_page

    sms_page = httpx.get(f"{server.url}/messages/1").text
    assert "SMS &lt;i&gt;body&lt;/i&gt;" in sms_page and "Segments" in sms_page
    assert httpx.get(f"{server.url}/messages/2").status_code == 404
    assert httpx.get(f"{server.url}/nowhere").status_code == 404


def test_concurrent_senders_all_get_recorded(server: SandboxServer) -> None:
    client = sendgrid(server)
    ids: list[str] = []

    def send() -> None:
        for _ in range(10):
            payload = copy.deepcopy(minimal_mail())
            ids.append(client.send(payload).headers["X-Message-Id"])

    threads = [threading.Thread(target=send) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(ids)) == 80 and len(server.wait_for(80, timeout=5)) == 80


def test_latency_delays_every_send_like_a_real_api() -> None:
    with pytest.raises(ValueError, match="latency"):
        SandboxServer(latency=-1)
    with SandboxServer(twilio_auth_token=TOKEN, latency=0.2) as slow:
        started = time.monotonic()
        sendgrid(slow).client.mail.send.post(request_body=minimal_mail())
        twilio(slow).messages.create(to="+14155550100", from_="+15005550006", body="Hi")
        took = time.monotonic() - started
        assert len(slow.messages()) == 2 and took >= 0.4  # both accepted, each after the latency


# -- lookups: Twilio's Messages list, SendGrid's Email Activity -----------------------------------------------


def test_twilio_messages_list_pages_through_what_was_accepted(server: SandboxServer) -> None:
    client = twilio(server)
    sids = [client.messages.create(to="+14155550100", from_="+15005550006", body=f"Hi {n}").sid for n in range(5)]
    client.messages.create(to="+14155550199", from_="+15005550006", body="Someone else")

    listed = client.messages.list(to="+14155550100", from_="+15005550006", page_size=2)

    assert [m.sid for m in listed] == list(reversed(sids))  # newest first, across three pages
    assert {(m.to, m.from_, m.direction, m.status) for m in listed} == {
        ("+14155550100", "+15005550006", "outbound-api", "delivered")
    }
    assert all(m.date_created is not None and m.date_sent is not None for m in listed)
    assert client.messages.list(to="+14155550100", from_="+15005550007") == []
    assert server.stats()["twilio"]["lookups"] == 4  # three pages, then one empty


def test_sendgrid_email_activity_by_custom_arg(server: SandboxServer) -> None:
    mail = minimal_mail(personalizations=[{"to": [{"email": "ana@example.org"}], "custom_args": {"outreach_id": "a1"}}])
    sent = sendgrid(server).send(mail)
    sendgrid(server).send(minimal_mail())
    client = sendgrid(server).client

    found = json.loads(client.messages.get(query_params={"query": "(unique_args['outreach_id']=\"a1\")"}).body)

    (message,) = found["messages"]
    assert message["msg_id"].split(".")[0] == sent.headers["X-Message-Id"]
    assert (message["to_email"], message["from_email"], message["status"]) == (
        "ana@example.org",
        "talent@example.com",
        "delivered",
    )
    none = client.messages.get(query_params={"query": "unique_args['outreach_id']=\"b2\"", "limit": 5})
    assert json.loads(none.body) == {"messages": []}
    with pytest.raises(BadRequestsError):
        client.messages.get(query_params={"query": 'subject="Hello"'})
    with pytest.raises(BadRequestsError):
        client.messages.get(query_params={"query": "(unique_args['outreach_id']=\"a1\")", "limit": 0})
    assert httpx.get(f"{server.url}/v3/messages").status_code == 401


def test_lookups_can_be_turned_off_made_to_fail_and_lag(server: SandboxServer) -> None:
    twilio(server).messages.create(to="+14155550100", from_="+15005550006", body="Hi")
    url = f"{server.url}/2010-04-01/Accounts/{ACCOUNT_SID}/Messages.json"
    answered = httpx.post(f"{server.url}/_sandbox/lookups", json={"provider": "twilio", "mode": "off", "delay": 60})
    assert answered.status_code == 200 and answered.json() == {
        "lookups": {"sendgrid": "on", "twilio": "off"},
        "delay": 60.0,
    }
    assert httpx.get(url, headers=basic(ACCOUNT_SID)).status_code == 403
    server.set_lookups("twilio", "fail")
    assert httpx.get(url, headers=basic(ACCOUNT_SID)).status_code == 500
    server.set_lookups("twilio", "on")
    assert httpx.get(url, headers=basic(ACCOUNT_SID)).json()["messages"] == []  # not listed for a minute
    server.set_lookups("twilio", "on", delay=0)
    assert len(httpx.get(url, headers=basic(ACCOUNT_SID)).json()["messages"]) == 1
    for wrong in (
        {"provider": "mailgun"},
        {"provider": "twilio", "mode": "sometimes"},
        {"provider": "twilio", "delay": -1},
    ):
        assert httpx.post(f"{server.url}/_sandbox/lookups", json=wrong).status_code == 400
    server.set_lookups("sendgrid", "off")
    server.clear()
    assert (server.lookups, server.lookup_delay) == ({"sendgrid": "on", "twilio": "on"}, 0.0)
