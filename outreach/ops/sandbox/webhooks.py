"""How the sandbox posts its webhooks (Twilio status callbacks, SendGrid event batches): in order, retried.

What each webhook says is the provider's business (:mod:`outreach.ops.sandbox.twilio`,
:mod:`outreach.ops.sandbox.sendgrid`); this is only the postman.
"""

from __future__ import annotations

import heapq
import http.client
import logging
import queue
import threading
import time
from collections.abc import Mapping
from typing import cast
from urllib.parse import urlsplit

__all__ = ["Dispatcher"]

log = logging.getLogger(__name__)


class Dispatcher:
    """Posts webhooks (status callbacks, event batches) from one background thread.

    One thread keeps each message's callbacks in order (``sent`` before ``delivered``) and reuses a
    keep-alive connection per host, which matters when a benchmark produces thousands of callbacks.
    A webhook that fails (a 5xx or 429 answer, no connection) is tried again with backoff, as SendGrid and Twilio do,
    until ``retry_for`` seconds after its first attempt; the others are not held up meanwhile.
    """

    _STOP = object()

    def __init__(self, retry_for: float = 120.0) -> None:
        self.retry_for = retry_for
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        # (due, sequence, first attempt, backoff, item): webhooks waiting for their next try.
        self._retries: list[tuple[float, int, float, float, tuple[str, bytes, dict[str, str]]]] = []
        self._sequence = 0
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self._connections: dict[tuple[str, str], http.client.HTTPConnection] = {}

    def post(self, url: str, body: bytes, headers: Mapping[str, str]) -> None:
        if self._thread is None:
            with self._start_lock:
                if self._thread is None:
                    self._thread = threading.Thread(target=self._run, name="sandbox-webhooks", daemon=True)
                    self._thread.start()
        self._queue.put((url, body, dict(headers)))

    def close(self) -> None:
        if self._thread is not None:
            self._queue.put(self._STOP)
            self._thread.join(timeout=2.0)
            self._thread = None

    def _run(self) -> None:
        while True:
            now = time.monotonic()
            while self._retries and self._retries[0][0] <= now:
                _, _, first, backoff, due_item = heapq.heappop(self._retries)
                self._attempt(due_item, first, backoff)
            timeout = max(self._retries[0][0] - time.monotonic(), 0.0) if self._retries else None
            try:
                item = self._queue.get(timeout=timeout)
            except queue.Empty:
                continue
            if item is self._STOP:
                break
            self._attempt(cast(tuple[str, bytes, dict[str, str]], item), time.monotonic(), 0.25)
        for connection in self._connections.values():
            connection.close()
        self._connections.clear()

    def _attempt(self, item: tuple[str, bytes, dict[str, str]], first: float, backoff: float) -> None:
        url, body, headers = item
        try:
            status = self._deliver(url, body, headers)
        except Exception as exc:  # the sandbox must outlive any receiver
            log.debug("sandbox webhook to %s failed: %r", url, exc)
            status = None
        if status is not None and status < 500 and status != 429:
            return
        due = time.monotonic() + backoff
        if due - first <= self.retry_for:
            self._sequence += 1
            heapq.heappush(self._retries, (due, self._sequence, first, min(backoff * 2, 5.0), item))

    def _deliver(self, url: str, body: bytes, headers: dict[str, str]) -> int:
        parts = urlsplit(url)
        key = (parts.scheme, parts.netloc)
        target = parts.path or "/"
        if parts.query:
            target += "?" + parts.query
        for attempt in range(2):
            connection = self._connections.get(key)
            reused = connection is not None
            if connection is None:
                factory = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
                connection = factory(parts.netloc, timeout=5.0)
                self._connections[key] = connection
            try:
                connection.request("POST", target, body=body, headers=headers)
                response = connection.getresponse()
                response.read()
                if response.status >= 400:
                    log.debug("sandbox webhook to %s answered %s", url, response.status)
                if response.will_close:
                    connection.close()
                    del self._connections[key]
                return response.status
            except (OSError, http.client.HTTPException):
                connection.close()
                self._connections.pop(key, None)
                # A kept-alive connection the receiver closed in the meantime deserves one fresh try.
                if not reused or attempt:
                    raise
        raise AssertionError("unreachable")
