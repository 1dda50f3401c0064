"""The synthetic cohort: who the simulated candidates are and what happens to each of them, drawn from one seed.

Each candidate gets a place (mostly Shanghai, some elsewhere in Asia, in Europe and in the Americas), a locale (en or
zh-CN, by place), a name to match, an email and a valid mobile number of their country (a few have only one of the
two, some ATS records carry no timezone), stack and concern tags, a source, nurture consent, and sometimes a place in
the talent pool. Their story is an application at any hour and what may follow it: replies, an out-of-office
auto-reply, an offer accepted (with the onboarding data) or declined (with a reason), a final-interview rejection, a
hire. HR acts in office hours of the company's timezone. Now and then a job reopens for the talent pool.
"""

from __future__ import annotations

import random
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import phonenumbers

from outreach.domain.campaigns import EventType
from outreach.policy.calendar import localize

#: The regions of :data:`PLACES`, in the order the report lists them.
REGIONS = ("China", "rest of Asia", "Europe", "Americas")


@dataclass(frozen=True)
class _Place:
    zone: str
    country: str
    region: str
    weight: float
    zh_share: float
    phone_implies_zone: bool  # the phone's country has one timezone: the ATS may leave the timezone out


PLACES = (
    _Place("Asia/Shanghai", "CN", "China", 0.62, 0.92, True),
    _Place("Asia/Hong_Kong", "HK", "rest of Asia", 0.04, 0.6, True),
    _Place("Asia/Singapore", "SG", "rest of Asia", 0.04, 0.4, True),
    _Place("Asia/Tokyo", "JP", "rest of Asia", 0.02, 0.2, True),
    _Place("Europe/Berlin", "DE", "Europe", 0.05, 0.15, True),
    _Place("Europe/London", "GB", "Europe", 0.05, 0.15, False),
    _Place("Europe/Paris", "FR", "Europe", 0.03, 0.1, True),
    _Place("Europe/Amsterdam", "NL", "Europe", 0.02, 0.1, True),
    _Place("America/New_York", "US", "Americas", 0.05, 0.15, False),
    _Place("America/Los_Angeles", "US", "Americas", 0.04, 0.2, False),
    _Place("America/Chicago", "US", "Americas", 0.02, 0.1, False),
    _Place("America/Toronto", "CA", "Americas", 0.02, 0.15, False),
)


def _words(text: str) -> tuple[str, ...]:
    return tuple(text.split())


EN_FIRST = _words(
    "Alex Jordan Taylor Morgan Sam Chris Emma Liam Olivia Noah Sophia Lucas Mia Ethan Hannah Daniel "
    "Laura Jonas Lena Marie Thomas Chloe Raj Priya Kenji Yuki Aisha Mateo Sara Felix Nora Omar Ines "
    "David Julia"
)
EN_LAST = _words(
    "Smith Johnson Brown Garcia Miller Müller Schmidt Dubois Martin Bakker Jansen Tanaka Sato Tan Lim "
    "Wong Chen Patel Nguyen Kim Rossi Novak Silva Khan Fischer Lambert Evans Walker Lee Ng"
)
ZH_SURNAMES = (
    ("王", "wang"),
    ("李", "li"),
    ("张", "zhang"),
    ("刘", "liu"),
    ("陈", "chen"),
    ("杨", "yang"),
    ("黄", "huang"),
    ("赵", "zhao"),
    ("吴", "wu"),
    ("周", "zhou"),
    ("徐", "xu"),
    ("孙", "sun"),
    ("马", "ma"),
    ("朱", "zhu"),
    ("胡", "hu"),
    ("郭", "guo"),
    ("何", "he"),
    ("林", "lin"),
    ("罗", "luo"),
    ("高", "gao"),
)
ZH_GIVEN = (
    ("伟", "wei"),
    ("芳", "fang"),
    ("娜", "na"),
    ("敏", "min"),
    ("静", "jing"),
    ("磊", "lei"),
    ("洋", "yang"),
    ("艳", "yan"),
    ("勇", "yong"),
    ("杰", "jie"),
    ("涛", "tao"),
    ("明", "ming"),
    ("超", "chao"),
    ("秀英", "xiuying"),
    ("晓东", "xiaodong"),
    ("子涵", "zihan"),
    ("浩然", "haoran"),
    ("欣怡", "xinyi"),
    ("雨桐", "yutong"),
    ("一鸣", "yiming"),
)
SOURCES = (
    ("linkedin", 0.2),
    ("boss_zhipin", 0.22),
    ("liepin", 0.1),
    ("referral", 0.15),
    ("careers_site", 0.18),
    ("campus", 0.08),
    ("indeed", 0.07),
)
STACKS = ("python", "java", "go", "frontend", "data", "ml", "mobile", "qa")
CONCERNS = ("growth", "pay", "remote")
DECLINE_REASONS = (
    "other_offer",
    "counter_offer",
    "compensation",
    "location",
    "timing",
    "personal",
    "role_fit",
    "Decided to stay closer to family for now",
)
HR_CONTACTS = (
    {"name": "李娜", "email": "li.na@example.com", "phone": "+862150001234"},
    {"name": "Chen Jie", "email": "chen.jie@example.com", "phone": "+862150001235"},
    {"name": "Anna Keller", "email": "anna.keller@example.com"},
    {"name": "王磊"},
)
OFFICES = {
    "Shanghai": "18F, 1000 Century Avenue, Pudong, Shanghai",
    "Beijing": "6F, 1 Zhongguancun Street, Haidian, Beijing",
    "Shenzhen": "Tower B, 9 Keyuan Road, Nanshan, Shenzhen",
    "Hangzhou": "3F, 88 Wenyi West Road, Hangzhou",
    "Singapore": "20 Collyer Quay, #10-01, Singapore",
    "Berlin": "Rosenthaler Straße 40, 10178 Berlin",
}
DOCUMENTS = {
    "en": ["Passport or national ID card", "Original degree certificate", "Two passport-size photos"],
    "zh-CN": ["身份证原件及复印件", "学历、学位证书原件", "两张一寸免冠照片"],
}

#: (external id, title, department, office, tags, salary range)
JOBS: tuple[tuple[str, str, str, str, tuple[str, ...], int, int], ...] = (
    ("be-101", "Backend Engineer (Python)", "Platform", "Shanghai", ("stack:python",), 30000, 50000),
    ("be-102", "Senior Java Engineer", "Payments", "Shanghai", ("stack:java",), 35000, 55000),
    ("in-103", "Go Infrastructure Engineer", "Infrastructure", "Beijing", ("stack:go",), 35000, 60000),
    ("fe-104", "Frontend Engineer (React)", "Product", "Shenzhen", ("stack:frontend",), 25000, 45000),
    ("da-105", "Data Engineer", "Data", "Shanghai", ("stack:data", "stack:python"), 30000, 50000),
    ("ml-106", "Machine Learning Engineer", "AI Lab", "Hangzhou", ("stack:ml", "stack:python"), 40000, 70000),
    ("mo-107", "Android Engineer", "Mobile", "Shenzhen", ("stack:mobile",), 28000, 48000),
    ("sr-108", "Site Reliability Engineer", "Infrastructure", "Singapore", ("stack:go",), 8000, 12000),
    ("qa-109", "QA Automation Engineer", "Quality", "Hangzhou", ("stack:qa", "stack:python"), 20000, 35000),
    ("se-110", "Solutions Engineer, Europe", "Sales Engineering", "Berlin", ("stack:java",), 6000, 8500),
    ("fe-111", "Developer Advocate", "Developer Relations", "Shanghai", ("stack:frontend",), 30000, 45000),
    ("be-112", "高级后端工程师", "平台研发部", "Shanghai", ("stack:java", "stack:go"), 40000, 65000),
)


@dataclass
class Person:
    external_id: str
    zone: ZoneInfo
    country: str | None  # the phone's country (None: no phone)
    region: str
    locale: str
    fields: dict[str, Any]
    pool: bool
    db_id: int = 0


@dataclass(frozen=True)
class Happening:
    """One thing that happens in the synthetic world: an ATS event, a reply, an auto-reply, a job reopening."""

    at: datetime
    kind: str  # an EventType value, "reply", "auto_reply" or "job_reopened"
    person: int  # index in the cohort; -1 for job_reopened
    job: str | None = None
    reason: str | None = None
    data: dict[str, Any] = field(default_factory=dict)


def _weighted(rng: random.Random, options: Sequence[tuple[Any, float]]) -> Any:
    return rng.choices([o for o, _ in options], weights=[w for _, w in options])[0]


def _ascii(text: str) -> str:
    cleaned = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    return "".join(ch for ch in cleaned.lower() if ch.isalnum())


def _phone(rng: random.Random, region: str) -> str:
    """A valid mobile number of ``region`` in E.164: the library's example with other last digits."""
    example = phonenumbers.example_number_for_type(region, phonenumbers.PhoneNumberType.MOBILE)
    assert example is not None, region
    national = str(example.national_number)
    for _ in range(20):
        digits = national[:-4] + f"{rng.randrange(10_000):04d}"
        number = phonenumbers.parse(f"+{example.country_code}{digits}")
        if phonenumbers.is_valid_number(number):
            return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)
    return phonenumbers.format_number(example, phonenumbers.PhoneNumberFormat.E164)


def _person(rng: random.Random, index: int) -> Person:
    place: _Place = _weighted(rng, [(p, p.weight) for p in PLACES])
    locale = "zh-CN" if rng.random() < place.zh_share else "en"
    if locale == "zh-CN":
        (surname, surname_latin), (given, given_latin) = rng.choice(ZH_SURNAMES), rng.choice(ZH_GIVEN)
        name, local_part = surname + given, f"{given_latin}.{surname_latin}"
    else:
        first, last = rng.choice(EN_FIRST), rng.choice(EN_LAST)
        name, local_part = f"{first} {last}", f"{_ascii(first)}.{_ascii(last)}"
    external_id = f"sim-{index + 1:05d}"
    has_phone = rng.random() < 0.95
    has_email = not has_phone or rng.random() < 0.99
    stacks = rng.sample(STACKS, rng.choice((1, 1, 2)))
    concerns = rng.sample(CONCERNS, rng.choice((0, 1, 1, 2)))
    fields: dict[str, Any] = {
        "external_id": external_id,
        "name": name,
        "email": f"{local_part}{index + 1}@{rng.choice(('example.com', 'example.org', 'example.net'))}"
        if has_email
        else None,
        "phone": _phone(rng, place.country) if has_phone else None,
        "locale": locale,
        # Some ATS records carry no timezone; the service then reads it off the phone number.
        "timezone": None if has_phone and place.phone_implies_zone and rng.random() < 0.1 else place.zone,
        "source": _weighted(rng, SOURCES),
        "tags": [f"stack:{s}" for s in stacks] + [f"concern:{c}" for c in concerns],
        "nurture_consent": rng.random() < 0.6,
    }
    return Person(
        external_id=external_id,
        zone=ZoneInfo(place.zone),
        country=place.country if has_phone else None,
        region=place.region,
        locale=locale,
        fields=fields,
        pool=rng.random() < 0.2,
    )


def _local_moment(rng: random.Random, day: date, zone: ZoneInfo, business_share: float) -> datetime:
    """A moment on ``day`` in ``zone``: office hours with probability ``business_share``, else any hour."""
    minute = rng.randrange(9 * 60, 18 * 60) if rng.random() < business_share else rng.randrange(24 * 60)
    wall = datetime.combine(day, time()) + timedelta(minutes=minute, seconds=rng.randrange(60))
    return localize(wall, zone)


def _office_hours(moment: datetime, zone: ZoneInfo, hour: int = 10, minute: int = 30) -> datetime:
    """The next weekday at ``hour:minute`` in ``zone`` on or after ``moment``'s local date."""
    day = moment.astimezone(zone).date()
    while day.weekday() >= 5:
        day += timedelta(days=1)
    return localize(datetime.combine(day, time(hour, minute)), zone)


def _story(
    rng: random.Random, index: int, person: Person, start: datetime, end: datetime, company: ZoneInfo
) -> list[Happening]:
    """One candidate's life: an application and what follows it. Times past ``end`` are dropped later.

    The candidate acts on their own clock (applications at any hour, replies); HR acts in office hours of the
    company's timezone (offers, rejections).
    """
    span = (end - start).total_seconds()
    applied = start + timedelta(seconds=rng.uniform(0, span))
    moment = _local_moment(rng, applied.astimezone(person.zone).date(), person.zone, 0.65)
    if start <= moment < end:
        applied = moment
    job = rng.choice([j for j in JOBS if set(j[4]) & set(person.fields["tags"])] or list(JOBS))
    job_id, title, office = job[0], job[1], job[3]
    out = [Happening(applied, EventType.APPLIED.value, index, job=job_id)]

    def days(low: float, high: float) -> timedelta:
        return timedelta(seconds=rng.uniform(low, high) * 86400)

    # Candidates answer the job-description mail: only those with an email reply or auto-reply to it.
    if person.fields["email"] and rng.random() < 0.03:
        out.append(Happening(applied + timedelta(minutes=2), "auto_reply", index))
    if person.fields["email"] and rng.random() < 0.36:
        delay = min(timedelta(hours=rng.expovariate(1 / 18)), timedelta(days=6)) + timedelta(minutes=10)
        out.append(Happening(applied + delay, "reply", index))

    roll = rng.random()
    if roll < 0.18:
        offered = _office_hours(applied + days(10, 35), company, rng.randrange(10, 18))
        hr = dict(rng.choice(HR_CONTACTS))
        offer_data = {
            "position": title,
            "hr_contact": hr,
            "respond_by": (offered + timedelta(days=7)).date().isoformat(),
        }
        out.append(Happening(offered, EventType.OFFER_EXTENDED.value, index, job=job_id, data=offer_data))
        if rng.random() < 0.35:
            out.append(Happening(offered + days(0.1, 2.5), "reply", index))
        decision = rng.random()
        if decision < 0.6:
            accepted = offered + days(0.2, 6)
            start_day = (accepted + days(14, 45)).astimezone(person.zone).date()
            while start_day.weekday() >= 5:
                start_day += timedelta(days=1)
            data: dict[str, Any] = {
                "position": title,
                "start_date": start_day.isoformat(),
                "start_place": OFFICES.get(office, office),
                "hr_contact": hr,
            }
            if rng.random() < 0.7:
                data["documents"] = list(DOCUMENTS[person.locale])
            if rng.random() < 0.5:
                deadline = start_day - timedelta(days=7)
                data["medical_check"] = {"place": "iKang Health Centre", "deadline": deadline.isoformat()}
            out.append(Happening(accepted, EventType.OFFER_ACCEPTED.value, index, job=job_id, data=data))
            first_day = localize(datetime.combine(start_day, time(9, 30)), person.zone)
            out.append(Happening(first_day, EventType.HIRED.value, index, job=job_id))
        elif decision < 0.88:
            reason = rng.choice(DECLINE_REASONS)
            out.append(
                Happening(
                    offered + days(1, 8),
                    EventType.OFFER_DECLINED.value,
                    index,
                    job=job_id,
                    reason=reason,
                    data={"position": title},
                )
            )
    elif roll < 0.32:
        rejected = _office_hours(applied + days(7, 30), company, rng.randrange(10, 18))
        out.append(Happening(rejected, EventType.FINAL_INTERVIEW_FAILED.value, index, job=job_id))
    return out


@dataclass(frozen=True)
class Cohort:
    """The candidates, each one's story (in cohort order; times past the end not yet dropped), the jobs reopening."""

    people: list[Person]
    stories: list[list[Happening]]
    reopenings: list[Happening]


def draw_cohort(seed: int, candidates: int, start: datetime, end: datetime, company: ZoneInfo) -> Cohort:
    """``candidates`` people living from ``start`` to ``end``, all from ``random.Random(seed)``: same seed, same
    cohort."""
    rng = random.Random(seed)
    people = [_person(rng, index) for index in range(candidates)]
    stories = [_story(rng, index, person, start, end, company) for index, person in enumerate(people)]
    # A job reopens about every six weeks; the ATS then shortlists the matching talent-pool candidates.
    count = max(1, round((end - start).days / 45))
    reopenings = [
        Happening(
            _office_hours(start + (end - start) * (n + 0.6) / count, company), "job_reopened", -1, rng.choice(JOBS)[0]
        )
        for n in range(count)
    ]
    return Cohort(people, stories, [h for h in reopenings if start <= h.at <= end])
