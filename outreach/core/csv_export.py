"""CSV the project writes, safe to open in a spreadsheet: every CSV goes through :func:`writer`.

A cell that starts with ``=``, ``+``, ``-`` or ``@`` is a formula to Excel, LibreOffice and Google Sheets
(``=HYPERLINK(…)`` sends data away when clicked, ``+1+cmd|' /C calc'!A0`` runs a program through DDE), and so is
one that starts with a tab or a carriage return (OWASP, "CSV Injection"). :func:`safe_cell` gives such a text cell
a leading ``'``, which spreadsheets read as "this is text" and do not show. Numbers are left as they are, so
``-3`` stays a number; the text ``-2+3`` becomes ``'-2+3``.

Decided beyond OWASP's list, because ours is bilingual data typed by people:

* the full-width forms ``＝ ＋ － ＠`` count too: East Asian input methods produce them, and a spreadsheet may fold
  them to ASCII;
* so does any of these after leading whitespace (spaces, tabs, line breaks, no-break and ideographic spaces):
  importers that trim spaces (LibreOffice's "Trim spaces") would see the formula. The cell keeps its spaces,
  after the ``'``.

Rows end in CRLF, as RFC 4180 has it, and no option changes that: ``csv`` quotes a cell holding a line break only
if the break is part of the line terminator, so with ``\n`` alone ``x\r=1+1`` would be written bare and read as
two rows, the second a live formula.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable
from typing import Any, Protocol

__all__ = ["FORMULA_START", "SafeWriter", "safe_cell", "writer"]

#: First characters (after any whitespace) that make a spreadsheet read a cell as a formula.
FORMULA_START = frozenset("=+-@\t\r＝＋－＠")


def safe_cell(value: Any) -> Any:
    """``value`` as a CSV cell: text a spreadsheet would run as a formula gets a leading ``'``; anything that is not
    text (numbers, None) is returned as it is."""
    if not isinstance(value, str) or not value:
        return value
    if value[0] in FORMULA_START or value.lstrip()[:1] in FORMULA_START:
        return "'" + value
    return value


class _Stream(Protocol):
    def write(self, text: str, /) -> Any: ...


class SafeWriter:
    """``csv.writer`` (Excel's dialect: commas, ``"`` quotes where needed, CRLF) whose rows go through
    :func:`safe_cell`."""

    def __init__(self, stream: _Stream) -> None:
        self._writer = csv.writer(stream)

    def writerow(self, row: Iterable[Any]) -> None:
        self._writer.writerow([safe_cell(cell) for cell in row])

    def writerows(self, rows: Iterable[Iterable[Any]]) -> None:
        for row in rows:
            self.writerow(row)


def writer(stream: _Stream) -> SafeWriter:
    """The one way outreach writes CSV."""
    return SafeWriter(stream)
