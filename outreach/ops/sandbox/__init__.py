"""A local stand-in for SendGrid and Twilio that the real SDKs can talk to.

It speaks ``POST /v3/mail/send`` (SendGrid v3) and ``POST /2010-04-01/Accounts/{sid}/Messages.json``
(Twilio Programmable Messaging) closely enough that ``sendgrid.SendGridAPIClient`` and ``twilio.rest.Client``
work unchanged when pointed at it. Every accepted message is kept in memory as a :class:`SandboxMessage`,
shown on an HTML page (like Mailpit) and served as JSON under ``/_sandbox/``. Twilio status callbacks and
SendGrid event webhooks are posted back, signed the way the real services sign them, so webhook handlers can
be tested end to end. Like the real services, the sandbox posts them whether or not the sender is still there
to read the answer, and retries a webhook that failed (a 5xx or 429 answer, no connection) with backoff for up to
:attr:`SandboxServer.webhook_retry_for` seconds.

Faults can be queued (:meth:`SandboxServer.fail` or ``POST /_sandbox/faults``); each one is consumed by the
next request to that provider's send endpoint (the kinds: :mod:`outreach.ops.sandbox.faults`).

The providers' lookups answer from the same records: Twilio's Messages list (``GET
/2010-04-01/Accounts/{sid}/Messages.json`` by ``To`` and ``From``) and SendGrid's Email Activity API (``GET
/v3/messages?query=(unique_args['outreach_id']="…")``). :meth:`SandboxServer.set_lookups` (or ``POST
/_sandbox/lookups``) turns them ``off`` (403, as for an account without the API, like SendGrid without the add-on),
makes them ``fail`` (500) or back ``on``, and sets how long an accepted message takes to show in them (``delay``).

Control and inspection: ``GET /_sandbox/messages`` (JSON records), ``DELETE /_sandbox/messages``,
``GET /_sandbox/stats``, ``GET /_sandbox/sendgrid-public-key``, ``GET /`` (newest first) and
``GET /messages/{index}`` (one message; email HTML inside a sandboxed iframe).

The modules, by job: :mod:`~outreach.ops.sandbox.server` (the HTTP server, its routes and the records),
:mod:`~outreach.ops.sandbox.sendgrid` and :mod:`~outreach.ops.sandbox.twilio` (what each API accepts or rejects,
what it answers, the webhooks it posts back), :mod:`~outreach.ops.sandbox.faults` (the faults it can inject),
:mod:`~outreach.ops.sandbox.pages` (the HTML pages), :mod:`~outreach.ops.sandbox.webhooks` (posting webhooks
with retries), :mod:`~outreach.ops.sandbox.messages` (the records kept) and :mod:`~outreach.ops.sandbox.discovery`
(how the commands of one data folder find the sandbox running for it).
"""

from __future__ import annotations

from outreach.ops.sandbox.faults import FaultKind
from outreach.ops.sandbox.messages import Provider, SandboxMessage
from outreach.ops.sandbox.server import SandboxServer, serve
from outreach.ops.sandbox.twilio import sms_segments

__all__ = [
    "FaultKind",
    "Provider",
    "SandboxMessage",
    "SandboxServer",
    "serve",
    "sms_segments",
]
