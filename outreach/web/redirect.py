"""Tracked links: ``GET /r/{token}`` records the click and redirects to the link's stored target.

Only links stored for a message we sent can be reached (see :mod:`outreach.pipeline.links`): a token that is forged,
damaged, minted with another key or names no stored link gets a 404 page and records nothing, so this is no
open redirect. ``HEAD`` requests (link checkers) and known scanners and link previewers (mail security gateways,
chat apps unfurling an SMS link) are redirected without counting as a click.
"""

from __future__ import annotations

import re
from html import escape

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from outreach.pipeline.links import follow
from outreach.service.runtime import Runtime

router = APIRouter(include_in_schema=False)

#: User agents that fetch links without a person clicking them.
_SCANNERS = re.compile(
    # Googlebot, Slackbot-LinkExpanding, TelegramBot, but not the CUBOT phone brand.
    r"(?-i:[a-z]bot|Bot)\b|crawler|spider|slurp|preview|scanner|facebookexternalhit|whatsapp|barracuda|mimecast"
    r"|proofpoint|safelinks|urldefense|python-requests|python-urllib|go-http-client|curl/|wget/|headless",
    re.IGNORECASE,
)

_NO_STORE = {"Cache-Control": "no-store", "Referrer-Policy": "no-referrer", "X-Robots-Tag": "noindex"}

_NOT_FOUND = """<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<meta name="viewport" content="width=device-width, initial-scale=1"></head>
<body style="font-family: sans-serif; max-width: 32rem; margin: 4rem auto; line-height: 1.5">
<h1 style="font-size: 1.4rem">{title}</h1><p>{body}</p></body></html>"""


def _not_found() -> HTMLResponse:
    page = _NOT_FOUND.format(
        title=escape("Link not valid"),
        body=escape("This link is damaged or was not issued by us. 此链接无效。"),
    )
    return HTMLResponse(page, status_code=404, headers=_NO_STORE)


def is_scanner(user_agent: str | None) -> bool:
    return not user_agent or _SCANNERS.search(user_agent) is not None


@router.get("/r/{token}")
def redirect(request: Request, token: str) -> Response:
    runtime: Runtime = request.app.state.runtime
    followed = follow(runtime, token, record=not is_scanner(request.headers.get("user-agent")))
    if followed is None:
        return _not_found()
    return RedirectResponse(followed.url, status_code=302, headers=_NO_STORE)


@router.head("/r/{token}")
def check(request: Request, token: str) -> Response:
    runtime: Runtime = request.app.state.runtime
    followed = follow(runtime, token, record=False)
    if followed is None:
        return Response(status_code=404, headers=_NO_STORE)
    return RedirectResponse(followed.url, status_code=302, headers=_NO_STORE)
