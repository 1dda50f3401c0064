"""Campaign definitions: YAML files in the campaigns folder, validated once when loaded.

A campaign file looks like this::

    name: jd_intro                 # must match the file name
    category: transactional        # or nurture; caps depend on it
    trigger:
      event: applied               # a candidate event …
      # cron: "0 10 1 1,4,7,10 *"  # … or a schedule over an audience
      audience: {stages: [declined, rejected, talent_pool], require_nurture_consent: true}
      # audience may also say intent: [high, medium] to enroll only candidates assessed at those levels
    exit_on: [stage_changed, replied]
    steps:
      - channel: email
        template: jd_intro
      - channel: sms
        template: jd_reminder
        delay: 2d                  # after the previous step (or the trigger, for the first)
        at: "10:00"                # optional: the next 10:00 in the candidate's timezone after the delay
        only_if: no_reply          # skip unless the candidate stayed silent since the previous step
        unless_clicked: [book_interview]  # skip if a message of this enrollment had that named link clicked
        alert: offer_unanswered    # optional: also raise an HR alert of this kind
        intent: [high]             # optional: only for these intent levels (high, medium, low, unassessed)
    track_clicks: true             # links become signed /r/ redirects; default: on for nurture, off otherwise

Errors name the file, the line and the field. ``policies.yaml`` and other files starting with ``_`` are
not campaigns.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from croniter import croniter
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic import ValidationError as PydanticValidationError
from pydantic_core import ErrorDetails

from outreach.core.errors import CampaignError, Problem
from outreach.core.models import Channel, Stage

NOT_CAMPAIGNS = {"policies.yaml", "policies.yml", "intent.yaml", "intent.yml", "events.yaml", "events.yml"}

#: An intent level a campaign can target: a candidate's latest assessment (``outreach.domain.intent``), or
#: ``unassessed`` for candidates nobody has assessed yet.
IntentTarget = Literal["high", "medium", "low", "unassessed"]


class Category(StrEnum):
    TRANSACTIONAL = "transactional"
    NURTURE = "nurture"


class EventType(StrEnum):
    APPLIED = "applied"
    CONTACTED = "contacted"
    INTERVIEW_SCHEDULED = "interview_scheduled"
    FINAL_INTERVIEW = "final_interview"
    MOVED_TO_TALENT_POOL = "moved_to_talent_pool"
    OFFER_EXTENDED = "offer_extended"
    OFFER_ACCEPTED = "offer_accepted"
    OFFER_DECLINED = "offer_declined"
    FINAL_INTERVIEW_FAILED = "final_interview_failed"
    JOB_OPENED = "job_opened"
    HIRED = "hired"


class ExitCondition(StrEnum):
    STAGE_CHANGED = "stage_changed"
    REPLIED = "replied"


_DURATION = re.compile(r"^\s*(\d+)\s*(s|m|h|d|w)?\s*$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(value: object) -> timedelta:
    """``0``, ``90s``, ``15m``, ``36h``, ``2d``, ``3w`` (a bare number is seconds)."""
    if isinstance(value, timedelta):
        return value
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 15m, 36h or 2d")
    if isinstance(value, int):
        return timedelta(seconds=value)
    match = _DURATION.match(str(value))
    if not match:
        raise ValueError(
            f"{value!r} is not a duration; use a number and a unit: 90s, 15m, 36h, 2d, 3w, or 2 business days"
        )
    amount, unit = match.groups()
    return timedelta(seconds=int(amount) * _UNITS[unit or "s"])


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Audience(_Spec):
    stages: tuple[Stage, ...] = ()
    tags_any: tuple[str, ...] = ()
    tags_all: tuple[str, ...] = ()
    require_nurture_consent: bool = False
    match_job_tags: bool = False
    #: Enroll only candidates at these intent levels (empty: any level, assessed or not).
    intent: tuple[IntentTarget, ...] = ()

    @field_validator("intent", mode="before")
    @classmethod
    def _intent(cls, value: object) -> object:
        return _names(value)


class Trigger(_Spec):
    event: EventType | None = None
    cron: str | None = None
    audience: Audience = Audience()

    @field_validator("cron")
    @classmethod
    def _valid_cron(cls, value: str | None) -> str | None:
        if value is not None and not croniter.is_valid(value):
            raise ValueError(f"{value!r} is not a valid cron expression (5 fields: minute hour day month weekday)")
        return value

    @model_validator(mode="after")
    def _one_kind(self) -> Trigger:
        if (self.event is None) == (self.cron is None):
            raise ValueError("give exactly one of `event` or `cron`")
        return self


#: A link's name, as templates give it (``data-link="book_interview"``) and rules refer to it.
LinkName = Annotated[str, Field(pattern=r"^[a-z0-9_]+$", max_length=64)]


def _names(value: object) -> object:
    """One name may be written without the list brackets."""
    return (value,) if isinstance(value, str) else value


_BUSINESS_DAYS = re.compile(r"^\s*(\d+)\s*(bd|business\s+days?)\s*$", re.IGNORECASE)


class Step(_Spec):
    channel: Channel
    template: str = Field(pattern=r"^[a-z0-9_]+$")
    delay: timedelta = timedelta(0)
    #: Set instead of ``delay`` when the delay is given in business days ("2 business days", "2bd").
    business_days: int | None = Field(default=None, ge=0)
    at: str | None = Field(default=None, pattern=r"^([01]\d|2[0-3]):[0-5]\d$")
    only_if: Literal["always", "no_reply", "no_click"] = "always"
    #: Skip the step if the candidate clicked one of these named links in a message of this enrollment.
    unless_clicked: tuple[LinkName, ...] = ()
    alert: str | None = Field(default=None, pattern=r"^[a-z0-9_]+$")
    #: Run the step only for candidates at these intent levels, as assessed when the step comes due (a
    #: reassessment in between counts); otherwise it is skipped, like ``only_if``. Empty: every level.
    intent: tuple[IntentTarget, ...] = ()

    @model_validator(mode="before")
    @classmethod
    def _business_days(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("delay"), str):
            match = _BUSINESS_DAYS.match(data["delay"])
            if match:
                return {**data, "delay": 0, "business_days": int(match.group(1))}
        return data

    @field_validator("delay", mode="before")
    @classmethod
    def _duration(cls, value: object) -> timedelta:
        return parse_duration(value)

    @field_validator("unless_clicked", "intent", mode="before")
    @classmethod
    def _unless_clicked(cls, value: object) -> object:
        return _names(value)


class Campaign(_Spec):
    name: str = Field(pattern=r"^[a-z0-9_]+$")
    description: str = ""
    category: Category
    enabled: bool = True
    trigger: Trigger
    exit_on: tuple[ExitCondition, ...] = (ExitCondition.STAGE_CHANGED, ExitCondition.REPLIED)
    steps: tuple[Step, ...] = Field(min_length=1)
    #: Click tracking (``outreach.pipeline.links``); None means the default: on for nurture, off for transactional.
    track_clicks: bool | None = None

    @property
    def is_cron(self) -> bool:
        return self.trigger.cron is not None

    @property
    def tracks_clicks(self) -> bool:
        return self.track_clicks if self.track_clicks is not None else self.category is Category.NURTURE


@dataclass(frozen=True)
class CampaignSet:
    """Every campaign, by name, plus where each came from."""

    campaigns: Mapping[str, Campaign]
    sources: Mapping[str, Path]
    #: The event data contract beside the campaigns (``events.yaml``), when it was loaded with them.
    #: (an ``outreach.domain.event_data.EventContract``; that module imports this one, so it is not named here)
    events: Any = None

    def __getitem__(self, name: str) -> Campaign:
        return self.campaigns[name]

    def get(self, name: str) -> Campaign | None:
        return self.campaigns.get(name)

    def __iter__(self) -> Any:
        return iter(self.campaigns.values())

    def __len__(self) -> int:
        return len(self.campaigns)

    def for_event(self, event: str) -> list[Campaign]:
        return [c for c in self.campaigns.values() if c.enabled and c.trigger.event == event]

    def scheduled(self) -> list[Campaign]:
        return [c for c in self.campaigns.values() if c.enabled and c.is_cron]


def _line_index(node: yaml.Node, path: tuple[Any, ...] = ()) -> dict[tuple[Any, ...], int]:
    """Map each path in a YAML document (keys and list indexes) to its 1-based line."""
    lines: dict[tuple[Any, ...], int] = {path: node.start_mark.line + 1}
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            child = (*path, key_node.value)
            lines.update(_line_index(value_node, child))
            lines[child] = key_node.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            lines.update(_line_index(item, (*path, index)))
    return lines


def _nearest_line(lines: Mapping[tuple[Any, ...], int], loc: tuple[Any, ...]) -> int | None:
    for end in range(len(loc), -1, -1):
        if loc[:end] in lines:
            return lines[loc[:end]]
    return None


def _field_name(loc: Iterable[Any]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            text = str(part)
            # A blank or odd key ("", " ", "a\tb") is shown quoted, so the message still says which one.
            shown = text if text.strip() and text.isprintable() and text == text.strip() else repr(text)
            out += ("." if out else "") + shown
    return out or "(file)"


def _follow_on(error: ErrorDetails, errors: Iterable[ErrorDetails]) -> bool:
    """A list's length error caused by its own invalid items: pydantic counts a list's items after dropping the
    ones that failed, so one invalid step also reports "steps: should have at least 1 item … not 0"."""
    if error["type"] != "too_short":
        return False
    loc = tuple(error["loc"])
    return any(len(other["loc"]) > len(loc) and tuple(other["loc"][: len(loc)]) == loc for other in errors)


M = TypeVar("M", bound=BaseModel)


#: More values than any campaign or policy file needs (aliases counted as often as they are used).
MAX_YAML_VALUES = 100_000
MAX_YAML_DEPTH = 100


def _expanded_size(node: yaml.Node) -> int:
    """How many values the document has once every alias is expanded, computed without expanding anything.

    An alias is the same node object as its anchor, so sizes are memoised per node; a node inside itself is
    endless.
    """
    sizes: dict[int, int] = {}
    visiting: set[int] = set()
    pending: list[tuple[yaml.Node, bool]] = [(node, False)]
    while pending:
        current, expanded = pending.pop()
        key = id(current)
        if key in sizes:
            continue
        if not isinstance(current, yaml.SequenceNode | yaml.MappingNode):
            sizes[key] = 1
            continue
        children: list[yaml.Node] = (
            list(current.value)
            if isinstance(current, yaml.SequenceNode)
            else [part for pair in current.value for part in pair]
        )
        if not expanded:
            if any(id(child) in visiting or child is current for child in children):
                return MAX_YAML_VALUES + 1  # a value that contains itself never ends
            visiting.add(key)
            pending.append((current, True))
            pending.extend((child, False) for child in children if id(child) not in sizes)
            continue
        visiting.discard(key)
        sizes[key] = min(MAX_YAML_VALUES + 1, 1 + sum(sizes.get(id(child), 1) for child in children))
    return sizes[id(node)]


def _flow_depth(text: str) -> int:
    """The deepest nesting of ``[`` and ``{`` (brackets inside strings count too: an over-estimate is harmless)."""
    depth = deepest = 0
    for char in text:
        if char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}" and depth:
            depth -= 1
    return deepest


def load_yaml_model(path: Path, model: type[M], expected: str) -> tuple[M | None, list[Problem], dict[Any, int]]:
    """Parse ``path`` and validate it as ``model``; every problem carries the file, the line and the field.

    Also returns the line index so callers can place problems they find after validation.
    """
    label = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        return None, [Problem(label, None, "(file)", f"cannot read: {exc}")], {}
    if _flow_depth(text) > MAX_YAML_DEPTH:
        # PyYAML parses nesting recursively: thousands of levels take seconds, then overflow the stack.
        return None, [Problem(label, None, "(yaml)", f"lists or mappings nested more than {MAX_YAML_DEPTH} deep")], {}
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        if node is not None and _expanded_size(node) > MAX_YAML_VALUES:
            # Aliases of aliases ("billion laughs") would make validation walk an exponential document.
            return None, [Problem(label, None, "(yaml)", f"the document expands to more than {MAX_YAML_VALUES} "
                                  "values; use fewer anchors and aliases (&, *)")], {}  # fmt: skip
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        problem = getattr(exc, "problem", None) or str(exc)
        return None, [Problem(label, line, "(yaml)", f"invalid YAML: {problem}")], {}
    except RecursionError:
        return None, [Problem(label, None, "(yaml)", "invalid YAML: lists or mappings nested too deeply")], {}
    if not isinstance(data, dict) or node is None:
        return None, [Problem(label, 1, "(file)", f"expected a mapping with {expected}")], {}
    lines = _line_index(node)
    try:
        return model.model_validate(data), [], lines
    except PydanticValidationError as exc:
        problems = []
        errors = exc.errors()
        for error in errors:
            if _follow_on(error, errors):
                continue
            loc = tuple(part for part in error["loc"] if not (isinstance(part, str) and "[" in part))
            message = error["msg"].removeprefix("Value error, ")
            if error["type"] == "extra_forbidden":
                message = "unknown field"
            problems.append(Problem(label, _nearest_line(lines, loc), _field_name(loc), message))
        return None, problems, lines


def load_campaign_file(path: Path) -> tuple[Campaign | None, list[Problem]]:
    """Parse and validate one file; returns the campaign or every problem found in it."""
    campaign, problems, lines = load_yaml_model(path, Campaign, "name, category, trigger and steps")
    if campaign is None:
        return None, problems
    if campaign.name != path.stem:
        return None, [Problem(str(path), lines.get(("name",)), "name", f"must match the file name {path.stem!r}")]
    return campaign, []


def campaign_files(directory: Path) -> list[Path]:
    if not directory.is_dir():
        return []
    return sorted(
        p
        for p in [*directory.glob("*.yaml"), *directory.glob("*.yml")]
        if p.name not in NOT_CAMPAIGNS and not p.name.startswith("_")
    )


class _StepsOnly(BaseModel):
    model_config = ConfigDict(extra="ignore")
    steps: list[Any] = []


def readable_steps(path: Path) -> list[tuple[int, Step]]:
    """The steps of a campaign file that are valid on their own, with their 0-based indexes (for a file with
    problems elsewhere, whose templates are still worth checking); none when the file is not a readable mapping."""
    found, _, _ = load_yaml_model(path, _StepsOnly, "steps")
    if found is None:
        return []
    steps: list[tuple[int, Step]] = []
    for index, raw in enumerate(found.steps):
        try:
            steps.append((index, Step.model_validate(raw)))
        except PydanticValidationError:
            continue
    return steps


@dataclass(frozen=True)
class CampaignScan:
    """What a campaigns folder holds: the valid campaigns, every problem, and the readable steps of the files
    that have problems (``(file, step index, step)``), so one pass can still check their templates."""

    campaigns: CampaignSet
    problems: list[Problem]
    steps_of_invalid: tuple[tuple[Path, int, Step], ...] = ()


def scan_campaigns(directory: Path) -> CampaignScan:
    """Load every campaign file in ``directory``, keeping the valid ones beside the problems of the others."""
    problems: list[Problem] = []
    campaigns: dict[str, Campaign] = {}
    sources: dict[str, Path] = {}
    invalid: list[tuple[Path, int, Step]] = []
    if not directory.is_dir():
        problems.append(Problem(str(directory), None, "(folder)", "campaigns folder not found"))
    for path in campaign_files(directory):
        campaign, found = load_campaign_file(path)
        problems.extend(found)
        if campaign is None:
            invalid.extend((path, index, step) for index, step in readable_steps(path))
            continue
        if campaign.name in campaigns:
            problems.append(
                Problem(str(path), None, "name", f"duplicate campaign name, also in {sources[campaign.name]}")
            )
            continue
        campaigns[campaign.name] = campaign
        sources[campaign.name] = path
    return CampaignScan(CampaignSet(campaigns=campaigns, sources=sources), problems, tuple(invalid))


def load_campaigns(directory: Path) -> CampaignSet:
    """Load every campaign in ``directory``; raise :class:`CampaignError` listing every problem."""
    scan = scan_campaigns(directory)
    if scan.problems:
        raise CampaignError(scan.problems)
    return scan.campaigns


def field_line(path: Path, loc: tuple[Any, ...]) -> int | None:
    """The line of a field in a campaign file, e.g. ``("steps", 1, "template")``; None if unknown."""
    try:
        node = yaml.compose(path.read_text(encoding="utf-8"), Loader=yaml.SafeLoader)
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    if node is None:
        return None
    return _nearest_line(_line_index(node), loc)
