"""Rendering a dashboard page: the Jinja environment over ``outreach/web/templates/dashboard/``, its filters, and
the headers every page is sent with."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from fastapi import Request
from fastapi.responses import HTMLResponse
from jinja2 import Environment, PackageLoader, select_autoescape

from outreach.core.clock import utcnow
from outreach.domain.auth import Principal, Role
from outreach.service.runtime import Runtime

__all__ = ["PREFIX", "format_percent", "format_when", "render_page", "runtime_of"]

PREFIX = "/dashboard"

_env = Environment(
    loader=PackageLoader("outreach.web", "templates"),
    autoescape=select_autoescape(default=True, default_for_string=True),
    trim_blocks=True,
    lstrip_blocks=True,
)


def format_when(value: datetime | None) -> str:
    if value is None:
        return "—"
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


def format_percent(value: float | None, digits: int = 1) -> str:
    if value is None:
        return "—"
    return f"{value * 100:.{digits}f}%"


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    seconds = max(0.0, float(seconds))
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


_env.filters["when"] = format_when
_env.filters["percent"] = format_percent
_env.filters["duration"] = format_duration


def runtime_of(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


def render_page(
    request: Request, template: str, principal: Principal | None, status_code: int = 200, **context: Any
) -> HTMLResponse:
    runtime = runtime_of(request)
    body = _env.get_template(f"dashboard/{template}").render(
        principal=principal,
        hr=principal is not None and principal.role is Role.HR,
        path=request.url.path,
        prefix=PREFIX,
        sandbox=bool(runtime.sandbox_url),
        now=utcnow(),
        **context,
    )
    return HTMLResponse(body, status_code=status_code, headers=_headers())


def _headers() -> dict[str, str]:
    return {
        "Cache-Control": "no-store",
        "X-Frame-Options": "DENY",
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "same-origin",
        "Content-Security-Policy": (
            "default-src 'none'; style-src 'unsafe-inline'; img-src 'self' data:; form-action 'self'; "
            "frame-ancestors 'none'; base-uri 'none'"
        ),
    }
