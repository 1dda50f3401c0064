"""Benchmarks: ``python -m bench`` (``make bench``) and ``python -m bench --smoke`` (``make bench-smoke``).

The first one measures messages per second end to end (claimed outbox row → provider accepted, through the real
SendGrid SDK to the sandbox over HTTP, templates rendered) next to a bare Dramatiq no-op actor on the same broker
and worker settings, and reports the ratio. See ``bench/README.md``.
"""

from __future__ import annotations

#: The baseline actor's name (declared in ``bench.noop``, which the driver never imports: it sets a broker up).
NOOP_ACTOR = "noop"

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/14"
DEFAULT_POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/test"
