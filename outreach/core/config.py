"""Settings, read from the environment once and typed.

Every setting has an ``OUTREACH_`` name except the provider credentials, which keep the names the providers'
own tools use (``SENDGRID_API_KEY``, ``TWILIO_ACCOUNT_SID``, ``TWILIO_AUTH_TOKEN``,
``TWILIO_MESSAGING_SERVICE_SID``). Secrets are wrapped in :class:`Secret` so they never show in a repr or a
traceback. The README lists every variable; keep the two in step.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from outreach.core.clock import check_instant
from outreach.core.errors import ConfigurationError


class Secret:
    """A string that does not print itself."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __bool__(self) -> bool:
        return bool(self._value)

    def __repr__(self) -> str:
        return "Secret('**********')" if self._value else "Secret('')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


def _flag(raw: str, name: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off", ""}:
        return False
    raise ConfigurationError(f"{name} must be true or false, got {raw!r}")


def _number(raw: str, name: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise ConfigurationError(f"{name} must be a number, got {raw!r}") from None
    if value < 0:
        raise ConfigurationError(f"{name} must not be negative, got {raw!r}")
    return value


def _instant(raw: str, name: str) -> datetime | None:
    if not raw:
        return None
    try:
        parsed = datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        raise ConfigurationError(f"{name} must be an ISO-8601 instant such as 2026-11-25T10:00:00+08:00") from None
    try:
        return check_instant(parsed)
    except ValueError as exc:
        raise ConfigurationError(f"{name} {exc}") from None


def _networks(raw: str, name: str) -> tuple[str, ...]:
    """Comma-separated IP addresses or CIDR networks, each written the one way Python spells it."""
    found: list[str] = []
    for part in (p.strip() for p in raw.split(",")):
        if not part:
            continue
        try:
            found.append(str(ipaddress.ip_network(part)) if "/" in part else str(ipaddress.ip_address(part)))
        except ValueError:
            raise ConfigurationError(
                f"{name}: {part!r} is not an IP address or a network such as 10.0.0.0/8 (host bits must be zero)"
            ) from None
    return tuple(found)


REAL_SENDGRID_HOST = "https://api.sendgrid.com"
REAL_TWILIO_BASE_URL = "https://api.twilio.com"
#: The shortest OUTREACH_SECRET_KEY accepted when the real providers are configured (a 256-bit key in hex is 64).
MIN_SECRET_KEY_LENGTH = 32
#: The longest a dashboard session may last or idle (seconds).
MAX_SESSION_SECONDS = 366 * 86400


@dataclass(frozen=True)
class Settings:
    database_url: str = "sqlite:///outreach.db"
    broker_url: str = ""
    campaigns_dir: Path = Path("campaigns")
    templates_dir: Path = Path("templates")
    public_url: str = "http://127.0.0.1:8000"
    secret_key: Secret = field(default_factory=lambda: Secret(""))

    sendgrid_api_key: Secret = field(default_factory=lambda: Secret(""))
    sendgrid_host: str = REAL_SENDGRID_HOST
    sendgrid_webhook_public_key: str = ""
    inbound_token: Secret = field(default_factory=lambda: Secret(""))
    twilio_account_sid: str = ""
    twilio_auth_token: Secret = field(default_factory=lambda: Secret(""))
    twilio_base_url: str = REAL_TWILIO_BASE_URL
    twilio_messaging_service_sid: str = ""
    email_from: str = "Talent Team <talent@example.com>"
    email_reply_to: str = ""
    sms_from: str = ""
    provider_timeout: float = 10.0

    company_name: str = "Example Co."
    company_timezone: str = "Asia/Shanghai"
    default_locale: str = "en"
    locales: tuple[str, ...] = ("en", "zh-CN")
    default_phone_region: str = "CN"

    sandbox_port: int = 8025
    #: A running provider sandbox that both SDKs send to while the credentials of either provider are missing.
    sandbox_url: str = ""
    tick_interval: float = 1.0
    claim_batch: int = 1000
    lease_seconds: float = 120.0
    cron_misfire_grace: float = 86400.0
    #: Seconds an ``uncertain`` message may wait for a provider event before the sweep alerts a person.
    uncertain_alert_after: float = 1800.0
    #: Ask the providers about ``uncertain`` messages (outreach.pipeline.reconcile): found → sent, absent → sent again.
    reconcile_lookups: bool = True
    #: The SendGrid account has the Email Activity API (a paid add-on): email lookups use it.
    sendgrid_email_activity: bool = False
    #: Seconds after the hand-off within which a provider may still not list a message it accepted: "absent" is
    #: proof only after it.
    provider_visibility_delay: float = 600.0
    #: Provider lookups per scheduler pass, at most.
    reconcile_batch: int = 20
    max_retries: int = 8
    queue_name: str = "outreach"
    log_level: str = "INFO"
    #: Start the service's clock at this instant and let it run from there (trials and tests; never beside the
    #: real providers). ``None``: the machine's clock.
    clock_start: datetime | None = None

    # Guards on the public routes (outreach.web.ratelimit): per client IP; 0 turns the rate limit off.
    public_rate_limit: float = 20.0
    public_rate_burst: int = 200
    #: Provider webhooks get their own, larger budget per IP: at volume SendGrid and Twilio post from few addresses,
    #: and Twilio does not retry a status callback answered 429.
    webhook_rate_limit: float = 500.0
    webhook_rate_burst: int = 5000
    rate_limit_redis_url: str = ""
    #: Reverse proxies whose ``X-Forwarded-For``/``-Proto`` are believed (IPs or CIDR networks); nobody's by default.
    trusted_proxies: tuple[str, ...] = ()
    max_request_bytes: int = 1024 * 1024
    max_webhook_bytes: int = 5 * 1024 * 1024

    #: Dashboard logins (server-side sessions): they end after this many seconds without a request ...
    dashboard_idle_seconds: float = 12 * 3600.0
    #: ... and this many after the login, however busy.
    dashboard_session_seconds: float = 7 * 86400.0

    @property
    def has_sendgrid_credentials(self) -> bool:
        return bool(self.sendgrid_api_key)

    @property
    def has_twilio_credentials(self) -> bool:
        return bool(self.twilio_account_sid and self.twilio_auth_token)

    @property
    def has_all_credentials(self) -> bool:
        """Both providers' credentials are set: no sandbox is used (``outreach up`` starts none)."""
        return self.has_sendgrid_credentials and self.has_twilio_credentials

    def with_overrides(self, **changes: Any) -> Settings:
        return replace(self, **changes)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ
        defaults = cls()

        def text(name: str, default: str) -> str:
            return env.get(name, default).strip()

        settings = cls(
            database_url=text("OUTREACH_DATABASE_URL", defaults.database_url),
            broker_url=text("OUTREACH_BROKER_URL", ""),
            campaigns_dir=Path(text("OUTREACH_CAMPAIGNS_DIR", str(defaults.campaigns_dir))),
            templates_dir=Path(text("OUTREACH_TEMPLATES_DIR", str(defaults.templates_dir))),
            public_url=text("OUTREACH_PUBLIC_URL", defaults.public_url).rstrip("/"),
            secret_key=Secret(text("OUTREACH_SECRET_KEY", "")),
            sendgrid_api_key=Secret(text("SENDGRID_API_KEY", "")),
            sendgrid_host=text("OUTREACH_SENDGRID_HOST", defaults.sendgrid_host).rstrip("/"),
            sendgrid_webhook_public_key="".join(text("OUTREACH_SENDGRID_WEBHOOK_PUBLIC_KEY", "").split()),
            inbound_token=Secret(text("OUTREACH_INBOUND_TOKEN", "")),
            twilio_account_sid=text("TWILIO_ACCOUNT_SID", ""),
            twilio_auth_token=Secret(text("TWILIO_AUTH_TOKEN", "")),
            twilio_base_url=text("OUTREACH_TWILIO_BASE_URL", defaults.twilio_base_url).rstrip("/"),
            twilio_messaging_service_sid=text("TWILIO_MESSAGING_SERVICE_SID", ""),
            email_from=text("OUTREACH_EMAIL_FROM", defaults.email_from),
            email_reply_to=text("OUTREACH_EMAIL_REPLY_TO", ""),
            sms_from=text("OUTREACH_SMS_FROM", ""),
            provider_timeout=_number(
                text("OUTREACH_PROVIDER_TIMEOUT", str(defaults.provider_timeout)), "OUTREACH_PROVIDER_TIMEOUT"
            ),
            company_name=text("OUTREACH_COMPANY_NAME", defaults.company_name),
            company_timezone=text("OUTREACH_COMPANY_TIMEZONE", defaults.company_timezone),
            default_locale=text("OUTREACH_DEFAULT_LOCALE", defaults.default_locale),
            locales=tuple(
                part.strip() for part in text("OUTREACH_LOCALES", ",".join(defaults.locales)).split(",") if part.strip()
            ),
            default_phone_region=text("OUTREACH_DEFAULT_PHONE_REGION", defaults.default_phone_region).upper(),
            sandbox_port=int(_number(text("OUTREACH_SANDBOX_PORT", "8025"), "OUTREACH_SANDBOX_PORT")),
            sandbox_url=text("OUTREACH_SANDBOX_URL", "").rstrip("/"),
            tick_interval=_number(text("OUTREACH_TICK_INTERVAL", "1.0"), "OUTREACH_TICK_INTERVAL"),
            claim_batch=int(_number(text("OUTREACH_CLAIM_BATCH", "1000"), "OUTREACH_CLAIM_BATCH")),
            lease_seconds=_number(text("OUTREACH_LEASE_SECONDS", "120"), "OUTREACH_LEASE_SECONDS"),
            cron_misfire_grace=_number(text("OUTREACH_CRON_MISFIRE_GRACE", "86400"), "OUTREACH_CRON_MISFIRE_GRACE"),
            uncertain_alert_after=_number(
                text("OUTREACH_UNCERTAIN_ALERT_AFTER", "1800"), "OUTREACH_UNCERTAIN_ALERT_AFTER"
            ),
            reconcile_lookups=_flag(text("OUTREACH_RECONCILE_LOOKUPS", "true"), "OUTREACH_RECONCILE_LOOKUPS"),
            sendgrid_email_activity=_flag(
                text("OUTREACH_SENDGRID_EMAIL_ACTIVITY", "false"), "OUTREACH_SENDGRID_EMAIL_ACTIVITY"
            ),
            provider_visibility_delay=_number(
                text("OUTREACH_PROVIDER_VISIBILITY_DELAY", "600"), "OUTREACH_PROVIDER_VISIBILITY_DELAY"
            ),
            reconcile_batch=int(_number(text("OUTREACH_RECONCILE_BATCH", "20"), "OUTREACH_RECONCILE_BATCH")),
            max_retries=int(_number(text("OUTREACH_MAX_RETRIES", "8"), "OUTREACH_MAX_RETRIES")),
            queue_name=text("OUTREACH_QUEUE", defaults.queue_name),
            log_level=text("OUTREACH_LOG_LEVEL", defaults.log_level).upper(),
            clock_start=_instant(text("OUTREACH_CLOCK_START", ""), "OUTREACH_CLOCK_START"),
            public_rate_limit=_number(
                text("OUTREACH_PUBLIC_RATE_LIMIT", str(defaults.public_rate_limit)), "OUTREACH_PUBLIC_RATE_LIMIT"
            ),
            public_rate_burst=max(
                1, int(_number(text("OUTREACH_PUBLIC_RATE_BURST", "200"), "OUTREACH_PUBLIC_RATE_BURST"))
            ),
            webhook_rate_limit=_number(
                text("OUTREACH_WEBHOOK_RATE_LIMIT", str(defaults.webhook_rate_limit)), "OUTREACH_WEBHOOK_RATE_LIMIT"
            ),
            webhook_rate_burst=max(
                1, int(_number(text("OUTREACH_WEBHOOK_RATE_BURST", "5000"), "OUTREACH_WEBHOOK_RATE_BURST"))
            ),
            rate_limit_redis_url=text("OUTREACH_RATE_LIMIT_REDIS_URL", ""),
            trusted_proxies=_networks(text("OUTREACH_TRUSTED_PROXIES", ""), "OUTREACH_TRUSTED_PROXIES"),
            max_request_bytes=int(_number(text("OUTREACH_MAX_REQUEST_BYTES", "1048576"), "OUTREACH_MAX_REQUEST_BYTES")),
            max_webhook_bytes=int(_number(text("OUTREACH_MAX_WEBHOOK_BYTES", "5242880"), "OUTREACH_MAX_WEBHOOK_BYTES")),
            dashboard_idle_seconds=_number(
                text("OUTREACH_DASHBOARD_IDLE_SECONDS", "43200"), "OUTREACH_DASHBOARD_IDLE_SECONDS"
            ),
            dashboard_session_seconds=_number(
                text("OUTREACH_DASHBOARD_SESSION_SECONDS", "604800"), "OUTREACH_DASHBOARD_SESSION_SECONDS"
            ),
        )
        settings.validate()
        return settings

    def validate(self) -> None:
        try:
            ZoneInfo(self.company_timezone)
        except (ZoneInfoNotFoundError, ValueError):
            raise ConfigurationError(
                f"OUTREACH_COMPANY_TIMEZONE: unknown IANA timezone {self.company_timezone!r}"
            ) from None
        scheme = self.broker_url.split("://", 1)[0] if self.broker_url else ""
        if scheme not in {"", "redis", "rediss", "amqp", "amqps"}:
            raise ConfigurationError(f"OUTREACH_BROKER_URL: expected redis://… or amqp://…, got scheme {scheme!r}")
        for name, seconds in (
            ("OUTREACH_DASHBOARD_IDLE_SECONDS", self.dashboard_idle_seconds),
            ("OUTREACH_DASHBOARD_SESSION_SECONDS", self.dashboard_session_seconds),
        ):
            if not 0 < seconds <= MAX_SESSION_SECONDS:
                raise ConfigurationError(f"{name} must be more than 0 and at most {MAX_SESSION_SECONDS} (a year)")
        if self.twilio_account_sid and not self.twilio_auth_token:
            raise ConfigurationError("TWILIO_AUTH_TOKEN is required when TWILIO_ACCOUNT_SID is set")
        if self.talks_to_real_providers and len(self.secret_key.reveal()) < MIN_SECRET_KEY_LENGTH:
            # Without it the link-signing key derives from the database URL: anyone who learns the URL could forge
            # unsubscribe and tracked links for real candidates.
            raise ConfigurationError(
                f"OUTREACH_SECRET_KEY: required (at least {MIN_SECRET_KEY_LENGTH} characters) when sending through "
                "the real SendGrid or Twilio; it signs the links candidates receive"
            )

        if self.clock_start is not None and self.talks_to_real_providers:
            raise ConfigurationError(
                "OUTREACH_CLOCK_START moves the service's clock: it is for trials against the sandbox, never with "
                "the real SendGrid or Twilio (candidates would get messages judged at the wrong time)"
            )

    @property
    def talks_to_real_providers(self) -> bool:
        """Credentials for a provider whose API host is the real one (not a sandbox or a test double)."""
        real_sendgrid = self.has_sendgrid_credentials and self.sendgrid_host == REAL_SENDGRID_HOST
        real_twilio = self.has_twilio_credentials and self.twilio_base_url == REAL_TWILIO_BASE_URL
        return real_sendgrid or real_twilio

    @property
    def signing_key(self) -> bytes:
        """Key for the HMAC tokens we mint; a per-database fallback keeps development working."""
        if self.secret_key:
            return self.secret_key.reveal().encode()
        return ("outreach-dev-key:" + self.database_url).encode()


_current: Settings | None = None


def get_settings() -> Settings:
    global _current
    if _current is None:
        _current = Settings.from_env()
    return _current


def set_settings(settings: Settings | None) -> None:
    """Replace the process-wide settings (used by the CLI and tests)."""
    global _current
    _current = settings
