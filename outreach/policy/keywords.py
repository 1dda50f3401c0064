"""SMS keywords: the whole message decides whether it is an opt-out, an opt-in or a request for help.

Only a message that *is* a keyword counts: ``STOP``, `` stop. ``, ``ＳＴＯＰ`` (full width) and ``退订`` are
opt-outs; ``stop sending me jobs`` or ``STOP please`` are conversation and reach a recruiter like any reply.
Before matching, the text is NFKC-normalised (full-width letters and spaces become ASCII), upper-cased, and
whitespace, punctuation, symbols (emoji) and invisible characters around it are dropped; spaces and hyphens
inside are ignored too, so ``opt-out`` and ``stop all`` match ``OPTOUT`` and ``STOPALL``.

The word lists follow the carriers and Twilio's defaults, plus the Chinese convention ("回T退订", "回复TD退订"):

* opt-out: STOP, STOPALL, UNSUBSCRIBE, CANCEL, END, QUIT, REVOKE, OPTOUT, 退订, TD, T
* opt-in: START, UNSTOP, YES
* help: HELP, INFO

``YES`` is an opt-in keyword for Twilio (it lifts Twilio's own block on the number), but it is also the most
ordinary answer a candidate can give. :func:`classify` reports it as an opt-in like Twilio does;
:func:`is_conversational` tells the caller it may just as well be an answer, so the inbound handling treats it
as an opt-in only when there is an opt-out to lift, and as a reply otherwise.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Mapping
from enum import StrEnum
from types import MappingProxyType

__all__ = ["KEYWORDS", "Keyword", "classify", "is_conversational", "normalise"]


class Keyword(StrEnum):
    OPT_OUT = "opt_out"
    OPT_IN = "opt_in"
    HELP = "help"


_WORDS: dict[Keyword, tuple[str, ...]] = {
    Keyword.OPT_OUT: ("STOP", "STOPALL", "UNSUBSCRIBE", "CANCEL", "END", "QUIT", "REVOKE", "OPTOUT", "退订", "TD", "T"),
    Keyword.OPT_IN: ("START", "UNSTOP", "YES"),
    Keyword.HELP: ("HELP", "INFO"),
}

#: Normalised keyword → what it means.
KEYWORDS: Mapping[str, Keyword] = MappingProxyType(
    {word: keyword for keyword, words in _WORDS.items() for word in words}
)

#: Keywords that are also everyday answers ("Are you still interested?" "Yes").
_CONVERSATIONAL = frozenset({"YES"})

# Unicode categories dropped around the text: punctuation (P*), separators (Z*: spaces, including the
# ideographic space), symbols (S*: emoji, ¥, +) and control/format characters (C*: zero-width spaces, BOMs).
_EDGE_CATEGORIES = ("P", "Z", "S", "C")
# Dropped inside, so "opt out", "opt-out" and "STOP ALL" match.
_INNER = str.maketrans("", "", " \t\r\n-_")


def _is_edge(char: str) -> bool:
    return unicodedata.category(char)[0] in _EDGE_CATEGORIES


def normalise(body: str) -> str:
    """The form keywords are matched in: NFKC, upper case, surrounding noise dropped, inner spaces/hyphens gone."""
    text = unicodedata.normalize("NFKC", body)
    start, end = 0, len(text)
    while start < end and _is_edge(text[start]):
        start += 1
    while end > start and _is_edge(text[end - 1]):
        end -= 1
    return text[start:end].upper().translate(_INNER)


def classify(body: str) -> Keyword | None:
    """The keyword the whole message is, or None when it is anything else (a reply to read)."""
    return KEYWORDS.get(normalise(body))


def is_conversational(body: str) -> bool:
    """True for keywords that are also ordinary answers (``YES``): an opt-in only if there is something to lift."""
    return normalise(body) in _CONVERSATIONAL
