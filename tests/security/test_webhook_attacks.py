"""Attack corpus for the webhooks: every forged, replayed, re-serialized or tampered request is refused (403) and
not a single row changes. The plain cases (unsigned, wrong key, stale) live in tests/web; these extend them."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlencode

from fastapi.testclient import TestClient
from starlette.datastructures import FormData, UploadFile
from twilio.request_validator import RequestValidator

from outreach.core.clock import utcnow
from outreach.service.runtime import Runtime
from tests.helpers import INBOUND_TOKEN, PUBLIC_URL, Signer, add_candidate
from tests.security.util import changed_rows, snapshot
from tests.web.test_webhooks import (
    EVENTS_PATH,
    TOKEN,
    add_message,
    batch_for,
    fixture_form,
)

FORM = {"Content-Type": "application/x-www-form-urlencoded"}


def sendgrid_attacks(signer: Signer, body: bytes) -> Iterator[tuple[str, bytes, dict[str, str]]]:
    """(case, body, headers): each one a signature that does not cover what is sent, or is no longer fresh."""
    good = signer.headers(body)
    events = json.loads(body)
    # Re-serialized: the same JSON value, other bytes. The signature covers the bytes, so all of these fail.
    yield "compact separators", json.dumps(events, separators=(",", ":")).encode(), good
    yield "pretty printed", json.dumps(events, indent=2).encode(), good
    yield "keys sorted", json.dumps(events, sort_keys=True).encode(), good
    yield "keys reversed", json.dumps([dict(reversed(list(e.items()))) for e in events]).encode(), good
    yield "unicode escaped", json.dumps(events, ensure_ascii=True).replace("@", "\\u0040").encode(), good
    yield "trailing newline", body + b"\n", good
    yield "leading space", b" " + body, good
    yield "utf-8 BOM", b"\xef\xbb\xbf" + body, good
    # Tampered: events changed, added, dropped or reordered.
    yield "status changed", body.replace(b'"delivered"', b'"bounce"'), good
    yield "outbox id changed", body.replace(events[0]["outreach_id"].encode(), b"f" * 32), good
    added = [*events, {**events[1], "sg_event_id": "bmV3", "event": "spamreport"}]
    yield "event added", json.dumps(added).encode(), good
    yield "event dropped", json.dumps(events[:1]).encode(), good
    yield "events reordered", json.dumps(list(reversed(events))).encode(), good
    yield "truncated", body[:-1], good
    # Signed, but not fresh, or signed for other bytes.
    old = int(utcnow().timestamp()) - 3600
    yield "replayed an hour later", body, signer.headers(body, old)
    yield "replayed a day later", body, signer.headers(body, int(utcnow().timestamp()) - 86400)
    yield "old signature, new timestamp", body, {**signer.headers(body, old), **{
        "X-Twilio-Email-Event-Webhook-Timestamp": good["X-Twilio-Email-Event-Webhook-Timestamp"]}}  # fmt: skip
    yield "timestamp with a sign", body, {**good, "X-Twilio-Email-Event-Webhook-Timestamp": "+" + good[
        "X-Twilio-Email-Event-Webhook-Timestamp"]}  # fmt: skip
    yield "timestamp as float", body, signer.headers(body, None) | {
        "X-Twilio-Email-Event-Webhook-Timestamp": f"{utcnow().timestamp():.3f}"}  # fmt: skip
    yield "signature of another body", body, signer.headers(b"[]")
    yield "signature of the timestamp only", body, signer.headers(b"")
    stamp = good["X-Twilio-Email-Event-Webhook-Timestamp"]
    moved = signer.headers(stamp[-2:].encode() + body, int(stamp[:-2]))  # bytes moved across the boundary
    yield "boundary shifted", body, moved
    raw = base64.b64decode(good["X-Twilio-Email-Event-Webhook-Signature"])
    yield "signature bit flipped", body, {**good, "X-Twilio-Email-Event-Webhook-Signature": base64.b64encode(
        raw[:-1] + bytes([raw[-1] ^ 1])).decode()}  # fmt: skip
    yield "empty signature", body, {**good, "X-Twilio-Email-Event-Webhook-Signature": ""}


def test_sendgrid_attack_corpus_is_refused_and_writes_nothing(
    runtime: Runtime, client: TestClient, signer: Signer
) -> None:
    outbox_id = add_message(runtime, add_candidate(runtime))
    body = batch_for(outbox_id)
    before = snapshot(runtime)
    statuses: dict[str, int] = {}
    for case, content, headers in sendgrid_attacks(signer, body):
        answer = client.post(EVENTS_PATH, content=content, headers=headers)
        statuses[case] = answer.status_code
        assert answer.status_code == 403, (case, answer.text)
        assert "c-1@example.org" not in answer.text
    changed = changed_rows(before, snapshot(runtime))
    refused = list(statuses.values()).count(403)
    print(f"sendgrid attacks: {len(statuses)}, refused 403: {refused}, rows changed: {changed}")
    assert changed == 0
    # The genuine request still passes (the corpus was refused for what it is, not for being unreadable).
    assert client.post(EVENTS_PATH, content=body, headers=signer.headers(body)).status_code == 200


def test_a_replayed_fresh_batch_writes_nothing_new(runtime: Runtime, client: TestClient, signer: Signer) -> None:
    outbox_id = add_message(runtime, add_candidate(runtime))
    body = batch_for(outbox_id)
    headers = signer.headers(body)
    assert client.post(EVENTS_PATH, content=body, headers=headers).status_code == 200
    after_first = snapshot(runtime)
    replays = [client.post(EVENTS_PATH, content=body, headers=headers) for _ in range(5)]
    assert {r.status_code for r in replays} == {200} and all(r.json()["stored"] == 0 for r in replays)
    changed = changed_rows(after_first, snapshot(runtime))
    print(f"replays inside the 5-minute window: {len(replays)}, rows changed: {changed}")
    assert changed == 0


def twilio_signed(url: str, params: dict[str, str] | list[tuple[str, str]], token: str = TOKEN) -> str:
    pairs = list(params.items()) if isinstance(params, dict) else params
    items: list[tuple[str, str | UploadFile]] = list(pairs)
    return RequestValidator(token).compute_signature(url, FormData(items))


def twilio_attacks(path: str, params: dict[str, str]) -> Iterator[tuple[str, str, bytes, dict[str, str]]]:
    """(case, request path, body, headers) for a status callback an attacker replays or rewrites."""
    body = urlencode(params).encode()
    public = PUBLIC_URL + path
    good = twilio_signed(public, params)
    # Behind a proxy: the forwarded headers must not choose the URL that is validated.
    for host_header in ("X-Forwarded-Host", "Host", "X-Original-Host", "Forwarded"):
        attacker = "https://evil.example" + path
        value = "host=evil.example;proto=https" if host_header == "Forwarded" else "evil.example"
        yield (
            f"signed for the attacker's host via {host_header}",
            path,
            body,
            {**FORM, host_header: value, "X-Forwarded-Proto": "https",
             "X-Twilio-Signature": twilio_signed(attacker, params)},
        )  # fmt: skip
    http_public = PUBLIC_URL.replace("https://", "http://") + path
    yield "signed for http, forwarded as http", path, body, {
        **FORM, "X-Forwarded-Proto": "http", "X-Twilio-Signature": twilio_signed(http_public, params)}  # fmt: skip
    yield "signed for the internal address", path, body, {
        **FORM, "X-Twilio-Signature": twilio_signed("http://testserver" + path, params)}  # fmt: skip
    # Tampered: the signed parameters or the URL's query changed.
    yield "status changed", path, urlencode({**params, "MessageStatus": "undelivered"}).encode(), {
        **FORM, "X-Twilio-Signature": good}  # fmt: skip
    yield "parameter added", path, urlencode({**params, "ErrorCode": "21610"}).encode(), {
        **FORM, "X-Twilio-Signature": good}  # fmt: skip
    yield "parameter dropped", path, urlencode({k: v for k, v in params.items() if k != "To"}).encode(), {
        **FORM, "X-Twilio-Signature": good}  # fmt: skip
    yield "parameter repeated", path, body + b"&MessageStatus=failed", {**FORM, "X-Twilio-Signature": good}
    yield "query rewritten", path.replace("outreach_id=", "outreach_id=f"), body, {**FORM, "X-Twilio-Signature": good}
    yield "query extended", path + "&x=1", body, {**FORM, "X-Twilio-Signature": good}
    yield "other route", "/webhooks/twilio/inbound", body, {**FORM, "X-Twilio-Signature": good}
    yield "wrong token", path, body, {**FORM, "X-Twilio-Signature": twilio_signed(public, params, "guess")}
    yield "signature case changed", path, body, {**FORM, "X-Twilio-Signature": good.swapcase()}
    yield "not latin-1 form", path, "MessageStatus=délivré".encode("utf-16"), {**FORM, "X-Twilio-Signature": good}


def test_twilio_attack_corpus_is_refused_and_writes_nothing(runtime: Runtime, client: TestClient) -> None:
    outbox_id = add_message(runtime, add_candidate(runtime), channel="sms")
    path = f"/webhooks/twilio/status?outreach_id={outbox_id}"
    params = fixture_form("status_callback_delivered.form")
    before = snapshot(runtime)
    cases = 0
    for case, request_path, body, headers in twilio_attacks(path, params):
        answer = client.post(request_path, content=body, headers=headers)
        assert answer.status_code == 403, (case, answer.status_code, answer.text)
        cases += 1
    changed = changed_rows(before, snapshot(runtime))
    print(f"twilio attacks: {cases}, refused 403: {cases}, rows changed: {changed}")
    assert changed == 0
    # Spoofed forwarding headers do not break a genuine callback either: the public URL is what is validated.
    genuine = {**FORM, "X-Forwarded-Host": "evil.example", "X-Forwarded-Proto": "http",
               "X-Twilio-Signature": twilio_signed(PUBLIC_URL + path, params)}  # fmt: skip
    assert client.post(path, content=urlencode(params).encode(), headers=genuine).status_code == 200


def test_twilio_extra_and_repeated_parameters_still_pass(runtime: Runtime, client: TestClient) -> None:
    outbox_id = add_message(runtime, add_candidate(runtime), channel="sms")
    path = f"/webhooks/twilio/status?outreach_id={outbox_id}"
    params: list[tuple[str, str]] = [
        *fixture_form("status_callback_sent.form").items(),
        ("StirVerstat", "TN-Validation-Passed-A"),
        ("MediaUrl0", "https://api.twilio.com/media/1"),
        ("AddOns", json.dumps({"status": "successful", "results": {}})),
        ("Unicode", "退订 ✓"),
        ("Repeated", "1"),
        ("Repeated", "2"),
        ("Empty", ""),
    ]
    headers = {**FORM, "X-Twilio-Signature": twilio_signed(PUBLIC_URL + path, params)}
    answer = client.post(path, content=urlencode(params).encode(), headers=headers)
    assert answer.status_code == 200, answer.text


def inbound_attempts(body: bytes) -> Iterator[tuple[str, str, dict[str, str]]]:
    content = {"Content-Type": "multipart/form-data; boundary=xYzZY"}
    path = "/webhooks/sendgrid/inbound"

    def basic(user: str, password: str) -> dict[str, str]:
        return {**content, "Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}

    yield "no token", path, content
    yield "empty token", f"{path}?token=", content
    yield "prefix of the token", f"{path}?token={INBOUND_TOKEN[:-1]}", content
    yield "token plus a character", f"{path}?token={INBOUND_TOKEN}x", content
    yield "token in upper case", f"{path}?token={INBOUND_TOKEN.upper()}", content
    yield "token as the user name", path, basic(INBOUND_TOKEN, "")
    yield "wrong password", path, basic("inbound", "guess")
    yield "empty password", path, basic("inbound", "")
    yield "not base64", path, {**content, "Authorization": "Basic %%%"}
    yield "bearer scheme", path, {**content, "Authorization": f"Bearer {INBOUND_TOKEN[:-1]}"}
    yield "token in a header", path, {**content, "X-Token": INBOUND_TOKEN}


def test_inbound_parse_without_the_token_writes_nothing(runtime: Runtime, client: TestClient) -> None:
    from tests.web.test_inbound_parse import fixture_body

    add_candidate(runtime)
    body = fixture_body()
    before = snapshot(runtime)
    refused = 0
    for case, path, headers in inbound_attempts(body):
        answer = client.post(path, content=body, headers=headers)
        assert answer.status_code == 403, (case, answer.status_code)
        refused += 1
    changed = changed_rows(before, snapshot(runtime))
    print(f"inbound parse attempts without the token: {refused}, refused 403: {refused}, rows changed: {changed}")
    assert changed == 0


def test_twilio_inbound_forged_writes_nothing(runtime: Runtime, client: TestClient) -> None:
    add_candidate(runtime)
    params = {**fixture_form("inbound_sms.form"), "Body": "STOP"}
    path = "/webhooks/twilio/inbound"
    before = snapshot(runtime)
    attempts: list[dict[str, Any]] = [
        {**FORM},
        {**FORM, "X-Twilio-Signature": twilio_signed(PUBLIC_URL + path, {**params, "Body": "hello"})},
        {**FORM, "X-Twilio-Signature": twilio_signed("https://evil.example" + path, params), "Host": "evil.example"},
        {**FORM, "X-Twilio-Signature": twilio_signed(PUBLIC_URL + "/webhooks/twilio/status", params)},
    ]
    for headers in attempts:
        assert client.post(path, content=urlencode(params).encode(), headers=headers).status_code == 403
    assert changed_rows(before, snapshot(runtime)) == 0
