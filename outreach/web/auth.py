"""Bearer authentication and role checks for every ``/api`` route.

Routers serving ``/api`` are included with ``dependencies=[Depends(authorize)]`` (see ``app.py``); a test walks
the app's routes and fails if one is not. Routes are ``hr``-only unless their endpoint is marked
:func:`ops_readable`: safe by default, so a new route never leaks personal data to ``ops`` by accident. Only
GET/HEAD are ever open to ``ops``.

The dashboard accepts the same keys as a Bearer header, and otherwise its own login sessions: the login form
trades a key for a session (:func:`outreach.domain.auth.open_dashboard_session`) whose random id is the
``outreach_session`` cookie. That cookie is never an API credential, and an API key is never a session.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Annotated, Any, TypeVar

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from outreach.core.config import Settings
from outreach.domain.auth import Principal, Role, SessionLimits, authenticate, dashboard_principal
from outreach.service.runtime import Runtime

__all__ = [
    "COOKIE",
    "LEGACY_COOKIE",
    "Forbidden",
    "PrincipalDep",
    "Unauthorized",
    "authorize",
    "ops_readable",
    "principal_from",
    "session_limits",
]

#: The dashboard session's cookie: a random session id, never a key.
COOKIE = "outreach_session"
#: Where the dashboard kept the API key itself before it had sessions; never read, only cleared.
LEGACY_COOKIE = "outreach_key"
_OPS_READABLE: set[Callable[..., Any]] = set()
_READ_METHODS = frozenset({"GET", "HEAD"})

F = TypeVar("F", bound=Callable[..., Any])


class Unauthorized(Exception):
    """No key, or a key we do not know (401)."""


class Forbidden(Exception):
    """A known key whose role may not do this (403)."""


def ops_readable(endpoint: F) -> F:
    """Mark a GET route whose answer holds no personal data, so the ``ops`` role may read it."""
    _OPS_READABLE.add(endpoint)
    return endpoint


def is_ops_readable(endpoint: Callable[..., Any]) -> bool:
    return endpoint in _OPS_READABLE


def presented_key(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return None


def session_limits(settings: Settings) -> SessionLimits:
    return SessionLimits(
        idle=timedelta(seconds=settings.dashboard_idle_seconds),
        lifetime=timedelta(seconds=settings.dashboard_session_seconds),
    )


def principal_from(request: Request, *, cookie: bool = False) -> Principal | None:
    """Who is calling: a Bearer key, or (``cookie``: the dashboard) a live session from the session cookie."""
    runtime: Runtime = request.app.state.runtime
    key = presented_key(request)
    if key is not None:
        with Session(runtime.engine) as session, session.begin():
            return authenticate(session, key)
    token = request.cookies.get(COOKIE) if cookie else None
    if not token:
        return None
    with Session(runtime.engine) as session, session.begin():
        return dashboard_principal(session, token, session_limits(runtime.settings))


def check_role(principal: Principal, request: Request) -> None:
    if principal.role is Role.HR:
        return
    endpoint = request.scope.get("endpoint")
    if request.method in _READ_METHODS and endpoint is not None and is_ops_readable(endpoint):
        return
    raise Forbidden(f"the {principal.role.value} role may not {request.method} {request.url.path}")


def authorize(request: Request) -> Principal:
    """The dependency on every ``/api`` route: 401 without a valid key, 403 for the wrong role."""
    principal = principal_from(request)
    if principal is None:
        raise Unauthorized("an API key is required: Authorization: Bearer <key>")
    check_role(principal, request)
    request.state.principal = principal
    return principal


def current_principal(request: Request) -> Principal:
    """The principal ``authorize`` found (routes use it to record who did something)."""
    principal: Principal | None = getattr(request.state, "principal", None)
    if principal is None:  # pragma: no cover - only reachable if a router was included without authorize
        raise Unauthorized("an API key is required: Authorization: Bearer <key>")
    return principal


PrincipalDep = Annotated[Principal, Depends(current_principal)]
