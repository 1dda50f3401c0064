"""The event data contract (campaigns/events.yaml): its file, and data checked against it at the door."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from outreach.core.errors import CampaignError
from outreach.domain.campaigns import EventType
from outreach.domain.event_data import EventContract, EventSpec, contract_problems, load_event_contract

ROOT = Path(__file__).resolve().parents[2]
_SEED = load_event_contract(ROOT / "campaigns")
assert _SEED is not None
SEED: EventContract = _SEED

GOOD_OFFER: dict[str, Any] = {
    "start_date": "2027-03-01",
    "start_place": "上海市浦东新区世纪大道1000号18楼",
    "hr_contact": {"name": "李娜", "email": "li.na@example.com", "phone": "021-5555 0123"},
    "documents": ["身份证原件及复印件"],
    "medical_check": {"place": "爱康国宾", "deadline": "2027-02-23"},
}


def contract_of(data: dict[str, Any]) -> EventContract:
    return EventContract(events={"offer_accepted": EventSpec.model_validate({"data": data})})


def test_the_seed_contract_declares_every_field_the_seed_templates_read() -> None:
    assert set(SEED.required("offer_accepted")) == {"start_date", "start_place", "hr_contact"}
    assert SEED.check("offer_accepted", GOOD_OFFER) == []
    assert SEED.declared("offer_accepted", ("hr_contact", "name"))
    assert SEED.declared("offer_accepted", ("documents", "[]"))
    assert not SEED.declared("offer_accepted", ("hr_contact", "wechat"))
    assert not SEED.declared("applied", ("position",))


def test_the_examples_are_valid_data_for_their_events() -> None:
    for event in EventType:
        assert SEED.check(event.value, SEED.example(event.value)) == [], event


def test_every_problem_is_reported_at_once_with_its_path() -> None:
    data = {
        "start_date": "1 March",
        "hr_contact": "Li Wei",  # a name where an object with a name is declared
        "documents": ["ID card", 7],
        "medical_check": {"deadline": "2027-02-30"},
    }
    problems = dict(SEED.check("offer_accepted", data))
    assert set(problems) == {
        "data.start_date",
        "data.start_place",
        "data.hr_contact",
        "data.documents[1]",
        "data.medical_check.place",
        "data.medical_check.deadline",
    }
    assert problems["data.hr_contact"] == "expected an object with name, got text"
    assert problems["data.start_place"].startswith("required")
    # The values sent are personal data: no message repeats them.
    assert not any("Li Wei" in message or "1 March" in message for message in problems.values())


@pytest.mark.parametrize(
    ("kind", "good", "bad"),
    [
        ("date", "2028-02-29", ["2027-02-29", "2027-3-1", "20270301", "tomorrow"]),
        ("datetime", "2027-03-01T09:30:00+08:00", ["2027-03-01T09:30:00", "2027-03-01", "3000-01-01T00:00:00+00:00"]),
        ("email", "li.na@example.com", ["li.na", "@example.com", "li na@example.com"]),
        ("phone", "+86 138 0013 8000", ["12", "call me", "+86"]),
        ("url", "https://book.example.com/x", ["javascript:alert(1)", "ftp://example.com", "https://"]),
        ("number", 12.5, [math.inf, math.nan, 10**13, True, "12"]),
        ("boolean", False, [0, "false"]),
        ("string", "任何文字", ["nul\x00byte", "x" * 10_001, 12]),
    ],
)
def test_each_type_accepts_its_shape_and_refuses_others(kind: str, good: Any, bad: list[Any]) -> None:
    contract = contract_of({"field": {"type": kind, "required": True}})
    assert contract.check("offer_accepted", {"field": good}) == []
    for value in bad:
        problems = contract.check("offer_accepted", {"field": value})
        assert [field for field, _ in problems] == ["data.field"], (kind, value)


def test_money_has_an_amount_a_currency_and_a_period() -> None:
    contract = contract_of({"salary": {"type": "money", "required": True}})
    assert contract.check("offer_accepted", {"salary": {"amount": 45000, "currency": "CNY", "period": "month"}}) == []
    problems = contract.check("offer_accepted", {"salary": {"amount": -1, "currency": "yuan", "period": "fortnight"}})
    assert [field for field, _ in problems] == ["data.salary.amount", "data.salary.currency", "data.salary.period"]
    assert contract.check("offer_accepted", {"salary": {"amount": 10**300, "currency": "CNY"}})
    assert contract.check("offer_accepted", {"salary": "45k"}) == [
        ("data.salary", "expected money as {amount, currency, period}, got text")
    ]


def test_undeclared_data_is_kept_and_not_checked() -> None:
    assert SEED.check("offer_accepted", {**GOOD_OFFER, "referrer": {"anything": [1, 2]}}) == []
    assert SEED.check("contacted", {"note": "met at a meetup"}) == []


def test_data_that_is_not_an_object_is_refused() -> None:
    assert SEED.check("offer_accepted", [])[0] == ("data", "must be an object")  # type: ignore[arg-type]


@settings(max_examples=200, deadline=None)
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
        max_leaves=20,
    )
)
def test_any_json_shape_gets_answers_never_an_exception(value: Any) -> None:
    for data in ({"hr_contact": value, "start_date": value, "documents": value, "medical_check": value}, value):
        for field, message in SEED.check("offer_accepted", data) if isinstance(data, dict) else []:
            assert field.startswith("data") and message


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "events.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_a_broken_contract_file_names_file_line_and_field(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "offer_accepted:\n"
        "  data:\n"
        "    start_date: {type: date, required: true, example: 'next week'}\n"
        "    hr_contact: {type: object}\n"
        "    bonus: {type: currency}\n"
        "offer_acepted:\n"
        "  data: {}\n",
    )
    _, problems = contract_problems(path)
    found = {(problem.line, problem.field.split(".")[0]) for problem in problems}
    assert (6, "offer_acepted") in found
    messages = " | ".join(problem.message for problem in problems)
    assert "a date like 2027-03-01" in messages  # the example is checked against its own type
    assert "an object needs its `fields`" in messages
    assert (5, "offer_accepted.data.bonus.type") in {(problem.line, problem.field) for problem in problems}
    assert all(problem.file == str(path) for problem in problems)
    with pytest.raises(CampaignError):
        load_event_contract(tmp_path)


def test_without_a_contract_file_nothing_is_checked(tmp_path: Path) -> None:
    """A campaigns folder from before the contract keeps working: its events are stored as they come."""
    assert load_event_contract(tmp_path) is None


def test_a_field_may_be_given_by_its_type_alone(tmp_path: Path) -> None:
    path = write(tmp_path, "offer_declined:\n  data:\n    position: string\n    respond_by: date\n")
    contract, problems = contract_problems(path)
    assert problems == []
    assert contract.check("offer_declined", {"respond_by": "soon"}) == [
        ("data.respond_by", "expected a date like 2027-03-01")
    ]
