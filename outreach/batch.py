"""Nurture email in SendGrid batches: one request for up to 1000 recipients, each still checked and tracked alone.

The scheduler puts the due nurture email rows of one (campaign, step, template, locale) on the queue as one batch
message of outbox ids (:meth:`outreach.scheduler.Scheduler.run_due`); a worker hands it to :func:`deliver_batch`,
which keeps every promise of the single path (:func:`outreach.delivery.deliver`):

- **Claim and rules, per recipient.** One transaction claims the rows that are still ``pending`` and due
  (``pending`` → ``sending``, rows another worker holds are skipped), locks the candidates' rows in id order
  (``FOR NO KEY UPDATE``, as the single path does, so caps hold against concurrent sends) and runs every policy
  rule for every recipient at the send stage, with what the rules read loaded once for the whole batch (enrollment
  states, suppressions, consent, the recent sends the caps count). A recipient a rule holds, suppresses, skips or
  cancels gets that status, rule and reason on its own row and simply drops out of the request. Two rows of one
  candidate in one batch are counted by the caps one after the other, as two single sends would be.
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
- **At least once, never blindly twice.** Rows are committed ``sending`` before the call. A crash mid-call leaves
  them ``sending`` until the sweeper marks them ``uncertain`` (reconciled from events, never resent); a retried
  batch message claims only rows still ``pending``. A transient failure puts the request's rows back to
  ``pending`` with the provider's reset time and asks for a retry; a permanent one for a request of several
  recipients sends them one by one (so one bad address fails alone), and fails the row of a single recipient.

**Cost.** A batch is a constant number of statements whatever its size (claim with the enrollments; candidates;
suppressions; recent sends; the stopped rows, if any; the exemplar's candidate per rendering; the sent rows) over
plain rows, not ORM objects: statements are built once with named parameters, the rules decide from the shared
reads (:class:`outreach.policy.bulk.PolicyReads`), and on PostgreSQL the sent rows' subjects and bodies are
filled in by the database from the shared text and one JSON document of substitution values. SQLite runs the
same steps with portable statements.

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

from sqlalchemy import JSON, Text, any_, bindparam, case, cast, func, insert, literal, or_, select, true, update
from sqlalchemy.orm import Session

from outreach.campaigns import Category
from outreach.clock import travel, utcnow
from outreach.delivery import STOP_REFUSED, backoff, build_context, pending_again, refused
from outreach.errors import (
    AmbiguousProviderError,
    PermanentProviderError,
    ProviderError,
    TemplateError,
    TransientProviderError,
)
from outreach.links import (
    Link,
    is_web_url,
    known_names,
    redirect_url,
    rewrite_html,
    rewrite_text,
    strip_names,
    tracks_clicks,
)
from outreach.models import Base, Candidate, Channel, Enrollment, Job, MessageStatus, OutboundMessage, TrackedLink
from outreach.policy.base import Stage
from outreach.policy.bulk import CHUNK, PolicyReads, any_of, array_of, one_of
from outreach.policy.engine import Outcome as Verdict
from outreach.providers.base import ProviderPipeline
from outreach.providers.sendgrid import address_field
from outreach.runtime import Runtime
from outreach.tokens import unsubscribe_url

__all__ = ["MAX_PERSONALIZATIONS", "MAX_PERSONALIZATION_BYTES", "BatchOutcome", "deliver_batch"]

log = logging.getLogger(__name__)

#: SendGrid's limits: personalizations per request, and bytes of substitutions, headers and custom args in one.
MAX_PERSONALIZATIONS = 1000
MAX_PERSONALIZATION_BYTES = 10_000

#: Candidate fields that may differ between the recipients of one rendering (they are substituted).
SUBSTITUTED = frozenset({"name", "first_name"})

_TAG = re.compile(r"%%o:[^%\s]{0,40}%%", re.IGNORECASE)
_OUTBOX = Base.metadata.tables["outbound_messages"]
_LINKS = Base.metadata.tables["tracked_links"]
_ENROLLMENTS = Base.metadata.tables["enrollments"]
_CANDIDATES = Base.metadata.tables["candidates"]
_FINISHED_FROM = (MessageStatus.SENDING.value, MessageStatus.UNCERTAIN.value)
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


#: What the claim returns of each outbox row, in this order, followed by its enrollment's status, exit reason,
#: job and context (the positions below).
_CLAIMED = (
    "id",
    "candidate_id",
    "enrollment_id",
    "campaign",
    "step",
    "template",
    "category",
    "channel",
    "attempts",
    "created_at",
    "not_before",
)
_CREATED_AT, _NOT_BEFORE, _STATUS, _JOB, _CONTEXT = 9, 10, 11, 13, 14


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def deliver_batch(runtime: Runtime, outbox_ids: Sequence[str], now: datetime | None = None) -> BatchOutcome:
    """Send these nurture email rows in as few SendGrid requests as their templates allow (as if at ``now``)."""
    with travel(now):
        return _deliver_batch(runtime, outbox_ids, now or utcnow())


def _deliver_batch(runtime: Runtime, outbox_ids: Sequence[str], now: datetime) -> BatchOutcome:
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
        # Nothing was sent yet: give the rows back rather than leave them to become ``uncertain``.
        _release(runtime, [r.id for r in recipients], utcnow(), 0.0, give_back_attempt=True)
        raise

    sent = 0
    retry_in: float | None = None
    for position, (shared, chunk) in enumerate(requests):
        try:
            result = _send(runtime, provider, shared, chunk, now)
        except BaseException:
            # This request's rows stay ``sending`` (the call may have happened); later ones were never tried.
            untried = [r.id for _, later in requests[position + 1 :] for r in later] + single
            _release(runtime, untried, utcnow(), 0.0, give_back_attempt=True)
            raise
        sent += result.sent
        failed += result.failed
        single.extend(result.single)
        if result.retry_in is not None:
            retry_in = result.retry_in if retry_in is None else min(retry_in, result.retry_in)
    if single:
        _release(runtime, single, utcnow(), 0.0, give_back_attempt=True)
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
    runtime: Runtime, recipients: Sequence[_Recipient]
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
            _fail(runtime, [r.id for r in group], utcnow(), rule="template", code="template", detail=str(exc)[:500])
            log.error("template failed", extra={"template": group[0].template, "count": len(group)})
            failed += len(group)
            continue
        fitting = _personalize(runtime, shared, group)
        fits = {r.id for r in fitting}
        single.extend(r.id for r in group if r.id not in fits)
        for chunk in _chunks(fitting, MAX_PERSONALIZATIONS):
            requests.append((shared, list(chunk)))
    return requests, single, failed


def _plain_in_html(runtime: Runtime, group: Sequence[_Recipient]) -> set[str]:
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
def _claim_statement(postgres: bool) -> Any:
    """Pending, due email rows among ``claim_ids`` become ``sending``; on PostgreSQL the claimed rows come back
    joined to their enrollments (status, exit reason, job and context as text), in one statement. Built once, so
    SQLAlchemy's statement cache finds it without walking it again."""
    table = _OUTBOX
    now = bindparam("claim_now", type_=table.c.not_before.type)
    values = {
        "status": MessageStatus.SENDING.value,
        "lease_until": bindparam("claim_lease", type_=table.c.lease_until.type),
        "attempts": table.c.attempts + 1,
        # Provisional, as in the single path: caps count rows being sent by this time.
        "sent_at": now,
        "updated_at": now,
    }
    if not postgres:
        pick = select(table.c.id).where(
            table.c.id.in_(bindparam("claim_ids", expanding=True)),
            table.c.status == MessageStatus.PENDING.value,
            table.c.not_before <= now,
            table.c.channel == Channel.EMAIL.value,
        )
        return (
            update(table)
            .where(table.c.id.in_(pick.scalar_subquery()))
            .values(**values)
            .returning(*(table.c[name] for name in _CLAIMED))
        )
    # Each id looked up on the primary key and locked in the order given (sorted: batches and single sends queue
    # up behind each other instead of deadlocking); rows a retried copy of this batch (or a single send) is
    # claiming right now are theirs and skipped. A lateral lookup per id rather than ``id = ANY(:ids)``, which
    # the planner may answer with a scan of the whole table once it holds some 100,000 rows.
    given = func.unnest(bindparam("claim_ids", type_=array_of(table.c.id.type))).table_valued("id")
    given = given.render_derived(name="given")
    row = table.alias("pending_row")
    due = (
        select(row.c.id)
        .where(
            row.c.id == given.c.id,
            row.c.status == MessageStatus.PENDING.value,
            row.c.not_before <= now,
            row.c.channel == Channel.EMAIL.value,
        )
        .with_for_update(skip_locked=True)
        .lateral("due")
    )
    picked = select(due.c.id).select_from(given).join(due, true())
    claim = (
        update(table)
        .where(table.c.id == any_(func.array(picked.scalar_subquery())))
        .values(**values)
        .returning(*(table.c[name] for name in _CLAIMED))
    )
    claimed = claim.cte("claimed")
    enrollments = _ENROLLMENTS
    return select(*(claimed.c[name] for name in _CLAIMED), *_enrollment_facts()).select_from(
        claimed.outerjoin(enrollments, enrollments.c.id == claimed.c.enrollment_id)
    )


def _enrollment_facts() -> tuple[Any, ...]:
    # The context as its stored text: recipients are grouped by it, and only a group's exemplar needs it parsed.
    enrollments = _ENROLLMENTS
    return (enrollments.c.status, enrollments.c.exit_reason, enrollments.c.job_id, cast(enrollments.c.context, Text))


@lru_cache(maxsize=1)
def _enrollments_statement() -> Any:
    enrollments = _ENROLLMENTS
    return select(enrollments.c.id, *_enrollment_facts()).where(
        enrollments.c.id.in_(bindparam("enrollments", expanding=True))
    )


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


def _claim_and_check(runtime: Runtime, ids: Sequence[str], now: datetime) -> tuple[list[_Recipient], int]:
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
        claiming = {
            "claim_ids": list(ids),
            "claim_now": now,
            "claim_lease": now + timedelta(seconds=settings.lease_seconds),
        }
        rows: Sequence[Any]
        if postgres:
            rows = connection.execute(_claim_statement(True), claiming).all()
        else:
            plain = connection.execute(_claim_statement(False), claiming).all()
            found: dict[Any, Any] = {}
            wanted = sorted({row.enrollment_id for row in plain if row.enrollment_id is not None})
            for chunk in _chunks(wanted, CHUNK):
                for row in connection.execute(_enrollments_statement(), {"enrollments": list(chunk)}):
                    found[row[0]] = tuple(row[1:])
            rows = [(*row, *found.get(row.enrollment_id, (None, None, None, None))) for row in plain]
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
                stopped.append(refused(message_id, Verdict(decision), row[_NOT_BEFORE], now))
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
        if stopped:
            connection.execute(STOP_REFUSED, stopped)
    return allowed, len(stopped)


# -- grouping and rendering ----------------------------------------------------------------------------------


def _groups(runtime: Runtime, recipients: Iterable[_Recipient]) -> list[list[_Recipient]]:
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


def _transient_message(recipient: _Recipient) -> OutboundMessage:
    return OutboundMessage(
        id=recipient.id,
        enrollment_id=recipient.enrollment_id,
        candidate_id=recipient.candidate.id,
        campaign=recipient.campaign,
        step=recipient.step,
        channel=recipient.channel,
        template=recipient.template,
        category=recipient.category,
        created_at=recipient.created_at,
    )


def render_shared(runtime: Runtime, exemplar: _Recipient, plain: Collection[str] = ()) -> SharedEmail:
    """Render ``exemplar``'s template once, with substitution tags for every per-recipient value; the values named
    in ``plain`` print the same in HTML for every recipient, so the HTML part uses their text tags."""
    enrollment = Enrollment(context=exemplar.context) if exemplar.enrollment_id is not None else None
    with Session(runtime.engine) as session:
        # The exemplar's whole candidate (the rest of the batch is plain rows): whatever else of it the template
        # reads is noticed by the probe and makes the rendering unshareable.
        candidate = session.get(Candidate, exemplar.candidate.id)
    if candidate is None:
        raise NotShareable("candidate gone")
    context = build_context(runtime, _transient_message(exemplar), candidate, enrollment, exemplar.job)
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


def _tracked(runtime: Runtime, context: Mapping[str, Any], text: str, body: str) -> tuple[str, str, list[Link]]:
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


def _personalize(runtime: Runtime, shared: SharedEmail, group: Sequence[_Recipient]) -> list[_Recipient]:
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
    fitting: list[_Recipient] = []
    for recipient in group:
        name = recipient.candidate.name or ""
        words = name.split()
        values = {
            "name": name,
            "first_name": words[0] if words else name,
            "unsubscribe": unsubscribe_url(settings, recipient.channel, recipient.candidate.id),
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


def _store_links(runtime: Runtime, shared: SharedEmail, group: Sequence[_Recipient]) -> dict[str, list[str]]:
    """One TrackedLink row per recipient and link (reusing an earlier attempt's); returns the redirect URLs."""
    settings = runtime.settings
    table = _LINKS
    ids = [r.id for r in group]
    urls: dict[str, list[str]] = {}
    with Session(runtime.engine) as session, session.begin():
        existing: dict[tuple[str, str, str | None], int] = {}
        positions: dict[str, int] = defaultdict(lambda: -1)
        for chunk in _chunks(ids, 1000):
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
    extra = {
        "substitutions": recipient.substitutions,
        "custom_args": {"outreach_id": recipient.id},
        "headers": recipient.headers,
    }
    return len(json.dumps(extra, ensure_ascii=False).encode("utf-8"))


# -- the request ---------------------------------------------------------------------------------------------


def build_payload(runtime: Runtime, shared: SharedEmail, chunk: Sequence[_Recipient]) -> dict[str, Any]:
    """The SendGrid v3 mail/send body for one request: shared content, one personalization per recipient."""
    settings = runtime.settings
    first = chunk[0]
    personalizations = []
    for recipient in chunk:
        personalization: dict[str, Any] = {
            "to": [{"email": recipient.candidate.email or ""}],
            "custom_args": {"outreach_id": recipient.id},
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
        "content": [
            {"type": kind, "value": value}
            for kind, value in (("text/plain", shared.text), ("text/html", shared.html))
            if value
        ],
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
    runtime: Runtime,
    provider: ProviderPipeline[Any, Any, Any],
    shared: SharedEmail,
    chunk: list[_Recipient],
    now: datetime,
) -> _Sent:
    settings = runtime.settings
    ids = [r.id for r in chunk]
    rate = runtime.policy.spec.rate_limits.get(provider.name)
    if rate is not None:
        booking = runtime.pacer.book(f"{provider.name}:{settings.email_from}", rate, cost=float(len(chunk)))
        if not booking.granted:
            _release(runtime, ids, utcnow(), booking.wait, give_back_attempt=True)
            return _Sent(retry_in=booking.wait)
        if booking.wait > 0:
            time.sleep(booking.wait)

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
        if not provider_message_id:
            error = PermanentProviderError(provider.name, "accepted without returning a message id")
            _fail(runtime, ids, utcnow(), rule="provider", code="no-id", detail=str(error), provider=provider.name)
            return _Sent(failed=len(ids))
        _record_sent(runtime, shared, chunk, provider.name, provider_message_id, now)
        return _Sent(sent=len(ids))

    if isinstance(error, AmbiguousProviderError):
        # The request went out and its answer was lost: SendGrid may have every personalization. Resending the
        # chunk could reach each recipient twice, so the rows wait, uncertain, for events naming their ids.
        _mark_uncertain(runtime, ids, utcnow(), error)
        log.warning("provider answer lost; batch uncertain", extra={"provider": error.provider, "count": len(ids)})
        return _Sent(uncertain=len(ids))

    if isinstance(error, TransientProviderError):
        code = error.code or str(error.status or "network")
        exhausted = [r.id for r in chunk if r.attempts >= settings.max_retries]
        retrying = [r.id for r in chunk if r.attempts < settings.max_retries]
        if exhausted:
            _fail(runtime, exhausted, utcnow(), rule="retries", code=code, detail=str(error)[:500])
        if not retrying:
            return _Sent(failed=len(exhausted))
        attempt = max(r.attempts for r in chunk)
        delay = error.retry_after if error.retry_after is not None else backoff(attempt)
        _release(runtime, retrying, utcnow(), delay, error_code=code, error_detail=str(error)[:500])
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
    _fail(runtime, ids, utcnow(), rule="provider", code=code, detail=str(error)[:500], provider=error.provider)
    return _Sent(failed=len(ids))


def _substitute(text: str, substitutions: Mapping[str, str]) -> str:
    for tag, value in substitutions.items():
        if tag in text:
            text = text.replace(tag, value)
    return text


def _record_sent(
    runtime: Runtime,
    shared: SharedEmail,
    chunk: Sequence[_Recipient],
    provider: str,
    provider_message_id: str,
    sent_at: datetime,
) -> None:
    """Every row of the request ``sent`` (or, where a provider event got there first, the send's facts added)."""
    facts = {
        "sent_time": sent_at,
        "sent_provider": provider,
        "sent_provider_id": provider_message_id,
        "sent_locale": shared.locale,
    }
    with Session(runtime.engine) as session, session.begin():
        connection = session.connection()
        if connection.dialect.name != "postgresql":
            rows = [
                {
                    **facts,
                    "b_id": r.id,
                    "b_subject": _substitute(shared.subject, r.substitutions),
                    "b_body": _substitute(shared.text, r.substitutions),
                }
                for r in chunk
            ]
            connection.execute(_record_sent_statement(), rows)
            return
        # PostgreSQL: the shared subject and text go once, each row's substitution values in one JSON document,
        # and the database fills them in (``replace`` in the order :func:`_substitute` follows, so the stored text
        # is what the recipient got) instead of a thousand bodies crossing the wire.
        tags = tuple(chunk[0].substitutions)
        if all(tuple(r.substitutions) == tags and not any("%" in v for v in r.substitutions.values()) for r in chunk):
            # No value can make a tag (they all have a ``%``), so only the tags the texts hold need replacing.
            in_subject = tuple(tag for tag in tags if tag in shared.subject)
            in_text = tuple(tag for tag in tags if tag in shared.text)
            used = tuple(tag for tag in tags if tag in in_subject or tag in in_text)
            values = [[r.id, *(r.substitutions[tag] for tag in used)] for r in chunk]
            statement = _record_sent_filled(used, in_subject, in_text)
            texts = {"sent_subject": shared.subject, "sent_text": shared.text}
        else:  # substitutions are filled for a whole rendering at once, so their keys agree; if not, each text
            values = [
                [r.id, _substitute(shared.subject, r.substitutions), _substitute(shared.text, r.substitutions)]
                for r in chunk
            ]
            statement = _record_sent_texts()
            texts = {}
        document = json.dumps(values, ensure_ascii=False)
        connection.execute(statement, {**facts, **texts, "sent_rows": document})


def _sent_facts() -> dict[str, Any]:
    """The values every row of a request gets. One statement for both cases of the single path's finish: a row
    still in flight becomes ``sent`` (the claim time stands as the send time: caps counted it from then on); a row
    a provider event already moved on keeps its status and only gains the send's facts."""
    table = _OUTBOX
    in_flight = or_(*(table.c.status == s for s in _FINISHED_FROM))
    return {
        "status": case((in_flight, MessageStatus.SENT.value), else_=table.c.status),
        "sent_at": case((in_flight, bindparam("sent_time", type_=table.c.sent_at.type)), else_=table.c.sent_at),
        "error_code": case((in_flight, None), else_=table.c.error_code),
        "error_detail": case((in_flight, None), else_=table.c.error_detail),
        "provider": bindparam("sent_provider", type_=table.c.provider.type),
        "provider_message_id": bindparam("sent_provider_id", type_=table.c.provider_message_id.type),
        "locale": bindparam("sent_locale", type_=table.c.locale.type),
        "lease_until": None,
        "updated_at": bindparam("sent_time", type_=table.c.updated_at.type),
    }


@lru_cache(maxsize=1)
def _record_sent_statement() -> Any:
    table = _OUTBOX
    return (
        update(table)
        .where(table.c.id == bindparam("b_id"))
        .values(subject=bindparam("b_subject"), body=bindparam("b_body"), **_sent_facts())
    )


def _json_rows(width: int) -> Any:
    """The rows of the JSON parameter ``sent_rows`` (an array of arrays of strings) as columns ``v0`` …"""
    element = func.json_array_elements(cast(bindparam("sent_rows", type_=Text), JSON)).table_valued(
        "value", name="sent_row"
    )
    values = (element.c.value.op("->>")(literal(position)).label(f"v{position}") for position in range(width))
    return select(*values).select_from(element).subquery("sent")


@lru_cache(maxsize=32)
def _record_sent_filled(used: tuple[str, ...], in_subject: tuple[str, ...], in_text: tuple[str, ...]) -> Any:
    """PostgreSQL: subject and body filled in from ``sent_subject``/``sent_text``, replacing the tags each holds
    (in the order :func:`_substitute` follows) by the row's values, which come in the order of ``used``."""
    rows = _json_rows(len(used) + 1)
    value = {tag: rows.c[f"v{position}"] for position, tag in enumerate(used, start=1)}
    subject: Any = bindparam("sent_subject", type_=Text)
    body: Any = bindparam("sent_text", type_=Text)
    for tag in in_subject:
        subject = func.replace(subject, literal(tag, Text), value[tag])
    for tag in in_text:
        body = func.replace(body, literal(tag, Text), value[tag])
    return update(_OUTBOX).where(_OUTBOX.c.id == rows.c.v0).values(subject=subject, body=body, **_sent_facts())


@lru_cache(maxsize=1)
def _record_sent_texts() -> Any:
    rows = _json_rows(3)
    return update(_OUTBOX).where(_OUTBOX.c.id == rows.c.v0).values(subject=rows.c.v1, body=rows.c.v2, **_sent_facts())


def _fail(
    runtime: Runtime,
    ids: Sequence[str],
    now: datetime,
    *,
    rule: str,
    code: str,
    detail: str,
    provider: str | None = None,
) -> None:
    om = OutboundMessage
    with Session(runtime.engine) as session, session.begin():
        session.execute(
            update(om)
            .where(om.id.in_(list(ids)), om.status.in_(_FINISHED_FROM))
            .values(
                status=MessageStatus.FAILED.value,
                rule=rule,
                error_code=code[:32],
                error_detail=detail[:500],
                provider=provider,
                lease_until=None,
                updated_at=now,
            )
        )


def _mark_uncertain(runtime: Runtime, ids: Sequence[str], now: datetime, error: AmbiguousProviderError) -> None:
    om = OutboundMessage
    with Session(runtime.engine) as session, session.begin():
        session.execute(
            update(om)
            .where(om.id.in_(list(ids)), om.status == MessageStatus.SENDING.value)
            .values(
                status=MessageStatus.UNCERTAIN.value,
                rule="ambiguous",
                reason=f"{error.provider} batch call failed after the request was sent; it may have been accepted: "
                "reconcile from provider events, do not resend",
                error_code=(error.code or "ambiguous")[:32],
                error_detail=str(error)[:500],
                provider=error.provider,
                lease_until=None,
                updated_at=now,
            )
        )


def _release(
    runtime: Runtime,
    ids: Sequence[str],
    now: datetime,
    delay: float,
    *,
    give_back_attempt: bool = False,
    **values: Any,
) -> None:
    """Rows still ``sending`` back to ``pending``, due after ``delay`` seconds."""
    om = OutboundMessage
    if give_back_attempt:
        values["attempts"] = om.attempts - 1
    with Session(runtime.engine) as session, session.begin():
        session.execute(
            update(om)
            .where(om.id.in_(list(ids)), om.status == MessageStatus.SENDING.value)
            .values(**pending_again(now, delay), **values)
        )
