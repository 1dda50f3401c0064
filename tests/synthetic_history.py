"""A synthetic outreach history for the analytics tests, and the figures recomputed from it in plain Python.

:func:`generate` builds thousands of outbox rows across campaigns, steps, channels, templates, locales and
candidate sources, with provider events (repeated ones too), opens, clicks on tracked links, replies with and
without ``in_reply_to``, auto-replies both ways, keywords, opt-outs, bounces, stage history, ATS events and
alerts, from a seeded random generator. :func:`insert` bulk-inserts it. The ``expected_*`` functions recompute
every figure from the generated rows alone, without SQL, so the tests compare two independent computations.
Candidates carry canary names, emails and phones, which no ops-readable answer may contain.
"""

from __future__ import annotations

import functools
import random
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

from sqlalchemy.engine import Engine

from outreach.core.models import (
    Alert,
    Candidate,
    CandidateEvent,
    DeliveryEvent,
    InboundMessage,
    LinkClick,
    OutboundMessage,
    StageChange,
    TrackedLink,
)

START = datetime(2026, 9, 1, tzinfo=UTC)
DAYS = 42
NOW = START + timedelta(days=DAYS + 2)

CANARY_NAME = "Zebulon Canarywright"
CANARY_EMAIL_DOMAIN = "canary-mail.example"
CANARY_PHONE = "+15550199"

SOURCES = ["linkedin", "referral", "job_board", "careers_site", None]
LOCALES = ["en", "zh-CN", "de", None]
CAMPAIGNS: dict[str, list[tuple[str, str]]] = {
    "jd_intro": [("email", "jd_intro"), ("sms", "jd_nudge"), ("sms", "jd_reminder")],
    "offer_followup": [("email", "offer_followup")],
    "offer_letter": [("email", "offer_letter")],
    "decline_followup": [("email", "decline_thanks"), ("email", "decline_recontact")],
    "final_thanks": [("email", "final_thanks")],
    "quarterly_nurture": [("email", "quarterly_nurture")],
}
ATTEMPTED = ["sent", "delivered", "failed", "bounced", "undelivered", "uncertain", "sending"]
NOT_SENT = ["pending", "held", "suppressed", "skipped", "cancelled"]
STAGES = ["applied", "contacted", "interviewing", "final", "offer", "accepted"]


@dataclass
class History:
    candidates: list[dict[str, Any]] = field(default_factory=list)
    messages: list[dict[str, Any]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    links: list[dict[str, Any]] = field(default_factory=list)
    clicks: list[dict[str, Any]] = field(default_factory=list)
    inbound: list[dict[str, Any]] = field(default_factory=list)
    stage_changes: list[dict[str, Any]] = field(default_factory=list)
    ats_events: list[dict[str, Any]] = field(default_factory=list)
    alerts: list[dict[str, Any]] = field(default_factory=list)


def _moment(rng: random.Random, start: datetime = START, days: float = DAYS) -> datetime:
    return start + timedelta(seconds=rng.randrange(int(days * 86400)))


@functools.cache
def generate(seed: int = 20261126, candidates: int = 700) -> History:
    """The same history for the same arguments (cached: treat it as read-only)."""
    rng = random.Random(seed)
    h = History()
    event_ids = iter(range(1, 10**9))
    for cid in range(1, candidates + 1):
        applied_at = _moment(rng)
        h.candidates.append(
            {
                "id": cid,
                "external_id": f"ext-{cid:05d}",
                "name": f"{CANARY_NAME} {cid}",
                "email": f"canary{cid}@{CANARY_EMAIL_DOMAIN}",
                "phone": f"{CANARY_PHONE}{cid:04d}",
                "locale": "en",
                "source": rng.choice(SOURCES),
                "stage": "applied",
                "tags": [],
                "data": {},
                "nurture_consent": False,
                "created_at": applied_at - timedelta(minutes=rng.randrange(0, 30)),
                "updated_at": applied_at,
            }
        )
        _history_of(rng, h, cid, applied_at, event_ids)
    return h


def _history_of(rng: random.Random, h: History, cid: int, applied_at: datetime, event_ids: Any) -> None:
    # ATS events, stage history and the candidate's furthest stage.
    if rng.random() < 0.9:
        h.ats_events.append({"candidate_id": cid, "type": "applied", "occurred_at": applied_at, "data": {}})
    furthest = rng.choices(range(len(STAGES)), weights=[30, 25, 20, 12, 8, 5])[0]
    ending = None
    if furthest >= 3 and rng.random() < 0.3:
        ending = "rejected"
    if furthest == 4 and rng.random() < 0.4:
        ending = "declined"
    if furthest == 5 and rng.random() < 0.5:
        ending = "hired"
    moment, previous = applied_at, "applied"
    for index in range(1, furthest + 1):
        moment += timedelta(hours=rng.randrange(2, 200))
        if rng.random() < 0.15 and index < furthest:
            continue  # a skipped stage: still reached, since a later one was
        h.stage_changes.append(
            {
                "candidate_id": cid,
                "from_stage": previous,
                "to_stage": STAGES[index],
                "changed_by": "event:test",
                "changed_at": moment,
            }
        )
        previous = STAGES[index]
        if STAGES[index] == "offer":
            h.ats_events.append({"candidate_id": cid, "type": "offer_extended", "occurred_at": moment, "data": {}})
            if rng.random() < 0.5:
                h.alerts.append(
                    {
                        "candidate_id": cid,
                        "kind": "offer_unanswered",
                        "message": "offer followup step 1: offer unanswered",
                        "created_at": moment + timedelta(hours=rng.choice([1, 72, 72.5, 80])),
                    }
                )
        if STAGES[index] == "accepted":
            h.ats_events.append({"candidate_id": cid, "type": "offer_accepted", "occurred_at": moment, "data": {}})
    if ending:
        moment += timedelta(hours=rng.randrange(1, 100))
        h.stage_changes.append(
            {
                "candidate_id": cid,
                "from_stage": previous,
                "to_stage": ending,
                "changed_by": "api:hr",
                "changed_at": moment,
            }
        )
        if ending == "declined":
            h.ats_events.append({"candidate_id": cid, "type": "offer_declined", "occurred_at": moment, "data": {}})
        if ending == "rejected" and furthest == 3:
            h.ats_events.append(
                {"candidate_id": cid, "type": "final_interview_failed", "occurred_at": moment, "data": {}}
            )
        previous = ending
    h.candidates[-1]["stage"] = previous

    # Outbox rows, their provider events, tracked links and clicks.
    mine: list[dict[str, Any]] = []
    for _ in range(rng.randrange(2, 9)):
        campaign = rng.choice(list(CAMPAIGNS))
        step = rng.randrange(len(CAMPAIGNS[campaign]))
        channel, template = CAMPAIGNS[campaign][step]
        auto = rng.random() < 0.06
        status = rng.choice(ATTEMPTED) if rng.random() < 0.85 else rng.choice(NOT_SENT)
        created = applied_at + timedelta(seconds=rng.randrange(-3600, 20 * 86400))
        sent_at = created + timedelta(seconds=rng.randrange(0, 3 * 86400)) if status in ATTEMPTED else None
        if status == "failed" and rng.random() < 0.3:
            sent_at = None  # refused before a send time was kept: counted at its creation time
        message = {
            "id": uuid.UUID(int=rng.getrandbits(128)).hex,
            "candidate_id": cid,
            "campaign": "auto_reply" if auto else campaign,
            "step": 0 if auto else step,
            "channel": channel,
            "template": "auto_reply" if auto else template,
            "category": "auto_reply" if auto else ("nurture" if campaign == "quarterly_nurture" else "transactional"),
            "status": status,
            "locale": rng.choice(LOCALES),
            "not_before": created,
            "created_at": created,
            "updated_at": created,
            "sent_at": sent_at,
            "body": f"Hello {CANARY_NAME} {cid}",
            "provider": "sendgrid" if channel == "email" else "twilio",
        }
        h.messages.append(message)
        mine.append(message)
        if status not in ATTEMPTED:
            continue
        base = sent_at or created

        def event(kind: str, after_hours: float, msg: dict[str, Any] = message, at: datetime = base) -> None:
            h.events.append(
                {
                    "message_id": msg["id"],
                    "provider": msg["provider"],
                    "provider_event_id": f"ev-{next(event_ids)}",
                    "type": kind,
                    "occurred_at": at + timedelta(hours=after_hours),
                    "raw": {},
                }
            )

        event("sent", 0)
        if rng.random() < 0.75:
            for _ in range(rng.choice([1, 1, 1, 2, 3])):  # repeated delivery receipts
                event("delivered", rng.random())
        if channel == "email":
            if rng.random() < 0.45:
                for _ in range(rng.randrange(1, 6)):  # several opens of one mail count once
                    event("opened", rng.random() * 48)
            if rng.random() < 0.1:
                event("clicked", rng.random() * 48)
            if rng.random() < 0.05:
                event("bounced", rng.random() * 2)
            if rng.random() < 0.03:
                event("unsubscribed", rng.random() * 72)
            if rng.random() < 0.01:
                event("complained", rng.random() * 72)
        elif rng.random() < 0.05:
            event("undelivered", rng.random())
        if rng.random() < 0.2:
            link_id = len(h.links) + 1
            h.links.append(
                {
                    "id": link_id,
                    "message_id": message["id"],
                    "position": 0,
                    "name": "book_interview",
                    "url": "https://x.example/b",
                }
            )
            for _ in range(rng.choice([0, 1, 1, 2, 4])):
                h.clicks.append(
                    {
                        "link_id": link_id,
                        "candidate_id": cid,
                        "name": "book_interview",
                        "clicked_at": base + timedelta(hours=rng.random() * 30),
                    }
                )
    # Events that name no message of ours (a provider test event) count nowhere.
    if rng.random() < 0.05:
        h.events.append(
            {
                "message_id": None,
                "provider": "sendgrid",
                "provider_event_id": f"ev-{next(event_ids)}",
                "type": "delivered",
                "occurred_at": applied_at,
                "raw": {},
            }
        )

    # Inbound: replies (by in_reply_to or by time), auto-replies, keywords.
    for _ in range(rng.randrange(0, 4)):
        kind = rng.choices(["reply", "auto_reply", "opt_out", "help", "opt_in"], weights=[55, 20, 12, 8, 5])[0]
        received = applied_at + timedelta(seconds=rng.randrange(0, 25 * 86400))
        in_reply_to = None
        answerable = [m for m in mine if m["sent_at"] is not None and m["sent_at"] <= received]
        if answerable and rng.random() < 0.5:
            in_reply_to = rng.choice(answerable)["id"]  # a message it can answer: one sent before it
        h.inbound.append(_inbound(rng, cid, kind, received, in_reply_to))
    if rng.random() < 0.02:
        h.inbound.append(_inbound(rng, None, "unmatched", applied_at, None))


def _inbound(
    rng: random.Random, cid: int | None, kind: str, received: datetime, in_reply_to: str | None
) -> dict[str, Any]:
    return {
        "candidate_id": cid,
        "channel": "email",
        "provider": "sendgrid",
        "provider_message_id": uuid.UUID(int=rng.getrandbits(128)).hex,
        "from_address": f"canary{cid}@{CANARY_EMAIL_DOMAIN}",
        "body": f"Thanks, {CANARY_NAME}",
        "kind": kind,
        "in_reply_to": in_reply_to,
        "received_at": received,
        "raw": {},
    }


def insert_history(engine: Engine, h: History) -> None:
    """Bulk-insert the history (a few executemany statements per table)."""
    with engine.begin() as connection:
        for model, rows in (
            (Candidate, h.candidates),
            (CandidateEvent, h.ats_events),
            (StageChange, h.stage_changes),
            (OutboundMessage, h.messages),
            (DeliveryEvent, h.events),
            (TrackedLink, h.links),
            (LinkClick, h.clicks),
            (InboundMessage, h.inbound),
            (Alert, h.alerts),
        ):
            if rows:
                connection.execute(model.__table__.insert(), rows)
    if engine.dialect.name == "postgresql":
        # Explicit ids were inserted: move the sequences past them for rows tests add later.
        with engine.begin() as connection:
            for table in ("candidates", "tracked_links"):
                connection.exec_driver_sql(
                    f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), (SELECT max(id) FROM {table}))"
                )


# -- figures recomputed in plain Python ---------------------------------------------------------------------------

ATTEMPTED_SET = set(ATTEMPTED)
ARRIVAL = {"delivered", "opened", "clicked", "unsubscribed", "complained"}


def counted_messages(h: History) -> list[dict[str, Any]]:
    return [m for m in h.messages if m["category"] != "auto_reply" and m["status"] in ATTEMPTED_SET]


def _attribute(h: History, kind: str) -> set[str]:
    by_candidate: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for m in counted_messages(h):
        if m["sent_at"] is not None:
            by_candidate[m["candidate_id"]].append(m)
    targets: set[str] = set()
    for i in h.inbound:
        if i["kind"] != kind:
            continue
        if i["in_reply_to"] is not None:
            targets.add(i["in_reply_to"])
            continue
        before = [m for m in by_candidate.get(i["candidate_id"], []) if m["sent_at"] <= i["received_at"]]
        if before:
            targets.add(max(before, key=lambda m: (m["sent_at"], m["id"]))["id"])
    return targets


def period_of(moment: datetime, bucket: str) -> date:
    day = moment.date()
    return day - timedelta(days=day.weekday()) if bucket == "week" else day


def expected_rates(
    h: History,
    by: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    bucket: str | None = None,
) -> dict[tuple[date | None, str | None], dict[str, int]]:
    if by == "period":
        by, bucket = None, bucket or "day"
    with_event: dict[str, set[str]] = defaultdict(set)
    for e in h.events:
        if e["message_id"] is not None:
            with_event[e["type"]].add(e["message_id"])
    arrived = set().union(*(with_event[t] for t in ARRIVAL))
    link_message = {link["id"]: link["message_id"] for link in h.links}
    clicked = with_event["clicked"] | {link_message[c["link_id"]] for c in h.clicks}
    replied = _attribute(h, "reply")
    opted_out = with_event["unsubscribed"] | _attribute(h, "opt_out")
    source = {c["id"]: c["source"] or "unknown" for c in h.candidates}
    groups: dict[tuple[date | None, str | None], dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for m in counted_messages(h):
        moment = m["sent_at"] or m["created_at"]
        if (since is not None and moment < since) or (until is not None and moment >= until):
            continue
        key: str | None = None
        if by == "source":
            key = source[m["candidate_id"]]
        elif by == "locale":
            key = m["locale"] or "unknown"
        elif by is not None:
            key = str(m[by])
        g = groups[(period_of(moment, bucket) if bucket else None, key)]
        mid = m["id"]
        email = m["channel"] == "email"
        g["messages"] += 1
        g["delivered"] += mid in arrived
        g["emails_delivered"] += mid in arrived and email
        g["opened"] += email and mid in with_event["opened"]
        g["clicked"] += mid in clicked
        g["replied"] += mid in replied
        g["opted_out"] += mid in opted_out
        g["bounced"] += mid in with_event["bounced"]
    return {k: dict(v) for k, v in groups.items()}


def expected_funnel(
    h: History, since: datetime | None = None, until: datetime | None = None
) -> dict[str | None, list[int]]:
    """Per source (None: all), how many reached each stage."""
    rank = {s: i for i, s in enumerate(STAGES)} | {"hired": 5, "declined": 4}
    applied: dict[int, datetime] = {}
    for e in h.ats_events:
        if e["type"] == "applied":
            applied[e["candidate_id"]] = min(e["occurred_at"], applied.get(e["candidate_id"], e["occurred_at"]))
    furthest: dict[int, int] = {}
    source: dict[int, str] = {}
    for c in h.candidates:
        at = applied.get(c["id"], c["created_at"])
        if (since is not None and at < since) or (until is not None and at >= until):
            continue
        furthest[c["id"]] = max(0, rank.get(c["stage"], -1))
        source[c["id"]] = c["source"] or "unknown"
    for s in h.stage_changes:
        if s["candidate_id"] in furthest:
            furthest[s["candidate_id"]] = max(
                furthest[s["candidate_id"]], rank.get(s["from_stage"] or "", -1), rank.get(s["to_stage"], -1)
            )
    result: dict[str | None, list[int]] = {}
    for key in [None, *sorted(set(source.values()))]:
        values = [f for cid, f in furthest.items() if key is None or source[cid] == key]
        result[key] = [sum(1 for f in values if f >= i) for i in range(len(STAGES))]
    return result


def expected_sla(
    h: History, since: datetime | None = None, until: datetime | None = None, now: datetime = NOW
) -> dict[str, dict[str, int]]:
    """met / breached / pending per promise, recomputed from the rows."""
    specs = {
        "first_contact": ("applied", timedelta(hours=48), None, None),
        "offer_letter": ("offer_accepted", timedelta(hours=24), "offer_letter", None),
        "decline_note": ("offer_declined", timedelta(hours=24), "decline_followup", None),
        "final_note": ("final_interview_failed", timedelta(hours=24), "final_thanks", None),
        "offer_unanswered_alert": ("offer_extended", timedelta(days=3), None, "offer_unanswered"),
    }
    # A failed message does not keep a promise; a transactional one that failed or was dropped breaks it at once.
    sent = [m for m in counted_messages(h) if m["sent_at"] is not None and m["status"] != "failed"]
    broken = [
        m
        for m in h.messages
        if m["category"] == "transactional"
        and (m["status"] in ("failed", "suppressed") or (m["status"] == "skipped" and m.get("rule") == "address"))
    ]
    result: dict[str, dict[str, int]] = {}
    for name, (event_type, within, campaign, alert) in specs.items():
        counts = {"total": 0, "met": 0, "breached": 0, "pending": 0}
        for e in h.ats_events:
            at = e["occurred_at"]
            if e["type"] != event_type or (since and at < since) or (until and at >= until):
                continue
            cid = e["candidate_id"]
            due = at + within
            if alert:
                answers = [i["received_at"] for i in h.inbound if i["candidate_id"] == cid and i["kind"] == "reply"]
                answers += [
                    x["occurred_at"]
                    for x in h.ats_events
                    if x["candidate_id"] == cid and x["type"] in ("offer_accepted", "offer_declined")
                ]
                answers += [
                    s["changed_at"]
                    for s in h.stage_changes
                    if s["candidate_id"] == cid and s["from_stage"] == "offer" and s["to_stage"] != "offer"
                ]
                if any(at < a <= due for a in answers):
                    continue
                due += timedelta(hours=1)
                done = min(
                    (
                        a["created_at"]
                        for a in h.alerts
                        if a["candidate_id"] == cid and a["kind"] == alert and a["created_at"] >= at
                    ),
                    default=None,
                )
            else:
                done = min(
                    (
                        m["sent_at"]
                        for m in sent
                        if m["candidate_id"] == cid
                        and m["sent_at"] >= at
                        and (campaign is None or m["campaign"] == campaign)
                    ),
                    default=None,
                )
            failed = (
                not alert
                and done is None
                and any(
                    m["candidate_id"] == cid
                    and m["updated_at"] >= at
                    and (campaign is None or m["campaign"] == campaign)
                    for m in broken
                )
            )
            counts["total"] += 1
            if done is not None and done <= due:
                counts["met"] += 1
            elif done is None and now < due and not failed:
                counts["pending"] += 1
            else:
                counts["breached"] += 1
        result[name] = counts
    return result
