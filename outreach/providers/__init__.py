"""Email and SMS providers, and the one function that picks and configures them.

Everything else talks to :class:`~outreach.providers.base.EmailProvider` and
:class:`~outreach.providers.base.SmsProvider` only, through :func:`build_providers`.
"""

from __future__ import annotations

from outreach.core.config import Secret, Settings
from outreach.providers.base import (
    EmailMessage,
    EmailProvider,
    Providers,
    SendResult,
    SmsMessage,
    SmsProvider,
)

__all__ = [
    "EmailMessage",
    "EmailProvider",
    "Providers",
    "SendResult",
    "SmsMessage",
    "SmsProvider",
    "build_providers",
]

# Placeholders the sandbox accepts when no real credentials are configured. The auth token matches the
# sandbox's default, so its signed status callbacks validate with the same settings.
SANDBOX_SENDGRID_API_KEY = "SG.sandbox"
SANDBOX_TWILIO_ACCOUNT_SID = "AC" + "0" * 32
SANDBOX_TWILIO_AUTH_TOKEN = "sandbox-token"
# Twilio's documented magic "From" number for test credentials.
SANDBOX_SMS_FROM = "+15005550006"


def build_providers(settings: Settings, *, sandbox_url: str | None = None) -> Providers:
    """SendGrid for email and Twilio for SMS, configured from ``settings``.

    With ``sandbox_url`` both point at that sandbox instead of the real APIs, and missing credentials or
    sender are replaced by placeholders (real ones, when set, are still what gets sent). Without it, missing
    credentials raise :class:`~outreach.core.errors.ConfigurationError`.
    """
    # Imported here so that importing the package (for the dataclasses) does not load both SDKs.
    from outreach.providers.sendgrid import SendGridProvider
    from outreach.providers.twilio import TwilioProvider

    if sandbox_url:
        base = sandbox_url.rstrip("/")
        changes: dict[str, object] = {"sendgrid_host": base, "twilio_base_url": base}
        if not settings.has_sendgrid_credentials:
            changes["sendgrid_api_key"] = Secret(SANDBOX_SENDGRID_API_KEY)
        if not settings.has_twilio_credentials:
            changes["twilio_account_sid"] = settings.twilio_account_sid or SANDBOX_TWILIO_ACCOUNT_SID
            changes["twilio_auth_token"] = Secret(SANDBOX_TWILIO_AUTH_TOKEN)
        if not (settings.sms_from or settings.twilio_messaging_service_sid):
            changes["sms_from"] = SANDBOX_SMS_FROM
        settings = settings.with_overrides(**changes)
    return Providers(email=SendGridProvider(settings), sms=TwilioProvider(settings))
