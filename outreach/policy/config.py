"""The policy file (``campaigns/policies.yaml``): caps, quiet hours, the business calendar, rate limits and
behaviour rules on named link clicks.

Every field has a default, so a missing file means the defaults below; a present file is validated like the
campaigns, with file, line and field in every problem.
"""

from __future__ import annotations

import re
from datetime import date, time, timedelta
from pathlib import Path
from typing import Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from outreach.core.errors import CampaignError
from outreach.core.models import Channel
from outreach.domain.campaigns import Category, LinkName, load_yaml_model, parse_duration
from outreach.domain.candidates import check_tags

POLICY_FILE = "policies.yaml"
WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_WINDOW = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)\s*-\s*([01]\d|2[0-4]):([0-5]\d)$")


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Window(_Spec):
    """A daily local-time window such as ``08:00-20:00`` (end exclusive; 24:00 means midnight)."""

    start: time
    end: time | None  # None: until midnight

    @classmethod
    def parse(cls, text: str) -> Window:
        match = _WINDOW.match(text.strip())
        if not match:
            raise ValueError(f"{text!r} is not a window; write HH:MM-HH:MM, e.g. 08:00-20:00")
        h1, m1, h2, m2 = (int(g) for g in match.groups())
        end = None if (h2, m2) == (24, 0) else time(h2, m2)
        if h2 == 24 and m2 != 0:
            raise ValueError(f"{text!r}: 24:00 is the latest end")
        if end is not None and end <= time(h1, m1):
            raise ValueError(f"{text!r}: the end must be after the start (windows do not cross midnight)")
        return cls(start=time(h1, m1), end=end)

    def contains(self, moment: time) -> bool:
        return self.start <= moment and (self.end is None or moment < self.end)

    def __str__(self) -> str:
        end = "24:00" if self.end is None else self.end.strftime("%H:%M")
        return f"{self.start.strftime('%H:%M')}-{end}"


def _window(value: object) -> Window:
    if isinstance(value, Window):
        return value
    return Window.parse(str(value))


class Closure(_Spec):
    """A company closure (a team offsite, the days around a holiday) on top of the public holidays."""

    start: date = Field(alias="from")
    end: date | None = Field(default=None, alias="to")
    name: str = "company closure"

    @model_validator(mode="after")
    def _order(self) -> Closure:
        if self.end is not None and self.end < self.start:
            raise ValueError("`to` must not be before `from`")
        return self

    def days(self) -> list[date]:
        last = self.end or self.start
        return [self.start + timedelta(days=n) for n in range((last - self.start).days + 1)]


class CalendarSpec(_Spec):
    timezone: str = "Asia/Shanghai"
    country: str | None = Field(default="CN", description="ISO country code for public holidays; null for none")
    subdivision: str | None = None
    working_days: tuple[Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"], ...] = (
        "mon",
        "tue",
        "wed",
        "thu",
        "fri",
    )
    working_hours: Window = Field(default_factory=lambda: Window.parse("09:00-18:00"))
    closures: tuple[Closure | date, ...] = ()

    @field_validator("working_hours", mode="before")
    @classmethod
    def _hours(cls, value: object) -> Window:
        return _window(value)

    @field_validator("timezone")
    @classmethod
    def _zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown IANA timezone {value!r}") from None
        return value

    @field_validator("country")
    @classmethod
    def _country(cls, value: str | None) -> str | None:
        if value is None:
            return None
        import holidays

        if value.upper() not in holidays.list_supported_countries():
            raise ValueError(f"no holiday calendar for country {value!r}; use an ISO code such as CN, US, DE")
        return value.upper()


class CapSpec(_Spec):
    """At most ``max`` messages per ``per`` to one candidate, counted over the listed categories and channels."""

    name: str = Field(pattern=r"^[a-z0-9_]+$")
    max: int = Field(ge=1)
    per: timedelta
    categories: tuple[Category, ...] = (Category.TRANSACTIONAL, Category.NURTURE)
    channels: tuple[Channel, ...] = (Channel.EMAIL, Channel.SMS)
    on_hit: Literal["defer", "drop"] = "defer"

    @field_validator("per", mode="before")
    @classmethod
    def _duration(cls, value: object) -> timedelta:
        duration = parse_duration(value)
        if duration <= timedelta(0):
            raise ValueError("must be longer than zero")
        return duration


def _default_caps() -> tuple[CapSpec, ...]:
    return (
        CapSpec(name="nurture_60d", max=1, per=timedelta(days=60), categories=(Category.NURTURE,)),
        CapSpec(name="non_transactional_7d", max=2, per=timedelta(days=7), categories=(Category.NURTURE,)),
        CapSpec(name="sms_daily", max=1, per=timedelta(days=1), channels=(Channel.SMS,)),
        CapSpec(
            name="transactional_safety",
            max=5,
            per=timedelta(days=1),
            categories=(Category.TRANSACTIONAL,),
            on_hit="drop",
        ),
    )


class EmailWindow(_Spec):
    hours: Window | None = None  # None: any time
    working_days_only: bool = False

    @field_validator("hours", mode="before")
    @classmethod
    def _hours(cls, value: object) -> Window | None:
        return None if value in (None, "any") else _window(value)


class QuietHoursSpec(_Spec):
    sms: Window = Field(default_factory=lambda: Window.parse("08:00-20:00"))
    sms_by_country: dict[str, Window] = Field(default_factory=dict)
    email: dict[Category, EmailWindow] = Field(
        default_factory=lambda: {
            Category.NURTURE: EmailWindow(hours=Window.parse("09:00-19:00"), working_days_only=True),
            Category.TRANSACTIONAL: EmailWindow(),
        }
    )
    spread: timedelta = timedelta(minutes=10)

    @field_validator("sms", mode="before")
    @classmethod
    def _sms(cls, value: object) -> Window:
        return _window(value)

    @field_validator("sms_by_country", mode="before")
    @classmethod
    def _countries(cls, value: object) -> dict[str, Window]:
        if not isinstance(value, dict):
            raise ValueError("expected a mapping of country code to window, e.g. {US: 09:00-20:00}")
        return {str(k).upper(): _window(v) for k, v in value.items()}

    @field_validator("spread", mode="before")
    @classmethod
    def _duration(cls, value: object) -> timedelta:
        return parse_duration(value)


class RateLimitSpec(_Spec):
    """Provider pacing per sender: a steady rate with a small burst (Twilio long code: 1 segment a second)."""

    per_second: float = Field(gt=0)
    burst: int = Field(default=1, ge=1)


def _default_rates() -> dict[str, RateLimitSpec]:
    # Twilio long codes deliver about 1 segment a second; SendGrid's mail send limit is far above what one
    # sender needs, so it is left unpaced unless an account's plan says otherwise.
    return {"twilio": RateLimitSpec(per_second=1.0, burst=1)}


class StopOnReplySpec(_Spec):
    enabled: bool = True
    out_of_office_pause: timedelta = timedelta(days=7)

    @field_validator("out_of_office_pause", mode="before")
    @classmethod
    def _duration(cls, value: object) -> timedelta:
        return parse_duration(value)


class ClickCondition(_Spec):
    """``clicked`` named link followed ``times`` or more times by the candidate, over all their messages."""

    clicked: LinkName
    times: int = Field(default=1, ge=1)


class BehaviourSpec(_Spec):
    """A behaviour rule: when the candidate's clicks meet ``when``, add ``add_tags`` (once; tags are a set)."""

    when: ClickCondition
    add_tags: tuple[str, ...] = Field(min_length=1)

    @field_validator("add_tags")
    @classmethod
    def _tags(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(check_tags(list(value)))


def _default_behaviours() -> tuple[BehaviourSpec, ...]:
    # The seed's high-intent signal: a candidate who comes back to the salary range is seriously interested.
    return (BehaviourSpec(when=ClickCondition(clicked="salary_range", times=2), add_tags=("intent:high",)),)


class RepliesSpec(_Spec):
    """How fast a person must answer a candidate's reply written during business hours."""

    response_time: timedelta = timedelta(hours=4)
    lookback: timedelta = timedelta(days=7)

    @field_validator("response_time", "lookback", mode="before")
    @classmethod
    def _duration(cls, value: object) -> timedelta:
        duration = parse_duration(value)
        if duration <= timedelta(0):
            raise ValueError("must be longer than zero")
        return duration


class PolicySpec(_Spec):
    calendar: CalendarSpec = Field(default_factory=CalendarSpec)
    caps: tuple[CapSpec, ...] = Field(default_factory=_default_caps)
    quiet_hours: QuietHoursSpec = Field(default_factory=QuietHoursSpec)
    rate_limits: dict[str, RateLimitSpec] = Field(default_factory=_default_rates)
    stop_on_reply: StopOnReplySpec = Field(default_factory=StopOnReplySpec)
    replies: RepliesSpec = Field(default_factory=RepliesSpec)
    behaviours: tuple[BehaviourSpec, ...] = Field(default_factory=_default_behaviours)

    @field_validator("caps")
    @classmethod
    def _unique(cls, caps: tuple[CapSpec, ...]) -> tuple[CapSpec, ...]:
        names = [c.name for c in caps]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"duplicate cap name(s): {', '.join(duplicates)}")
        return caps


def load_policies(campaigns_dir: Path) -> PolicySpec:
    """The policy file beside the campaigns, or the defaults if there is none."""
    path = campaigns_dir / POLICY_FILE
    if not path.exists():
        return PolicySpec()
    spec, problems, _ = load_yaml_model(path, PolicySpec, "calendar, caps, quiet_hours and rate_limits")
    if spec is None:
        raise CampaignError(problems)
    return spec
