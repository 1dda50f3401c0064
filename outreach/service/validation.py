"""Cross-checks between campaigns and templates, run by ``outreach campaigns validate`` and at start-up.

Loading a campaign file checks its own schema; this module checks what only the pair can tell: every step's
template exists on the step's channel (in the default locale, and completely in every other locale), and
renders with the context the campaign's trigger will actually provide:

* every campaign is first rendered with the full sample context, so plain template bugs are named as such;
* cron campaigns have no ``event`` and no ``job``;
* event campaigns always have ``event``; only ``applied`` and ``job_opened`` always carry a ``job``, for the
  other events it depends on the ATS, so the template must work both with and without one;
* finally with only the required data (optional ``event.data`` items, reason, concerns, booking link and the
  job's optional fields absent), which is what ``is defined`` / ``default`` guards are for.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from outreach.core.errors import CampaignError, Problem, TemplateError
from outreach.domain.campaigns import Campaign, CampaignSet, EventType, Step, field_line, scan_campaigns
from outreach.domain.event_data import EVENTS_FILE, EventContract, contract_problems
from outreach.domain.render import EMAIL_PARTS, Renderer
from outreach.pipeline.samples import sample_context

# Triggers whose enrollment always knows the job: the application's job, or the job that just opened.
JOB_BOUND_EVENTS = frozenset({EventType.APPLIED, EventType.JOB_OPENED})

_OPTIONAL_JOB_FIELDS = ("department", "location", "booking_url", "salary_min", "salary_max")


def _expected_files(channel: str, template: str, locale: str) -> str:
    if channel == "email":
        return ", ".join(f"email/{template}.{locale}.{part}" for part in EMAIL_PARTS)
    return f"sms/{template}.{locale}.txt"


def _minimal(context: Mapping[str, Any], event_type: str | None, contract: EventContract | None) -> dict[str, Any]:
    """The context with everything optional taken away."""
    out = copy.deepcopy(dict(context))
    out["concerns"] = []
    out["candidate"]["tags"] = []
    out["candidate"]["timezone"] = None
    out["candidate"]["source"] = None
    out["links"]["booking"] = None
    if out.get("job") is not None:
        for key in _OPTIONAL_JOB_FIELDS:
            out["job"][key] = None
        out["job"]["description"] = ""
        out["job"]["tags"] = []
    if out.get("event") is not None:
        if contract is not None:  # without a readable contract nothing is known to be optional
            out["event"]["data"] = contract.example(event_type or "", required_only=True)
        out["event"]["reason"] = None
    return out


def _variants(
    campaign: Campaign, locale: str, contract: EventContract | None
) -> Iterator[tuple[str, dict[str, Any], str]]:
    """(label, context, advice if only this variant fails) in order from most to least data."""
    event = campaign.trigger.event
    full = sample_context(locale, event_type=event.value if event else "offer_accepted", contract=contract)
    full["campaign"] = {"name": campaign.name, "category": campaign.category.value}
    yield "the full sample context", full, ""
    shaped = copy.deepcopy(full)
    if campaign.is_cron:
        shaped["event"] = None
        shaped["job"] = None
        yield (
            "no event and no job",
            shaped,
            "scheduled (cron) campaigns have no `event` and no `job`; remove them from the template or guard"
            " them with {% if event %} / {% if job %}",
        )
    elif event is not None and event not in JOB_BOUND_EVENTS:
        shaped["job"] = None
        yield (
            "no job",
            shaped,
            f"a {event.value} event may come without a job (only applied and job_opened"
            " always carry one); guard the job parts with {% if job %}",
        )
    required = ", ".join(contract.required(event.value)) if event and contract is not None else ""
    yield (
        "only the required data",
        _minimal(shaped, event.value if event else None, contract),
        "optional data may be missing in a real send (event.data items"
        + (f" other than {required}" if required else "")
        + ", event.reason, concerns, links.booking, the job's department, location, salary and description);"
        " guard them with `is defined`, `default(...)` or {% if ... %}",
    )


def _render(renderer: Renderer, channel: str, template: str, locale: str, context: Mapping[str, Any]) -> None:
    if channel == "email":
        renderer.render_email(template, locale, context)
    else:
        renderer.render_sms(template, locale, context)


def _check_files(channel: str, template: str, renderer: Renderer, problem: Callable[[str], Problem]) -> list[Problem]:
    """The template's files: it exists on the channel, completely in every locale it has, and in the default one."""
    default = renderer.default_locale
    available = renderer.locales(channel, template)
    incomplete = renderer.incomplete_locales(channel, template)
    if not available and not incomplete:
        return [
            problem(
                f"no {channel} template named {template!r}; create {_expected_files(channel, template, default)}"
                " in the templates folder (or fix the name)"
            )
        ]
    problems: list[Problem] = []
    for locale, missing in incomplete.items():
        problems.append(
            problem(
                f"{channel} template {template!r} in {locale} is incomplete: {', '.join(missing)} missing;"
                f" add it, or until then {locale} candidates get the {default} version"
            )
        )
    if default not in available:
        problems.append(
            problem(
                f"{channel} template {template!r} has no version in the default locale {default}; create"
                f" {_expected_files(channel, template, default)} (candidates whose language has no version"
                " fall back to it)"
            )
        )
    return problems


def _check_step(
    campaign: Campaign, source: Path | None, index: int, renderer: Renderer, contract: EventContract | None
) -> list[Problem]:
    step = campaign.steps[index]
    channel = step.channel.value
    template = step.template
    file = str(source) if source is not None else campaign.name
    line = field_line(source, ("steps", index, "template")) if source is not None else None
    field = f"steps[{index}].template"

    def problem(message: str) -> Problem:
        return Problem(file, line, field, message)

    problems = _check_files(channel, template, renderer, problem)
    available = renderer.locales(channel, template)
    event = campaign.trigger.event
    event_name = event.value if event is not None else ""
    for locale in available:
        undeclared = [
            read
            for read in (renderer.data_reads(channel, template, locale) if event and contract else ())
            if contract is not None and not contract.declared(event_name, read.path)
        ]
        for read in undeclared:
            field_name = "event.data." + ".".join(read.path).replace(".[]", "[]")
            where = f"{renderer.templates_dir / read.file}:{read.line}"
            problems.append(
                problem(
                    f"{where} reads {field_name}, which {EVENTS_FILE} does not declare for {event_name};"
                    " declare it there (with an example) or fix the name"
                )
            )
        if undeclared:
            continue
        for label, context, advice in _variants(campaign, locale, contract):
            try:
                _render(renderer, channel, template, locale, context)
            except TemplateError as exc:
                message = f"{channel} template {template!r} ({locale}) does not render with {label}: {exc}"
                problems.append(problem(f"{message}; {advice}" if advice else f"{message}; fix the template"))
                break
    return problems


def _check_readable_step(path: Path, index: int, step: Step, renderer: Renderer) -> list[Problem]:
    """The template files of a valid step in an invalid campaign file (rendering needs the whole campaign)."""
    where = Problem(str(path), field_line(path, ("steps", index, "template")), f"steps[{index}].template", "")
    return _check_files(step.channel.value, step.template, renderer, lambda message: replace(where, message=message))


def check_templates(campaigns: CampaignSet, renderer: Renderer) -> list[Problem]:
    """Every problem between the campaigns' steps, the templates they name and the event data contract the
    campaigns were loaded with (empty when all is well)."""
    contract = campaigns.events
    problems: list[Problem] = []
    for campaign in campaigns:
        source = campaigns.sources.get(campaign.name)
        for index in range(len(campaign.steps)):
            problems.extend(_check_step(campaign, source, index, renderer, contract))
    return problems


def validate_all(
    campaigns_dir: Path, templates_dir: Path, default_locale: str = "en"
) -> tuple[CampaignSet | None, list[Problem]]:
    """Load the campaigns and check them against the templates.

    Returns the campaigns (None when a file is invalid) and every problem found; the service must not
    start while the list is non-empty.
    """
    from outreach.domain.intent import intent_problems
    from outreach.policy.config import load_policies

    policy_problems: list[Problem] = []
    try:
        load_policies(campaigns_dir)
    except CampaignError as exc:
        policy_problems = list(exc.problems)
    policy_problems += intent_problems(campaigns_dir)[1]
    contract, contract_found = contract_problems(campaigns_dir / EVENTS_FILE)
    policy_problems += contract_found
    # Files with problems leave the others (and their own readable steps) to be checked in the same pass.
    scan = scan_campaigns(campaigns_dir)
    # A broken contract is reported as such, not as every template reading undeclared fields.
    campaigns = replace(scan.campaigns, events=None if contract_found else contract)
    loaded = None if scan.problems else campaigns
    if not templates_dir.is_dir():
        return loaded, [
            *policy_problems,
            *scan.problems,
            Problem(str(templates_dir), None, "(folder)", "templates folder not found"),
        ]
    renderer = Renderer(templates_dir, default_locale)
    found = [*scan.problems, *check_templates(campaigns, renderer)]
    for path, index, step in scan.steps_of_invalid:
        found.extend(_check_readable_step(path, index, step, renderer))
    # File by file (a stable sort: within a file its own fields first, then its templates).
    return loaded, policy_problems + sorted(found, key=lambda problem: problem.file)
