"""Who is looking at the dashboard: the login form, its cookie, and the ``viewer`` dependency every page takes.

**Who may look.** The same API keys as ``/api`` (:mod:`outreach.web.auth`): a key pasted into the login form opens
a server-side session (:func:`outreach.domain.auth.open_dashboard_session`) whose random id becomes an HttpOnly,
SameSite=Strict cookie scoped to ``/dashboard`` — ``Secure`` whenever ``OUTREACH_PUBLIC_URL`` is https, whatever
scheme the request arrived on behind a proxy. The key itself is never stored in the browser. Logout deletes the
session, so a copied cookie dies with it; revoking the key ends its sessions at once; otherwise a session ends
after ``OUTREACH_DASHBOARD_IDLE_SECONDS`` without a request or ``OUTREACH_DASHBOARD_SESSION_SECONDS`` after the
login. A Bearer header works too. Both roles see
every page, but the ``ops`` role never sees personal data: candidates appear by external id only, never a name,
address, phone number, subject, body or provider error text (which can quote an address). Pages for ``hr`` add
those. Without a valid key every page redirects to the login form. Forms that change something (login, logout)
are POSTs whose ``Origin`` (or ``Referer``) must be this site; with the SameSite=Strict cookie that is enough
against cross-site requests.
"""

from __future__ import annotations

from typing import Annotated
from urllib.parse import quote, urlsplit

from fastapi import APIRouter, Depends, Form, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from sqlalchemy.orm import Session

from outreach.domain.auth import Principal, authenticate, close_dashboard_session, open_dashboard_session
from outreach.web.auth import COOKIE, LEGACY_COOKIE, principal_from, session_limits
from outreach.web.dashboard.render import PREFIX, render_page, runtime_of

__all__ = ["ViewerDep", "router", "viewer"]

router = APIRouter(prefix=PREFIX, include_in_schema=False)


class _LoginRequired(HTTPException):
    def __init__(self, location: str) -> None:
        super().__init__(status_code=303, detail="login required", headers={"Location": location})


def _safe_next(target: str | None) -> str:
    """Only a path on the dashboard itself: never an absolute URL (no open redirect)."""
    if not target:
        return PREFIX
    parts = urlsplit(target)
    if parts.scheme or parts.netloc or "\\" in target or not parts.path.startswith(PREFIX):
        return PREFIX
    return target


def viewer(request: Request) -> Principal:
    """The dependency on every page: the key's principal, or a redirect to the login form."""
    principal = principal_from(request, cookie=True)
    if principal is None:
        here = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        raise _LoginRequired(f"{PREFIX}/login?next={quote(here, safe='')}")
    return principal


ViewerDep = Annotated[Principal, Depends(viewer)]


def _same_origin(request: Request) -> bool:
    """A POST from a page of this site: its Origin (or, lacking one, Referer) names this host."""
    own = f"{request.url.scheme}://{request.url.netloc}"
    allowed = {own}
    public = runtime_of(request).settings.public_url.rstrip("/")
    if public:
        parts = urlsplit(public)
        allowed.add(f"{parts.scheme}://{parts.netloc}")
    origin = request.headers.get("origin")
    if origin is not None:
        return origin in allowed
    referer = request.headers.get("referer")
    if referer is not None:
        parts = urlsplit(referer)
        return f"{parts.scheme}://{parts.netloc}" in allowed
    return True  # not a browser (browsers send Origin on every POST); the cookie is SameSite=Strict anyway


def _secure(request: Request) -> bool:
    """Cookies only over https when the site is public on https (a TLS proxy may talk plain http to us)."""
    return runtime_of(request).settings.public_url.lower().startswith("https://") or request.url.scheme == "https"


def _forget_cookies(request: Request, response: Response, names: tuple[str, ...] = (COOKIE, LEGACY_COOKIE)) -> Response:
    """Clear the session cookie and the key a dashboard from before sessions left in the browser, if present."""
    for name in names:
        if name in request.cookies:
            response.delete_cookie(name, path=PREFIX, httponly=True, samesite="strict", secure=_secure(request))
    return response


@router.get("/login", response_class=HTMLResponse)
def login_form(request: Request, next: str | None = None) -> Response:
    if principal_from(request, cookie=True) is not None:
        return RedirectResponse(_safe_next(next), status_code=303)
    page = render_page(request, "login.html", None, next=_safe_next(next), error=None)
    return _forget_cookies(request, page)  # an ended session's cookie, or an old one holding a key


@router.post("/login", response_class=HTMLResponse)
def login(request: Request, key: Annotated[str, Form()] = "", next: Annotated[str, Form()] = "") -> Response:
    if not _same_origin(request):
        error = "This form must be sent from this site."
        return render_page(request, "login.html", None, 403, next=_safe_next(next), error=error)
    key = key.strip()
    runtime = runtime_of(request)
    limits = session_limits(runtime.settings)
    token = None
    if key:
        with Session(runtime.engine) as session, session.begin():
            principal = authenticate(session, key)
            if principal is not None:
                close_dashboard_session(session, request.cookies.get(COOKIE, ""))  # logging in again: one session
                token = open_dashboard_session(session, principal, limits)
    if token is None:
        # Never echo the key back, not even a wrong one.
        message = "Paste an API key." if not key else "Unknown or revoked key."
        return render_page(request, "login.html", None, 401, next=_safe_next(next), error=message)
    response = _forget_cookies(request, RedirectResponse(_safe_next(next), status_code=303), (LEGACY_COOKIE,))
    response.set_cookie(
        COOKIE,
        token,
        max_age=int(limits.lifetime.total_seconds()),
        path=PREFIX,
        httponly=True,
        samesite="strict",
        secure=_secure(request),
    )
    return response


@router.post("/logout")
def logout(request: Request) -> Response:
    if not _same_origin(request):
        return HTMLResponse("This form must be sent from this site.", status_code=403)
    token = request.cookies.get(COOKIE)
    if token:
        with Session(runtime_of(request).engine) as session, session.begin():
            close_dashboard_session(session, token)
    return _forget_cookies(request, RedirectResponse(f"{PREFIX}/login", status_code=303))
