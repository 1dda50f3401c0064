"""Settings from the environment: every bad value is refused with the variable's name."""

from __future__ import annotations

import pytest

from outreach.core.config import MIN_SECRET_KEY_LENGTH, Settings
from outreach.core.errors import ConfigurationError

REAL_SENDGRID = {"SENDGRID_API_KEY": "SG.live-looking-key"}
REAL_TWILIO = {"TWILIO_ACCOUNT_SID": "AC" + "1" * 32, "TWILIO_AUTH_TOKEN": "token"}
KEY = "k" * MIN_SECRET_KEY_LENGTH


def test_defaults_load_without_any_variable() -> None:
    settings = Settings.from_env({})
    assert not settings.talks_to_real_providers
    assert settings.signing_key  # the development fallback


@pytest.mark.parametrize("credentials", [REAL_SENDGRID, REAL_TWILIO], ids=["sendgrid", "twilio"])
def test_real_providers_need_a_secret_key(credentials: dict[str, str]) -> None:
    with pytest.raises(ConfigurationError, match="OUTREACH_SECRET_KEY"):
        Settings.from_env(credentials)
    with pytest.raises(ConfigurationError, match="at least 32 characters"):
        Settings.from_env({**credentials, "OUTREACH_SECRET_KEY": "short"})
    settings = Settings.from_env({**credentials, "OUTREACH_SECRET_KEY": KEY})
    assert settings.talks_to_real_providers
    assert settings.signing_key == KEY.encode()


def test_credentials_for_a_sandbox_need_no_key() -> None:
    """Benchmarks, fault tests and local stacks point real SDKs at the sandbox with made-up credentials."""
    settings = Settings.from_env(
        {
            **REAL_SENDGRID,
            **REAL_TWILIO,
            "OUTREACH_SENDGRID_HOST": "http://127.0.0.1:8025",
            "OUTREACH_TWILIO_BASE_URL": "http://127.0.0.1:8025",
        }
    )
    assert not settings.talks_to_real_providers


@pytest.mark.parametrize(
    ("environ", "named"),
    [
        ({"OUTREACH_COMPANY_TIMEZONE": "Mars/Olympus"}, "OUTREACH_COMPANY_TIMEZONE"),
        ({"OUTREACH_BROKER_URL": "kafka://x"}, "OUTREACH_BROKER_URL"),
        ({"TWILIO_ACCOUNT_SID": "AC" + "1" * 32}, "TWILIO_AUTH_TOKEN"),
        ({"OUTREACH_LEASE_SECONDS": "soon"}, "OUTREACH_LEASE_SECONDS"),
        ({"OUTREACH_CLAIM_BATCH": "-5"}, "OUTREACH_CLAIM_BATCH"),
        ({"OUTREACH_TRUSTED_PROXIES": "10.0.0.1/8"}, "OUTREACH_TRUSTED_PROXIES"),
        ({"OUTREACH_TRUSTED_PROXIES": "proxy.internal"}, "OUTREACH_TRUSTED_PROXIES"),
        ({"OUTREACH_TRUSTED_PROXIES": "*"}, "OUTREACH_TRUSTED_PROXIES"),
        ({"OUTREACH_DASHBOARD_IDLE_SECONDS": "0"}, "OUTREACH_DASHBOARD_IDLE_SECONDS"),
        ({"OUTREACH_DASHBOARD_SESSION_SECONDS": "1e12"}, "OUTREACH_DASHBOARD_SESSION_SECONDS"),
        ({"OUTREACH_SENDGRID_EMAIL_ACTIVITY": "maybe"}, "OUTREACH_SENDGRID_EMAIL_ACTIVITY"),
        ({"OUTREACH_RECONCILE_LOOKUPS": "2"}, "OUTREACH_RECONCILE_LOOKUPS"),
        ({"OUTREACH_PROVIDER_VISIBILITY_DELAY": "-1"}, "OUTREACH_PROVIDER_VISIBILITY_DELAY"),
        ({"OUTREACH_RECONCILE_BATCH": "some"}, "OUTREACH_RECONCILE_BATCH"),
    ],
)
def test_bad_values_name_their_variable(environ: dict[str, str], named: str) -> None:
    with pytest.raises(ConfigurationError, match=named):
        Settings.from_env(environ)


def test_trusted_proxies_are_nobody_by_default_and_parsed_as_addresses_and_networks() -> None:
    assert Settings.from_env({}).trusted_proxies == ()
    settings = Settings.from_env({"OUTREACH_TRUSTED_PROXIES": " 10.0.0.0/8,, 127.0.0.1 ,2001:DB8::1,fd00::/8 "})
    assert settings.trusted_proxies == ("10.0.0.0/8", "127.0.0.1", "2001:db8::1", "fd00::/8")


def test_provider_lookups() -> None:
    """Twilio's Messages list is always there; SendGrid's Email Activity API is a paid add-on, off unless said."""
    defaults = Settings.from_env({})
    assert (defaults.reconcile_lookups, defaults.sendgrid_email_activity) == (True, False)
    assert (defaults.provider_visibility_delay, defaults.reconcile_batch) == (600.0, 20)
    chosen = Settings.from_env(
        {
            "OUTREACH_RECONCILE_LOOKUPS": "off",
            "OUTREACH_SENDGRID_EMAIL_ACTIVITY": "yes",
            "OUTREACH_PROVIDER_VISIBILITY_DELAY": "900",
            "OUTREACH_RECONCILE_BATCH": "5",
        }
    )
    assert (chosen.reconcile_lookups, chosen.sendgrid_email_activity) == (False, True)
    assert (chosen.provider_visibility_delay, chosen.reconcile_batch) == (900.0, 5)
