"""Personal data never reaches logs, error output or provider metadata.

Canary names, emails, phones, salaries and reply text (tests/security/conftest.py) go through the main flows —
CSV import (good and bad rows), an ATS event, delivery on both channels through the real SDKs, provider faults,
SendGrid and Twilio webhooks, an SMS and an email reply, a STOP, template and unexpected errors — with every
logger captured at DEBUG. None of the canaries may appear in the captured logs or in the CLI's output, and the
custom args and categories SendGrid received (as the sandbox recorded them) must be opaque ids.
"""

from __future__ import annotations

import json
import re
from datetime import timedelta
from pathlib import Path
from urllib.parse import urlencode

import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session

from outreach.cli import main
from outreach.core.clock import utcnow
from outreach.core.config import Secret, set_settings
from outreach.core.errors import TemplateError
from outreach.core.models import OutboundMessage
from outreach.domain.render import Renderer
from outreach.ops.sandbox import SandboxServer
from outreach.pipeline.delivery import deliver
from outreach.service.runtime import Runtime
from outreach.web import create_app
from outreach.web.webhooks import WebhookSettings
from tests.helpers import PUBLIC_URL, Signer, add_job, fire
from tests.security.conftest import (
    CANARY_EMAIL,
    CANARY_NAME,
    CANARY_NAME_ZH,
    CANARY_PHONE,
    CANARY_PHONE_LOCAL,
    CANARY_SALARY,
    CANARY_TEXT,
    LogSink,
    leaks,
)
from tests.security.test_webhook_attacks import twilio_signed
from tests.web.test_inbound_parse import form

INBOUND_TOKEN = "canary-inbound-token"
OPAQUE = re.compile(r"^[A-Za-z0-9_.:\-]{1,64}$")


def run_cli(runtime: Runtime, *args: str) -> str:
    env = {"OUTREACH_DATABASE_URL": runtime.settings.database_url, "OUTREACH_LOG_LEVEL": "DEBUG"}
    result = CliRunner().invoke(main, list(args), env=env)
    set_settings(runtime.settings)  # the CLI installs its own settings
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    return result.output


def import_canaries(runtime: Runtime, tmp_path: Path) -> str:
    header = "external_id,name,email,phone,locale,timezone,tags,nurture_consent\n"
    good = tmp_path / "good.csv"
    good.write_text(header + f"canary-1,{CANARY_NAME},{CANARY_EMAIL},{CANARY_PHONE_LOCAL},en,Asia/Shanghai,"
                    "stack:python,yes\n", encoding="utf-8")  # fmt: skip
    bad = tmp_path / "bad.csv"
    bad.write_text(
        header
        + f"canary-2,{CANARY_NAME_ZH},{CANARY_EMAIL}x@,{CANARY_PHONE_LOCAL}9,en,,,\n"
        + f"canary-3,{CANARY_NAME},{CANARY_EMAIL},+1{CANARY_PHONE_LOCAL},en,,,\n"
        + f"canary-4,{CANARY_NAME},{CANARY_EMAIL},{CANARY_PHONE},{CANARY_NAME_ZH},,,\n"
        + f"canary-5,{CANARY_NAME},{CANARY_EMAIL},{CANARY_PHONE},en,{CANARY_TEXT},,\n"
        + f"canary-6,{CANARY_NAME},{CANARY_EMAIL},{CANARY_PHONE},en,,{CANARY_TEXT},\n"
        + f"canary-7,{CANARY_NAME * 20},{CANARY_EMAIL},{CANARY_PHONE},en,,,\n",
        encoding="utf-8",
    )
    output = run_cli(runtime, "candidates", "import", str(good))
    assert "imported 1" in output, output
    refused = run_cli(runtime, "candidates", "import", str(bad))
    assert "nothing was imported" in refused and refused.count(str(bad) + ":") == 6, refused
    return output + refused


def sent(runtime: Runtime, channel: str) -> list[OutboundMessage]:
    with Session(runtime.engine) as session:
        query = select(OutboundMessage).where(OutboundMessage.channel == channel, OutboundMessage.status == "sent")
        return list(session.scalars(query))


def test_canaries_stay_out_of_logs_errors_and_provider_metadata(
    runtime: Runtime, sandbox: SandboxServer, all_logs: LogSink, tmp_path: Path
) -> None:
    signer = Signer()
    runtime.settings = runtime.settings.with_overrides(
        public_url=PUBLIC_URL, public_rate_limit=0.0, email_reply_to="Talent <replies@example.com>"
    )
    set_settings(runtime.settings)
    outputs = [import_canaries(runtime, tmp_path)]

    # An ATS event for the canary: jd_intro's email and SMS, through the real SDKs, the first attempts failing.
    add_job(runtime, salary_min=CANARY_SALARY, salary_max=CANARY_SALARY + 1000, description=CANARY_TEXT)
    fire(runtime, "canary-1", "applied", job="j-1", data={"salary": CANARY_SALARY, "note": CANARY_TEXT})
    sandbox.fail("sendgrid", "500")
    sandbox.fail("twilio", "429")
    queued: list[str] = runtime.queued  # type: ignore[attr-defined]
    for minutes in (0, 10, 20, 30, 40):
        at = utcnow() + timedelta(minutes=minutes)
        runtime.scheduler.tick(at)
        with Session(runtime.engine) as session:
            due = session.scalars(select(OutboundMessage.id).where(OutboundMessage.status == "pending")).all()
        for outbox_id in dict.fromkeys([*queued, *due]):
            deliver(runtime, outbox_id, now=at)
        queued.clear()
    emails, texts = sent(runtime, "email"), sent(runtime, "sms")
    with Session(runtime.engine) as session:
        rows = session.execute(select(OutboundMessage.channel, OutboundMessage.status, OutboundMessage.rule,
                                      OutboundMessage.reason, OutboundMessage.not_before)).all()  # fmt: skip
    assert emails and texts, f"the canary's messages were not sent: {rows}"

    # Webhooks: SendGrid events naming the canary's address, Twilio status callbacks, an SMS reply and a STOP,
    # an email reply through Inbound Parse.
    hooks = WebhookSettings(sendgrid_public_key=signer.public_key, inbound_token=Secret(INBOUND_TOKEN))
    client = TestClient(create_app(runtime, hooks), raise_server_exceptions=False)
    now = int(utcnow().timestamp())
    batch = json.dumps([
        {"email": CANARY_EMAIL, "timestamp": now, "event": event, "sg_event_id": f"ev{n}", "outreach_id": emails[0].id,
         "sg_message_id": f"{emails[0].provider_message_id}.filter", "reason": f"550 {CANARY_EMAIL} unknown",
         "url": f"https://example.com/?email={CANARY_EMAIL}", "useragent": CANARY_NAME}
        for n, event in enumerate(["delivered", "open", "click", "bounce"])
    ] + [{"email": CANARY_EMAIL, "event": "nonsense", "timestamp": "x"}]).encode()  # fmt: skip
    assert client.post("/webhooks/sendgrid/events", content=batch, headers=signer.headers(batch)).status_code == 400
    good = batch.replace(b', {"email": "' + CANARY_EMAIL.encode() + b'", "event": "nonsense", "timestamp": "x"}', b"")
    assert client.post("/webhooks/sendgrid/events", content=good, headers=signer.headers(good)).status_code == 200

    def twilio(path: str, params: dict[str, str]) -> int:
        headers = {"Content-Type": "application/x-www-form-urlencoded",
                   "X-Twilio-Signature": twilio_signed(PUBLIC_URL + path, params)}  # fmt: skip
        return client.post(path, content=urlencode(params).encode(), headers=headers).status_code

    status = {"MessageSid": texts[0].provider_message_id or "SMx", "MessageStatus": "undelivered",
              "ErrorCode": "30005", "To": CANARY_PHONE, "From": "+15005550006",
              "ErrorMessage": f"unknown handset {CANARY_PHONE}"}  # fmt: skip
    assert twilio(f"/webhooks/twilio/status?outreach_id={texts[0].id}", status) == 200
    assert twilio("/webhooks/twilio/status?outreach_id=x", {"To": CANARY_PHONE, "Body": CANARY_TEXT}) == 400
    reply = {"MessageSid": "SM" + "c" * 32, "From": CANARY_PHONE, "To": "+15005550006", "Body": CANARY_TEXT}
    assert twilio("/webhooks/twilio/inbound", reply) == 200
    assert twilio("/webhooks/twilio/inbound", {**reply, "MessageSid": "SM" + "d" * 32, "Body": "STOP"}) == 200
    assert twilio("/webhooks/twilio/inbound", {"From": CANARY_PHONE, "Body": CANARY_TEXT}) == 400

    mail = form(
        ("from", f"{CANARY_NAME} <{CANARY_EMAIL}>".encode()),
        ("to", b"replies@example.com"),
        ("subject", f"Re: hello from {CANARY_NAME}".encode()),
        ("text", f"{CANARY_TEXT}\nCall me on {CANARY_PHONE}".encode()),
        ("headers", f"From: {CANARY_EMAIL}\r\nMessage-ID: <canary@example.net>\r\n".encode()),
        ("envelope", json.dumps({"from": CANARY_EMAIL, "to": ["replies@example.com"]}).encode()),
    )
    inbound = client.post(
        f"/webhooks/sendgrid/inbound?token={INBOUND_TOKEN}",
        content=mail,
        headers={"Content-Type": "multipart/form-data; boundary=xYzZY"},
    )
    assert inbound.status_code == 200, inbound.text
    broken = client.post(f"/webhooks/sendgrid/inbound?token={INBOUND_TOKEN}", content=mail[:-20],
                         headers={"Content-Type": "multipart/form-data; boundary=xYzZY"})  # fmt: skip
    assert broken.status_code == 400
    assert not leaks(broken.text)

    # Errors: a template that fails on candidate data, and an unexpected exception in a route.
    root = tmp_path / "t"
    (root / "sms").mkdir(parents=True)
    (root / "sms" / "bad.en.txt").write_text("{{ candidate.name | int(default=none) + 1 }}{{ data[candidate.name] }}")
    with pytest.raises(TemplateError) as failure:
        Renderer(root).render_sms("bad", "en", {"candidate": {"name": CANARY_NAME}, "data": {}})
    outputs.append(str(failure.value))
    app = create_app(runtime, hooks)

    @app.get("/boom")
    def boom() -> None:
        raise ValueError(f"cannot reach {CANARY_NAME} at {CANARY_EMAIL}, {CANARY_PHONE}, salary {CANARY_SALARY}")

    crash = TestClient(app, raise_server_exceptions=False).get("/boom")
    assert crash.status_code == 500
    outputs.append(crash.text)

    logged = all_logs.text
    print(f"log lines captured: {len(all_logs.lines)}, canary hits in logs: {len(leaks(logged))}, "
          f"in error output: {len(leaks(chr(10).join(outputs)))}")  # fmt: skip
    assert len(all_logs.lines) > 20, "the flows logged almost nothing: is the capture working?"
    assert leaks(logged) == [], [line for line in all_logs.lines if leaks(line)][:5]
    assert leaks("\n".join(outputs)) == [], outputs

    # SendGrid metadata: ids only.
    mails = [m for m in sandbox.messages() if m.provider == "sendgrid"]
    assert mails
    metadata = [f"{k}={v}" for m in mails for k, v in m.custom_args.items()]
    metadata += [c for m in mails for c in m.categories]
    print(f"sendgrid messages: {len(mails)}, custom args and categories checked: {len(metadata)}, "
          f"canary hits: {len(leaks(chr(10).join(metadata)))}")  # fmt: skip
    assert leaks("\n".join(metadata)) == []
    for m in mails:
        assert all(OPAQUE.match(k) and OPAQUE.match(str(v)) for k, v in m.custom_args.items()), m.custom_args
        assert all(OPAQUE.match(c) for c in m.categories), m.categories
