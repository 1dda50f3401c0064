"""Canary personal data for the security tests: values that must never show up in logs or error output."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from outreach.core.logs import KeyValueFormatter, quiet_data_loggers, scrub_database_errors

# Distinctive values: a hit is never a coincidence. The phone is a valid mainland-China mobile number.
CANARY_NAME = "Quillon Canarywood"
CANARY_NAME_ZH = "金丝雀测"
CANARY_EMAIL = "quillon.canarywood@canary-mail.example"
CANARY_PHONE = "+8613987651234"
CANARY_PHONE_LOCAL = "13987651234"
CANARY_SALARY = 987_653
CANARY_TEXT = "Canary reply text zebra-quartz"


def canary_values() -> list[str]:
    return [CANARY_NAME, CANARY_NAME_ZH, CANARY_EMAIL, CANARY_PHONE, CANARY_PHONE_LOCAL, str(CANARY_SALARY),
            f"{CANARY_SALARY:,}", CANARY_TEXT, "canarywood", "zebra-quartz"]  # fmt: skip


@dataclass
class LogSink(logging.Handler):
    """Every record of every logger, formatted with its extra fields and any traceback, as production writes it."""

    lines: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(KeyValueFormatter("%(levelname)s %(name)s %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))

    def __hash__(self) -> int:
        return id(self)

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


@pytest.fixture
def all_logs() -> Iterator[LogSink]:
    """Captures every logger at DEBUG for the test (levels and propagation restored afterwards), except the
    library loggers production pins because they write data (:data:`outreach.core.logs.DATA_LOGGERS`), with
    production's scrubbing of database errors (:func:`outreach.core.logs.scrub_database_errors`)."""
    sink = LogSink()
    root = logging.getLogger()
    saved = {name: (lg.level, lg.propagate, lg.disabled) for name, lg in logging.Logger.manager.loggerDict.items()
             if isinstance(lg, logging.Logger)}  # fmt: skip
    root_level = root.level
    for name in saved:
        logger = logging.getLogger(name)
        logger.setLevel(logging.NOTSET)
        logger.propagate = True
        logger.disabled = False
    # Production's own pins (outreach.core.logs) apply: the libraries that log data at DEBUG stay at WARNING, and
    # database errors are logged by class and SQLSTATE.
    quiet_data_loggers()
    factory = logging.getLogRecordFactory()
    scrub_database_errors()
    root.setLevel(logging.DEBUG)
    root.addHandler(sink)
    yield sink
    root.removeHandler(sink)
    root.setLevel(root_level)
    logging.setLogRecordFactory(factory)
    for name, (level, propagate, disabled) in saved.items():
        logger = logging.getLogger(name)
        logger.setLevel(level)
        logger.propagate = propagate
        logger.disabled = disabled


def leaks(text: str) -> list[str]:
    lowered = text.lower()
    return [value for value in canary_values() if value.lower() in lowered]
