"""SMS through Twilio's Programmable Messaging API, with the official SDK.

The client keeps one ``requests`` session, so connections to Twilio are pooled and reused across sends and
threads. Error mapping: ``TwilioRestException`` carries the HTTP status and Twilio's error code; 429/20429 and
5xx are transient, 21610 (the recipient replied STOP) is permanent and suppresses the number, other 4xx are
permanent. Of the ``requests`` exceptions the SDK lets through, a connection that never opened (refused, DNS,
``ConnectTimeout``) is transient; a failure after the request went out (``ReadTimeout``, a reset or
``ChunkedEncodingError`` while reading the answer) is ambiguous (:class:`~outreach.core.errors.AmbiguousProviderError`):
Twilio may have accepted the message, so it is not resent.

Lookups (:meth:`TwilioProvider.look_up`) read the Messages list for the recipient (``To``) and our sender
(``From``; through a Messaging Service, its sid on each message): every outbound message created since the hand-off
(less :data:`CLOCK_SKEW`). A Message resource does not carry its status callback, so a message is ours when its body
holds the text we sent (Twilio may add a trial prefix or opt-out words). ``DateSent`` is not used as a filter: it is a
day and stays empty while a message waits in Twilio's queue, which would hide exactly the messages we must not send
twice; the window is applied to ``date_created`` here, and a recipient with more than :data:`LOOKUP_LIMIT` messages
from us is an answer Twilio could not complete.
"""

from __future__ import annotations

import http.client
import logging
from datetime import timedelta
from typing import Any

import requests
from requests.adapters import HTTPAdapter
from twilio.base.exceptions import TwilioException, TwilioRestException, TwilioServiceException
from twilio.http.http_client import TwilioHttpClient
from twilio.rest import Client

from outreach.core.config import Settings
from outreach.core.errors import (
    AmbiguousProviderError,
    ConfigurationError,
    PermanentProviderError,
    ProviderError,
    TransientProviderError,
)
from outreach.providers.base import (
    Lookup,
    LookupAnswer,
    ProviderPipeline,
    SendResult,
    Sighting,
    SmsMessage,
    SmsProvider,
)
from outreach.providers.http import nothing_sent

__all__ = ["TwilioProvider"]

_NAME = "twilio"
# Enough connections for a worker process's threads; requests' default of 10 would make the 11th thread
# open and discard a connection per send.
_POOL_SIZE = 32
#: Messages to one recipient a lookup reads at most; more and it cannot be sure it saw the message's window.
LOOKUP_LIMIT = 200
#: How far Twilio's clock and ours may disagree: a lookup's window opens this long before the hand-off.
CLOCK_SKEW = timedelta(minutes=5)
_OUTBOUND = frozenset({"outbound-api", "outbound-call", "outbound-reply"})

# Our own wording for the codes we expect: Twilio's messages quote the phone number, ours never do.
_DESCRIPTIONS = {
    20003: "authentication failed",
    20429: "too many requests",
    21211: "invalid 'To' phone number",
    21212: "invalid 'From' number",
    21408: "sending to this region is not enabled",
    21602: "message body is required",
    21603: "a 'From' number or messaging service is required",
    21604: "a 'To' number is required",
    21606: "the 'From' number cannot send SMS",
    21608: "trial accounts can only send to verified numbers",
    21610: "the recipient has unsubscribed (replied STOP)",
    21612: "Twilio cannot route to this number",
    21614: "'To' is not a mobile number",
    21617: "message body exceeds 1600 characters",
    20500: "Twilio internal server error",
    20503: "Twilio service unavailable",
}


class _DebugLogger(logging.LoggerAdapter[logging.Logger]):
    """Hands the SDK a logger that demotes its per-request INFO chatter to DEBUG."""

    def log(self, level: int, msg: Any, *args: Any, **kwargs: Any) -> None:
        super().log(logging.DEBUG if level == logging.INFO else level, msg, *args, **kwargs)


def _describe(status: int, code: int | None) -> str:
    if code is not None and code in _DESCRIPTIONS:
        return _DESCRIPTIONS[code]
    if status >= 500:
        return f"server error (HTTP {status})"
    return f"request rejected with HTTP {status}"


def _lookup_problem(exc: Exception) -> str:
    """Why a Messages list failed, in our words: an error page comes as ``TwilioException("Unable to fetch page",
    response)``, whose text is not ours to log; only its HTTP status is kept."""
    status = getattr(exc, "status", None)
    if status is None and len(exc.args) > 1:
        status = getattr(exc.args[1], "status_code", None)
    if isinstance(status, int):
        return f"the Messages list answered HTTP {status}"
    return f"the Messages list failed ({type(exc).__name__})"


class TwilioProvider(ProviderPipeline[SmsMessage, dict[str, Any], Any], SmsProvider):
    """:class:`SmsProvider` backed by ``twilio.rest.Client``.

    Sends from ``settings.sms_from`` when it is set, otherwise through
    ``settings.twilio_messaging_service_sid``.
    ``settings.twilio_base_url`` replaces ``https://api.twilio.com`` (sandbox, tests);
    ``settings.provider_timeout`` bounds connect and read.
    """

    name = _NAME

    def __init__(self, settings: Settings) -> None:
        account_sid = settings.twilio_account_sid
        auth_token = settings.twilio_auth_token.reveal()
        if not (account_sid and auth_token):
            raise ConfigurationError("TWILIO_ACCOUNT_SID and TWILIO_AUTH_TOKEN are required")
        if not (settings.sms_from or settings.twilio_messaging_service_sid):
            raise ConfigurationError("set OUTREACH_SMS_FROM or TWILIO_MESSAGING_SERVICE_SID to send SMS")
        self._sender: dict[str, str] = (
            {"from_": settings.sms_from}
            if settings.sms_from
            else {"messaging_service_sid": settings.twilio_messaging_service_sid}
        )
        http_client = TwilioHttpClient(
            pool_connections=True,
            timeout=settings.provider_timeout or None,
            logger=_DebugLogger(logging.getLogger("outreach.providers.twilio.http"), {}),
        )
        # The SDK sizes the pool for https only; the sandbox and tests speak plain http.
        for scheme in ("https://", "http://"):
            http_client.session.mount(scheme, HTTPAdapter(pool_maxsize=_POOL_SIZE))
        client = Client(account_sid, auth_token, http_client=http_client)
        # The SDK reads TWILIO_EDGE / TWILIO_REGION from the environment and would rewrite the host (and so
        # the base URL below); where messages go is decided by our settings alone.
        client.edge = None
        client.region = None
        # Every URL is built from the Api domain's base_url ("https://api.twilio.com" + "/2010-04-01/...").
        client.api.base_url = settings.twilio_base_url.rstrip("/")
        self._client = client

    def send_sms(self, message: SmsMessage) -> SendResult:
        return self.run(message)

    @property
    def can_look_up(self) -> bool:
        return True

    def look_up(self, lookup: Lookup) -> LookupAnswer:
        """The outbound messages from our sender to ``lookup.to`` created since the hand-off; ours (by body) marked."""
        sender = {"from_": self._sender["from_"]} if "from_" in self._sender else {}
        service = self._sender.get("messaging_service_sid")
        try:
            listed = self._client.messages.list(
                to=lookup.to, limit=LOOKUP_LIMIT + 1, page_size=LOOKUP_LIMIT + 1, **sender
            )
        except (TwilioException, requests.RequestException, OSError, http.client.HTTPException, ValueError) as exc:
            return LookupAnswer(problem=_lookup_problem(exc))
        if len(listed) > LOOKUP_LIMIT:
            return LookupAnswer(problem=f"more than {LOOKUP_LIMIT} messages to this recipient")
        opens = lookup.since - CLOCK_SKEW
        sightings = []
        for message in listed:
            if message.direction not in _OUTBOUND or not message.sid:
                continue
            if service and message.messaging_service_sid not in (None, service):
                continue
            if message.date_created is not None and message.date_created < opens:
                continue
            ours = bool(lookup.body) and lookup.body in (message.body or "")
            sightings.append(Sighting(message.sid, "body" if ours else "none"))
        return LookupAnswer(tuple(sightings))

    def build_payload(self, message: SmsMessage) -> dict[str, Any]:
        payload: dict[str, Any] = {"to": message.to, "body": message.body, **self._sender}
        if message.status_callback:
            payload["status_callback"] = message.status_callback
        if message.validity_period is not None:
            payload["validity_period"] = message.validity_period
        return payload

    def post(self, payload: dict[str, Any]) -> Any:
        return self._client.messages.create(**payload)

    def parse_result(self, response: Any) -> str:
        return str(response.sid or "")

    def map_error(self, exc: Exception) -> ProviderError | None:
        if isinstance(exc, (TwilioRestException, TwilioServiceException)):
            status = int(exc.status)
            code = int(exc.code) if exc.code is not None else None
            code_text = str(code) if code is not None else str(status)
            detail = _describe(status, code)
            if status == 429 or code == 20429:
                return TransientProviderError(_NAME, detail, status=status, code=code_text)
            if status >= 500:
                return TransientProviderError(_NAME, detail, status=status, code=code_text)
            if code == 21610:
                return PermanentProviderError(_NAME, detail, status=status, code=code_text, suppress=True)
            if 400 <= status < 500:
                return PermanentProviderError(_NAME, detail, status=status, code=code_text)
            return TransientProviderError(_NAME, detail, status=status, code=code_text)
        if isinstance(exc, TwilioException):
            return TransientProviderError(_NAME, f"client error ({type(exc).__name__})")
        if not isinstance(exc, (requests.RequestException, OSError, http.client.HTTPException)):
            return None
        if nothing_sent(exc):
            return TransientProviderError(_NAME, f"connection failed ({type(exc).__name__})")
        # The request went out and no answer came back (ReadTimeout, a reset or ChunkedEncodingError while
        # reading): Twilio may have accepted the message.
        if isinstance(exc, (requests.Timeout, TimeoutError)):
            return AmbiguousProviderError(_NAME, "timed out waiting for the answer")
        return AmbiguousProviderError(_NAME, f"connection lost before the answer ({type(exc).__name__})")
