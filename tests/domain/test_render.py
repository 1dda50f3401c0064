"""The renderer: seed templates, locale fallback, strictness, escaping, the sandbox, SMS segments, caching."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from outreach.core.errors import TemplateError
from outreach.domain.campaigns import load_campaigns
from outreach.domain.event_data import load_event_contract
from outreach.domain.render import (
    MAX_EMAIL_BYTES,
    MAX_SMS_CHARS,
    Renderer,
    sms_segments,
)
from outreach.pipeline.samples import sample_context

ROOT = Path(__file__).resolve().parents[2]
TEMPLATES = ROOT / "templates"
CAMPAIGNS = ROOT / "campaigns"
LOCALES = ("en", "zh-CN")


@pytest.fixture(scope="module")
def renderer() -> Renderer:
    return Renderer(TEMPLATES)


def make_renderer(root: Path, files: dict[str, str]) -> Renderer:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return Renderer(root)


def email_files(name: str, locale: str, subject: str, text: str, html: str) -> dict[str, str]:
    return {
        f"email/{name}.{locale}.subject.txt": subject,
        f"email/{name}.{locale}.txt": text,
        f"email/{name}.{locale}.html": html,
    }


def seed_steps() -> list[tuple[str, str, str, str, bool]]:
    """(campaign, channel, template, event type, job present) for every step of every seed campaign."""
    steps = []
    for campaign in load_campaigns(CAMPAIGNS):
        event = campaign.trigger.event
        for step in campaign.steps:
            steps.append(
                (
                    campaign.name,
                    step.channel.value,
                    step.template,
                    event.value if event else "",
                    event is not None and event.value in {"applied", "job_opened"},
                )
            )
    return steps


def context_for(campaign: str, category: str, locale: str, event_type: str) -> dict[str, Any]:
    context = sample_context(locale, event_type=event_type or "offer_accepted")
    context["campaign"] = {"name": campaign, "category": category}
    if not event_type:
        context["event"] = None
        context["job"] = None
    return context


# --- seed templates ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("locale", LOCALES)
@pytest.mark.parametrize(("campaign", "channel", "template", "event_type", "has_job"), seed_steps())
def test_every_seed_template_renders_in_both_locales(
    renderer: Renderer,
    campaign: str,
    channel: str,
    template: str,
    event_type: str,
    has_job: bool,
    locale: str,
) -> None:
    assert renderer.locales(channel, template) == ["en", "zh-CN"]
    category = load_campaigns(CAMPAIGNS)[campaign].category.value
    context = context_for(campaign, category, locale, event_type)
    if channel == "email":
        email = renderer.render_email(template, locale, context)
        assert email.locale == locale
        parts: tuple[str, ...] = (email.subject, email.text, email.html)
        assert "\n" not in email.subject and email.subject == email.subject.strip()
        assert email.html.startswith("<!DOCTYPE html>")
        assert f'<html lang="{locale}">' in email.html
        if locale == "zh-CN":
            # Chinese greetings use the full name.
            assert email.text.startswith(f"{context['candidate']['name']}，您好！")
        else:
            assert email.text.startswith(f"Hi {context['candidate']['first_name']},")
        assert context["company"]["name"] in email.text
        if category == "nurture":
            assert context["links"]["unsubscribe"] in email.text
            assert context["links"]["unsubscribe"] in email.html
        else:
            assert context["links"]["unsubscribe"] not in email.text
    else:
        sms = renderer.render_sms(template, locale, context)
        parts = (sms.text,)
        # English SMS must stay GSM-7; Chinese is necessarily UCS-2.
        assert sms.encoding == ("UCS-2" if locale == "zh-CN" else "GSM-7")
        assert sms.segments <= 2
        assert context["links"]["booking"] in sms.text
    for part in parts:
        assert "{{" not in part and "{%" not in part
        assert "None" not in part
        if locale == "zh-CN":
            assert re.search(r"[\u4e00-\u9fff]", part)


@pytest.mark.parametrize("locale", LOCALES)
def test_jd_intro_carries_job_company_process_and_booking_link(renderer: Renderer, locale: str) -> None:
    context = context_for("jd_intro", "transactional", locale, "applied")
    email = renderer.render_email("jd_intro", locale, context)
    job = context["job"]
    for part in (email.text, email.html):
        assert job["title"] in part
        assert "350" in part  # company introduction
        assert "30" in part  # interview process
    assert job["description"].splitlines()[0] in email.text
    assert f'href="{context["links"]["booking"]}"' in email.html
    assert context["links"]["booking"] in email.text

    context["links"]["booking"] = None
    email = renderer.render_email("jd_intro", locale, context)
    assert "book.example.com" not in email.html
    assert ("Reply to this email" if locale == "en" else "请直接回复本邮件") in email.text


@pytest.mark.parametrize("locale", LOCALES)
def test_offer_letter_checklist_and_concern_sections(renderer: Renderer, locale: str) -> None:
    context = context_for("offer_letter", "transactional", locale, "offer_accepted")
    data = context["event"]["data"]
    email = renderer.render_email("offer_letter", locale, context)
    for part in (email.text, email.html):
        assert data["hr_contact"]["name"] in part
        assert data["medical_check"]["place"] in part
        for document in data["documents"]:
            assert document in part
    assert ("Monday, 2 March 2026" if locale == "en" else "2026年3月2日（星期一）") in email.text
    assert data["start_place"] in email.text

    sections = {
        "growth": ("LEARNING AND GROWTH", "【学习与成长】"),
        "pay": ("HOW BONUSES WORK", "【薪酬与奖金】"),
        "remote": ("WORKING REMOTELY", "【远程办公】"),
    }
    pick = 0 if locale == "en" else 1
    for concerns in ([], ["growth"], ["pay", "remote"], ["growth", "pay", "remote"], ["unknown"]):
        context["concerns"] = concerns
        text = renderer.render_email("offer_letter", locale, context).text
        for concern, titles in sections.items():
            assert (titles[pick] in text) == (concern in concerns), (concerns, concern)


@pytest.mark.parametrize("locale", LOCALES)
def test_offer_letter_renders_with_only_required_data_and_fails_without_it(renderer: Renderer, locale: str) -> None:
    context = context_for("offer_letter", "transactional", locale, "offer_accepted")
    full = context["event"]["data"]
    required = load_event_contract(CAMPAIGNS).required("offer_accepted")
    assert set(required) == {"start_date", "start_place", "hr_contact"}
    context["event"]["data"] = {key: full[key] for key in required}
    context["event"]["data"]["hr_contact"] = {"name": "Li Na"}
    context["job"] = None
    context["concerns"] = []
    email = renderer.render_email("offer_letter", locale, context)
    assert "Li Na" in email.text

    del context["event"]["data"]["start_date"]
    with pytest.raises(TemplateError, match="start_date"):
        renderer.render_email("offer_letter", locale, context)


@pytest.mark.parametrize("locale", LOCALES)
def test_decline_thanks_mentions_a_known_reason_and_never_quotes_free_text(renderer: Renderer, locale: str) -> None:
    context = context_for("decline_followup", "transactional", locale, "offer_declined")
    context["event"]["reason"] = "Compensation"
    text = renderer.render_email("decline_thanks", locale, context).text
    assert ("about the package" if locale == "en" else "薪酬方面") in text

    context["event"]["reason"] = "Candidate felt the manager was rude"
    email = renderer.render_email("decline_thanks", locale, context)
    assert "rude" not in email.text and "rude" not in email.html
    assert ("what shaped your decision" if locale == "en" else "分享您的考虑") in email.text

    context["event"]["reason"] = None
    text = renderer.render_email("decline_thanks", locale, context).text
    assert "what shaped your decision" not in text and "分享您的考虑" not in text


# --- locales -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("wanted", "resolved"),
    [
        ("zh-CN", "zh-CN"),
        ("zh-TW", "zh-CN"),
        ("zh_cn", "zh-CN"),
        ("zh", "zh-CN"),
        ("en", "en"),
        ("en-GB", "en"),
        ("fr", "en"),
        ("fr-FR", "en"),
        (None, "en"),
        ("", "en"),
    ],
)
def test_locale_fallback(renderer: Renderer, wanted: str | None, resolved: str) -> None:
    assert renderer.resolve_locale("email", "jd_intro", wanted) == resolved
    assert renderer.resolve_locale("sms", "jd_nudge", wanted) == resolved


def test_rendered_locale_follows_the_fallback(renderer: Renderer) -> None:
    context = sample_context("zh-TW", event_type="applied")
    assert renderer.render_email("jd_intro", "zh-TW", context).locale == "zh-CN"
    assert renderer.render_sms("jd_nudge", "fr", context).locale == "en"


def test_unknown_template_or_channel_is_a_template_error(renderer: Renderer) -> None:
    with pytest.raises(TemplateError, match="does not exist in any locale"):
        renderer.resolve_locale("email", "no_such_template", "en")
    with pytest.raises(TemplateError, match="does not exist in any locale"):
        renderer.render_email("no_such_template", "zh-CN", sample_context())
    with pytest.raises(TemplateError, match="does not exist in any locale"):
        renderer.render_sms("jd_intro", "en", sample_context())  # an email template, not an SMS one
    with pytest.raises(TemplateError, match="unknown channel"):
        renderer.resolve_locale("fax", "jd_intro", "en")


def test_no_default_version_is_a_template_error(tmp_path: Path) -> None:
    renderer = make_renderer(tmp_path, {"sms/only_zh.zh-CN.txt": "你好"})
    assert renderer.resolve_locale("sms", "only_zh", "zh-TW") == "zh-CN"
    with pytest.raises(TemplateError, match="default locale 'en'"):
        renderer.resolve_locale("sms", "only_zh", "fr")


def test_an_email_locale_counts_only_when_all_three_parts_exist(tmp_path: Path) -> None:
    files = email_files("hello", "en", "Hi", "Hi", "<p>Hi</p>")
    files["email/hello.zh-CN.txt"] = "你好"
    renderer = make_renderer(tmp_path, files)
    assert renderer.locales("email", "hello") == ["en"]
    assert renderer.incomplete_locales("email", "hello") == {
        "zh-CN": ["email/hello.zh-CN.subject.txt", "email/hello.zh-CN.html"]
    }
    assert renderer.render_email("hello", "zh-CN", sample_context()).locale == "en"


# --- strictness and errors ---------------------------------------------------------------------------------


def test_strict_undefined_names_the_missing_variable_and_line(tmp_path: Path) -> None:
    renderer = make_renderer(
        tmp_path,
        {
            "sms/typo.en.txt": "Hi {{ candidate.first_name }},\nyour role: {{ candidate.nmae }}",
            "sms/unknown.en.txt": "Hi {{ recruiter }}",
        },
    )
    context = sample_context()
    with pytest.raises(TemplateError) as info:
        renderer.render_sms("typo", "en", context)
    message = str(info.value)
    assert "'nmae'" in message
    assert "sms/typo.en.txt line 2" in message
    assert info.value.template == "sms/typo.en.txt"
    with pytest.raises(TemplateError, match="variable 'recruiter' is undefined"):
        renderer.render_sms("unknown", "en", context)


def test_errors_never_contain_personal_data(tmp_path: Path) -> None:
    renderer = make_renderer(
        tmp_path,
        {
            "sms/key.en.txt": "{{ event.data[candidate.name] }}",
            "sms/value.en.txt": "{{ candidate.name|int + candidate.name }}",
            "sms/python.en.txt": "{{ candidate.name.index('zzz') }}",
        },
    )
    context = sample_context()
    context["candidate"]["name"] = "Emma Clarke"
    for template in ("key", "value", "python"):
        with pytest.raises(TemplateError) as info:
            renderer.render_sms(template, "en", context)
        assert "Emma" not in str(info.value), str(info.value)
        assert f"sms/{template}.en.txt line 1" in str(info.value)


def test_syntax_errors_and_missing_partials_name_file_and_line(tmp_path: Path) -> None:
    renderer = make_renderer(
        tmp_path,
        {
            "sms/broken.en.txt": "fine\n{% if %}\n",
            "sms/partial.en.txt": "one\ntwo {% include 'partials/nope.en.txt' %}",
            "sms/broken_partial.en.txt": "{% include 'partials/bad.en.txt' %}",
            "partials/bad.en.txt": "a\nb\n{{ oops( }}",
        },
    )
    with pytest.raises(TemplateError, match=r"syntax error at sms/broken.en.txt line 2"):
        renderer.render_sms("broken", "en", sample_context())
    with pytest.raises(TemplateError, match=r"includes partials/nope.en.txt, which does not exist"):
        renderer.render_sms("partial", "en", sample_context())
    with pytest.raises(TemplateError, match=r"syntax error at partials/bad.en.txt line 3"):
        renderer.render_sms("broken_partial", "en", sample_context())


def test_subject_is_one_stripped_line_and_empty_output_is_refused(tmp_path: Path) -> None:
    files = email_files("multi", "en", "\n  Hello\n  {{ candidate.first_name }}  \n\n", "Body", "<p>Body</p>")
    files.update(email_files("blank", "en", "{% if false %}x{% endif %}\n", "Body", "<p>Body</p>"))
    files["sms/empty.en.txt"] = "   \n"
    renderer = make_renderer(tmp_path, files)
    assert renderer.render_email("multi", "en", sample_context()).subject == "Hello Emma"
    with pytest.raises(TemplateError, match="subject rendered empty"):
        renderer.render_email("blank", "en", sample_context())
    with pytest.raises(TemplateError, match="rendered empty"):
        renderer.render_sms("empty", "en", sample_context())


# --- escaping ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("locale", LOCALES)
def test_html_is_autoescaped_and_text_is_not(renderer: Renderer, locale: str) -> None:
    context = context_for("jd_intro", "transactional", locale, "applied")
    evil = "<script>alert(1)</script>"
    context["candidate"]["name"] = evil
    context["candidate"]["first_name"] = evil
    context["job"]["title"] = 'Engineer "R&D" <b>'
    email = renderer.render_email("jd_intro", locale, context)
    assert "<script>" not in email.html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in email.html
    assert "&#34;R&amp;D&#34; &lt;b&gt;" in email.html
    assert evil in email.text
    # The subject is plain text (the email library encodes it), so it is not escaped either.
    assert (evil if locale == "zh-CN" else 'Engineer "R&D" <b>') in email.subject


def test_autoescape_is_decided_by_extension(tmp_path: Path) -> None:
    renderer = make_renderer(tmp_path, email_files("x", "en", "{{ v }}", "{{ v }}", "{{ v }}"))
    email = renderer.render_email("x", "en", {"v": "a<b"})
    assert (email.subject, email.text, email.html) == ("a<b", "a<b", "a&lt;b")


def test_a_template_cannot_include_a_partial_of_another_format(tmp_path: Path) -> None:
    # A .txt partial inside HTML would print candidate data unescaped.
    files = email_files("mixed", "en", "Hi", "Hi", "<p>{% include 'partials/raw.en.txt' %}</p>")
    files["partials/raw.en.txt"] = "{{ candidate.name }}"
    renderer = make_renderer(tmp_path, files)
    with pytest.raises(TemplateError, match="only include or extend files of its own format"):
        renderer.render_email("mixed", "en", sample_context())


# --- sandbox -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "expression",
    [
        "{{ ''.__class__.__mro__ }}",
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ cycler.__init__.__globals__ }}",
        "{{ cycler.__init__.__globals__.os.popen('touch MARKER').read() }}",
        "{{ joiner.__init__.__globals__.__builtins__.open('MARKER', 'w').write('x') }}",
        "{{ x|attr('__class__') }}",
        "{{ (x|attr('__class__')).__base__.__subclasses__() }}",
        "{{ '{0.__class__}'.format(x) }}",
        "{{ '{0.__class__.__init__.__globals__}'.format(cycler) }}",
        "{{ 'a{x.__class__}'.format_map({'x': x}) }}",
        "{{ candidate.tags.append('pwned') }}",
        "{{ candidate.update({'name': 'pwned'}) }}",
        "{{ 'x' * 100000000 }}",
        "{{ 9 ** 9999999 }}",
    ],
)
def test_sandbox_blocks_escapes_and_nothing_runs(tmp_path: Path, expression: str) -> None:
    marker = tmp_path / "pwned"
    renderer = make_renderer(tmp_path / "t", {"sms/evil.en.txt": expression.replace("MARKER", str(marker))})
    context = sample_context()
    context["x"] = object()
    tags_before = list(context["candidate"]["tags"])
    with pytest.raises(TemplateError) as info:
        renderer.render_sms("evil", "en", context)
    assert "sandbox" in str(info.value) or "unsafe" in str(info.value)
    assert not marker.exists()
    assert context["candidate"]["tags"] == tags_before
    assert context["candidate"]["name"] == "Emma Clarke"


# --- size limits -------------------------------------------------------------------------------------------


def test_runaway_output_is_stopped(tmp_path: Path) -> None:
    loop = "{% for i in range(100000) %}{% for j in range(100000) %}0123456789{% endfor %}{% endfor %}"
    files = email_files("huge", "en", "Hi", loop, "<p>Hi</p>")
    files.update(email_files("big_html", "en", "Hi", "Hi", "{% for i in range(30000) %}<p>0123456789</p>{% endfor %}"))
    files["sms/long.en.txt"] = "{% for i in range(200) %}0123456789{% endfor %}"
    files["sms/limit.en.txt"] = "{% for i in range(160) %}0123456789{% endfor %}"
    renderer = make_renderer(tmp_path, files)
    with pytest.raises(TemplateError, match="exceeds the limit"):
        renderer.render_email("huge", "en", sample_context())
    with pytest.raises(TemplateError, match="exceeds the limit"):
        renderer.render_email("big_html", "en", sample_context())
    with pytest.raises(TemplateError, match=f"limit of {MAX_SMS_CHARS}"):
        renderer.render_sms("long", "en", sample_context())
    assert len(renderer.render_sms("limit", "en", sample_context()).text) == MAX_SMS_CHARS


def test_email_limit_counts_utf8_bytes(tmp_path: Path) -> None:
    # 100,000 Chinese characters are 300,000 bytes: under the character count, over the byte limit.
    body = "{% for i in range(10000) %}一二三四五六七八九十{% endfor %}"
    files = email_files("wide", "zh-CN", "你好", body, "<p>好</p>")
    renderer = make_renderer(tmp_path, files)
    with pytest.raises(TemplateError, match=f"over the {MAX_EMAIL_BYTES} byte limit"):
        renderer.render_email("wide", "zh-CN", sample_context())


# --- caching -----------------------------------------------------------------------------------------------


def test_templates_are_compiled_once_and_cached(monkeypatch: pytest.MonkeyPatch) -> None:
    renderer = Renderer(TEMPLATES)
    loader = renderer.environment.loader
    assert loader is not None
    loads: list[str] = []
    original = loader.get_source

    def counting(environment: Any, name: str) -> Any:
        loads.append(name)
        return original(environment, name)

    monkeypatch.setattr(loader, "get_source", counting)
    context = sample_context("en", event_type="applied")
    first = renderer.render_email("jd_intro", "en", context)
    assert "email/jd_intro.en.html" in loads
    assert "partials/company_intro.en.html" in loads
    assert len(loads) == len(set(loads))
    loaded = list(loads)
    for _ in range(3):
        assert renderer.render_email("jd_intro", "en", context) == first
    assert loads == loaded  # nothing was loaded or compiled again
    cache = renderer.environment.cache
    assert cache is not None
    cached = {key[1] for key in cache}
    assert {"email/jd_intro.en.txt", "email/jd_intro.en.html", "partials/layout.en.html"} <= cached
    assert renderer.environment.auto_reload is False


# --- SMS segments ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", ("GSM-7", 0)),
        ("a", ("GSM-7", 1)),
        ("a" * 160, ("GSM-7", 1)),
        ("a" * 161, ("GSM-7", 2)),
        ("a" * 306, ("GSM-7", 2)),
        ("a" * 307, ("GSM-7", 3)),
        ("a" * 459, ("GSM-7", 3)),
        ("a" * 460, ("GSM-7", 4)),
        ("@£$¥èéùìòÇØøÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ¤¡ÄÖÑÜ§¿äöñüà", ("GSM-7", 1)),
        # Extension characters are two septets each.
        ("€" * 80, ("GSM-7", 1)),
        ("€" * 81, ("GSM-7", 2)),
        ("a" * 159 + "[", ("GSM-7", 2)),
        ("a" * 158 + "{", ("GSM-7", 1)),
        ("^{}\\[~]|", ("GSM-7", 1)),
        # An escape pair never straddles two parts: 152 + 2 does not fit in 153.
        ("a" * 152 + "€" + "a" * 152, ("GSM-7", 3)),
        # One character outside GSM-7 switches everything to UCS-2.
        ("a" * 69 + "张", ("UCS-2", 1)),
        ("a" * 70 + "张", ("UCS-2", 2)),
        ("张" * 70, ("UCS-2", 1)),
        ("张" * 71, ("UCS-2", 2)),
        ("张" * 134, ("UCS-2", 2)),
        ("张" * 135, ("UCS-2", 3)),
        ("a" * 159 + "’", ("UCS-2", 3)),
        ("`", ("UCS-2", 1)),  # the backtick is ASCII but not GSM-7
        # Emoji are two UTF-16 code units.
        ("😀" * 35, ("UCS-2", 1)),
        ("a" * 68 + "😀", ("UCS-2", 1)),
        ("a" * 69 + "😀", ("UCS-2", 2)),
        ("a" * 66 + "😀" + "a" * 66, ("UCS-2", 3)),
    ],
)
def test_sms_segments(text: str, expected: tuple[str, int]) -> None:
    assert sms_segments(text) == expected


def test_rendered_sms_reports_encoding_and_segments(renderer: Renderer) -> None:
    context = sample_context("zh-CN", event_type="applied")
    sms = renderer.render_sms("jd_nudge", "zh-CN", context)
    assert (sms.encoding, sms.segments) == sms_segments(sms.text)
    assert sms.encoding == "UCS-2"


# --- filters and sample data -------------------------------------------------------------------------------


def test_date_and_number_filters(tmp_path: Path) -> None:
    renderer = make_renderer(
        tmp_path,
        {
            "sms/d.en.txt": "{{ d|date('en') }} / {{ d|date('zh-CN') }} / {{ 'soon'|date('en') }} / {{ n|number }}",
        },
    )
    text = renderer.render_sms("d", "en", {"d": "2026-03-02", "n": 45000}).text
    assert text == "Monday, 2 March 2026 / 2026年3月2日（星期一） / soon / 45,000"


def test_sample_context_has_every_key_of_a_real_send() -> None:
    context = sample_context()
    assert set(context) == {"candidate", "job", "company", "event", "links", "message", "campaign", "concerns"}
    assert set(context["candidate"]) == {
        "external_id", "name", "first_name", "locale", "timezone", "stage", "source", "tags",
    }  # fmt: skip
    assert set(context["job"]) == {
        "external_id", "title", "department", "location", "description", "booking_url",
        "salary_min", "salary_max", "tags",
    }  # fmt: skip
    assert set(context["company"]) == {"name", "timezone"}
    assert set(context["event"]) == {"type", "reason", "occurred_at", "data"}
    assert set(context["links"]) == {"booking", "unsubscribe"}
    assert set(context["message"]) == {"id"}
    assert set(context["campaign"]) == {"name", "category"}
    assert set(context["event"]["data"]) >= {"start_date", "start_place", "hr_contact", "documents", "medical_check"}
    assert context["concerns"] == [tag.split(":", 1)[1] for tag in context["candidate"]["tags"] if ":" in tag]
    assert sample_context("zh-CN")["candidate"]["name"] == "张伟"
    assert sample_context("zh-TW")["candidate"]["locale"] == "zh-TW"
    assert sample_context(event_type="offer_declined")["event"]["reason"]
    # Fresh copies: a caller changing one must not change the next.
    context["candidate"]["tags"].append("x")
    assert "x" not in sample_context()["candidate"]["tags"]
