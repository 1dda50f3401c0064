"""Logging set-up. Log records carry ids and codes only; personal data never goes into a log line.

Database and driver errors are the exception to watch: their text quotes what was being written. PostgreSQL's
``DETAIL`` names the duplicate key (``Key (external_id)=(…) already exists``), its ``CONTEXT`` quotes the JSON it could
not read (a mail body), and SQLAlchemy adds the statement's ``[parameters: …]``. Whatever logs such an error —
our code with ``exc_info``, Dramatiq reporting a failed actor, any library — :func:`scrub_database_errors` (installed
by :func:`configure_logging`, for every handler) replaces its text, in the traceback and in the arguments, with its
class and SQLSTATE: ``IntegrityError: database error withheld (UniqueViolation, SQLSTATE 23505)``. An encoding error
(a driver that could not encode a value) is withheld too: its repr holds the whole text.
"""

from __future__ import annotations

import json
import logging
import sys
import traceback
from types import TracebackType
from typing import Any

from sqlalchemy.exc import StatementError

_STANDARD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}


def _driver_errors() -> tuple[type[BaseException], ...]:
    """The DB-API error bases of the drivers this process loaded (none is imported just to be checked)."""
    found: list[type[BaseException]] = []
    for module, name in (("psycopg", "Error"), ("sqlite3", "Error"), ("psycopg2", "Error")):
        loaded = sys.modules.get(module)
        base = getattr(loaded, name, None) if loaded is not None else None
        if isinstance(base, type) and issubclass(base, BaseException):
            found.append(base)
    return tuple(found)


def database_error(exc: BaseException) -> str | None:
    """What may be said of a database or driver error: ``database error withheld (UniqueViolation, SQLSTATE
    23505)``; for an encoding error (whose repr holds the text it could not encode) ``text withheld (utf-8:
    surrogates not allowed)``; None for any other exception."""
    original: BaseException | None
    if isinstance(exc, UnicodeError):  # a driver that could not encode a value: its repr holds the whole text
        return f"text withheld ({getattr(exc, 'encoding', '?')}: {getattr(exc, 'reason', '?')})"
    if isinstance(exc, StatementError):
        original = exc.orig if isinstance(exc.orig, BaseException) else None
    elif isinstance(exc, _driver_errors()):
        original = exc
    else:
        return None
    if original is None:
        return "database error withheld"
    code = getattr(original, "sqlstate", None) or getattr(original, "sqlite_errorname", None)
    name = type(original).__name__
    return f"database error withheld ({name}, SQLSTATE {code})" if code else f"database error withheld ({name})"


_CAUSE = "\nThe above exception was the direct cause of the following exception:\n\n"
_CONTEXT = "\nDuring handling of the above exception, another exception occurred:\n\n"


def _chain(exc: BaseException) -> list[tuple[BaseException, str]]:
    """``exc`` and the exceptions it was raised from or during, newest first, each with the line that leads from
    it to the newer one (as :mod:`traceback` prints them)."""
    found: list[tuple[BaseException, str]] = []
    seen: set[int] = set()
    current: BaseException | None = exc
    link = ""
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        found.append((current, link))
        if current.__cause__ is not None:
            current, link = current.__cause__, _CAUSE
        elif current.__context__ is not None and not current.__suppress_context__:
            current, link = current.__context__, _CONTEXT
        else:
            current = None
    return found


def has_database_error(exc: BaseException) -> bool:
    return any(database_error(item) is not None for item, _ in _chain(exc))


def safe_traceback(exc: BaseException) -> str:
    """The traceback of ``exc`` and its chain as Python prints it, but with the message of every database or
    driver error replaced by :func:`database_error`."""
    parts: list[str] = []
    for item, link in reversed(_chain(exc)):
        lines = ["Traceback (most recent call last):\n", *traceback.format_tb(item.__traceback__)]
        withheld = database_error(item)
        if withheld is None:
            lines.extend(traceback.format_exception_only(type(item), item))
        else:
            lines.append(f"{type(item).__module__}.{type(item).__qualname__}: {withheld}\n")
        parts.append("".join(lines if item.__traceback__ is not None else lines[-1:]))
        if link:
            parts.append(link)
    return "".join(parts).rstrip("\n")


class _Withheld:
    """Stands in for a database error in a record's arguments: ``%s`` and ``%r`` print the class and SQLSTATE."""

    def __init__(self, exc: BaseException, text: str) -> None:
        self.text = f"{type(exc).__name__}: {text}"

    def __str__(self) -> str:
        return self.text

    __repr__ = __str__


def _scrub_record(record: logging.LogRecord) -> None:
    exc_info = record.exc_info
    if exc_info and exc_info[1] is not None and has_database_error(exc_info[1]):
        # The formatted traceback replaces the exception itself, so no handler formats the original.
        record.exc_text = safe_traceback(exc_info[1])
        record.exc_info = None
    if isinstance(record.msg, BaseException) and (text := database_error(record.msg)) is not None:
        record.msg = _Withheld(record.msg, text)
    args = record.args
    if isinstance(args, tuple) and any(isinstance(arg, BaseException) for arg in args):
        record.args = tuple(
            _Withheld(arg, text)
            if isinstance(arg, BaseException) and (text := database_error(arg)) is not None
            else arg
            for arg in args
        )


def scrub_database_errors() -> None:
    """Make every log record of this process carry database errors by class and SQLSTATE only, whichever
    logger writes it and whichever handlers print it (the record factory sees each record first). Idempotent."""
    factory = logging.getLogRecordFactory()
    if getattr(factory, "_outreach_scrub", False):
        return

    def scrubbing_factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = factory(*args, **kwargs)
        _scrub_record(record)
        return record

    scrubbing_factory._outreach_scrub = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(scrubbing_factory)


class KeyValueFormatter(logging.Formatter):
    """``time level logger message key=value …``: the ``extra`` fields appended, JSON-quoted when needed. A
    database error's text is withheld from tracebacks (:func:`safe_traceback`)."""

    def formatException(
        self, ei: tuple[type[BaseException], BaseException, TracebackType | None] | tuple[None, None, None]
    ) -> str:
        if ei[1] is not None and has_database_error(ei[1]):
            return safe_traceback(ei[1])
        return super().formatException(ei)

    def format(self, record: logging.LogRecord) -> str:
        base = super().format(record)
        extras: dict[str, Any] = {k: v for k, v in record.__dict__.items() if k not in _STANDARD}
        if not extras:
            return base
        parts = " ".join(f"{k}={json.dumps(v, default=str, ensure_ascii=False)}" for k, v in extras.items())
        return f"{base} {parts}"


#: Library loggers that write data at their verbose levels: SQLAlchemy's engine logs result rows at DEBUG,
#: SendGrid's HTTP client each request body at DEBUG, Twilio's the parameters of each request (numbers, message
#: bodies) at INFO.
DATA_LOGGERS = {
    "sqlalchemy.engine": logging.WARNING,
    "python_http_client": logging.WARNING,
    "twilio.http_client": logging.WARNING,
}


def quiet_data_loggers() -> None:
    """Keep the loggers of :data:`DATA_LOGGERS` at WARNING whatever the root level is."""
    for name, level in DATA_LOGGERS.items():
        logging.getLogger(name).setLevel(level)


def configure_logging(level: str = "INFO") -> None:
    quiet_data_loggers()
    scrub_database_errors()
    root = logging.getLogger()
    if any(getattr(h, "_outreach", False) for h in root.handlers):
        root.setLevel(level)
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(KeyValueFormatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    handler._outreach = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level)
