"""The HTTP surface: JSON API under /api/v1, health, and (later) webhooks and the dashboard."""

from outreach.web.app import create_app

__all__ = ["create_app"]
