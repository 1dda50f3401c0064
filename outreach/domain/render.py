"""Message templates: a Jinja2 sandbox that compiles each file once and renders it many times.

Layout of the templates folder::

    email/<name>.<locale>.subject.txt    one line after rendering
    email/<name>.<locale>.txt            plain-text part
    email/<name>.<locale>.html           HTML part (autoescaped)
    sms/<name>.<locale>.txt
    partials/…                           included or extended by the above

A locale "has" an email template only when all three parts exist. The candidate's locale picks the file
(``zh-CN``), then any file of the same language (``zh-TW`` → ``zh-CN``, ``en-GB`` → ``en``), then the default
locale.

Templates get the context documented at :func:`outreach.pipeline.context.shape_context` plus three filters:
``date(locale)`` for ISO dates, ``number`` for thousands separators and ``paragraphs`` for splitting free text
into paragraphs of lines.

Every failure is a :class:`~outreach.core.errors.TemplateError` naming the file and line. Messages never carry
context values: they are a candidate's personal data and end up in logs and the outbox's error column.
"""

from __future__ import annotations

import contextvars
import math
import os
import re
import string
import time
import traceback
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import date, datetime
from itertools import islice
from pathlib import Path
from typing import Any, Literal

from jinja2 import FileSystemLoader, StrictUndefined, Template, nodes, select_autoescape
from jinja2 import TemplateError as JinjaTemplateError
from jinja2.exceptions import (
    SecurityError,
    TemplateNotFound,
    TemplateSyntaxError,
    UndefinedError,
)
from jinja2.filters import FILTERS as DEFAULT_FILTERS
from jinja2.runtime import Context
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import missing, object_type_repr

from outreach.core.errors import TemplateError

__all__ = [
    "EMAIL_PARTS",
    "MAX_EMAIL_BYTES",
    "MAX_SMS_CHARS",
    "DataRead",
    "RenderedEmail",
    "RenderedSms",
    "Renderer",
    "sms_segments",
]

CHANNELS = ("email", "sms")
EMAIL_PARTS = ("subject.txt", "txt", "html")

# Runaway guards. 256 KB is far beyond any real recruiting email yet well under provider limits; Twilio
# refuses bodies over 1600 characters.
MAX_EMAIL_BYTES = 256 * 1024
MAX_SUBJECT_CHARS = 998  # RFC 5322 line length
MAX_SMS_CHARS = 1600

_FILE_NAME = re.compile(
    r"^(?P<name>[a-z0-9_]+)\.(?P<locale>[A-Za-z]{2,3}(?:-[A-Za-z0-9]{2,8})*)\.(?P<part>subject\.txt|txt|html)$"
)
_SAFE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")

# Large enough that every template in a real deployment stays compiled for the life of the process.
_CACHE_SIZE = 4096
_RESOLVED_CACHE_LIMIT = 4096
_MAX_REPEAT = 100_000
_MAX_EXPONENT = 1024
_FIRST_BATCH = 2048
# A string a single operation may build (`replace`, `join`, padding widths): far beyond any real message.
_MAX_STRING = 1_000_000
_MAX_WIDTH = 10_000
#: CPU budget of one template render, in seconds of the rendering thread's own CPU time; a real one takes about a
#: millisecond. CPU time, not elapsed time: a worker host that is merely busy (other threads holding the GIL,
#: other processes on the cores) must not fail good messages as runaway templates.
RENDER_TIME_BUDGET = 2.0
# Loops check the clock once per this many items.
_TICK_EVERY = 256


class _TooLong(Exception):
    pass


class _TooSlow(Exception):
    pass


# The deadline of the render running in this thread (None outside a render: previews of single expressions).
_DEADLINE: contextvars.ContextVar[float | None] = contextvars.ContextVar("outreach_render_deadline", default=None)


def _tick() -> None:
    deadline = _DEADLINE.get()
    if deadline is not None and time.thread_time() > deadline:
        raise _TooSlow


def _budgeted(iterable: Any) -> Iterator[Any]:
    """Every ``{% for %}`` iterates through this: the render's time budget holds inside loops that call nothing."""
    for count, item in enumerate(iterable):
        if not count % _TICK_EVERY:
            _tick()
        yield item


_PERCENT_FIELD = re.compile(r"%(?:\([^)]*\))?[#0 +\-]*(\*|\d+)?(?:\.(\*|\d+))?")


def _check_widths(widths: Iterator[str]) -> None:
    for width in widths:
        if width == "*" or "{" in width:
            raise SecurityError("field widths taken from arguments are not allowed")
        if width.isdigit() and int(width) > _MAX_WIDTH:
            raise SecurityError(f"field widths above {_MAX_WIDTH} are not allowed")


def _check_percent_format(template: str) -> None:
    _check_widths(w for m in _PERCENT_FIELD.finditer(template) for w in m.groups() if w)


def _check_brace_format(template: str) -> None:
    try:
        fields = list(string.Formatter().parse(template))
    except ValueError:
        return  # malformed: formatting it fails on its own
    specs = (spec for _, name, spec, _ in fields if name is not None and spec)
    _check_widths(w for spec in specs for w in (["{"] if "{" in spec else re.findall(r"\d+", spec)))


def _too_big(size: int) -> None:
    if size > _MAX_STRING:
        raise SecurityError(f"building a string of more than {_MAX_STRING} characters is not allowed")


def _check_str_call(text: str, method: str, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> None:
    """Refuse str methods whose result would be huge before they build it."""
    if method in {"center", "ljust", "rjust", "zfill"}:
        width = args[0] if args else kwargs.get("width")
        if isinstance(width, int) and width > _MAX_WIDTH:
            raise SecurityError(f"field widths above {_MAX_WIDTH} are not allowed")
    elif method == "expandtabs":
        size = args[0] if args else kwargs.get("tabsize", 8)
        if isinstance(size, int):
            _too_big(len(text) + text.count("\t") * size)
    elif method == "replace" and len(args) >= 2 and isinstance(args[0], str) and isinstance(args[1], str):
        old, new = args[0], args[1]
        hits = text.count(old) if old else len(text) + 1
        _too_big(len(text) + hits * max(0, len(new) - len(old)))
    elif method == "join" and args and hasattr(args[0], "__len__"):
        _too_big(len(text) * max(0, len(args[0]) - 1))
    elif method in {"format", "format_map"}:
        _check_brace_format(text)


def _guard_filter(name: str, check: Any) -> Any:
    original = DEFAULT_FILTERS[name]

    def guarded(*args: Any, **kwargs: Any) -> Any:
        check(*args, **kwargs)
        return original(*args, **kwargs)

    guarded.__name__ = original.__name__
    for attribute in ("jinja_pass_arg",):
        if hasattr(original, attribute):
            setattr(guarded, attribute, getattr(original, attribute))
    return guarded


def _check_width_filter(value: Any, width: Any = 80, *args: Any, **kwargs: Any) -> None:
    width = kwargs.get("width", width)
    if isinstance(width, int) and width > _MAX_WIDTH:
        raise SecurityError(f"field widths above {_MAX_WIDTH} are not allowed")
    if isinstance(width, str) and len(width) > _MAX_WIDTH:
        raise SecurityError(f"indentation longer than {_MAX_WIDTH} characters is not allowed")


def _check_replace_filter(eval_ctx: Any, value: Any, old: Any = "", new: Any = "", *args: Any, **kwargs: Any) -> None:
    if isinstance(value, str) and isinstance(old, str) and isinstance(new, str):
        _check_str_call(value, "replace", (old, new), {})


def _check_join_filter(eval_ctx: Any, value: Any, d: Any = "", *args: Any, **kwargs: Any) -> None:
    if isinstance(d, str) and hasattr(value, "__len__"):
        _too_big(len(d) * max(0, len(value) - 1))


def _check_format_filter(value: Any, *args: Any, **kwargs: Any) -> None:
    if isinstance(value, str):
        _check_percent_format(value)


@dataclass(frozen=True)
class RenderedEmail:
    subject: str
    text: str
    html: str
    locale: str


@dataclass(frozen=True)
class RenderedSms:
    text: str
    locale: str
    encoding: Literal["GSM-7", "UCS-2"]
    segments: int


# --- SMS segments ------------------------------------------------------------------------------------------

_GSM7_BASIC = frozenset(
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
# Each of these is sent as ESC + character, so it costs two septets.
_GSM7_EXTENSION = frozenset("\f^{}\\[]~|€")
_GSM7_ALL = _GSM7_BASIC | _GSM7_EXTENSION


def _split(widths: Iterator[int], per_part: int) -> int:
    # A two-unit character (escape pair, surrogate pair) is never split across parts, so a part may hold
    # one unit less than its capacity; plain division would undercount.
    parts, used = 1, 0
    for width in widths:
        if used + width > per_part:
            parts += 1
            used = 0
        used += width
    return parts


def sms_segments(text: str) -> tuple[str, int]:
    """The encoding an SMS needs and how many segments it is billed as.

    GSM-7 fits 160 septets in one message or 153 per part of a longer one; the extension characters
    ``^{}\\[]~|€`` and form feed take two septets. Any other character (every Chinese character, curly quotes,
    emoji) forces UCS-2: 70 UTF-16 code units in one message or 67 per part, an emoji being two units.
    The empty text is ``("GSM-7", 0)``: nothing would be sent (:meth:`Renderer.render_sms` refuses it).
    """
    if not text:
        return "GSM-7", 0
    chars = set(text)
    if chars <= _GSM7_ALL:
        extended = chars & _GSM7_EXTENSION
        septets = len(text) + (sum(text.count(c) for c in extended) if extended else 0)
        if septets <= 160:
            return "GSM-7", 1
        if not extended:
            return "GSM-7", math.ceil(septets / 153)
        return "GSM-7", _split((2 if c in _GSM7_EXTENSION else 1 for c in text), 153)
    units = len(text.encode("utf-16-le")) // 2
    if units <= 70:
        return "UCS-2", 1
    if units == len(text):
        return "UCS-2", math.ceil(units / 67)
    return "UCS-2", _split((2 if ord(c) > 0xFFFF else 1 for c in text), 67)


# --- Filters -----------------------------------------------------------------------------------------------

_WEEKDAYS_EN = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
_MONTHS_EN = (
    "January", "February", "March", "April", "May", "June",
    "July", "August", "September", "October", "November", "December",
)  # fmt: skip
_WEEKDAYS_ZH = "一二三四五六日"


def _format_date(value: object, locale: str = "en") -> str:
    """``2026-03-02`` → ``Monday, 2 March 2026`` / ``2026年3月2日（星期一）``; anything unparseable as is.

    Written out by hand because strftime follows the process locale, which differs between machines.
    """
    if isinstance(value, datetime):
        day = value.date()
    elif isinstance(value, date):
        day = value
    else:
        try:
            day = date.fromisoformat(str(value).strip()[:10])
        except ValueError:
            return str(value)
    if locale.lower().startswith("zh"):
        return f"{day.year}年{day.month}月{day.day}日（星期{_WEEKDAYS_ZH[day.weekday()]}）"
    return f"{_WEEKDAYS_EN[day.weekday()]}, {day.day} {_MONTHS_EN[day.month - 1]} {day.year}"


def _format_number(value: object) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    return f"{value:,}"


def _paragraphs(value: object) -> list[list[str]]:
    """Free text → paragraphs (split on blank lines) of stripped lines, so HTML can escape each line."""
    blocks = re.split(r"\n\s*\n", str(value or "").replace("\r\n", "\n").strip())
    return [lines for block in blocks if (lines := [line.strip() for line in block.splitlines() if line.strip()])]


# --- Environment -------------------------------------------------------------------------------------------


class _Undefined(StrictUndefined):
    """StrictUndefined whose messages name variables but never echo data.

    A key looked up dynamically (``data[candidate.name]``) would otherwise put a value into the message, so
    only names that look like identifiers are shown.
    """

    __slots__ = ()

    @property
    def _undefined_message(self) -> str:
        name = self._undefined_name
        safe = isinstance(name, str) and _SAFE_NAME.fullmatch(name) is not None
        shown = repr(name) if safe else "(a name computed from data, not shown)"
        obj = self._undefined_obj
        if self._undefined_exception is SecurityError:
            return f"access to attribute {shown} of a {type(obj).__name__!r} object is unsafe"
        if self._undefined_hint:
            return self._undefined_hint
        if obj is missing:
            return f"variable {shown} is undefined"
        return f"{object_type_repr(obj)} has no attribute or key {shown}"


def _format_of(name: str) -> str:
    return name.rsplit(".", 1)[-1]


class _Environment(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset({"*", "**", "%"})

    def _parse(self, source: str, name: str | None, filename: str | None) -> nodes.Template:
        # Every loop iterates through _budgeted, so a loop that outputs nothing still meets the time budget.
        tree = super()._parse(source, name, filename)
        for loop in tree.find_all(nodes.For):
            loop.iter = nodes.Filter(loop.iter, "_budgeted", [], [], None, None, lineno=loop.lineno)
        return tree

    def call(
        __self,
        __context: Context,
        __obj: Any,
        *args: Any,
        **kwargs: Any,
    ) -> Any:
        # Every call (macros included: deep recursion, loops of calls) checks the clock.
        _tick()
        # str.format arrives wrapped by the sandbox (a partial carrying the method as __wrapped__).
        method = getattr(__obj, "__wrapped__", __obj)
        bound = getattr(method, "__self__", None)
        if isinstance(bound, str):
            _check_str_call(bound, getattr(method, "__name__", ""), args, kwargs)
        return super().call(__context, __obj, *args, **kwargs)

    def getattr(self, obj: Any, attribute: str) -> Any:
        # The context is plain dicts: look the key up first. This skips the AttributeError the default order
        # raises for every `candidate.name` (a measurable share of a render) and lets data keys such as
        # `items` win over dict methods.
        if type(obj) is dict:
            try:
                return obj[attribute]
            except KeyError:
                pass
        return super().getattr(obj, attribute)

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        # `"x" * 10**9` or `9 ** 10**8` would exhaust memory or CPU before any output limit is reached.
        if operator == "*":
            for seq, count in ((left, right), (right, left)):
                if isinstance(seq, str | list | tuple) and isinstance(count, int) and len(seq) * count > _MAX_REPEAT:
                    raise SecurityError(f"repetition producing more than {_MAX_REPEAT} items is not allowed")
        elif operator == "**" and isinstance(right, int) and abs(right) > _MAX_EXPONENT:
            raise SecurityError(f"exponents above {_MAX_EXPONENT} are not allowed")
        elif operator == "%" and isinstance(left, str):
            _check_percent_format(left)
        return super().call_binop(context, operator, left, right)

    def join_path(self, template: str, parent: str) -> str:
        # Autoescaping is decided by the *included* file's name: a .txt partial inside an .html email would
        # print candidate data unescaped, and an .html partial in a text part would show `&amp;`.
        if template.endswith(".html") != parent.endswith(".html"):
            raise SecurityError(
                f"{parent} includes {template}; a template may only include or extend files of its own"
                f" format (.{_format_of(parent)})"
            )
        return template


def _scan(root: Path) -> dict[tuple[str, str], dict[str, set[str]]]:
    """(channel, template) → locale → the parts present."""
    index: dict[tuple[str, str], dict[str, set[str]]] = {}
    for channel in CHANNELS:
        folder = root / channel
        if not folder.is_dir():
            continue
        for path in folder.iterdir():
            match = _FILE_NAME.match(path.name)
            if match is None or not path.is_file():
                continue
            part = match["part"]
            if channel == "sms" and part != "txt":
                continue
            index.setdefault((channel, match["name"]), {}).setdefault(match["locale"], set()).add(part)
    return index


@dataclass(frozen=True)
class DataRead:
    """A template reading ``event.data.<path>`` at ``file``:``line``."""

    file: str
    line: int
    path: tuple[str, ...]


#: Mapping methods a template may call on the data without naming a field.
_MAPPING_METHODS = frozenset({"get", "items", "keys", "values"})


def _data_reads(tree: nodes.Template) -> list[tuple[int, tuple[str, ...]]]:
    """(line, path below ``event.data``) for every attribute or key read under it, in source order."""
    names: dict[str, tuple[str, ...]] = {"event": ("event",)}

    def resolve(node: nodes.Node) -> tuple[str, ...] | None:
        if isinstance(node, nodes.Name):
            return names.get(node.name)
        if isinstance(node, nodes.Getattr):
            base = resolve(node.node)
            return None if base is None else (*base, node.attr)
        if isinstance(node, nodes.Getitem) and isinstance(node.arg, nodes.Const):
            base = resolve(node.node)
            if base is None:
                return None
            return (*base, "[]") if isinstance(node.arg.value, int) else (*base, str(node.arg.value))
        if isinstance(node, nodes.Filter) and node.name == "default" and node.node is not None:
            return resolve(node.node)
        return None

    reads: list[tuple[int, tuple[str, ...]]] = []
    for node in tree.find_all((nodes.Assign, nodes.For, nodes.Getattr, nodes.Getitem)):
        if isinstance(node, nodes.Assign) and isinstance(node.target, nodes.Name):
            path = resolve(node.node)
            if path is not None and path[:2] == ("event", "data"):
                names[node.target.name] = path
        elif isinstance(node, nodes.For) and isinstance(node.target, nodes.Name):
            path = resolve(node.iter)
            if path is not None and path[:2] == ("event", "data"):
                names[node.target.name] = (*path, "[]")
        elif isinstance(node, nodes.Getattr | nodes.Getitem):
            path = resolve(node)
            if path is not None and path[:2] == ("event", "data") and len(path) > 2:
                below = path[2:]
                if below[-1] not in _MAPPING_METHODS:
                    reads.append((node.lineno, below))
    return reads


class Renderer:
    """Compiles each template once (``auto_reload`` is off: templates change with a deploy, not at run time).

    Build one per process and share it; it is safe to use from several threads.
    """

    def __init__(self, templates_dir: Path, default_locale: str = "en") -> None:
        self.templates_dir = Path(templates_dir)
        self.default_locale = default_locale
        self._root = os.path.abspath(self.templates_dir)
        self.environment = _Environment(
            loader=FileSystemLoader(self._root),
            undefined=_Undefined,
            autoescape=select_autoescape(enabled_extensions=("html",), default_for_string=False, default=False),
            auto_reload=False,
            cache_size=_CACHE_SIZE,
            trim_blocks=True,
            lstrip_blocks=True,
            keep_trailing_newline=True,
        )
        self.environment.filters["date"] = _format_date
        self.environment.filters["number"] = _format_number
        self.environment.filters["paragraphs"] = _paragraphs
        self.environment.filters["_budgeted"] = _budgeted
        self.environment.filters["center"] = _guard_filter("center", _check_width_filter)
        self.environment.filters["indent"] = _guard_filter("indent", _check_width_filter)
        self.environment.filters["replace"] = _guard_filter("replace", _check_replace_filter)
        self.environment.filters["join"] = _guard_filter("join", _check_join_filter)
        self.environment.filters["format"] = _guard_filter("format", _check_format_filter)
        # Lorem ipsum has no place in a real message, and lipsum(n=10**9) would run for ever.
        self.environment.globals.pop("lipsum", None)
        self.time_budget = RENDER_TIME_BUDGET
        self._index = _scan(Path(self._root))
        self._compiled: dict[str, Template] = {}
        self._resolved: dict[tuple[str, str, str | None], str] = {}

    # -- what exists ----------------------------------------------------------------------------------------

    def locales(self, channel: str, template: str) -> list[str]:
        """Locales in which the template is complete (all three parts for email), sorted."""
        entry = self._index.get((str(channel), template), {})
        needed = set(EMAIL_PARTS) if channel == "email" else {"txt"}
        return sorted(locale for locale, parts in entry.items() if needed <= parts)

    def incomplete_locales(self, channel: str, template: str) -> dict[str, list[str]]:
        """Locales with only some email parts: locale → file names missing (relative to the templates folder)."""
        entry = self._index.get((str(channel), template))
        if not entry or channel != "email":
            return {}
        return {
            locale: [f"email/{template}.{locale}.{part}" for part in EMAIL_PARTS if part not in parts]
            for locale, parts in sorted(entry.items())
            if not set(EMAIL_PARTS) <= parts
        }

    def data_reads(self, channel: str, template: str, locale: str) -> list[DataRead]:
        """Every place the template's files (in ``locale``) read ``event.data``, found in their syntax trees.

        Reads through a name are followed (``{% set data = event.data %}`` then ``data.hr_contact.name``, also
        through ``default(...)`` and ``{% for item in data.documents %}``); a list's item is ``[]`` in the path.
        Partials a file includes are not followed (rendering still checks them)."""
        parts = EMAIL_PARTS if channel == "email" else ("txt",)
        reads: list[DataRead] = []
        for part in parts:
            name = f"{channel}/{template}.{locale}.{part}"
            try:
                source, _, _ = self.environment.loader.get_source(self.environment, name)  # type: ignore[union-attr]
                tree = self.environment.parse(source)
            except (OSError, JinjaTemplateError):
                continue
            reads.extend(DataRead(name, line, path) for line, path in dict.fromkeys(_data_reads(tree)))
        return reads

    def template_names(self, channel: str) -> list[str]:
        return sorted(name for (ch, name) in self._index if ch == channel)

    def resolve_locale(self, channel: str, template: str, locale: str | None) -> str:
        key = (str(channel), template, locale)
        found = self._resolved.get(key)
        if found is not None:
            return found
        found = self._resolve(str(channel), template, locale)
        if len(self._resolved) >= _RESOLVED_CACHE_LIMIT:
            # Locales come from ATS data; never let odd values grow this without bound.
            self._resolved.clear()
        self._resolved[key] = found
        return found

    def _resolve(self, channel: str, template: str, locale: str | None) -> str:
        if channel not in CHANNELS:
            raise TemplateError(f"{channel}/{template}", f"unknown channel {channel!r}; use email or sms")
        available = self.locales(channel, template)
        if not available:
            expected = (
                f"email/{template}.{self.default_locale}.subject.txt, .txt and .html"
                if channel == "email"
                else f"sms/{template}.{self.default_locale}.txt"
            )
            raise TemplateError(
                f"{channel}/{template}", f"does not exist in any locale; expected {expected} in the templates folder"
            )
        for wanted in (locale, self.default_locale):
            if wanted:
                match = _match_locale(available, wanted)
                if match is not None:
                    return match
        raise TemplateError(
            f"{channel}/{template}",
            f"has no version for {locale!r} nor for the default locale {self.default_locale!r}"
            f" (only {', '.join(available)}); add a {self.default_locale} version",
        )

    # -- rendering ------------------------------------------------------------------------------------------

    def render_email(self, template: str, locale: str | None, context: Mapping[str, Any]) -> RenderedEmail:
        resolved = self.resolve_locale("email", template, locale)
        base = f"email/{template}.{resolved}"
        subject = " ".join(self._render(f"{base}.subject.txt", context, MAX_SUBJECT_CHARS).split())
        if not subject:
            raise TemplateError(f"{base}.subject.txt", "the subject rendered empty")
        text = self._render(f"{base}.txt", context, MAX_EMAIL_BYTES - len(subject)).strip()
        if not text:
            raise TemplateError(f"{base}.txt", "the text part rendered empty")
        html = self._render(f"{base}.html", context, MAX_EMAIL_BYTES - len(subject) - len(text)).strip()
        size = len(subject) + len(text) + len(html)
        # Characters never outnumber UTF-8 bytes, so encoding is only needed when the result could be close.
        if size * 4 > MAX_EMAIL_BYTES:
            size = sum(len(part.encode("utf-8")) for part in (subject, text, html))
            if size > MAX_EMAIL_BYTES:
                raise TemplateError(base, f"the email is {size} bytes, over the {MAX_EMAIL_BYTES} byte limit")
        return RenderedEmail(subject=subject, text=text, html=html, locale=resolved)

    def render_sms(self, template: str, locale: str | None, context: Mapping[str, Any]) -> RenderedSms:
        resolved = self.resolve_locale("sms", template, locale)
        name = f"sms/{template}.{resolved}.txt"
        text = self._render(name, context, MAX_SMS_CHARS).strip()
        if not text:
            raise TemplateError(name, "the SMS rendered empty")
        encoding, segments = sms_segments(text)
        return RenderedSms(
            text=text,
            locale=resolved,
            encoding="UCS-2" if encoding == "UCS-2" else "GSM-7",
            segments=segments,
        )

    def _template(self, name: str) -> Template:
        template = self._compiled.get(name)
        if template is None:
            try:
                template = self.environment.get_template(name)
            except Exception as exc:
                raise self._error(name, exc) from None
            self._compiled[name] = template
        return template

    def _render(self, name: str, context: Mapping[str, Any], limit: int) -> str:
        template = self._template(name)
        try:
            return self._collect(template, context, limit)
        except _TooLong:
            raise TemplateError(name, f"output exceeds the limit of {limit} characters; is a loop runaway?") from None
        except _TooSlow:
            raise TemplateError(
                name, f"rendering took longer than the budget of {self.time_budget:g} seconds; is a loop runaway?"
            ) from None
        except Exception as exc:
            raise self._error(name, exc) from None

    def _collect(self, template: Template, context: Mapping[str, Any], limit: int) -> str:
        # Template.render minus its extra generator layer, plus a size check. A real message is a few hundred
        # chunks, so the first batch is all of it and is joined at C speed; only a runaway loop reaches the
        # batch-by-batch path, which stops it as soon as it passes the limit.
        deadline = _DEADLINE.set(time.thread_time() + self.time_budget)
        try:
            variables = context if isinstance(context, dict) else dict(context)
            stream = template.root_render_func(template.new_context(variables))
            text = "".join(islice(stream, _FIRST_BATCH))
            size = len(text)
            if size > limit:
                raise _TooLong
            chunks = [text]
            while batch := list(islice(stream, _FIRST_BATCH)):
                chunk = "".join(batch)
                size += len(chunk)
                if size > limit:
                    raise _TooLong
                chunks.append(chunk)
                _tick()
        except (_TooLong, _TooSlow):
            raise
        except Exception:
            # Rewrites the traceback to template file names and lines, which _where() reports.
            self.environment.handle_exception()
        finally:
            _DEADLINE.reset(deadline)
        return text if len(chunks) == 1 else "".join(chunks)

    # -- errors ---------------------------------------------------------------------------------------------

    def _where(self, exc: BaseException) -> str:
        """The innermost template file and line in a traceback Jinja has rewritten to template lines."""
        prefix = self._root + os.sep
        for frame in reversed(traceback.extract_tb(exc.__traceback__)):
            if frame.filename.startswith(prefix):
                relative = frame.filename[len(prefix) :].replace(os.sep, "/")
                return f"{relative} line {frame.lineno}"
        return ""

    def _error(self, name: str, exc: Exception) -> TemplateError:
        if isinstance(exc, TemplateSyntaxError):
            where = f"{exc.name or name} line {exc.lineno}"
            return TemplateError(name, f"syntax error at {where}: {exc.message}")
        if isinstance(exc, TemplateNotFound):
            missing_name = exc.name if isinstance(exc.name, str) else str(exc.message)
            if missing_name == name:
                return TemplateError(name, "does not exist in the templates folder")
            at = self._where(exc)
            return TemplateError(name, f"includes {missing_name}, which does not exist" + (f" (at {at})" if at else ""))
        at = self._where(exc)
        at_text = f" at {at}" if at else ""
        if isinstance(exc, SecurityError):
            return TemplateError(name, f"blocked by the sandbox{at_text}: {exc.message}")
        if isinstance(exc, UndefinedError):
            return TemplateError(name, f"undefined variable{at_text}: {exc.message}")
        if isinstance(exc, JinjaTemplateError):
            return TemplateError(name, f"{type(exc).__name__}{at_text}: {exc.message}")
        # Other exceptions' messages can quote the values involved (int("Zhang Wei")); TypeError and
        # arithmetic errors describe types and operations only.
        detail = f": {exc}" if isinstance(exc, TypeError | ArithmeticError) else ""
        return TemplateError(name, f"{type(exc).__name__}{at_text}{detail}")


def _match_locale(available: list[str], wanted: str) -> str | None:
    wanted = wanted.strip().replace("_", "-").lower()
    by_lower = {locale.lower(): locale for locale in available}
    if wanted in by_lower:
        return by_lower[wanted]
    language = wanted.split("-", 1)[0]
    if language in by_lower:
        return by_lower[language]
    same = [locale for locale in available if locale.lower().split("-", 1)[0] == language]
    return same[0] if same else None
