"""A keep-alive HTTP transport for the SendGrid SDK's ``python_http_client``.

The SDK builds every request itself (URL, headers, JSON body) and sends it with ``urllib``, which opens a new TCP
connection per request and closes it afterwards. :class:`PooledClient` keeps all of the SDK's request building
and its error classes and replaces only the last step, the send, with a ``urllib3`` connection pool shared by
every thread of the process: connections stay open between sends. Non-2xx answers still raise the SDK's own
``python_http_client.exceptions.HTTPError`` subclasses, with status, body and headers as the SDK gives them.

Nothing is retried here: a POST that may have reached the provider must not be sent twice behind the caller's
back. Only a connection that could not be opened at all is tried again (nothing was sent on it). Failures leave
as ``urllib3.exceptions.HTTPError`` subclasses (timeouts as ``urllib3.exceptions.TimeoutError``).

:func:`nothing_sent` tells the two kinds of network failure apart for both providers' error mapping.
"""

from __future__ import annotations

import functools
import io
import json
import urllib.error
import urllib.request
from email.message import Message
from typing import Any

import requests
import urllib3
from python_http_client import Client
from python_http_client.client import Response
from python_http_client.exceptions import handle_error

__all__ = ["PooledClient", "nothing_sent", "pool_manager"]

#: urllib3's failures to open a connection (refused, DNS, connect timeout): the request never left.
_NEVER_CONNECTED = (urllib3.exceptions.NewConnectionError, urllib3.exceptions.ConnectTimeoutError)


def nothing_sent(exc: BaseException) -> bool:
    """True when ``exc`` proves the request never reached the provider, so sending it again cannot duplicate it.

    That is only a connection that could not be opened: refused, a name that did not resolve, a connect timeout
    (urllib3's ``NewConnectionError`` / ``ConnectTimeoutError``, also as the reason of a ``MaxRetryError``, and
    ``requests``' ``ConnectTimeout`` or a ``ConnectionError`` wrapping one of them), or ``urllib``'s ``URLError``,
    which it raises only while connecting and writing the request. Everything else — a read timeout, a reset or
    a closed connection while waiting for the answer, a broken TLS stream — happened after the request may have
    been read by the provider: the send is ambiguous.
    """
    if isinstance(exc, requests.ConnectTimeout):
        return True
    if isinstance(exc, requests.ConnectionError):
        # requests wraps urllib3's error as its first argument.
        inner = exc.args[0] if exc.args else None
        return isinstance(inner, BaseException) and nothing_sent(inner)
    if isinstance(exc, urllib3.exceptions.MaxRetryError):
        return isinstance(exc.reason, _NEVER_CONNECTED)
    if isinstance(exc, _NEVER_CONNECTED):
        return True
    return isinstance(exc, urllib.error.URLError) and not isinstance(exc, urllib.error.HTTPError)


def pool_manager(maxsize: int, timeout: float | None) -> urllib3.PoolManager:
    """A process-wide pool: up to ``maxsize`` open connections per host, never blocking a thread for one."""
    return urllib3.PoolManager(
        num_pools=4,
        maxsize=maxsize,
        block=False,
        timeout=urllib3.Timeout(connect=timeout, read=timeout),
        # Connection failures only: the request never left, so trying again cannot send it twice.
        retries=urllib3.Retry(total=2, connect=2, read=0, redirect=0, status=0, other=0, raise_on_status=False),
    )


class _Answer:
    """What ``python_http_client.Response`` reads from an answer: ``getcode()``, ``read()`` and ``info()``."""

    def __init__(self, status: int, body: bytes, headers: Message) -> None:
        self._status = status
        self._body = body
        self._headers = headers

    def getcode(self) -> int:
        return self._status

    def read(self) -> bytes:
        return self._body

    def info(self) -> Message:
        return self._headers


def _headers(response: urllib3.BaseHTTPResponse) -> Message:
    # The SDK hands out urllib's header object (an email Message: case-insensitive get()); keep that type.
    headers = Message()
    for name, value in response.headers.items():
        headers[name] = value
    return headers


class PooledClient(Client):  # type: ignore[misc]
    """``python_http_client.Client`` that sends through ``pool`` instead of a new urllib connection per call."""

    def __init__(self, *args: Any, pool: urllib3.PoolManager, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._pool = pool

    @classmethod
    def replacing(cls, client: Client, pool: urllib3.PoolManager) -> PooledClient:
        """A pooled copy of the SDK's root ``client`` (same host, version, headers and timeout)."""
        return cls(
            host=client.host,
            request_headers=client.request_headers,
            version=client._version,
            url_path=list(client._url_path),
            append_slash=client.append_slash,
            timeout=client.timeout,
            pool=pool,
        )

    def _build_client(self, name: str | None = None) -> PooledClient:
        url_path = [*self._url_path, name] if name else self._url_path
        return PooledClient(
            host=self.host,
            version=self._version,
            request_headers=self.request_headers,
            url_path=url_path,
            append_slash=self.append_slash,
            timeout=self.timeout,
            pool=self._pool,
        )

    def __getattr__(self, name: str) -> Any:
        if name in self.methods:  # a class attribute: looking it up never comes back here
            return functools.partial(self._http_request, name.upper())
        return super().__getattr__(name)

    def _http_request(
        self,
        method: str,
        request_body: Any = None,
        query_params: Any = None,
        request_headers: Any = None,
        timeout: float | None = None,
        **_: Any,
    ) -> Response:
        """The SDK's own ``http_request`` (``Client.__getattr__``): the same headers, JSON body, URL and
        ``Response``, minus the ``urllib`` opener it builds on every call (default handlers, proxy settings read
        from the environment) only to hand it to :meth:`_make_request`, which sends through the pool instead."""
        if request_headers:
            self._update_headers(request_headers)
        data: bytes | None
        if request_body is None:
            data = None
        elif "Content-Type" in self.request_headers and self.request_headers["Content-Type"] != "application/json":
            data = request_body.encode("utf-8")
        else:
            self.request_headers.setdefault("Content-Type", "application/json")
            data = json.dumps(request_body).encode("utf-8")
        request = urllib.request.Request(
            self._build_url(query_params), headers=self.request_headers, data=data, method=method
        )
        return Response(self._make_request(None, request, timeout=timeout))

    def _make_request(self, opener: Any, request: urllib.request.Request, timeout: float | None = None) -> _Answer:
        timeout = timeout or self.timeout
        response = self._pool.request(
            request.get_method(),
            request.full_url,
            body=request.data,  # type: ignore[arg-type]
            headers=dict(request.header_items()),
            timeout=urllib3.Timeout(connect=timeout, read=timeout) if timeout else urllib3.Timeout.DEFAULT_TIMEOUT,
            redirect=False,
            preload_content=True,
        )
        body = response.data
        headers = _headers(response)
        if response.status >= 400:
            # The SDK's own error classes, built the way the SDK builds them from urllib's HTTPError.
            error = urllib.error.HTTPError(
                request.full_url, response.status, response.reason or "", headers, io.BytesIO(body)
            )
            try:
                raise handle_error(error) from None
            finally:
                error.close()
        return _Answer(response.status, body, headers)
