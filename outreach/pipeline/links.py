"""Click tracking: links in sent messages become signed ``/r/{token}`` redirects; clicks feed behaviour rules.

**When.** A campaign tracks clicks when it says ``track_clicks: true``, and by default when it is a nurture
campaign (:attr:`outreach.domain.campaigns.Campaign.tracks_clicks`). Delivery rewrites the rendered message right
before the provider call: every ``href`` of an ``<a>``/``<area>`` tag in the HTML part, and every ``http(s)://``
URL in the text part or the SMS body, becomes ``{public_url}/r/{token}``. Never rewritten: the unsubscribe
link (it must keep working on its own, RFC 8058), anything that is not http(s) (``mailto:``, ``tel:``), links
to our own ``/r/`` and ``/unsubscribe/`` routes, and URLs longer than a stored link may be.

**Names.** Rules speak about links by name (``book_interview``, ``salary_range``), and names come from the
templates, with no helper to call:

- in HTML, an attribute on the link: ``<a href="…" data-link="salary_range">``; the attribute is removed from
  what is sent (tracked or not, it never reaches the candidate);
- links the message context provides have fixed names (:data:`CONTEXT_LINK_NAMES`: ``links.booking`` is
  ``book_interview``), wherever they appear, so an SMS needs no markup at all;
- a URL in the text part takes the name the same URL has in the HTML part, so an email names each link once.

A link without a name is still tracked (``last_click_at``, ``only_if: no_click``); it just feeds no rule.

**Tokens.** Each distinct (URL, name) of a message is one :class:`~outreach.core.models.TrackedLink` row, written
before the provider call — by delivery in the transaction that claims the message, for a whole group of messages
in one insert (:class:`LinkSet`) — (a send that then fails leaves harmless unused rows; a retry reuses them, so
a resent message carries the same links). The token is ``sign(settings, "r", link_id)``:
HMAC-signed, holding our row id only. ``/r/{token}`` redirects only to a URL stored for a message we sent, so it
is no open redirect: a forged token, a token minted with another key, or a made-up id leads nowhere.

**Clicks.** :func:`follow` records a :class:`~outreach.core.models.LinkClick` (link, candidate, name, time), moves
``Candidate.last_click_at`` and applies the behaviour rules of ``policies.yaml`` (``behaviours:``: N or more
clicks of a named link → tags), all in one transaction. Steps with ``unless_clicked: [name]`` are skipped by the
scheduler once a link of that name in a message of the same enrollment was clicked.
"""

from __future__ import annotations

import functools
import html
import logging
import re
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from sqlalchemy import func, insert, select
from sqlalchemy.orm import Session

from outreach.core.clock import utcnow
from outreach.core.config import Settings
from outreach.core.models import Base, Candidate, LinkClick, OutboundMessage, TrackedLink
from outreach.core.sql import one_of
from outreach.domain.campaigns import Campaign
from outreach.domain.candidates import add_tags
from outreach.domain.render import RenderedEmail
from outreach.domain.tokens import sign, verify
from outreach.pipeline.services import Services
from outreach.policy.config import BehaviourSpec

__all__ = [
    "CONTEXT_LINK_NAMES",
    "Followed",
    "Link",
    "LinkSet",
    "apply_behaviours",
    "follow",
    "known_names",
    "link_id_from_token",
    "redirect_url",
    "rewrite_html",
    "rewrite_text",
    "store_links",
    "strip_names",
    "tracks_clicks",
]

log = logging.getLogger(__name__)

#: Names of the links the message context provides (``links.<key>`` → link name).
CONTEXT_LINK_NAMES: Mapping[str, str] = {"booking": "book_interview"}

TOKEN_PURPOSE = "r"
MAX_URL_LENGTH = 2000  # TrackedLink.url
MAX_LINK_ID = 2**31 - 1  # TrackedLink.id is an INTEGER
_NAME = re.compile(r"^[a-z0-9_]{1,64}$")
_LINKS = Base.metadata.tables["tracked_links"]

# An <a> or <area> start tag; quoted attribute values may hold ">".
_TAG = re.compile(r"""<(?:a|area)(?=[\s/>])((?:[^>"']|"[^"]*"|'[^']*')*)>""", re.IGNORECASE)
# One attribute inside a tag: name, optionally = and a double-quoted, single-quoted or bare value.
_ATTRIBUTE = re.compile(r"""([^\s"'>/=]+)(?:\s*=\s*(?:"([^"]*)"|'([^']*)'|([^\s"'=<>`]+)))?""")
# A URL in plain text: RFC 3986 characters only, so Chinese text or full-width punctuation ends it.
_TEXT_URL = re.compile(r"""https?://[A-Za-z0-9\-._~:/?#\[\]@!$&'()*+,;=%]+""", re.IGNORECASE)
_TRAILING = ".,;:!?'"


@dataclass(frozen=True)
class Link:
    """A link found in a message: its target and, if the template named it, its name."""

    url: str
    name: str | None


#: Given a link, the URL to put in its place (None: leave it as it is).
Replace = Callable[[Link], str | None]


def tracks_clicks(campaign: Campaign | None) -> bool:
    return campaign is not None and campaign.tracks_clicks


def redirect_url(settings: Settings, link_id: int) -> str:
    return f"{settings.public_url}/r/{sign(settings, TOKEN_PURPOSE, str(link_id))}"


def link_id_from_token(settings: Settings, token: str) -> int | None:
    """The TrackedLink id a token was minted for by us, or None for anything forged, damaged or foreign."""
    payload = verify(settings, TOKEN_PURPOSE, token)
    if payload is None or not (payload.isascii() and payload.isdigit()) or len(payload) > 10:
        return None
    link_id = int(payload)
    return link_id if link_id <= MAX_LINK_ID else None


def is_web_url(url: str) -> bool:
    return url[:8].lower().startswith(("http://", "https://")) and len(url) <= MAX_URL_LENGTH


# --- finding and replacing links ---------------------------------------------------------------------------


def _value(match: re.Match[str]) -> str | None:
    for group in (2, 3, 4):
        if match.group(group) is not None:
            return match.group(group)
    return None


@functools.lru_cache(maxsize=1024)
def _parse_tag(attributes: str) -> tuple[str | None, str | None, tuple[tuple[str, str, str], ...], str]:
    """A tag's attributes: (first href, unescaped; its valid ``data-link`` name; every attribute as (whitespace
    before it, lowercased name, its text); what follows the last). Parsed once per distinct tag per process: the
    messages of one template repeat the same tags."""
    href: str | None = None
    name: str | None = None
    parts: list[tuple[str, str, str]] = []
    last = 0
    for attribute in _ATTRIBUTE.finditer(attributes):
        key = attribute.group(1).lower()
        if key == "href" and href is None:
            href = html.unescape(_value(attribute) or "")
        elif key == "data-link" and name is None:
            name = (_value(attribute) or "").strip()
        parts.append((attributes[last : attribute.start()], key, attribute.group(0)))
        last = attribute.end()
    if name is not None and not _NAME.match(name):
        log.warning("link name ignored: use lowercase letters, digits and _ (at most 64)")
        name = None
    return href, name, tuple(parts), attributes[last:]


def rewrite_html(document: str, known: Mapping[str, str], replace_link: Replace) -> str:
    """Each ``<a>``/``<area>`` href through ``replace_link``; ``data-link`` names the link and is removed.

    ``known`` names links the template did not name (URL → name).
    """

    def tag(match: re.Match[str]) -> str:
        href, name, parts, tail = _parse_tag(match.group(1))
        target = None
        if href is not None:
            target = replace_link(Link(href, name or known.get(href)))
        out: list[str] = []
        for gap, key, text in parts:
            if key == "data-link":
                continue  # with the whitespace before it
            if key == "href" and target is not None:
                out.append(f'{gap}href="{html.escape(target)}"')
                target = None  # only the first href counts, as in browsers
                continue
            out.append(gap + text)
        out.append(tail)
        head = match.group(0)[: match.start(1) - match.start(0)]
        return head + "".join(out) + ">"

    return _TAG.sub(tag, document)


def _trim(url: str) -> str:
    """Drop punctuation that ends a sentence rather than the URL, and closing brackets it did not open."""
    while url:
        last = url[-1]
        unopened = (last == ")" and url.count(")") > url.count("(")) or (
            last == "]" and url.count("]") > url.count("[")
        )
        if last not in _TRAILING and not unopened:
            break
        url = url[:-1]
    return url


def rewrite_text(text: str, names: Mapping[str, str], replace_link: Replace) -> str:
    """Each http(s) URL in plain text through ``replace_link``, named by ``names`` (URL → name)."""

    def url(match: re.Match[str]) -> str:
        found = match.group(0)
        trimmed = _trim(found)
        target = replace_link(Link(trimmed, names.get(trimmed)))
        return found if target is None else target + found[len(trimmed) :]

    return _TEXT_URL.sub(url, text)


def known_names(context: Mapping[str, Any]) -> dict[str, str]:
    """URL → name for the context's own links (:data:`CONTEXT_LINK_NAMES`)."""
    links = context.get("links") or {}
    return {url: name for key, name in CONTEXT_LINK_NAMES.items() if isinstance(url := links.get(key), str) and url}


class _Tracker:
    """Finds a message's links in a first pass, stores them, and puts their redirects in on the second."""

    def __init__(self, settings: Settings, context: Mapping[str, Any]) -> None:
        self.settings = settings
        self.known = known_names(context)
        links = context.get("links") or {}
        unsubscribe = links.get("unsubscribe")
        self.never = {unsubscribe} if isinstance(unsubscribe, str) else set()
        self.own = (f"{settings.public_url}/r/", f"{settings.public_url}/unsubscribe/")
        self.found: list[Link] = []
        self.redirects: dict[Link, str] = {}

    def trackable(self, link: Link) -> bool:
        return is_web_url(link.url) and link.url not in self.never and not link.url.startswith(self.own)

    def collect(self, link: Link) -> str | None:
        if self.trackable(link) and link not in self.found:
            self.found.append(link)
        return None

    def substitute(self, link: Link) -> str | None:
        return self.redirects.get(link) if self.trackable(link) else None

    def resolve(self, ids: Mapping[Link, int]) -> None:
        """The redirects, once every found link has its row id."""
        self.redirects = {link: redirect_url(self.settings, ids[link]) for link in self.found}


def store_links(session: Session, trackers: Sequence[tuple[str, _Tracker]]) -> None:
    """The links of several messages in one read and one insert: one row per distinct link of a message, reusing
    those of an earlier attempt at the same message (a resent message carries the same links)."""
    wanted = [(message_id, tracker) for message_id, tracker in trackers if tracker.found]
    if not wanted:
        return
    message_ids = sorted({message_id for message_id, _ in wanted})
    found = one_of(session, TrackedLink.message_id, message_ids)
    ids: dict[str, dict[Link, int]] = defaultdict(dict)
    positions: dict[str, int] = defaultdict(lambda: -1)
    for link_id, message_id, position, url, name in session.execute(
        select(TrackedLink.id, TrackedLink.message_id, TrackedLink.position, TrackedLink.url, TrackedLink.name).where(
            found
        )
    ):
        ids[message_id][Link(url, name)] = link_id
        positions[message_id] = max(positions[message_id], position)
    missing: list[dict[str, Any]] = []
    placed: dict[tuple[str, int], Link] = {}
    for message_id, tracker in wanted:
        known = ids[message_id]
        for link in tracker.found:
            if link in known:
                continue
            known[link] = 0  # a placeholder until the insert answers
            positions[message_id] += 1
            placed[(message_id, positions[message_id])] = link
            missing.append(
                {"message_id": message_id, "position": positions[message_id], "url": link.url, "name": link.name}
            )
    if missing:
        # One multi-row INSERT … RETURNING for the whole set; rows are matched back by (message, position).
        statement = insert(_LINKS).returning(_LINKS.c.id, _LINKS.c.message_id, _LINKS.c.position)
        for link_id, message_id, position in session.connection().execute(statement, missing):
            ids[message_id][placed[(message_id, position)]] = link_id
    for message_id, tracker in wanted:
        tracker.resolve(ids[message_id])


class LinkSet:
    """Click tracking for several messages at once: :meth:`email` and :meth:`sms` find each message's links,
    :meth:`store` writes the new rows of all of them in one read and one insert, and the function each of the
    first two returned then gives that message as it goes out (links replaced by their redirects)."""

    def __init__(self, runtime: Services) -> None:
        self.runtime = runtime
        self._trackers: list[tuple[str, _Tracker]] = []

    def email(
        self, message: OutboundMessage, email: RenderedEmail, context: Mapping[str, Any]
    ) -> Callable[[], RenderedEmail]:
        """The email's links found; call the result after :meth:`store` for the email as it goes out (the
        ``data-link`` names removed either way; the subject is left alone)."""
        if not tracks_clicks(self.runtime.campaigns.get(message.campaign)):
            stripped = replace(email, html=strip_names(email.html))
            return lambda: stripped
        finish = self._collect(message.id, context, email.html, [email.text])

        def tracked() -> RenderedEmail:
            new_html, (new_text,) = finish()
            return replace(email, html=new_html or "", text=new_text)

        return tracked

    def sms(self, message: OutboundMessage, body: str, context: Mapping[str, Any]) -> Callable[[], str]:
        """The SMS body's links found; call the result after :meth:`store` for the body as it goes out."""
        if not tracks_clicks(self.runtime.campaigns.get(message.campaign)):
            return lambda: body
        finish = self._collect(message.id, context, None, [body])
        return lambda: finish()[1][0]

    def store(self, session: Session) -> None:
        """Write the links found so far (in ``session``'s transaction)."""
        store_links(session, self._trackers)
        self._trackers = []

    def _collect(
        self, message_id: str, context: Mapping[str, Any], html_part: str | None, texts: Sequence[str]
    ) -> Callable[[], tuple[str | None, list[str]]]:
        tracker = _Tracker(self.runtime.settings, context)
        html_names = dict(tracker.known)
        if html_part is not None:

            def collect_html(link: Link) -> str | None:
                if link.name is not None:
                    html_names.setdefault(link.url, link.name)
                return tracker.collect(link)

            rewrite_html(html_part, tracker.known, collect_html)
        for text in texts:
            rewrite_text(text, html_names, tracker.collect)
        if tracker.found:
            self._trackers.append((message_id, tracker))

        def finish() -> tuple[str | None, list[str]]:
            # Even with nothing to track the HTML goes through once more, to drop the data-link attributes.
            new_html = None if html_part is None else rewrite_html(html_part, tracker.known, tracker.substitute)
            new_texts = [
                rewrite_text(text, html_names, tracker.substitute) if tracker.found else text for text in texts
            ]
            return new_html, new_texts

        return finish


def strip_names(document: str) -> str:
    """The HTML without its ``data-link`` attributes."""
    if "data-link" not in document:
        return document
    return rewrite_html(document, {}, lambda link: None)


# --- clicks ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Followed:
    """Where a redirect token leads, and what the click changed."""

    url: str
    link_id: int
    name: str | None
    recorded: bool
    tags_added: tuple[str, ...] = ()


def follow(runtime: Services, token: str, *, record: bool = True, now: datetime | None = None) -> Followed | None:
    """The stored target of a redirect token, or None when the token or its link is not ours.

    With ``record`` the click is stored, ``last_click_at`` moves and the behaviour rules run, in one transaction.
    """
    link_id = link_id_from_token(runtime.settings, token)
    if link_id is None:
        return None
    now = now or utcnow()
    with Session(runtime.engine, expire_on_commit=False) as session, session.begin():
        found = session.execute(
            select(TrackedLink, OutboundMessage.candidate_id)
            .join(OutboundMessage, OutboundMessage.id == TrackedLink.message_id)
            .where(TrackedLink.id == link_id)
        ).first()
        if found is None:
            return None
        link, candidate_id = found
        if not is_web_url(link.url):
            return None
        if not record:
            return Followed(link.url, link.id, link.name, recorded=False)
        query = select(Candidate).where(Candidate.id == candidate_id)
        if session.get_bind().dialect.name == "postgresql":
            # Serialise concurrent clicks of one candidate: the tag list is read, changed and written back.
            query = query.with_for_update(key_share=True)
        candidate = session.scalars(query).one()
        session.add(LinkClick(link_id=link.id, candidate_id=candidate.id, name=link.name, clicked_at=now))
        if candidate.last_click_at is None or candidate.last_click_at < now:
            candidate.last_click_at = now
        added: tuple[str, ...] = ()
        if link.name is not None:
            session.flush()
            added = apply_behaviours(session, candidate, link.name, runtime.policy.spec.behaviours)
    log.info("link clicked", extra={"link_id": link.id, "link_name": link.name, "message_id": link.message_id})
    return Followed(link.url, link.id, link.name, recorded=True, tags_added=added)


def apply_behaviours(
    session: Session, candidate: Candidate, name: str, rules: Sequence[BehaviourSpec]
) -> tuple[str, ...]:
    """Run the rules about ``name`` after a click on it; returns the tags that were new."""
    relevant = [rule for rule in rules if rule.when.clicked == name]
    if not relevant:
        return ()
    clicks = session.scalar(
        select(func.count())
        .select_from(LinkClick)
        .where(LinkClick.candidate_id == candidate.id, LinkClick.name == name)
    )
    before = list(candidate.tags)
    for rule in relevant:
        if (clicks or 0) >= rule.when.times and not set(rule.add_tags) <= set(candidate.tags):
            add_tags(candidate, *rule.add_tags)
    added = tuple(tag for tag in candidate.tags if tag not in before)
    if added:
        log.info("behaviour rule tagged candidate", extra={"candidate_id": candidate.id, "link_name": name})
    return added
