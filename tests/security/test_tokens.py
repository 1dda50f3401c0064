"""Unsubscribe, redirect and reply tokens: 100,000 forgeries change nothing; /r/ is no open redirect;
unsubscribe tokens name a message, not a candidate, and expire."""

from __future__ import annotations

import base64
import random
from collections.abc import Iterator
from datetime import timedelta
from urllib.parse import quote

from fastapi.testclient import TestClient

from outreach.core.clock import utcnow
from outreach.core.config import Secret
from outreach.core.models import new_id
from outreach.domain.tokens import (
    UNSUBSCRIBE_VALIDITY,
    outbox_id_from_reply_address,
    sign,
    unsubscribe_message_id,
    unsubscribe_url,
    verify,
)
from outreach.ops.sandbox import SandboxServer
from outreach.pipeline.links import follow, link_id_from_token
from outreach.service.runtime import Runtime
from outreach.web import create_app
from tests.pipeline.test_links import BOOKING, send_jd_email, tracked_paths
from tests.security.util import changed_rows, snapshot

BROWSER = {"user-agent": "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 Chrome/126.0 Safari/537.36"}
FORGERIES = 100_000


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forged_tokens(runtime: Runtime, real: list[str], ids: list[int], count: int, seed: int = 7) -> Iterator[str]:
    """Tokens an attacker can make: every kind below, in turn, with random parts."""
    rng = random.Random(seed)
    other_key = runtime.settings.with_overrides(secret_key=Secret("another deployment's key"))
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_."
    for n in range(count):
        token = rng.choice(real)
        body, mac = token.split(".")
        some_id = rng.choice([*ids, rng.randint(1, 2**31), 0, -1])
        kind = n % 10
        if kind == 0:  # a plausible payload and a random MAC
            payload = rng.choice([f"email:{some_id}", f"sms:{some_id}", str(some_id)])
            yield f"{b64(payload.encode())}.{b64(rng.randbytes(16))}"
        elif kind == 1:  # a real MAC on another payload
            payload = rng.choice([f"email:{some_id}", f"sms:{some_id}", str(some_id), f"{some_id}\n"])
            yield f"{b64(payload.encode())}.{mac}"
        elif kind == 2:  # one character of a real MAC changed
            i = rng.randrange(len(mac))
            yield f"{body}.{mac[:i]}{rng.choice([c for c in alphabet[:64] if c != mac[i]])}{mac[i + 1 :]}"
        elif kind == 3:  # a truncated or extended MAC
            yield f"{body}.{mac[: rng.randrange(len(mac))]}" if n % 20 == 3 else f"{body}.{mac}{rng.choice(alphabet)}"
        elif kind == 4:  # a genuine token of another purpose
            purpose = rng.choice(["reply", "R", "unsubscribe\n", "", "r\n", "Unsubscribe"])
            yield sign(runtime.settings, purpose, rng.choice([f"email:{some_id}", str(some_id)]))
        elif kind == 5:  # the right purpose, another key
            yield sign(other_key, rng.choice(["unsubscribe", "r"]), rng.choice([f"email:{some_id}", str(some_id)]))
        elif kind == 6:  # non-canonical spellings of a real token
            yield rng.choice(
                [f"{body}=.{mac}", f"{body}.{mac}==", f" {token}", f"{token} ", token.upper(), f"{body}..{mac}",
                 f"{body}.{mac}.{mac}", token.replace("-", "+").replace("_", "/")]
            )  # fmt: skip
        elif kind == 7:  # noise
            yield "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60)))
        elif kind == 8:  # non-ASCII and odd bytes
            yield rng.choice(["é.é", "٣.٣", "\x00.\x00", "%2e%2e", "../../etc", f"{b64('email:١'.encode())}.{mac}"])
        else:  # enormous
            yield "A" * rng.randint(1_000, 20_000) + "." + mac


def test_a_hundred_thousand_forged_tokens_change_nothing(pg_runtime: Runtime, sandbox: SandboxServer) -> None:
    # PostgreSQL only: the loop never reaches the database, so a second run on SQLite would prove nothing more.
    runtime = pg_runtime
    runtime.settings = runtime.settings.with_overrides(public_rate_limit=0.0)
    mail = send_jd_email(runtime, sandbox)
    paths = tracked_paths(runtime, mail.html)
    redirect_tokens = [path.rsplit("/", 1)[1] for path in paths.values()]
    link_ids = [link_id for token in redirect_tokens if (link_id := link_id_from_token(runtime.settings, token))]
    candidate_id = 1
    outbox_id = mail.custom_args["outreach_id"]
    unsubscribe_tokens = [unsubscribe_url(runtime.settings, outbox_id, utcnow()).rsplit("/", 1)[1]]
    real = redirect_tokens + unsubscribe_tokens
    before = snapshot(runtime)

    accepted = 0
    tried = 0
    for n, token in enumerate(forged_tokens(runtime, real, [candidate_id, *link_ids], FORGERIES)):
        tried += 1
        if token in real:
            continue  # a spelling that happens to equal a real token (cannot happen, but never count it)
        for purpose in ("unsubscribe", "r"):
            accepted += verify(runtime.settings, purpose, token) is not None
        accepted += link_id_from_token(runtime.settings, token) is not None
        if n % 10 != 4:  # kind 4 includes genuine reply tokens, which are not forgeries for that purpose
            accepted += outbox_id_from_reply_address(runtime.settings, f"replies+{token}@example.com") is not None
        accepted += follow(runtime, token) is not None
        accepted += unsubscribe_message_id(runtime.settings, token, utcnow()) is not None
    print(f"tokens tried: {tried}, accepted: {accepted}, rows changed: {changed_rows(before, snapshot(runtime))}")
    assert tried == FORGERIES and accepted == 0

    client = TestClient(create_app(runtime), headers=BROWSER)
    sample = list(forged_tokens(runtime, real, [candidate_id, *link_ids], 600, seed=11))
    answers: dict[int, int] = {}
    for n, token in enumerate(sample):
        if not token or token in real:
            continue
        token = quote(token, safe="")
        response = (
            client.post(f"/unsubscribe/{token}")
            if n % 3 == 0
            else client.get(f"/r/{token}", follow_redirects=False)
            if n % 3 == 1
            else client.head(f"/r/{token}", follow_redirects=False)
        )
        answers[response.status_code] = answers.get(response.status_code, 0) + 1
        assert "location" not in response.headers, (n, token)
    after = snapshot(runtime)
    changed = changed_rows(before, after)
    print(f"HTTP sample: {sum(answers.values())} requests, statuses {answers}, rows changed: {changed}")
    assert set(answers) == {404}
    assert changed_rows(before, after) == 0

    # The genuine tokens do work, so the test would see a change.
    assert client.get(paths["book_interview"], follow_redirects=False).headers["location"] == BOOKING
    assert changed_rows(before, snapshot(runtime)) > 0


def test_the_redirect_is_not_open(runtime: Runtime, sandbox: SandboxServer) -> None:
    runtime.settings = runtime.settings.with_overrides(public_rate_limit=0.0)
    paths = tracked_paths(runtime, send_jd_email(runtime, sandbox).html)
    client = TestClient(create_app(runtime), headers=BROWSER)
    good = paths["book_interview"]
    for attempt in (
        f"{good}?url=https://evil.example",
        f"{good}?next=//evil.example&redirect=https://evil.example",
    ):
        response = client.get(attempt, follow_redirects=False)
        assert response.headers["location"] == BOOKING, attempt
    evil = [
        "/r/https://evil.example",
        "/r//evil.example",
        "/r/%2F%2Fevil.example",
        "/r/" + b64(b"https://evil.example") + "." + good.rsplit(".", 1)[1],
        "/r/" + sign(runtime.settings, "unsubscribe", "email:1"),
        "/r/" + sign(runtime.settings, "r", "999999"),  # ours, but no such link was ever sent
    ]
    for attempt in evil:
        response = client.get(attempt, follow_redirects=False)
        assert response.status_code == 404, attempt
        assert "location" not in response.headers, attempt


def test_unsubscribe_tokens_name_a_message_and_expire(runtime: Runtime) -> None:
    settings = runtime.settings
    outbox_id, issued = new_id(), utcnow()
    token = unsubscribe_url(settings, outbox_id, issued).rsplit("/", 1)[1]
    assert verify(settings, "unsubscribe", token) == f"{outbox_id}:{int(issued.timestamp())}"
    assert unsubscribe_message_id(settings, token, issued) == outbox_id
    assert unsubscribe_message_id(settings, token, issued + UNSUBSCRIBE_VALIDITY - timedelta(seconds=1)) == outbox_id
    assert unsubscribe_message_id(settings, token, issued + UNSUBSCRIBE_VALIDITY + timedelta(seconds=1)) is None
    other_key = settings.with_overrides(secret_key=Secret("another deployment's key"))
    assert unsubscribe_message_id(other_key, token, issued) is None
    # The old tokens named the channel and our sequential candidate id; they are refused, not misread.
    for old in (sign(settings, "unsubscribe", "email:1"), sign(settings, "unsubscribe", "sms:42")):
        assert (
            verify(settings, "unsubscribe", old) is not None and unsubscribe_message_id(settings, old, issued) is None
        )
