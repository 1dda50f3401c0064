"""SMS keywords: only a message that is a keyword as a whole counts; everything else is conversation."""

from __future__ import annotations

import pytest

from outreach.policy.keywords import KEYWORDS, Keyword, classify, is_conversational, normalise


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        # opt-out, in every spelling a phone produces
        ("STOP", Keyword.OPT_OUT),
        ("Stop", Keyword.OPT_OUT),
        (" STOP ", Keyword.OPT_OUT),
        ("stop.", Keyword.OPT_OUT),
        ("Stop!!", Keyword.OPT_OUT),
        ('"stop"', Keyword.OPT_OUT),
        ("ＳＴＯＰ", Keyword.OPT_OUT),  # full-width letters
        ("\u3000STOP\u3000", Keyword.OPT_OUT),  # ideographic spaces
        ("\u200bstop\n", Keyword.OPT_OUT),  # zero-width space, trailing newline
        ("STOP 🙏", Keyword.OPT_OUT),
        ("stopall", Keyword.OPT_OUT),
        ("Stop all", Keyword.OPT_OUT),
        ("unsubscribe", Keyword.OPT_OUT),
        ("Cancel", Keyword.OPT_OUT),
        ("end", Keyword.OPT_OUT),
        ("QUIT", Keyword.OPT_OUT),
        ("revoke", Keyword.OPT_OUT),
        ("optout", Keyword.OPT_OUT),
        ("opt-out", Keyword.OPT_OUT),
        ("Opt out", Keyword.OPT_OUT),
        ("退订", Keyword.OPT_OUT),
        ("退订。", Keyword.OPT_OUT),
        ("【退订】", Keyword.OPT_OUT),
        ("td", Keyword.OPT_OUT),
        ("TD", Keyword.OPT_OUT),
        ("ＴＤ", Keyword.OPT_OUT),
        ("T", Keyword.OPT_OUT),
        ("t", Keyword.OPT_OUT),
        ("t。", Keyword.OPT_OUT),
        # opt-in
        ("START", Keyword.OPT_IN),
        ("start", Keyword.OPT_IN),
        ("Unstop", Keyword.OPT_IN),
        ("yes", Keyword.OPT_IN),
        ("YES!", Keyword.OPT_IN),
        # help
        ("HELP", Keyword.HELP),
        ("help?", Keyword.HELP),
        ("Info", Keyword.HELP),
        ("ＨＥＬＰ", Keyword.HELP),
        # conversation
        ("STOP please", None),
        ("stop sending me jobs", None),
        ("Please stop", None),
        ("help me", None),
        ("I need help with the form", None),
        ("Tomorrow", None),
        ("To", None),
        ("Thanks", None),
        ("S.T.O.P", None),
        ("不要再发了", None),
        ("退订谢谢", None),
        ("Yes, I'm interested", None),
        ("START date?", None),
        ("", None),
        ("   ", None),
        ("!!!", None),
    ],
)
def test_classify(body: str, expected: Keyword | None) -> None:
    assert classify(body) is expected


def test_normalise_is_the_form_keywords_are_listed_in() -> None:
    assert normalise("\u3000ｓｔｏｐ　ａｌｌ！ ") == "STOPALL"
    assert normalise("  Opt-Out. ") == "OPTOUT"
    for word in KEYWORDS:
        assert normalise(word) == word
        assert classify(word.lower()) is KEYWORDS[word]


def test_yes_is_an_opt_in_that_may_also_be_an_answer() -> None:
    assert is_conversational("Yes.")
    assert is_conversational("ＹＥＳ")
    assert not is_conversational("START")
    assert not is_conversational("Yes please call me")


def test_keyword_values_are_the_inbound_kinds() -> None:
    assert [k.value for k in Keyword] == ["opt_out", "opt_in", "help"]
