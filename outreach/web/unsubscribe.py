"""One-click unsubscribe (RFC 8058): POST unsubscribes from nurture, GET only shows a page with the button.

The token is HMAC-signed and names the random outbox id of the message the link came in and when it was issued,
never a candidate or an address; it works for :data:`outreach.domain.tokens.UNSUBSCRIBE_VALIDITY`. A forged,
damaged or expired token (or one of the old kind that named a candidate) gets a 404 page and changes nothing.

``POST /unsubscribe/{token}`` (what a mail client's one-click button sends) withdraws nurture consent: news and
job suggestions stop, mail about an application or offer in progress still goes. The page it answers with offers,
as a separate, explicit choice, ``POST /unsubscribe/{token}/all``: no more messages on that channel at all. The
pages are in English and Chinese.
"""

from __future__ import annotations

from html import escape

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse
from sqlalchemy import select
from sqlalchemy.orm import Session

from outreach.core.clock import utcnow
from outreach.core.models import Channel, OutboundMessage
from outreach.domain.tokens import unsubscribe_message_id
from outreach.pipeline.suppression import unsubscribe as withdraw
from outreach.service.runtime import Runtime

router = APIRouter(include_in_schema=False)

#: The token is in the URL: no caching, no Referer, no indexing.
_HEADERS = {"Cache-Control": "no-store", "Referrer-Policy": "no-referrer", "X-Robots-Tag": "noindex"}

_PAGE = """<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<meta name="viewport" content="width=device-width, initial-scale=1"></head>
<body style="font-family: sans-serif; max-width: 32rem; margin: 4rem auto; line-height: 1.5">
<h1 style="font-size: 1.4rem">{heading}</h1>{body}</body></html>"""

_BUTTON = (
    '<form method="post" action="{action}"><button type="submit" style="font-size: 1rem; padding: .5rem 1rem">'
    "{label}</button></form>"
)

#: A text in English and Chinese.
Text = tuple[str, str]

#: What the messages of a channel are called on the pages.
_MESSAGES: dict[str, Text] = {Channel.EMAIL.value: ("emails", "邮件"), Channel.SMS.value: ("text messages", "短信")}


def _both(text: Text) -> str:
    return f'{escape(text[0])}<br><span lang="zh-CN">{escape(text[1])}</span>'


def _page(title: Text, paragraphs: list[Text], form: str = "", status: int = 200) -> HTMLResponse:
    body = "".join(f"<p>{_both(p)}</p>" for p in paragraphs) + form
    page = _PAGE.format(title=escape(f"{title[0]} / {title[1]}"), heading=_both(title), body=body)
    return HTMLResponse(page, status_code=status, headers=_HEADERS)


def _button(action: str, label: Text) -> str:
    return _BUTTON.format(action=escape(action), label=escape(f"{label[0]} / {label[1]}"))


def _not_valid() -> HTMLResponse:
    return _page(
        ("Link not valid", "链接无效"),
        [
            (
                "This unsubscribe link is damaged, has expired or was not issued by us. Nothing was changed.",
                "此退订链接已损坏、已过期或并非由我们发出，未做任何更改。",
            ),
            (
                "To stop our news, use the unsubscribe link in our latest message, or reply to it and tell us.",
                "如需退订，请使用我们最近一封邮件中的退订链接，或直接回复告诉我们。",
            ),
        ],
        status=404,
    )


def _message_id(request: Request, token: str) -> str | None:
    runtime: Runtime = request.app.state.runtime
    return unsubscribe_message_id(runtime.settings, token, utcnow())


@router.get("/unsubscribe/{token}")
def confirm_page(request: Request, token: str) -> HTMLResponse:
    outbox_id = _message_id(request, token)
    if outbox_id is None:
        return _not_valid()
    runtime: Runtime = request.app.state.runtime
    with Session(runtime.engine) as session:
        found = session.scalar(select(OutboundMessage.id).where(OutboundMessage.id == outbox_id))
    if found is None:  # the message is gone (its candidate was erased)
        return _not_valid()
    return _page(
        ("Unsubscribe from our news?", "退订我们的资讯？"),
        [
            (
                "Press the button and we will stop sending you news and job suggestions. Messages about an "
                "application or offer in progress still reach you.",
                "点击按钮后，我们将不再向您发送资讯和职位推荐；与您正在进行的申请或录用相关的消息仍会发送给您。",
            )
        ],
        _button(f"/unsubscribe/{token}", ("Unsubscribe", "退订")),
    )


@router.post("/unsubscribe/{token}")
def unsubscribe(request: Request, token: str) -> HTMLResponse:
    """RFC 8058's one-click POST: nurture consent is withdrawn; nothing else stops."""
    return _unsubscribe(request, token, everything=False)


@router.post("/unsubscribe/{token}/all")
def unsubscribe_everything(request: Request, token: str) -> HTMLResponse:
    """The page's second button: no more messages on the link's channel at all."""
    return _unsubscribe(request, token, everything=True)


def _unsubscribe(request: Request, token: str, *, everything: bool) -> HTMLResponse:
    outbox_id = _message_id(request, token)
    if outbox_id is None:
        return _not_valid()
    runtime: Runtime = request.app.state.runtime
    with Session(runtime.engine) as session, session.begin():
        done = withdraw(session, outbox_id, utcnow(), everything=everything)
    if done is None:  # the message is gone (its candidate was erased)
        return _not_valid()
    en, zh = _MESSAGES.get(done.channel, _MESSAGES[Channel.EMAIL.value])
    if everything:
        return _page(
            (f"No more {en} from us", f"我们不会再给您发送{zh}"),
            [
                (
                    f"We will not send you any {en} any more, including about applications and offers. If you "
                    "change your mind, contact us.",
                    f"我们将不再向您发送任何{zh}，包括与申请和录用相关的{zh}。如需恢复，请联系我们。",
                )
            ],
        )
    return _page(
        ("You are unsubscribed", "您已成功退订"),
        [
            (
                "You will get no more news or job suggestions from us. Messages about an application or offer in "
                "progress still reach you.",
                "您将不再收到我们的资讯和职位推荐；与您正在进行的申请或录用相关的消息仍会发送给您。",
            ),
            (
                f"Want no {en} from us at all, not even about your application?",
                f"不想再收到我们的任何{zh}，包括与您申请相关的{zh}？",
            ),
        ],
        _button(f"/unsubscribe/{token}/all", (f"Stop all {en}", f"停止所有{zh}")),
    )
