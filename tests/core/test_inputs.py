"""The text, integer and instant rules every input passes (outreach.core.inputs)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from pydantic import Field

from outreach.core.errors import ValidationError
from outreach.core.inputs import (
    INT32_MAX,
    InputModel,
    Instant,
    Int32,
    UTCInstant,
    clean_data,
    clean_text,
    scrub_data,
    scrub_text,
    validate,
)


def test_clean_text_refuses_nul_and_mends_lone_surrogates() -> None:
    assert clean_text("plain") == "plain"
    assert clean_text("张伟 \U0001f600") == "张伟 \U0001f600"
    assert clean_text("a\udc80b\ud800") == "a\ufffdb\ufffd"
    for text in ("\x00", "a\x00", "张\x00伟"):
        with pytest.raises(ValueError, match="NUL"):
            clean_text(text)


def test_scrub_text_mends_both() -> None:
    assert scrub_text("ok") == "ok"
    assert scrub_text("a\x00b\udfff") == "a\ufffdb\ufffd"


def test_nested_data_is_copied_with_keys_and_items_cleaned() -> None:
    given: dict[str, Any] = {"k\udc80": ["v\ud800", {"x": 1, "y": None, "z": 2.5}], "n": True}
    assert clean_data(given) == {"k\ufffd": ["v\ufffd", {"x": 1, "y": None, "z": 2.5}], "n": True}
    assert given["n"] is True and "k\udc80" in given  # the input is left as it was
    with pytest.raises(ValueError, match="NUL"):
        clean_data({"a": [{"b\x00": 1}]})
    assert scrub_data({"a\x00": ["\x00"]}) == {"a\ufffd": ["\ufffd"]}


def test_data_nested_deeper_than_the_recursion_limit_is_walked() -> None:
    cleaned = scrub_data(_deep(50_000, "\udc80"))
    for _ in range(50_000):
        cleaned = cleaned[0]
    assert cleaned == "\ufffd"


def _deep(levels: int, leaf: Any) -> Any:
    value = leaf
    for _ in range(levels):
        value = [value]
    return value


class Sample(InputModel):
    name: str = Field(max_length=20)
    data: dict[str, Any] = Field(default_factory=dict)
    amount: Int32 | None = None
    at: Instant | None = None
    since: UTCInstant | None = None


def test_an_input_model_cleans_every_field_and_names_each_problem() -> None:
    model = validate(Sample, {"name": "Al\udc80", "data": {"k": ["\udc80"]}})
    assert (model.name, model.data) == ("Al\ufffd", {"k": ["\ufffd"]})
    with pytest.raises(ValidationError) as caught:
        validate(Sample, {"name": "Quillon\x00", "data": {"k": "Canary\x00"}, "amount": 2**31})
    assert caught.value.errors == [
        ("name", "must not contain NUL characters"),
        ("data", "must not contain NUL characters"),
        ("amount", f"Input should be less than or equal to {INT32_MAX}"),
    ]
    assert "Quillon" not in str(caught.value) and "Canary" not in str(caught.value)


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("at", "2027-03-01T10:00:00+08:00", datetime(2027, 3, 1, 2, tzinfo=UTC)),
        ("at", "1970-01-01T00:00:00Z", datetime(1970, 1, 1, tzinfo=UTC)),
        ("at", "0001-01-01T00:00:00+14:00", "must lie between"),
        ("at", "9999-12-31T23:59:59-12:00", "must lie between"),
        ("at", "3000-01-01T00:00:00Z", "must lie between"),
        ("at", "2027-03-01T10:00:00", "needs a timezone offset"),
        ("since", "2027-03-01T10:00:00", datetime(2027, 3, 1, 10, tzinfo=UTC)),
        ("since", "0001-01-01", "must lie between"),
    ],
)
def test_instants_are_aware_and_between_1970_and_2999(field: str, value: str, expected: object) -> None:
    if isinstance(expected, datetime):
        assert getattr(validate(Sample, {"name": "x", field: value}), field) == expected
    else:
        with pytest.raises(ValidationError) as caught:
            validate(Sample, {"name": "x", field: value})
        assert caught.value.field == field and str(expected) in caught.value.message
