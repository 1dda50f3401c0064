"""Nurture email in SendGrid batches: one request for up to 1000 recipients, each still checked and tracked alone.

This is one of the two ways of calling a provider over the outbox's transitions (:mod:`outreach.pipeline.outbox`); the
other is :mod:`outreach.pipeline.delivery` (one request per message). Both claim, hand off, record, fail, give back and
mark uncertain through the same functions, so a batch row goes through the same states as a single one.

The scheduler puts the due nurture email rows of one (campaign, step, template, locale) on the queue as one batch
message of outbox ids (:meth:`outreach.pipeline.scheduler.Scheduler.run_due`); a worker hands it to
:func:`deliver_batch`, which keeps every promise of the single path (:func:`outreach.pipeline.delivery.deliver`):

- **Claim and rules, per recipient.** One transaction claims the rows that are still ``pending`` and due
  (:func:`outreach.pipeline.outbox.claim`: ``pending`` → ``sending`` with the claim marker ``rule = 'claimed'``, rows
  another worker holds are skipped), locks the candidates' rows in id order
  (``FOR NO KEY UPDATE``, as the single path does, so caps hold against concurrent sends) and runs every policy
  rule for every recipient at the send stage, with what the rules read loaded once for the whole batch (enrollment
  states, suppressions, consent, the recent sends the caps count). A recipient a rule holds, suppresses, skips or
  cancels gets that status, rule and reason on its own row (:func:`outreach.pipeline.outbox.refuse`) and simply drops
  out of the request. Two rows of one candidate in one batch are counted by the caps one after the other, as two single
  sends would be.
- **Render once.** The template is rendered once per (template, locale, job, enrollment context) with SendGrid
  substitution tags standing for what differs between recipients: the name, the unsubscribe link, the outbox id
  and the tracked links. The HTML part gets HTML-escaped values of its own tags (or the text tag, for a value
  escaping leaves unchanged in the whole group: the unsubscribe link, the outbox id). A template that reads anything
  else about the candidate (tags, concerns, stage …), or transforms a per-recipient value instead of printing it,
  cannot be shared: its rows go back to ``pending`` and are sent one by one.
- **One request per 1000.** Each personalization carries the recipient's substitutions, ``List-Unsubscribe``
  headers and our outbox id as the custom arg ``outreach_id`` (opaque ids only), which SendGrid returns on every
  event, so events find their own row although the whole request shares one ``X-Message-Id``. A personalization
  over SendGrid's 10,000-byte limit is sent on its own instead.
- **Hand-off, then the request.** Right before each request, one statement hands off its rows
  (:func:`outreach.pipeline.outbox.hand_off`: the marker cleared, ``attempts + 1``, the lease renewed), committed before
  SendGrid is called; a row no longer claimed (the sweeper took it back) leaves the request. Attempts are counted
  there, not at the claim, as for single sends.
- **At least once, never blindly twice.** A worker that stops between the claim and a request leaves that
  request's rows claimed: the sweeper puts them back to ``pending`` once their lease runs out, and they are sent
  later, once. One that stops during a request leaves its rows handed off: ``uncertain`` after the lease
  (reconciled from events, never resent). Requests never attempted are given back at once when the worker sees
  an error (:func:`outreach.pipeline.outbox.give_back`: only rows still claimed). A retried batch message claims only
  rows still ``pending``. A transient failure puts the request's rows back to ``pending`` with the provider's reset time
  (the attempt counted) and asks for a retry; a permanent one for a request of several recipients sends them one by one
  (so one bad address fails alone), and fails the row of a single recipient.

**Cost.** A batch is a constant number of statements whatever its size (claim with the enrollments; candidates;
suppressions; recent sends; the stopped rows, if any; the exemplar's candidate per rendering; the hand-off and
the sent rows per request) over plain rows, not ORM objects: statements are built once with named parameters,
the rules decide from the shared reads (:class:`outreach.policy.bulk.PolicyReads`), and on PostgreSQL the sent
rows' subjects and bodies are filled in by the database from the shared text and one JSON document of
substitution values. SQLite runs the same steps with portable statements.

SendGrid cannot carry a different ``Reply-To`` per personalization (it is a reserved header), so batched mail uses
the plain ``OUTREACH_EMAIL_REPLY_TO`` address and replies are matched by the sender's address. Twilio has no
batch send: SMS always go one by one.
"""

from __future__ import annotations

import html
import json
import logging
import re
import time
from collections import defaultdict
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import lru_cache
from typing import Any, NamedTuple

from sqlalchemy import insert, select
from sqlalchemy.orm import Session

from outreach.core.clock import travel, utcnow
from outreach.core.errors import (
    AmbiguousProviderError,
    ProviderError,
    TemplateError,
    TransientProviderError,
)
from outreach.core.models import Base, Candidate, Channel, Enrollment, Job, TrackedLink
from outreach.core.sql import any_of, chunks, one_of
from outreach.domain.campaigns import Category
from outreach.domain.tokens import unsubscribe_url
from outreach.pipeline import outbox
from outreach.pipeline.context import build_context
from outreach.pipeline.delivery import backoff
from outreach.pipeline.links import (
    Link,
    is_web_url,
    known_names,
    redirect_url,
    rewrite_html,
    rewrite_text,
    strip_names,
    tracks_clicks,
)
from outreach.pipeline.services import Services
from outreach.policy.base import Stage
from outreach.policy.bulk import PolicyReads
from outreach.policy.engine import Outcome as Verdict
from outreach.providers.base import ProviderPipeline
from outreach.providers.sendgrid_payload import (
    MAX_PERSONALIZATION_BYTES,
    MAX_PERSONALIZATIONS,
    OUTBOX_ID_ARG,
    address_field,
    content,
    personalization_bytes,
)

__all__ = ["BatchOutcome", "deliver_batch"]

log = logging.getLogger(__name__)

#: Candidate fields that may differ between the recipients of one rendering (they are substituted).
SUBSTITUTED = frozenset({"name", "first_name"})

_TAG = re.compile(r"%%o:[^%\s]{0,40}%%", re.IGNORECASE)
_OUTBOX = Base.metadata.tables["outbound_messages"]
_LINKS = Base.metadata.tables["tracked_links"]
_CANDIDATES = Base.metadata.tables["candidates"]
_NURTURE = Category.NURTURE.value


def text_tag(key: str) -> str:
    return f"%%o:{key}%%"


def html_tag(key: str) -> str:
    return f"%%o:{key}:h%%"


@dataclass(frozen=True)
class BatchOutcome:
    """What one batch did; ``retry_in`` (seconds) asks the caller to run the same batch again later."""

    claimed: int = 0
    sent: int = 0
    stopped: int = 0  # held, suppressed, skipped or cancelled by a rule
    failed: int = 0
    single: int = 0  # handed back to the one-by-one path
    requests: int = 0
    retry_in: float | None = None


# -- render once ---------------------------------------------------------------------------------------------


class _Slot(str):
    """A per-recipient value in the shared rendering: prints as its text tag, autoescapes to its HTML tag (or to
    the text tag, for a value that HTML escaping leaves as it is: one substitution fewer per recipient)."""

    __slots__ = ("key", "plain")
    key: str
    plain: bool

    def __new__(cls, key: str, plain: bool = False) -> _Slot:
        slot = super().__new__(cls, text_tag(key))
        slot.key = key
        slot.plain = plain
        return slot

    def __html__(self) -> str:
        return text_tag(self.key) if self.plain else html_tag(self.key)


class _Probe(dict[str, Any]):
    """The candidate as the shared rendering sees it; remembers which fields the template read."""

    def __init__(self, values: Mapping[str, Any]) -> None:
        super().__init__(values)
        self.read: set[str] = set()

    def __getitem__(self, key: str) -> Any:
        self.read.add(key)
        return super().__getitem__(key)

    def get(self, key: str, default: Any = None) -> Any:
        self.read.add(key)
        return super().get(key, default)


class _ProbeList(list[Any]):
    """A per-recipient list (``concerns``): any use of it makes the rendering unshareable."""

    used = False

    def __iter__(self) -> Iterator[Any]:
        self.used = True
        return super().__iter__()

    def __len__(self) -> int:
        self.used = True
        return super().__len__()

    def __contains__(self, item: object) -> bool:
        self.used = True
        return super().__contains__(item)

    def __getitem__(self, index: Any) -> Any:
        self.used = True
        return super().__getitem__(index)


@dataclass(frozen=True)
class SharedEmail:
    """One rendering for many recipients: the parts hold substitution tags; ``links`` are the tracked ones."""

    subject: str
    text: str
    html: str
    locale: str
    tags: frozenset[str]
    links: tuple[Link, ...] = ()


class NotShareable(Exception):
    """The template reads or reshapes per-recipient data; its recipients are sent one by one."""


# -- the recipients ------------------------------------------------------------------------------------------


class _Person(NamedTuple):
    """The candidate facts a batch needs (the rules' and the substitutions'), read as a plain row."""

    id: int
    name: str | None
    email: str | None
    phone: str | None
    locale: str | None
    timezone: str | None
    nurture_consent: bool


@dataclass(slots=True)
class _Recipient:
    id: str
    candidate: _Person
    enrollment_id: int | None
    campaign: str
    step: int
    template: str
    category: str
    channel: str
    attempts: int
    created_at: datetime
    not_before: datetime
    context: dict[str, Any] = field(default_factory=dict)
    #: The enrollment context as stored: recipients with the same one share a rendering.
    context_key: str = ""
    job: Job | None = None
    substitutions: dict[str, str] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def candidate_id(self) -> int:
        return self.candidate.id


#: Positions in a claimed row (:data:`outreach.pipeline.outbox.CLAIMED_COLUMNS`, then the enrollment's facts).
_CREATED_AT, _NOT_BEFORE, _STATUS, _JOB, _CONTEXT = 9, 10, 11, 13, 14


def deliver_batch(runtime: Services, outbox_ids: Sequence[str], now: datetime | None = None) -> BatchOutcome:
    """Send these nurture email rows in as few SendGrid requests as their templates allow (as if at ``now``)."""
    with travel(now):
        return _deliver_batch(runtime, outbox_ids, now or utcnow())


def _deliver_batch(runtime: Services, outbox_ids: Sequence[str], now: datetime) -> BatchOutcome:
    ids = sorted(set(outbox_ids))
    if not ids:
        return BatchOutcome()
    provider = runtime.providers.email
    if not isinstance(provider, ProviderPipeline) or provider.name != "sendgrid":
        # Only SendGrid's payload is built here; another provider gets one request per message.
        runtime.enqueue(ids)
        return BatchOutcome(single=len(ids))

    recipients, stopped = _claim_and_check(runtime, ids, now)
    claimed = len(recipients) + stopped
    if not recipients:
        return BatchOutcome(claimed=claimed, stopped=stopped)

    try:
        requests, single, failed = _prepare(runtime, recipients)
    except BaseException:
        # Nothing was sent yet: give the rows back rather than leave them to the sweeper.
        _give_back(runtime, [r.id for r in recipients])
        raise

    sent = 0
    retry_in: float | None = None
    refused: list[str] = []  # handed off, refused as a whole by the provider: sent one by one
    for position, (shared, chunk) in enumerate(requests):
        try:
            result = _send(runtime, provider, shared, chunk, now)
        except BaseException:
            # Rows this request handed off stay ``sending`` (the call may have happened: the sweeper makes them
            # ``uncertain``); the rest were never offered to SendGrid. Only rows still claimed are given back.
            untried = [r.id for _, later in requests[position:] for r in later] + single
            _give_back(runtime, untried)
            raise
        sent += result.sent
        failed += result.failed
        refused.extend(result.single)
        if result.retry_in is not None:
            retry_in = result.retry_in if retry_in is None else min(retry_in, result.retry_in)
    if single or refused:
        with runtime.engine.begin() as connection:
            outbox.give_back(connection, single, utcnow(), 0.0)
            outbox.give_back(connection, refused, utcnow(), 0.0, attempted=True)
        single += refused
        runtime.enqueue(single)
    return BatchOutcome(
        claimed=claimed,
        sent=sent,
        stopped=stopped,
        failed=failed,
        single=len(single),
        requests=len(requests),
        retry_in=retry_in,
    )


def _prepare(
    runtime: Services, recipients: Sequence[_Recipient]
) -> tuple[list[tuple[SharedEmail, list[_Recipient]]], list[str], int]:
    """Render each group once and fill in its recipients: (requests to make, ids to send singly, failed count)."""
    single: list[str] = []
    failed = 0
    requests: list[tuple[SharedEmail, list[_Recipient]]] = []
    for group in _groups(runtime, recipients):
        try:
            shared = render_shared(runtime, group[0], _plain_in_html(runtime, group))
        except NotShareable as exc:
            log.info(
                "template not shareable; sending one by one", extra={"template": group[0].template, "why": str(exc)}
            )
            single.extend(r.id for r in group)
            continue
        except TemplateError as exc:
            with runtime.engine.begin() as connection:
                outbox.fail(
                    connection,
                    [r.id for r in group],
                    utcnow(),
                    rule="template",
                    code="template",
                    detail=str(exc),
                    sent_at=None,
                )
            log.error("template failed", extra={"template": group[0].template, "count": len(group)})
            failed += len(group)
            continue
        fitting = _personalize(runtime, shared, group)
        fits = {r.id for r in fitting}
        single.extend(r.id for r in group if r.id not in fits)
        for chunk in chunks(fitting, MAX_PERSONALIZATIONS):
            requests.append((shared, list(chunk)))
    return requests, single, failed


def _plain_in_html(runtime: Services, group: Sequence[_Recipient]) -> set[str]:
    """Per-recipient values HTML escaping leaves unchanged for this whole group: the unsubscribe link (our public
    URL and a token of URL-safe base64) unless the URL itself has something to escape, and the outbox ids."""
    plain = set()
    if html.escape(runtime.settings.public_url) == runtime.settings.public_url:
        plain.add("unsubscribe")
    if all(html.escape(r.id) == r.id for r in group):
        plain.add("message_id")
    return plain


# -- claim and rules -----------------------------------------------------------------------------------------


@lru_cache(maxsize=2)
def _candidates_statement(postgres: bool) -> Any:
    """The candidates' facts, their rows locked in id order (``FOR NO KEY UPDATE``, as the single path locks),
    so batches and single sends queue up behind each other instead of deadlocking."""
    people = _CANDIDATES
    query = (
        select(*(people.c[name] for name in _Person._fields))
        .where(any_of(postgres, people.c.id, "people"))
        .order_by(people.c.id)
    )
    return query.with_for_update(key_share=True) if postgres else query


def _claim_and_check(runtime: Services, ids: Sequence[str], now: datetime) -> tuple[list[_Recipient], int]:
    """Claim the rows still pending, lock their candidates, run every rule; returns those allowed to go.

    Plain rows throughout (no ORM objects): one statement claims the rows and reads their enrollments (on
    PostgreSQL an ``UPDATE … RETURNING`` in a CTE joined to ``enrollments``), one locks and reads the candidates,
    :class:`PolicyReads` reads suppressions and recent sends in one statement each, and the stopped rows are
    recorded in one more: a constant number of statements whatever the size of the batch."""
    settings = runtime.settings
    policy = runtime.policy
    with Session(runtime.engine, expire_on_commit=False) as session, session.begin():
        connection = session.connection()
        postgres = connection.dialect.name == "postgresql"
        lease = timedelta(seconds=settings.lease_seconds)
        rows = outbox.claim(connection, ids, now, lease, batch=True)
        if not rows:
            return [], 0
        claimed_ids = [row[0] for row in rows]
        people = {"people": sorted({row[1] for row in rows})}
        candidates = {
            row[0]: _Person(*row) for row in connection.execute(_candidates_statement(postgres), people).all()
        }

        job_ids = {row[_JOB] for row in rows if row[_JOB] is not None}
        jobs = {j.id: j for j in session.scalars(select(Job).where(Job.id.in_(job_ids)))} if job_ids else {}
        reads = PolicyReads.load(session, policy, candidates.values(), {Channel.EMAIL.value}, now, exclude=claimed_ids)

        allowed: list[_Recipient] = []
        stopped: list[dict[str, Any]] = []
        stage = Stage.SEND
        contexts: dict[str | None, dict[str, Any]] = {}
        for row in sorted(rows, key=lambda r: (r[1], r[0])):
            (message_id, candidate_id, enrollment_id, campaign, step, template, category, channel, attempts) = row[:9]
            candidate = candidates[candidate_id]
            subject = policy.subject(
                candidate,
                channel=channel,
                category=category,
                campaign=campaign,
                now=now,
                stage=stage,
                message_id=message_id,
            )
            enrolled = enrollment_id is not None and row[_STATUS] is not None
            decision = reads.evaluate(
                session, subject, candidate, (row[_STATUS], row[_STATUS + 1]) if enrolled else None
            )
            if not decision.allowed:
                stopped.append(outbox.refused(message_id, Verdict(decision), row[_NOT_BEFORE], now))
                continue
            reads.count(subject)
            text = row[_CONTEXT] if enrolled else None
            context = contexts.get(text)
            if context is None:
                context = contexts[text] = dict(json.loads(text) or {}) if text else {}
            job_id = row[_JOB] if enrolled else None
            allowed.append(
                _Recipient(
                    id=message_id,
                    candidate=candidate,
                    enrollment_id=enrollment_id,
                    campaign=campaign,
                    step=step,
                    template=template,
                    category=category,
                    channel=channel,
                    attempts=attempts,
                    created_at=row[_CREATED_AT],
                    not_before=row[_NOT_BEFORE],
                    context=context,
                    context_key=text or "",
                    job=jobs.get(job_id) if job_id else None,
                )
            )
        outbox.refuse(connection, stopped)
    return allowed, len(stopped)


# -- grouping and rendering ----------------------------------------------------------------------------------


def _groups(runtime: Services, recipients: Iterable[_Recipient]) -> list[list[_Recipient]]:
    """Recipients that one rendering serves: same campaign, template, locale, job and enrollment context."""
    groups: dict[tuple[Any, ...], list[_Recipient]] = {}
    locales: dict[tuple[str, str | None], str] = {}
    for recipient in recipients:
        wanted = (recipient.template, recipient.candidate.locale)
        locale = locales.get(wanted)
        if locale is None:
            try:
                locale = runtime.renderer.resolve_locale("email", recipient.template, recipient.candidate.locale)
            except TemplateError:
                locale = recipient.candidate.locale or ""
            locales[wanted] = locale
        key = (
            recipient.campaign,
            recipient.category,
            recipient.template,
            locale,
            recipient.job.id if recipient.job is not None else None,
            recipient.context_key,
        )
        groups.setdefault(key, []).append(recipient)
    return list(groups.values())


def render_shared(runtime: Services, exemplar: _Recipient, plain: Collection[str] = ()) -> SharedEmail:
    """Render ``exemplar``'s template once, with substitution tags for every per-recipient value; the values named
    in ``plain`` print the same in HTML for every recipient, so the HTML part uses their text tags."""
    enrollment = Enrollment(context=exemplar.context) if exemplar.enrollment_id is not None else None
    with Session(runtime.engine) as session:
        # The exemplar's whole candidate (the rest of the batch is plain rows): whatever else of it the template
        # reads is noticed by the probe and makes the rendering unshareable.
        candidate = session.get(Candidate, exemplar.candidate.id)
    if candidate is None:
        raise NotShareable("candidate gone")
    context = build_context(
        runtime.settings, runtime.policy.calendar, outbox.detached(exemplar), candidate, enrollment, exemplar.job
    )
    probe = _Probe({**context["candidate"], **{key: _Slot(key) for key in SUBSTITUTED}})
    concerns = _ProbeList(context.get("concerns") or [])
    context.update(
        candidate=probe,
        concerns=concerns,
        links={**context["links"], "unsubscribe": _Slot("unsubscribe", "unsubscribe" in plain)},
        message={**context["message"], "id": _Slot("message_id", "message_id" in plain)},
    )
    email = runtime.renderer.render_email(exemplar.template, candidate.locale, context)
    unshared = sorted(probe.read - SUBSTITUTED)
    if unshared or concerns.used:
        raise NotShareable(f"reads candidate fields {unshared or ['concerns']}")
    allowed = {text_tag(k) for k in (*SUBSTITUTED, "unsubscribe", "message_id")}
    allowed |= {html_tag(k) for k in (*SUBSTITUTED, "unsubscribe", "message_id")}
    found = set(_TAG.findall(email.subject + email.text + email.html))
    if found - allowed or "%%o:" in _TAG.sub("", email.subject + email.text + email.html).lower():
        raise NotShareable("transforms a per-recipient value instead of printing it")

    text, body = email.text, email.html
    links: list[Link] = []
    if tracks_clicks(runtime.campaigns.get(exemplar.campaign)):
        text, body, links = _tracked(runtime, context, text, body)
        found |= {text_tag(f"link{i}") for i in range(len(links))}
    else:
        body = strip_names(body)
    return SharedEmail(
        subject=email.subject, text=text, html=body, locale=email.locale, tags=frozenset(found), links=tuple(links)
    )


def _tracked(runtime: Services, context: Mapping[str, Any], text: str, body: str) -> tuple[str, str, list[Link]]:
    """The parts with every trackable link replaced by a tag of its own (``link0`` …), as click tracking would."""
    settings = runtime.settings
    known = known_names(context)
    own = (f"{settings.public_url}/r/", f"{settings.public_url}/unsubscribe/")
    found: list[Link] = []
    names = dict(known)

    def trackable(link: Link) -> bool:
        return is_web_url(link.url) and not link.url.startswith(own)

    def collect_html(link: Link) -> str | None:
        if link.name is not None:
            names.setdefault(link.url, link.name)
        if trackable(link) and link not in found:
            found.append(link)
        return None

    def collect_text(link: Link) -> str | None:
        if trackable(link) and link not in found:
            found.append(link)
        return None

    rewrite_html(body, known, collect_html)
    rewrite_text(text, names, collect_text)
    tags = {link: text_tag(f"link{i}") for i, link in enumerate(found)}

    def substitute(link: Link) -> str | None:
        return tags.get(link) if trackable(link) else None

    return rewrite_text(text, names, substitute), rewrite_html(body, known, substitute), found


def _personalize(runtime: Services, shared: SharedEmail, group: Sequence[_Recipient]) -> list[_Recipient]:
    """Fill each recipient's substitutions (storing tracked links first); returns those that fit a batch."""
    settings = runtime.settings
    link_urls = _store_links(runtime, shared, group) if shared.links else {}
    keys = ("name", "first_name", "unsubscribe", "message_id", *(f"link{i}" for i in range(len(shared.links))))
    # Which tags this rendering has, worked out once: (key, text tag or None, HTML tag or None).
    wanted = [
        (key, text if text in shared.tags else None, tagged if tagged in shared.tags else None)
        for key, text, tagged in ((key, text_tag(key), html_tag(key)) for key in keys)
        if text in shared.tags or tagged in shared.tags
    ]
    shared_unsubscribe = text_tag("unsubscribe") in shared.tags
    issued_at = utcnow()
    fitting: list[_Recipient] = []
    for recipient in group:
        name = recipient.candidate.name or ""
        words = name.split()
        values = {
            "name": name,
            "first_name": words[0] if words else name,
            "unsubscribe": unsubscribe_url(settings, recipient.id, issued_at),  # each recipient's own message
            "message_id": recipient.id,
        }
        for index, url in enumerate(link_urls.get(recipient.id, ())):
            values[f"link{index}"] = url
        substitutions: dict[str, str] = {}
        for key, text, tagged in wanted:
            value = values[key]
            if text is not None:
                substitutions[text] = value
            if tagged is not None:
                substitutions[tagged] = html.escape(value)
        recipient.substitutions = substitutions
        unsubscribe_listed = shared_unsubscribe and recipient.category == _NURTURE
        recipient.headers = (
            {"List-Unsubscribe": f"<{values['unsubscribe']}>", "List-Unsubscribe-Post": "List-Unsubscribe=One-Click"}
            if unsubscribe_listed
            else {}
        )
        if _personalization_bytes(recipient) <= MAX_PERSONALIZATION_BYTES:
            fitting.append(recipient)
    return fitting


def _store_links(runtime: Services, shared: SharedEmail, group: Sequence[_Recipient]) -> dict[str, list[str]]:
    """One TrackedLink row per recipient and link (reusing an earlier attempt's); returns the redirect URLs."""
    settings = runtime.settings
    table = _LINKS
    ids = [r.id for r in group]
    urls: dict[str, list[str]] = {}
    with Session(runtime.engine) as session, session.begin():
        existing: dict[tuple[str, str, str | None], int] = {}
        positions: dict[str, int] = defaultdict(lambda: -1)
        for chunk in chunks(ids, 1000):
            for link_id, message_id, position, url, name in session.execute(
                select(
                    TrackedLink.id, TrackedLink.message_id, TrackedLink.position, TrackedLink.url, TrackedLink.name
                ).where(one_of(session, TrackedLink.message_id, chunk))
            ):
                existing[(message_id, url, name)] = link_id
                positions[message_id] = max(positions[message_id], position)
        missing: list[dict[str, Any]] = []
        for message_id in ids:
            for link in shared.links:
                if (message_id, link.url, link.name) not in existing:
                    positions[message_id] += 1
                    missing.append(
                        {
                            "message_id": message_id,
                            "position": positions[message_id],
                            "url": link.url,
                            "name": link.name,
                        }
                    )
        if missing:
            statement = insert(table).returning(
                table.c.id, table.c.message_id, table.c.url, table.c.name, sort_by_parameter_order=True
            )
            for link_id, message_id, url, name in session.connection().execute(statement, missing):
                existing[(message_id, url, name)] = link_id
    for message_id in ids:
        urls[message_id] = [
            redirect_url(settings, existing[(message_id, link.url, link.name)]) for link in shared.links
        ]
    return urls


#: JSON text per character at most (``\u001f``: six ASCII bytes), and UTF-8 bytes per character at most.
_WORST_PER_CHAR = 6


def _personalization_bytes(recipient: _Recipient) -> int:
    # SendGrid counts substitutions, custom args and headers of a personalization against its limit. A bound from
    # the lengths first (each character is at most six bytes of JSON, each string adds its quotes, colon and
    # comma); the exact JSON only for the few that might be near the limit.
    substitutions, headers = recipient.substitutions, recipient.headers
    characters = sum(map(len, substitutions)) + sum(map(len, substitutions.values()))
    characters += sum(map(len, headers)) + sum(map(len, headers.values())) + len(recipient.id)
    bound = 100 + _WORST_PER_CHAR * (characters + 6 * (len(substitutions) + len(headers)))
    if bound <= MAX_PERSONALIZATION_BYTES:
        return bound
    return personalization_bytes(
        {
            "substitutions": recipient.substitutions,
            "custom_args": {OUTBOX_ID_ARG: recipient.id},
            "headers": recipient.headers,
        }
    )


# -- the request ---------------------------------------------------------------------------------------------


def build_payload(runtime: Services, shared: SharedEmail, chunk: Sequence[_Recipient]) -> dict[str, Any]:
    """The SendGrid v3 mail/send body for one request: shared content, one personalization per recipient."""
    settings = runtime.settings
    first = chunk[0]
    personalizations = []
    for recipient in chunk:
        personalization: dict[str, Any] = {
            "to": [{"email": recipient.candidate.email or ""}],
            "custom_args": {OUTBOX_ID_ARG: recipient.id},
        }
        if recipient.substitutions:
            personalization["substitutions"] = recipient.substitutions
        if recipient.headers:
            personalization["headers"] = recipient.headers
        personalizations.append(personalization)
    payload: dict[str, Any] = {
        "personalizations": personalizations,
        "from": address_field(settings.email_from),
        "subject": shared.subject,
        "content": content(shared.text, shared.html),
        "categories": list(dict.fromkeys((first.campaign, first.template))),
    }
    if settings.email_reply_to:
        payload["reply_to"] = address_field(settings.email_reply_to)
    return payload


@dataclass
class _Sent:
    sent: int = 0
    failed: int = 0
    uncertain: int = 0
    single: list[str] = field(default_factory=list)
    retry_in: float | None = None


def _send(
    runtime: Services,
    provider: ProviderPipeline[Any, Any, Any],
    shared: SharedEmail,
    chunk: list[_Recipient],
    now: datetime,
) -> _Sent:
    """One request: hand its rows off (one statement, committed), then call SendGrid and record the outcome."""
    settings = runtime.settings
    ids = [r.id for r in chunk]
    rate = runtime.policy.spec.rate_limits.get(provider.name)
    if rate is not None:
        booking = runtime.pacer.book(f"{provider.name}:{settings.email_from}", rate, cost=float(len(chunk)))
        if not booking.granted:
            _give_back(runtime, ids, booking.wait)
            return _Sent(retry_in=booking.wait)
        if booking.wait > 0:
            time.sleep(booking.wait)

    started = utcnow()
    with runtime.engine.begin() as connection:
        handed = set(outbox.hand_off(connection, ids, started + timedelta(seconds=settings.lease_seconds), started))
    if len(handed) < len(chunk):
        # The sweeper took some back (their lease ran out while earlier requests went): not ours to send.
        chunk = [r for r in chunk if r.id in handed]
        ids = [r.id for r in chunk]
        if not chunk:
            return _Sent()
    payload = build_payload(runtime, shared, chunk)
    error: ProviderError | None
    try:
        response = provider.post(payload)
        error = None
    except ProviderError as exc:
        error = exc
    except Exception as exc:
        error = provider.map_error(exc)
        if error is None:
            raise
    if error is None:
        provider_message_id = provider.parse_result(response)
        with runtime.engine.begin() as connection:
            if not provider_message_id:
                detail = "accepted without returning a message id"
                outbox.fail(
                    connection, ids, utcnow(), rule="provider", code="no-id", detail=detail, provider=provider.name
                )
                return _Sent(failed=len(ids))
            sent = outbox.SharedSend(
                provider=provider.name,
                provider_message_id=provider_message_id,
                locale=shared.locale,
                subject=shared.subject,
                text=shared.text,
                rows=[(r.id, r.substitutions) for r in chunk],
            )
            outbox.record_sent(connection, sent, now, utcnow())
        return _Sent(sent=len(ids))

    if isinstance(error, AmbiguousProviderError):
        # The request went out and its answer was lost: SendGrid may have every personalization. Resending the
        # chunk could reach each recipient twice, so the rows wait, uncertain, for events naming their ids.
        with runtime.engine.begin() as connection:
            outbox.uncertain(
                connection,
                ids,
                utcnow(),
                provider=error.provider,
                reason=f"{error.provider} batch call failed after the request was sent; it may have been "
                "accepted: reconcile from provider events, do not resend",
                code=error.code or "ambiguous",
                detail=str(error),
            )
        log.warning("provider answer lost; batch uncertain", extra={"provider": error.provider, "count": len(ids)})
        return _Sent(uncertain=len(ids))

    if isinstance(error, TransientProviderError):
        # Attempts are counted at the hand-off: this request was attempt ``attempts + 1`` of each row.
        code = error.code or str(error.status or "network")
        exhausted = [r.id for r in chunk if r.attempts + 1 >= settings.max_retries]
        retrying = [r.id for r in chunk if r.attempts + 1 < settings.max_retries]
        attempt = max(r.attempts for r in chunk) + 1
        delay = error.retry_after if error.retry_after is not None else backoff(attempt)
        with runtime.engine.begin() as connection:
            outbox.fail(connection, exhausted, utcnow(), rule="retries", code=code, detail=str(error))
            outbox.give_back(
                connection, retrying, utcnow(), delay, attempted=True, error_code=code, error_detail=str(error)[:500]
            )
        if not retrying:
            return _Sent(failed=len(exhausted))
        log.warning(
            "provider busy; retrying batch",
            extra={"provider": error.provider, "status": error.status, "delay": delay, "count": len(retrying)},
        )
        return _Sent(failed=len(exhausted), retry_in=delay)

    if len(chunk) > 1:
        # One bad personalization refuses the whole request: send them one by one, so only that one fails.
        log.warning(
            "provider refused batch; sending one by one", extra={"provider": error.provider, "code": error.code}
        )
        return _Sent(single=ids)
    code = error.code or str(error.status)
    with runtime.engine.begin() as connection:
        outbox.fail(connection, ids, utcnow(), rule="provider", code=code, detail=str(error), provider=error.provider)
    return _Sent(failed=len(ids))


def _give_back(runtime: Services, ids: Sequence[str], delay: float = 0.0) -> None:
    """Rows still claimed (never handed off) back to ``pending`` (:func:`outreach.pipeline.outbox.give_back`)."""
    with runtime.engine.begin() as connection:
        outbox.give_back(connection, ids, utcnow(), delay)
