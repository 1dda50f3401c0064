"""The template sandbox's resource limits: no single operation of a template can run away.

The render budget is checked between operations (every call and filter, every loop item, every batch of output), but
one Python operation cannot be interrupted: ``((9**1024)**1024)**1024`` is three multiplications of numbers with
millions of digits, ``(['a' * 100000] * 100000)|join`` one ``str.join`` of ten billion characters. So every operation
that could build something big is checked *before* it runs, from the size of its operands:

* integers: no result above :data:`MAX_INT_BITS` bits (``**`` and ``*`` are refused from their operands' bit
  lengths; ``+``, ``-``, the ``int`` filter and ``int.from_bytes`` after the fact, which costs no more than reading
  the operands);
* strings and collections: no value above :data:`MAX_SIZE` (:func:`size_of`) from repetition, concatenation
  (``+``, ``~``), ``join``, ``%`` and ``format`` (fields × arguments + widths), padding, ``replace``,
  ``translate``, ``indent``, ``wordwrap``, ``urlize``, ``batch``, ``slice``, a captured block or macro output, or a
  list, tuple or dict literal holding big values; the filters that print a multiple of their input (escaping,
  JSON, URL encoding, ``pprint``) are checked with their worst factor;
* work: ``wordwrap`` is quadratic on long words; codecs other than the usual ones written in C are refused
  (``punycode`` is quadratic).

A value a template holds is at most MAX_SIZE, so operations that only read values (comparisons, ``in``, sorting,
printing) stay linear in it. Values of the context (the candidate, the job, the event data) are the application's
and are not limited here; whatever a template builds from them is.
"""

from __future__ import annotations

import codecs
import contextvars
import re
import string
import time
from collections import Counter
from collections.abc import Callable, ItemsView, Iterable, Iterator, KeysView, Mapping, ValuesView
from contextlib import contextmanager
from decimal import Decimal
from itertools import chain, islice
from typing import Any, TypeGuard

from jinja2.exceptions import SecurityError
from jinja2.runtime import markup_join, str_join
from jinja2.utils import Cycler, Namespace, _PassArg

__all__ = [
    "MAX_INT_BITS",
    "MAX_ITEMS",
    "MAX_SIZE",
    "MAX_WIDTH",
    "TooSlow",
    "bounded_concat",
    "budget",
    "budgeted",
    "check_binop",
    "check_call",
    "check_value",
    "finalize",
    "guard_filter",
    "join_values",
    "size_of",
    "tick",
]

#: Integers a template computes: 4096 bits is 1234 decimal digits.
MAX_INT_BITS = 4096
#: The size of a value a template builds (:func:`size_of`): far beyond any real message, which is capped at 256 KB.
MAX_SIZE = 1_000_000
#: Field widths and precisions (``%10s``, ``{:>10}``, ``center``, ``indent``).
MAX_WIDTH = 10_000
#: Counts a filter is asked to make things in (``batch``'s line count, ``slice``'s slices), as many as ``range``.
MAX_ITEMS = 100_000
#: Characters ``wordwrap`` may copy: it copies the rest of a word too long for a line once per line.
_MAX_WRAP_WORK = 4 * 10**9
#: Digits ``round`` may be asked for: as many as the biggest integer has.
_MAX_DIGITS = MAX_INT_BITS * 3 // 10 + 1
#: What a format field adds beyond its argument: a float printed with ``%f`` takes up to 316 characters.
_FIELD_SLACK = 320
#: How much longer than itself a string can print inside a container: ``\U000e0001`` is 10 characters for one.
_REPR_FACTOR = 10
#: A float, a date, None, a function: counted as this many characters.
_SCALAR = 8
_SEQUENCES = (str, bytes, bytearray, list, tuple)
# Codecs implemented in C, linear in their input (punycode, written in Python, is quadratic).
_SAFE_CODECS = frozenset(
    {
        "ascii", "utf-8", "utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-32-le", "utf-32-be", "latin-1",
        "iso8859-1", "cp1252", "gb2312", "gbk", "gb18030", "big5", "shift_jis", "euc_jp", "euc_kr",
    }
)  # fmt: skip
_SAFE_ERRORS = frozenset({"strict", "ignore", "replace"})
# Words long enough for wordwrap's cutting them to cost more than the lines they fill.
_LONG_WORD = re.compile(r"\S{256,}")


def _too_big() -> SecurityError:
    return SecurityError(f"building a value of more than {MAX_SIZE} characters or items is not allowed")


def _int_too_big() -> SecurityError:
    return SecurityError(f"integers of more than {MAX_INT_BITS} bits are not allowed")


def _width_too_big() -> SecurityError:
    return SecurityError(f"field widths above {MAX_WIDTH} are not allowed")


def _refuse_over(size: int) -> None:
    if size > MAX_SIZE:
        raise _too_big()


def _is_int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int)


# --- the CPU budget ----------------------------------------------------------------------------------------


class TooSlow(Exception):
    """The render ran past its CPU budget."""


class _Clock:
    """The CPU-time deadline of a render. Reading a thread's CPU time is a system call (microseconds), so it is read
    only once elapsed time shows that enough of it may have passed: a thread never uses more CPU than time passes."""

    __slots__ = ("deadline", "next_look")

    def __init__(self, seconds: float) -> None:
        self.deadline = time.thread_time() + seconds
        self.next_look = time.perf_counter() + _LOOK_EVERY


# The clock of the render running in this thread (None outside a render: previews of single expressions).
_CLOCK: contextvars.ContextVar[_Clock | None] = contextvars.ContextVar("outreach_render_clock", default=None)
#: Seconds between two readings of the CPU clock, at most: what the budget may be overrun by.
_LOOK_EVERY = 0.005


@contextmanager
def budget(seconds: float) -> Iterator[None]:
    """Give what runs inside ``seconds`` of this thread's CPU time (not elapsed time: a worker host that is merely
    busy must not fail good messages as runaway templates)."""
    token = _CLOCK.set(_Clock(seconds))
    try:
        yield
    finally:
        _CLOCK.reset(token)


def tick() -> None:
    """Raise :class:`TooSlow` once the render has used its budget; cheap enough to call for every loop item."""
    clock = _CLOCK.get()
    if clock is None:
        return
    now = time.perf_counter()
    if now < clock.next_look:
        return
    clock.next_look = now + _LOOK_EVERY
    if time.thread_time() > clock.deadline:
        raise TooSlow


def budgeted(iterable: Any) -> Iterator[Any]:
    """Every ``{% for %}`` iterates through this: the render's time budget holds inside loops that call nothing."""
    for item in iterable:
        tick()
        yield item


# --- sizes -------------------------------------------------------------------------------------------------


def _items(value: Any) -> list[Any] | tuple[Any, ...] | None:
    """The items of a collection (a mapping's keys and values), read without calling a subclass's own methods (the
    batch path's probes count a read as use); None for anything else."""
    if type(value) is list or type(value) is tuple:
        return value
    if isinstance(value, list):
        return list(list.__iter__(value))
    if isinstance(value, tuple):
        return tuple(tuple.__iter__(value))
    if isinstance(value, set | frozenset):
        return tuple(value)
    if isinstance(value, dict):
        return (*dict.keys(value), *dict.values(value))
    if isinstance(value, KeysView | ValuesView | ItemsView):
        return tuple(value)
    if isinstance(value, Namespace):
        return _items(object.__getattribute__(value, "_Namespace__attrs"))
    if isinstance(value, Cycler):
        return _items(value.items)
    return None


def size_of(value: Any, limit: int = MAX_SIZE, *, factor: int = 1, indent: int = 0) -> int:
    """Roughly the characters it takes to print ``value``: a string's length, an integer's digits, a collection's
    items each with its own size — a list holding one string a thousand times counts it a thousand times, as
    printing or joining it would. Counting stops as soon as it passes ``limit``; collections of strings or numbers
    are measured at C speed and an item repeated in a big collection once, so a value of any shape costs little.

    ``factor`` multiplies the strings' lengths (escaping, JSON); ``indent`` adds that many characters per nesting
    level to each item (``pprint``, ``tojson(indent=…)``)."""
    if isinstance(value, str):
        return len(value) * factor
    total = 0
    steps = 0
    # (a value, its nesting depth, how many times it counts)
    pending: list[tuple[Any, int, int]] = [(value, 0, 1)]
    while pending:
        item, depth, times = pending.pop()
        steps += 1
        if not steps % 4096:
            tick()
        if isinstance(item, str | bytes | bytearray):
            total += len(item) * factor * times
        elif isinstance(item, int):
            total += (item.bit_length() // 3 + 1) * times
        elif isinstance(item, range):
            try:
                widest = max(abs(item.start), abs(item.stop)).bit_length() // 3 + 2
                total += (1 + len(item) * widest) * times
            except OverflowError:
                return limit + 1
        else:
            items = _items(item)
            if items is None:
                total += _SCALAR * times
            else:
                count = len(items)
                total += (1 + count * (1 + indent * (depth + 1))) * times
                if total > limit:
                    return total
                kinds = set(map(type, items))
                if all(issubclass(kind, str | bytes | bytearray) for kind in kinds):
                    total += sum(map(len, items)) * factor * times
                elif all(issubclass(kind, int) for kind in kinds):
                    total += (sum(map(int.bit_length, items)) // 3 + count) * times
                elif count > 64:
                    # Each item once, however often the collection holds it.
                    objects = dict(zip(map(id, items), items, strict=True))
                    repeats = Counter(map(id, items))
                    pending.extend((objects[key], depth + 1, times * n) for key, n in repeats.items())
                else:
                    pending.extend((child, depth + 1, times) for child in items)
        if total > limit:
            return total
    return total


def check_value(value: Any) -> Any:
    """Refuse a value a template built if it is over the limits; returns it."""
    if isinstance(value, str):
        if len(value) > MAX_SIZE:
            raise _too_big()
    elif isinstance(value, int):
        if value.bit_length() > MAX_INT_BITS:
            raise _int_too_big()
    elif size_of(value) > MAX_SIZE:
        raise _too_big()
    return value


def _printed_size(value: Any) -> int:
    return len(value) if isinstance(value, str) else size_of(value, factor=_REPR_FACTOR)


def finalize(value: Any) -> Any:
    """Every ``{{ … }}`` goes through this before it is turned into text."""
    if type(value) is not str and _printed_size(value) > MAX_SIZE:
        raise _too_big()
    return value


def _take(items: Iterator[Any]) -> list[Any]:
    taken = list(islice(items, MAX_SIZE + 1))
    if len(taken) > MAX_SIZE:
        raise _too_big()
    return taken


def join_values(values: tuple[Any, ...], markup: bool) -> str:
    """``a ~ b ~ c``: each value printed, then joined, once the total is known to fit."""
    total = 0
    for value in values:
        total += _printed_size(value)
        if total > MAX_SIZE:
            raise _too_big()
    return markup_join(values) if markup else str_join(values)


def bounded_concat(parts: Iterable[str]) -> str:
    """What joins a block's output into one string (``{% set %}…{% endset %}``, a macro's or ``caller()``'s
    result, a filter block), stopping at MAX_SIZE rather than after joining it."""
    pieces = []
    total = 0
    for piece in parts:
        total += len(piece)
        if total > MAX_SIZE:
            raise _too_big()
        pieces.append(piece)
    return "".join(pieces)


# --- operators ---------------------------------------------------------------------------------------------


def check_binop(operator: str, left: Any, right: Any) -> None:
    """Refuse ``left <operator> right`` if its result would be over the limits, before it is computed."""
    ints = _is_int(left) and _is_int(right)
    if operator == "**":
        # |left| ** right has at least (bits of |left| - 1) * right + 1 bits.
        if ints and right > 1 and abs(left) > 1 and (abs(left).bit_length() - 1) * right >= MAX_INT_BITS:
            raise _int_too_big()
    elif operator == "*":
        if ints:
            if left.bit_length() + right.bit_length() > MAX_INT_BITS + 1:
                raise _int_too_big()
            return
        for seq, count in ((left, right), (right, left)):
            if isinstance(seq, _SEQUENCES) and _is_int(count) and count > 1:
                _refuse_over(size_of(seq) * count)
    elif operator == "+":
        if isinstance(left, _SEQUENCES) and isinstance(right, _SEQUENCES):
            _refuse_over(size_of(left) + size_of(right))
    elif operator == "%" and isinstance(left, str | bytes):
        check_percent_format(left, right)


# --- formatting --------------------------------------------------------------------------------------------

_PERCENT_FIELD = re.compile(r"%(?:%|(?:\([^)]*\))?[#0 +\-]*(\*|\d+)?(?:\.(\*|\d+))?[hlL]?([A-Za-z]?))")


def _width(number: str | None) -> int:
    if not number:
        return 0
    if number == "*" or "{" in number:
        raise SecurityError("field widths taken from arguments are not allowed")
    if len(number) > 5 or int(number) > MAX_WIDTH:
        raise _width_too_big()
    return int(number)


def _format_estimate(template_size: int, fields: int, widths: int, repr_fields: int, values: Iterable[Any]) -> None:
    if not fields:
        return
    biggest = max((size_of(value) for value in values), default=0) + _FIELD_SLACK
    _refuse_over(template_size + widths + (fields + repr_fields * (_REPR_FACTOR - 1)) * biggest)


def _arguments(args: Any) -> Iterable[Any]:
    if isinstance(args, Mapping):
        return dict.values(args) if isinstance(args, dict) else args.values()
    if isinstance(args, tuple):
        return args
    return (args,)


def check_percent_format(template: str | bytes, args: Any) -> None:
    """``template % args``: widths up to MAX_WIDTH, and no result over MAX_SIZE (each field counted as big as the
    biggest argument)."""
    text = template.decode("latin-1") if isinstance(template, bytes) else template
    fields = widths = repr_fields = 0
    for match in _PERCENT_FIELD.finditer(text):
        if match.group(0) == "%%":
            continue
        width, precision, kind = match.groups()
        widths += _width(width) + _width(precision)
        fields += 1
        repr_fields += kind in ("r", "a")
    _format_estimate(len(text), fields, widths, repr_fields, _arguments(args))


def check_brace_format(template: str, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> None:
    """``template.format(*args, **kwargs)``, the same way as :func:`check_percent_format`."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError:
        return  # malformed: formatting it fails on its own
    fields = widths = repr_fields = 0
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        fields += 1
        repr_fields += conversion in ("r", "a")
        if spec:
            numbers = ["{"] if "{" in spec else re.findall(r"\d+", spec)
            widths += sum(_width(number) for number in numbers)
    _format_estimate(len(template), fields, widths, repr_fields, chain(args, _arguments(kwargs)))


# --- calls -------------------------------------------------------------------------------------------------


def _check_text_method(
    text: str | bytes | bytearray, name: str, args: tuple[Any, ...], kwargs: Mapping[str, Any]
) -> tuple[Any, ...]:
    if name in {"center", "ljust", "rjust", "zfill"}:
        width = args[0] if args else kwargs.get("width")
        if _is_int(width) and width > MAX_WIDTH:
            raise _width_too_big()
    elif name == "expandtabs":
        size = args[0] if args else kwargs.get("tabsize", 8)
        if _is_int(size):
            tabs = text.count("\t") if isinstance(text, str) else text.count(b"\t")
            _refuse_over(len(text) + tabs * max(size, 0))
    elif name == "replace" and len(args) >= 2:
        old, new = args[0], args[1]
        if isinstance(old, str | bytes | bytearray) and isinstance(new, str | bytes | bytearray):
            try:
                hits = text.count(old) if old else len(text) + 1  # type: ignore[arg-type]
            except TypeError:
                return args  # str and bytes mixed: the call fails on its own
            _refuse_over(len(text) + hits * max(0, len(new) - len(old)))
    elif name == "join" and args:
        items = args[0]
        if isinstance(items, Iterator):
            items = _take(items)
            args = (items, *args[1:])
        if hasattr(items, "__len__"):
            _refuse_over(size_of(items) + len(text) * max(0, len(items) - 1))
    elif name in {"format", "format_map"} and isinstance(text, str):
        if name == "format":
            check_brace_format(text, args, kwargs)
        elif args and isinstance(args[0], Mapping):
            check_brace_format(text, (), args[0])
    elif name == "translate" and isinstance(text, str) and args:
        table = args[0]
        found = _items(table.values() if isinstance(table, Mapping) else table)
        biggest = 1 if found is None else max((size_of(value) for value in found), default=1)
        _refuse_over(len(text) * max(biggest, 1))
    elif name in {"encode", "decode"}:
        encoding = args[0] if args else kwargs.get("encoding", "utf-8")
        errors = args[1] if len(args) > 1 else kwargs.get("errors", "strict")
        try:
            codec = codecs.lookup(encoding).name if isinstance(encoding, str) else ""
        except LookupError:
            return args  # the call fails on its own
        if codec not in _SAFE_CODECS:
            raise SecurityError(f"the codec {codec or encoding!r} is not allowed in templates")
        if errors not in _SAFE_ERRORS:
            raise SecurityError("only the errors handlers strict, ignore and replace are allowed in templates")
    return args


def check_call(obj: Any, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> tuple[Any, ...]:
    """Refuse a call of a string, bytes or integer method whose result would be over the limits, before it runs.
    Returns the arguments to call with (an iterator given to ``join`` becomes a list, to be measured)."""
    # str.format arrives wrapped by the sandbox (a function carrying the method as __wrapped__).
    method = getattr(obj, "__wrapped__", obj)
    bound = getattr(method, "__self__", None)
    name = getattr(method, "__name__", "")
    if isinstance(bound, str | bytes | bytearray):
        return _check_text_method(bound, name, args, kwargs)
    if _is_int(bound) and name == "to_bytes":
        length = args[0] if args else kwargs.get("length", 1)
        if _is_int(length):
            _refuse_over(length)
    return args


# --- filters -----------------------------------------------------------------------------------------------


def _check_center(value: Any, width: Any = 80) -> None:
    if _is_int(width) and width > MAX_WIDTH:
        raise _width_too_big()


def _check_indent(s: Any, width: Any = 4, first: bool = False, blank: bool = False) -> None:
    size = len(width) if isinstance(width, str) else width if _is_int(width) else 0
    if size > MAX_WIDTH:
        raise _width_too_big()
    if isinstance(s, str):
        _refuse_over(len(s) + (s.count("\n") + 1) * max(size, 0))


def _check_wordwrap(
    s: Any,
    width: Any = 79,
    break_long_words: bool = True,
    wrapstring: Any = None,
    break_on_hyphens: bool = True,
) -> None:
    if not isinstance(s, str) or not _is_int(width) or width < 1:
        return
    # Every line holds a character at least, and ends with the wrap string.
    _refuse_over(len(s) * (1 + (len(wrapstring) if isinstance(wrapstring, str) else 1)))
    if break_long_words:
        # A word longer than a line is cut one line at a time, copying the rest of it each time; shorter words
        # cost no more than the lines they fill.
        work = sum(
            length * (length // width + 1)
            for length in (match.end() - match.start() for match in _LONG_WORD.finditer(s))
        )
        if work > _MAX_WRAP_WORK:
            raise SecurityError(f"wrapping {len(s)} characters at width {width} is too much work")


def _check_replace(s: Any, old: Any = "", new: Any = "", count: Any = None) -> None:
    if isinstance(s, str) and isinstance(old, str) and isinstance(new, str):
        _check_text_method(s, "replace", (old, new), {})


def _check_join(value: Any, d: Any = "", attribute: Any = None) -> None:
    if hasattr(value, "__len__"):
        _refuse_over(size_of(value) + len(str(d)) * max(0, len(value) - 1))


def _check_format(value: Any, *args: Any, **kwargs: Any) -> None:
    if isinstance(value, str):
        check_percent_format(value, kwargs or args)


def _check_parts(parts: Any) -> None:
    if _is_int(parts) and parts > MAX_ITEMS:
        raise SecurityError(f"splitting into more than {MAX_ITEMS} parts is not allowed")


def _check_batch(value: Any, linecount: Any = None, fill_with: Any = None) -> None:
    _check_parts(linecount)


def _check_slice(value: Any, slices: Any = None, fill_with: Any = None) -> None:
    _check_parts(slices)


def _check_sum(iterable: Any, attribute: Any = None, start: Any = 0) -> None:
    if not isinstance(start, int | float | Decimal):
        raise SecurityError("sum only adds numbers in templates")


def _check_round(value: Any, precision: Any = 0, method: Any = "common") -> None:
    # round(5, -10**7) computes 10 ** 10**7 first, and so do the floor and ceil methods.
    if _is_int(precision) and abs(precision) > _MAX_DIGITS:
        raise SecurityError(f"rounding to more than {_MAX_DIGITS} digits is not allowed")


def _check_urlize(
    value: Any,
    trim_url_limit: Any = None,
    nofollow: bool = False,
    target: Any = None,
    rel: Any = None,
    extra_schemes: Any = None,
) -> None:
    text = str(value) if isinstance(value, str) else ""
    per_link = 80 + size_of(target) + size_of(rel)
    _refuse_over(2 * len(text) + len(text.split()) * per_link)


def _expands(
    factor: int, *, per_level: int = 0, indent_argument: bool = False, printed: bool = True, strings: bool = True
) -> Callable[..., None]:
    """A check for a filter printing up to ``factor`` characters for each character of the strings in its value;
    ``printed``: a value that is not a string is printed first (its strings quoted and escaped: up to
    ``_REPR_FACTOR`` times longer); ``per_level``: characters added to each item per nesting level, or the
    filter's ``indent`` argument; ``strings``: False if the filter gives a string back as it is."""

    def check(value: Any, *args: Any, **kwargs: Any) -> None:
        if isinstance(value, int | float) or value is None or (isinstance(value, str) and not strings):
            return
        levels = per_level
        if indent_argument:
            indent = kwargs.get("indent", args[0] if args else None)
            levels = len(indent) if isinstance(indent, str) else indent if _is_int(indent) else 0
            if levels > MAX_WIDTH:
                raise _width_too_big()
        scale = factor * _REPR_FACTOR if printed and not isinstance(value, str) else factor
        _refuse_over(size_of(value, factor=scale, indent=max(levels, 0)))

    return check


_FILTER_CHECKS: dict[str, Callable[..., None]] = {
    "center": _check_center,
    "indent": _check_indent,
    "wordwrap": _check_wordwrap,
    "replace": _check_replace,
    "join": _check_join,
    "format": _check_format,
    "batch": _check_batch,
    "slice": _check_slice,
    "sum": _check_sum,
    "round": _check_round,
    "urlize": _check_urlize,
    # & becomes &amp;, ' becomes &#39;: five characters for one.
    "escape": _expands(5),
    "e": _expands(5),
    "forceescape": _expands(5),
    "xmlattr": _expands(5),
    # A character outside the BMP is \ud83d\ude00 in JSON and %F0%9F%98%80 in a URL.
    "tojson": _expands(12, indent_argument=True, printed=False),
    "urlencode": _expands(12),
    "pprint": _expands(_REPR_FACTOR, per_level=1, printed=False),
    "string": _expands(1, strings=False),
}


def guard_filter(name: str, function: Callable[..., Any]) -> Callable[..., Any]:
    """``function`` (a filter) checking the budget, its arguments before it runs and its result after.

    A generator given to a filter is read into a list first (at most MAX_SIZE items), so the check sees what the
    filter will."""
    check = _FILTER_CHECKS.get(name)
    # Filters that take the context, the eval context or the environment first get the value second.
    offset = 0 if _PassArg.from_obj(function) is None else 1

    def guarded(*args: Any, **kwargs: Any) -> Any:
        tick()
        if len(args) > offset and isinstance(args[offset], Iterator):
            args = (*args[:offset], _take(args[offset]), *args[offset + 1 :])
        if check is not None:
            check(*args[offset:], **kwargs)
        result = function(*args, **kwargs)
        return result if type(result) is str and len(result) <= MAX_SIZE else check_value(result)

    guarded.__name__ = getattr(function, "__name__", name)
    if hasattr(function, "jinja_pass_arg"):
        guarded.jinja_pass_arg = function.jinja_pass_arg  # type: ignore[attr-defined]
    return guarded
