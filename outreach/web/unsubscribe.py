"""One-click unsubscribe (RFC 8058): POST unsubscribes, GET only shows a page with the button.

The token is HMAC-signed and names the channel and our candidate id, never an address; a forged or damaged
token changes nothing.
"""

from __future__ import annotations

from html import escape

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse
from sqlalchemy.orm import Session

from outreach.core.clock import utcnow
from outreach.core.models import Candidate
from outreach.domain.tokens import verify
from outreach.pipeline.suppression import Suppress, suppress
from outreach.service.runtime import Runtime

router = APIRouter(include_in_schema=False)

_PAGE = """<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<meta name="viewport" content="width=device-width, initial-scale=1"></head>
<body style="font-family: sans-serif; max-width: 32rem; margin: 4rem auto; line-height: 1.5">
<h1 style="font-size: 1.4rem">{title}</h1><p>{body}</p>{form}</body></html>"""


def _page(title: str, body: str, form: str = "", status: int = 200) -> HTMLResponse:
    return HTMLResponse(_PAGE.format(title=escape(title), body=escape(body), form=form), status_code=status)


def _target(request: Request, token: str) -> tuple[str, int] | None:
    runtime: Runtime = request.app.state.runtime
    payload = verify(runtime.settings, "unsubscribe", token)
    if payload is None:
        return None
    channel, _, candidate_id = payload.partition(":")
    if channel not in {"email", "sms"} or not candidate_id.isdigit():
        return None
    return channel, int(candidate_id)


@router.get("/unsubscribe/{token}")
def confirm_page(request: Request, token: str) -> HTMLResponse:
    if _target(request, token) is None:
        return _page("Link not valid", "This unsubscribe link is damaged or was not issued by us.", status=404)
    form = (
        f'<form method="post" action="/unsubscribe/{escape(token)}">'
        '<button type="submit" style="font-size: 1rem; padding: .5rem 1rem">Unsubscribe / 退订</button></form>'
    )
    return _page("Stop these messages?", "Press the button and we will not send you news like this again.", form)


@router.post("/unsubscribe/{token}")
def unsubscribe(request: Request, token: str) -> HTMLResponse:
    target = _target(request, token)
    if target is None:
        return _page("Link not valid", "This unsubscribe link is damaged or was not issued by us.", status=404)
    channel, candidate_id = target
    runtime: Runtime = request.app.state.runtime
    with Session(runtime.engine) as session, session.begin():
        candidate = session.get(Candidate, candidate_id)
        if candidate is not None:
            candidate.nurture_consent = False
            address = candidate.email if channel == "email" else candidate.phone
            if address:
                # Recorded only: the send-time rules refuse whatever is queued to the address.
                suppress(session, [Suppress(channel, address, "unsubscribed", "link", channel)], utcnow(), cancel=False)
    return _page("You are unsubscribed", "You will not receive these messages any more. 您已成功退订。")
