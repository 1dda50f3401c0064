"""Templates edited by HR: sandbox escapes and resource attacks are stopped at validation, and nothing runs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
import tracemalloc
from pathlib import Path
from typing import Any

import pytest

from outreach.core.errors import TemplateError
from outreach.domain import render
from outreach.domain.render import Renderer
from outreach.pipeline.samples import sample_context
from outreach.service.validation import validate_all

ROOT = Path(__file__).resolve().parents[2]
TARGET = "email/final_thanks.en.txt"  # a template a seed campaign uses

# Each entry: a template body that tries to escape the sandbox or exhaust the process. MARKER is replaced by a
# file path: any entry that managed to run code would create it.
CORPUS: list[tuple[str, str]] = [
    ("dunder class", "{{ ''.__class__ }}"),
    ("mro subclasses", "{{ ''.__class__.__mro__[1].__subclasses__() }}"),
    ("attr filter", "{{ candidate|attr('__class__') }}"),
    ("attr filter, built name", "{{ (candidate|attr('__cla' ~ 'ss__')).__base__ }}"),
    ("cycler globals", "{{ cycler.__init__.__globals__.os.popen('touch MARKER').read() }}"),
    ("joiner builtins", "{{ joiner.__init__.__globals__.__builtins__.open('MARKER', 'w').write('x') }}"),
    ("namespace globals", "{{ namespace.__init__.__globals__ }}"),
    ("lipsum globals", "{{ lipsum.__globals__['os'].system('touch MARKER') }}"),
    ("self context", "{{ self._TemplateReference__context }}"),
    ("str.format attribute", "{{ '{0.__class__.__init__.__globals__}'.format(cycler) }}"),
    ("str.format_map", "{{ '{x.__class__}'.format_map({'x': candidate}) }}"),
    ("format method reference", "{{ ''.format.__self__ }}"),
    ("mutate context", "{{ candidate.tags.append('pwned') }}"),
    ("mutate context dict", "{{ candidate.update({'name': 'MARKER'}) }}"),
    ("include outside folder", "{% include '../../pyproject.toml' %}"),
    ("include absolute", "{% include '/etc/passwd' %}"),
    ("huge range", "{% for i in range(10**9) %}x{% endfor %}"),
    ("string multiplication", "{{ 'x' * 10**9 }}"),
    ("list multiplication", "{{ ([1] * 10**8)|length }}"),
    ("power", "{{ 9 ** 9999999 }}"),
    ("percent width", "{{ '%01000000000d' % 1 }}"),
    ("percent star width", "{{ '%*d' % (1000000000, 1) }}"),
    ("format width", "{{ '{:>1000000000}'.format(1) }}"),
    ("format nested width", "{{ '{:>{w}}'.format(1, w=1000000000) }}"),
    ("format filter width", "{{ '%01000000000d'|format(1) }}"),
    ("center method", "{{ 'x'.center(1000000000) }}"),
    ("center filter", "{{ 'x'|center(1000000000) }}"),
    ("indent filter", "{{ 'a\nb'|indent(1000000000) }}"),
    ("replace amplification", "{% set s = 'x' * 99999 %}{{ s.replace('x', s) }}"),
    ("replace filter amplification", "{% set s = 'x' * 99999 %}{{ s|replace('x', s) }}"),
    ("join amplification", "{% set s = 'x' * 99999 %}{{ s.join(s) }}"),
    ("join filter amplification", "{{ range(99999)|join('x' * 99999) }}"),
    ("lipsum call", "{{ lipsum(n=1000000000) }}"),
    ("recursive macro", "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}"),
    ("exponential macro", "{% macro f(n) %}{% if n %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}{{ f(60) }}"),
    ("silent nested loops", "{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}done"),
    ("loops over strings", "{% set s = 'x' * 99999 %}{% for a in s %}{% for b in s %}{% endfor %}{% endfor %}done"),
    ("runaway output", "{% for i in range(99999) %}{% for j in range(99999) %}0123456789{% endfor %}{% endfor %}"),
]

EXPECTED = ("sandbox", "unsafe", "undefined", "does not exist", "limit", "budget", "RecursionError", "too big")


@pytest.fixture
def seeds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    campaigns, templates = tmp_path / "campaigns", tmp_path / "templates"
    shutil.copytree(ROOT / "campaigns", campaigns)
    shutil.copytree(ROOT / "templates", templates)
    # The budget is short here so the slow entries fail fast; the mechanism is the same as with 2 seconds.
    monkeypatch.setattr(render, "RENDER_TIME_BUDGET", 0.3)
    return campaigns, templates


# Through the whole of `campaigns validate` (a few seconds each): one of every kind; every entry goes through the
# renderer below.
THROUGH_VALIDATION = [
    "cycler globals", "attr filter, built name", "lipsum globals", "str.format attribute", "include outside folder",
    "format width", "replace amplification", "exponential macro", "silent nested loops", "runaway output",
]  # fmt: skip


@pytest.mark.parametrize(
    ("label", "body"),
    [entry for entry in CORPUS if entry[0] in THROUGH_VALIDATION],
    ids=[label for label, _ in CORPUS if label in THROUGH_VALIDATION],
)
def test_validation_reports_every_escape_and_nothing_runs(
    seeds: tuple[Path, Path], tmp_path: Path, label: str, body: str
) -> None:
    campaigns, templates = seeds
    marker = tmp_path / "pwned"
    (templates / TARGET).write_text(body.replace("MARKER", str(marker)), encoding="utf-8")
    started = time.monotonic()
    _, problems = validate_all(campaigns, templates)
    elapsed = time.monotonic() - started
    ours = [p for p in problems if TARGET in str(p)]
    print(f"{label}: problems {len(ours)}, first: {ours[0] if ours else None}, seconds {elapsed:.2f}")
    assert ours, f"{label}: not reported"
    assert all(any(word in str(p) for word in EXPECTED) for p in ours), ours
    assert not marker.exists()
    assert "MARKER" not in str(problems)


def test_corpus_against_the_renderer_directly_leaves_the_context_untouched(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    root = tmp_path / "t"
    (root / "sms").mkdir(parents=True)
    for n, (_, body) in enumerate(CORPUS):
        (root / "sms" / f"evil{n}.en.txt").write_text(body.replace("MARKER", str(marker)), encoding="utf-8")
    renderer = Renderer(root)
    renderer.time_budget = 0.3
    context: dict[str, Any] = sample_context()
    before = repr(context)
    stopped = 0
    for n, (label, _) in enumerate(CORPUS):
        with pytest.raises(TemplateError) as info:
            renderer.render_sms(f"evil{n}", "en", context)
        assert any(word in str(info.value) for word in EXPECTED), (label, str(info.value))
        if "format" in label or "width" in label:
            assert "exceeds the limit" not in str(info.value), "refused only after building the string"
        stopped += 1
    print(f"corpus entries: {len(CORPUS)}, stopped: {stopped}, executed: {int(marker.exists())}")
    assert stopped == len(CORPUS)
    assert not marker.exists()
    assert repr(context) == before


def test_slow_and_long_templates_name_the_limit(tmp_path: Path) -> None:
    root = tmp_path / "t"
    (root / "sms").mkdir(parents=True)
    # The outer count comes from the data: constant loops this long are refused when the file is compiled.
    (root / "sms" / "slow.en.txt").write_text(
        "{% for i in range(candidate.tags|length * 25000) %}{% for j in range(99999) %}{% endfor %}{% endfor %}",
        encoding="utf-8",
    )
    (root / "sms" / "long.en.txt").write_text("{% for i in range(99999) %}0123456789{% endfor %}", encoding="utf-8")
    renderer = Renderer(root)
    renderer.time_budget = 0.2
    with pytest.raises(TemplateError, match=r"sms/slow.en.txt.*longer than the budget of 0.2 seconds"):
        renderer.render_sms("slow", "en", sample_context())
    with pytest.raises(TemplateError, match=r"sms/long.en.txt.*exceeds the limit of 1600 characters"):
        renderer.render_sms("long", "en", sample_context())


def test_the_budget_counts_the_render_s_own_cpu_not_a_busy_machine(tmp_path: Path) -> None:
    """A worker host that is only busy (the render waits for the GIL or a core) must not fail a good message:
    the budget is the rendering thread's CPU time. Here a context value takes 0.3 s of waiting to read."""
    root = tmp_path / "t"
    (root / "sms").mkdir(parents=True)
    (root / "sms" / "waits.en.txt").write_text(
        "Hello {{ candidate.name }}{% for i in range(3) %}.{% endfor %}", encoding="utf-8"
    )

    class Waiting(dict[str, Any]):
        def __getitem__(self, key: str) -> Any:
            threading.Event().wait(0.3)  # no CPU used, like a thread waiting its turn
            return super().__getitem__(key)

    renderer = Renderer(root)
    renderer.time_budget = 0.1
    context = sample_context()
    context["candidate"] = Waiting(context["candidate"])
    assert renderer.render_sms("waits", "en", context).text.startswith("Hello ")


def test_real_templates_keep_working_with_the_guards(tmp_path: Path) -> None:
    root = tmp_path / "t"
    (root / "sms").mkdir(parents=True)
    (root / "sms" / "ok.en.txt").write_text(
        "{% for tag in candidate.tags %}{{ loop.index }}/{{ loop.length }} {{ tag|center(12) }}{% endfor %}"
        " {{ '%05.1f' % 3.14159 }} {{ '{:>6}'.format('ab') }} {{ 'a-b'.replace('-', '+') }}"
        " {{ ', '.join(candidate.tags) }} {{ candidate.tags|join(' / ') }} {{ '%s!'|format('hi') }}",
        encoding="utf-8",
    )
    text = Renderer(root).render_sms("ok", "en", sample_context()).text
    assert "1/4" in text and "003.1" in text and "    ab" in text and "a+b" in text and "hi!" in text


def test_html_variables_are_escaped_in_every_seed_email(tmp_path: Path) -> None:
    renderer = Renderer(ROOT / "templates")
    context = sample_context("en", event_type="applied")
    payload = '<script>alert(1)</script><img src=x onerror="alert(2)">'
    context["candidate"]["name"] = context["candidate"]["first_name"] = payload
    context["job"]["title"] = context["job"]["description"] = payload
    context["campaign"]["name"] = "jd_intro"
    email = renderer.render_email("jd_intro", "en", context)
    assert "<script>" not in email.html and 'onerror="' not in email.html
    assert "&lt;script&gt;" in email.html
    assert payload in email.text  # plain text is not HTML: no escaping there


def test_cli_validate_exits_1_naming_the_file(seeds: tuple[Path, Path]) -> None:
    campaigns, templates = seeds
    (templates / TARGET).write_text("{{ cycler.__init__.__globals__ }}", encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OUTREACH_", "SENDGRID_", "TWILIO_"))}
    env.update({"OUTREACH_CAMPAIGNS_DIR": str(campaigns), "OUTREACH_TEMPLATES_DIR": str(templates)})
    result = subprocess.run(
        [sys.executable, "-m", "outreach", "campaigns", "validate"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 1
    assert TARGET in result.stdout + result.stderr
    assert "unsafe" in result.stdout + result.stderr


def test_jinja2_is_pinned_past_the_known_sandbox_escapes() -> None:
    import re
    from importlib.metadata import version

    pin = re.search(r'"jinja2>=([0-9.]+)"', (ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert pin is not None
    # CVE-2024-56201, CVE-2024-56326 (fixed in 3.1.5) and CVE-2025-27516 (|attr and format, fixed in 3.1.6).
    assert tuple(int(p) for p in pin.group(1).split(".")) >= (3, 1, 6)
    assert tuple(int(p) for p in version("jinja2").split(".")[:3]) >= (3, 1, 6)


# --- resource limits ---------------------------------------------------------------------------------------
# One Python operation cannot be interrupted by the budget's clock, so each of these would run for minutes or take
# gigabytes inside a single call. Each entry: a template body and what the refusal says. MEGA is a string of a
# million characters.
RUNAWAYS: list[tuple[str, str, str]] = [
    ("power chain", "{{ ((9**1024)**1024)**1024 }}", "integers of more than 4096 bits"),
    (
        "power chain in a branch the data never takes",
        "{% if candidate.name == 'nobody' %}{{ ((9**1024)**1024)**1024 }}{% endif %}hello",
        "line 1: integers of more than 4096 bits",
    ),
    ("product chain", "{% set n = 9 ** 1000 %}{{ n * n * n * n * n }}", "integers of more than"),
    ("sum past the bits", "{{ 2 ** 4095 + 2 ** 4095 }}", "integers of more than"),
    ("int filter", "{{ ('1' * 100000)|int(base=2) }}", "integers of more than"),
    ("int.to_bytes", "{{ (1).to_bytes(10**9, 'big')|length }}", "characters or items"),
    ("join of big strings", "{{ (['a' * 100000] * 100000)|join }}", "characters or items"),
    ("repeating a list of big strings", "{{ (['a' * 100000] * 100000)|length }}", "characters or items"),
    ("repeating a list of a range", "{{ ((range(99999)|list) * 99)|length }}", "characters or items"),
    ("join separator", "{{ range(99999)|join('x' * 99) }}", "characters or items"),
    ("join of a generator", "{{ range(9999)|map('string')|join('x' * 999) }}", "characters or items"),
    ("center filter", "{{ 'x'|center(10**9) }}", "field widths above"),
    ("ljust method", "{{ 'x'.ljust(10**9) }}", "field widths above"),
    (
        "nested constant loops",
        "{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}",
        "loops nested here repeat 9999800001 times",
    ),
    (
        "nested constant loops in a branch",
        "{% if candidate.name == 'nobody' %}{% for i in range(9999) %}{% for j in 'x' * 9999 %}{{ j }}{% endfor %}"
        "{% endfor %}{% endif %}hello",
        "loops nested here repeat 99980001 times",
    ),
    (
        "nested loops of the data",
        "{% for i in range(candidate.tags|length * 25000) %}{% for j in range(99999) %}{% endfor %}{% endfor %}",
        "longer than the budget",
    ),
    ("percent width", "{{ '%0999999999d' % 1 }}", "field widths above"),
    ("percent fields times widths", "{{ ('%9999s' * 200) % ((1,) * 200) }}", "characters or items"),
    ("percent fields times a big argument", "{{ ('%(a)s' * 100) % {'a': 'x' * 99999} }}", "characters or items"),
    ("format fields times a big argument", "{{ ('{0}' * 100).format('x' * 99999) }}", "characters or items"),
    ("format fields times widths", "{{ ('{:>9999}' * 1000).format(*range(1000)) }}", "characters or items"),
    ("format filter fields", "{{ ('%s' * 99)|format(*(['x' * 99999] * 9)) }}", "characters or items"),
    ("wordwrap of one long word", "{{ ('x' * 200000)|wordwrap(1)|length }}", "too much work"),
    ("wordwrap string", "{{ ('a ' * 50000)|wordwrap(1, wrapstring='x' * 1000)|length }}", "characters or items"),
    ("indent many lines", "{{ ('a\\n' * 50000)|indent(9999)|length }}", "characters or items"),
    ("indent with a string", "{{ ('a\\n' * 50000)|indent('-' * 9999)|length }}", "characters or items"),
    ("concatenation with ~", "{% set s = 'x' * 999999 %}{{ (s ~ s ~ s)|length }}", "characters or items"),
    ("concatenation with +", "{% set s = 'x' * 999999 %}{{ (s + s)|length }}", "characters or items"),
    ("list concatenation", "{% set l = ['x' * 99999] * 9 %}{{ (l + l)|length }}", "characters or items"),
    (
        "doubling in a namespace",
        "{% set ns = namespace(s='x' * 1000) %}{% for i in range(30) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}"
        "{{ ns.s|length }}",
        "characters or items",
    ),
    (
        "doubling macro output",
        "{% macro f(n) %}{% if n %}{{ f(n - 1) }}{{ f(n - 1) }}{% else %}{{ 'x' * 99999 }}{% endif %}{% endmacro %}"
        "{{ f(12)|length }}",
        "characters or items",
    ),
    (
        "captured block",
        "{% set s %}{% for i in range(9999) %}{{ 'x' * 999 }}{% endfor %}{% endset %}{{ s|length }}",
        "characters or items",
    ),
    (
        "filter block",
        "{% filter upper %}{% for i in range(9999) %}{{ 'x' * 999 }}{% endfor %}{% endfilter %}",
        "characters or items",
    ),
    (
        "nested list literals",
        "{% set a = ['x' * 99999] %}{% set b = [a, a, a, a] %}{% set c = [b, b, b, b] %}{% set d = [c, c, c, c] %}"
        "{{ d|length }}",
        "characters or items",
    ),
    ("dict literal", "{% set s = 'x' * 600000 %}{{ {'a': s, 'b': s}|length }}", "characters or items"),
    ("printing a big list", "{{ ['x' * 99999] * 5 }}", "characters or items"),
    ("batch fill", "{{ [1]|batch(10**8, 'x')|list|length }}", "more than 100000 parts"),
    ("slice", "{{ range(1)|slice(10**8)|list|length }}", "more than 100000 parts"),
    ("rounding an integer", "{{ 5|round(-10**7) }}", "rounding to more than 1229 digits"),
    ("rounding down", "{{ 5.5|round(10**7, 'floor') }}", "rounding to more than 1229 digits"),
    ("sum of lists", "{{ ([[1]] * 50000)|sum(start=[])|length }}", "only adds numbers"),
    ("translate", "{{ ('a' * 99999).translate({97: 'b' * 99})|length }}", "characters or items"),
    ("expandtabs", "{{ ('\\t' * 99999).expandtabs(99)|length }}", "characters or items"),
    ("punycode", "{{ ('\\u00e9' * 9999).encode('punycode')|length }}", "codec 'punycode' is not allowed"),
    ("tojson", "{{ ('\\u00e9' * 99999)|tojson|length }}", "characters or items"),
    ("escaping a list", "{{ (['<' * 99999] * 5)|e|length }}", "characters or items"),
    ("urlize target", "{{ ('a.com ' * 9999)|urlize(target='x' * 999)|length }}", "characters or items"),
]

# Big operations that stay within the limits: they run, quickly and in little memory.
BOUNDED: list[tuple[str, str, str]] = [
    ("truncate with a huge length", "{{ ('x' * 999999)|truncate(10**9)|length }}", "999999"),
    ("truncate a long text", "{{ ('word ' * 99999)|truncate(19) }}", "word word word..."),
    ("wordwrap a long text", "{{ ('word ' * 10000)|wordwrap(79)|length }}", "49999"),
    ("indent a long text", "{{ ('line\\n' * 50000)|indent(4)|length }}", "449996"),
    (
        "constant loops under the limit",
        "{% for i in range(1000) %}{% for j in range(100) %}{% endfor %}{% endfor %}ok",
        "ok",
    ),
    ("the biggest power", "{{ (2 ** 4095)|string|length }}", "1233"),
    ("join of a range", "{{ range(99999)|join(',')|length }}", "588883"),
    ("formatting", "{{ '%05.1f|%-4s|%x' % (3.14159, 'ab', 255) }} {{ '{:>5}'.format(7) }}", "003.1|ab  |ff     7"),
    ("a long string", "{{ ('x' * 999999 ~ 'y')|length }}", "1000000"),
]


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory) -> Renderer:
    root = tmp_path_factory.mktemp("limits")
    (root / "sms").mkdir()
    for n, (_, body, _) in enumerate(RUNAWAYS + BOUNDED):
        (root / "sms" / f"t{n}.en.txt").write_text(body, encoding="utf-8")
    renderer = Renderer(root)
    renderer.time_budget = 0.3
    return renderer


def outcome_of(renderer: Renderer, name: str) -> str:
    """The text, or the error's message."""
    try:
        return renderer.render_sms(name, "en", sample_context()).text
    except TemplateError as exc:
        return str(exc)


def measured(renderer: Renderer, name: str) -> tuple[str, float, float]:
    """(the outcome; CPU seconds, compiling included; peak megabytes allocated, measured on a second render)."""
    started = time.thread_time()
    outcome = outcome_of(renderer, name)
    seconds = time.thread_time() - started
    tracemalloc.start()
    try:
        again = outcome_of(renderer, name)
        peak = tracemalloc.get_traced_memory()[1] / 1e6
    finally:
        tracemalloc.stop()
    assert again == outcome
    return outcome, seconds, peak


@pytest.mark.parametrize(
    ("n", "label", "body", "expected"),
    [(n, *entry) for n, entry in enumerate(RUNAWAYS)],
    ids=[label for label, _, _ in RUNAWAYS],
)
def test_each_runaway_is_refused_at_once_in_little_memory(
    limited: Renderer, n: int, label: str, body: str, expected: str
) -> None:
    outcome, seconds, peak = measured(limited, f"t{n}")
    print(f"{label}: {seconds:.3f} s, {peak:.1f} MB: {outcome}")
    assert outcome.startswith(f"template sms/t{n}.en.txt: ") and expected in outcome, outcome
    assert f"sms/t{n}.en.txt line 1" in outcome or "budget" in outcome
    assert seconds < 0.8  # the budget is 0.3 s; everything else is refused before it runs
    assert peak < 40


@pytest.mark.parametrize(
    ("n", "label", "body", "expected"),
    [(len(RUNAWAYS) + n, *entry) for n, entry in enumerate(BOUNDED)],
    ids=[label for label, _, _ in BOUNDED],
)
def test_big_operations_within_the_limits_run_quickly(
    limited: Renderer, n: int, label: str, body: str, expected: str
) -> None:
    outcome, seconds, peak = measured(limited, f"t{n}")
    print(f"{label}: {seconds:.3f} s, {peak:.1f} MB: {outcome}")
    assert outcome == expected
    assert seconds < 0.8
    assert peak < 40


def test_validation_names_the_file_and_line_of_a_runaway_in_a_branch_quickly(seeds: tuple[Path, Path]) -> None:
    campaigns, templates = seeds
    body = "Hello\n{% if candidate.name == 'nobody' %}\n{{ ((9**1024)**1024)**1024 }}\n{% endif %}\n"
    (templates / TARGET).write_text(body, encoding="utf-8")
    started = time.monotonic()
    _, problems = validate_all(campaigns, templates)
    elapsed = time.monotonic() - started
    ours = [str(p) for p in problems if TARGET in str(p)]
    print(f"seconds {elapsed:.2f}: {ours}")
    assert ours and all(f"{TARGET} line 3: integers of more than 4096 bits" in p for p in ours)
    assert elapsed < 30  # the whole of validate; the expression alone took minutes
