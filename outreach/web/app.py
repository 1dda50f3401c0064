"""FastAPI application factory. Routes live in their own modules; this file wires them and the error shape."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import OperationalError

from outreach.core.config import set_settings
from outreach.core.errors import NotFoundError, ValidationError
from outreach.service.runtime import Runtime, freeze_startup_heap
from outreach.web import api, candidates_api, conversation, dashboard, inbound_parse, redirect, unsubscribe, webhooks
from outreach.web.auth import Forbidden, Unauthorized, authorize
from outreach.web.guards import clean_parameters
from outreach.web.metrics_api import router as metrics_router
from outreach.web.prometheus import router as prometheus_router
from outreach.web.ratelimit import BodyLimit, ErrorShield, RateLimit, make_limiter
from outreach.web.webhooks import WebhookSettings

log = logging.getLogger(__name__)


def _field(loc: tuple[object, ...] | list[object]) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path")]
    return ".".join(parts) or "(body)"


@asynccontextmanager
async def _lifespan(_: FastAPI) -> AsyncIterator[None]:
    freeze_startup_heap()
    yield


def create_app(runtime: Runtime, webhook_settings: WebhookSettings | None = None) -> FastAPI:
    set_settings(runtime.settings)
    app = FastAPI(
        title="outreach",
        version="0.1.0",
        description="Timed, personal email and SMS for recruiting teams.",
        lifespan=_lifespan,
    )
    app.state.runtime = runtime
    app.state.webhook_settings = webhook_settings or WebhookSettings.from_settings(runtime.settings)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        # The submitted values are personal data: name the fields, never echo the input.
        errors = [
            {
                "field": _field(e.get("loc", ())),
                "message": str(e.get("msg", "")).removeprefix("Value error, "),
            }
            for e in exc.errors()
        ]
        first = errors[0] if errors else {"field": "(body)", "message": "invalid request"}
        return JSONResponse(
            status_code=422,
            content={
                "error": "invalid",
                "field": first["field"],
                "message": first["message"],
                "errors": errors,
            },
        )

    @app.exception_handler(ValidationError)
    async def _invalid_domain(_: Request, exc: ValidationError) -> JSONResponse:
        return JSONResponse(
            status_code=422,
            content={
                "error": "invalid",
                "field": exc.field,
                "message": exc.message,
                "errors": [{"field": field, "message": message} for field, message in exc.errors],
            },
        )

    @app.exception_handler(Unauthorized)
    async def _unauthorized(_: Request, exc: Unauthorized) -> JSONResponse:
        return JSONResponse(
            status_code=401,
            content={"error": "unauthorized", "message": str(exc)},
            headers={"WWW-Authenticate": 'Bearer realm="outreach"'},
        )

    @app.exception_handler(Forbidden)
    async def _forbidden(_: Request, exc: Forbidden) -> JSONResponse:
        return JSONResponse(status_code=403, content={"error": "forbidden", "message": str(exc)})

    @app.exception_handler(NotFoundError)
    async def _not_found(_: Request, exc: NotFoundError) -> JSONResponse:
        return JSONResponse(status_code=404, content={"error": "not_found", "message": str(exc)})

    @app.exception_handler(OperationalError)
    async def _database_down(_: Request, exc: OperationalError) -> JSONResponse:
        log.error("database unavailable", extra={"error": type(exc.orig).__name__ if exc.orig else "unknown"})
        return JSONResponse(status_code=503, content={"error": "unavailable", "message": "database unavailable"})

    # Every /api route: a key first, then the path and query values checked (bodies are checked by their models).
    api_guards = [Depends(authorize), Depends(clean_parameters)]
    app.include_router(api.public)
    app.include_router(api.router, dependencies=api_guards)
    app.include_router(unsubscribe.router)
    app.include_router(redirect.router)
    app.include_router(webhooks.router)
    app.include_router(inbound_parse.router)
    app.include_router(conversation.router, dependencies=api_guards)
    app.include_router(dashboard.router)  # its own login: the same keys, from a cookie or a Bearer header
    app.include_router(metrics_router, dependencies=api_guards)
    app.include_router(prometheus_router)  # /metrics: no key, like /healthz (see outreach.web.prometheus)
    app.include_router(candidates_api.router, dependencies=api_guards)

    # Guards (outreach.web.ratelimit), outermost last: request id and generic 500s, rate limits, body size.
    settings = runtime.settings
    app.add_middleware(BodyLimit, max_bytes=settings.max_request_bytes, max_webhook_bytes=settings.max_webhook_bytes)
    limiter = make_limiter(settings.public_rate_limit, settings.public_rate_burst, settings.rate_limit_redis_url)
    webhook_limiter = make_limiter(
        settings.webhook_rate_limit, settings.webhook_rate_burst, settings.rate_limit_redis_url
    )
    app.add_middleware(RateLimit, limiter=limiter, webhook_limiter=webhook_limiter)
    app.add_middleware(ErrorShield)
    return app
