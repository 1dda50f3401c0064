"""The operations dashboard at ``/dashboard``: server-rendered pages over the outbox, the analytics and the sandbox.

:mod:`.login` decides who is looking (an API key, from the login form's cookie or a Bearer header),
:mod:`.pages` serves the pages, :mod:`.charts` draws their SVG charts and :mod:`.render` renders the templates in
``outreach/web/templates/dashboard/``. The app mounts :data:`router`, which holds the routes of both.
"""

from __future__ import annotations

from fastapi import APIRouter

from outreach.web.dashboard import login, pages

__all__ = ["router"]

router = APIRouter()
router.include_router(login.router)
router.include_router(pages.router)
