"""Logging set-up. Log records carry ids and codes only; personal data never goes into a log line."""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

_STANDARD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}


class KeyValueFormatter(logging.Formatter):
    """``time level logger message key=value …``: the ``extra`` fields appended, JSON-quoted when needed."""

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
    root = logging.getLogger()
    if any(getattr(h, "_outreach", False) for h in root.handlers):
        root.setLevel(level)
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(KeyValueFormatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    handler._outreach = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level)
