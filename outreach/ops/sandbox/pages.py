"""The sandbox's pages, like Mailpit's: the messages, newest first (``GET /``), and one message
(``GET /messages/{index}``), its email HTML inside a sandboxed iframe.
"""

from __future__ import annotations

import html

from outreach.ops.sandbox.messages import SandboxMessage

__all__ = ["headers", "page", "render_index", "render_message"]

_STYLE = """
body{font:14px/1.45 system-ui,sans-serif;margin:0;color:#1f2328;background:#f6f8fa}
header{background:#24292f;color:#fff;padding:10px 20px}header a{color:#fff;text-decoration:none}
main{padding:16px 20px}table{border-collapse:collapse;width:100%;background:#fff}
th,td{border-bottom:1px solid #d0d7de;padding:6px 8px;text-align:left;vertical-align:top}
th{background:#eaeef2}tr:hover td{background:#f3f6fa}td.muted,span.muted{color:#656d76}
pre{white-space:pre-wrap;background:#fff;border:1px solid #d0d7de;padding:10px}
iframe{width:100%;height:520px;border:1px solid #d0d7de;background:#fff}
.tag{display:inline-block;background:#ddf4ff;border-radius:8px;padding:0 6px;margin-right:4px}
"""

# Enough to find recent messages without making the page slow after a benchmark.
_INDEX_LIMIT = 500


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def page(title: str, content: str) -> str:
    """A whole page: ``content`` under the sandbox's header, in its style."""
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        f"<title>{_e(title)} · outreach sandbox</title><style>{_STYLE}</style></head><body>"
        '<header><a href="/">outreach sandbox</a></header>'
        f"<main>{content}</main></body></html>"
    )


def render_index(records: list[SandboxMessage]) -> str:
    """The list of messages, newest first (at most the newest 500), each linking to its own page."""
    rows = []
    first = max(0, len(records) - _INDEX_LIMIT)
    for index in range(len(records) - 1, first - 1, -1):
        record = records[index]
        summary = record.subject if record.channel == "email" else record.body
        if len(summary) > 120:
            summary = summary[:117] + "…"
        rows.append(
            f'<tr><td><a href="/messages/{index}">{index}</a></td>'
            f'<td class="muted">{_e(record.received_at.strftime("%Y-%m-%d %H:%M:%S"))}</td>'
            f"<td>{_e(record.provider)}</td><td>{_e(record.from_)}</td><td>{_e(record.to)}</td>"
            f'<td><a href="/messages/{index}">{_e(summary)}</a></td></tr>'
        )
    shown = (
        f"<p class=muted>Showing the newest {_INDEX_LIMIT} of {len(records)}.</p>"
        if len(records) > _INDEX_LIMIT
        else ""
    )
    table = (
        "<table><thead><tr><th>#</th><th>Received (UTC)</th><th>Provider</th><th>From</th><th>To</th>"
        f"<th>Subject / body</th></tr></thead><tbody>{''.join(rows)}</tbody></table>"
        if rows
        else "<p>No messages yet.</p>"
    )
    return page("Messages", f"<h1>Messages ({len(records)})</h1>{shown}{table}")


def render_message(index: int, record: SandboxMessage) -> str:
    """The page of message ``index``: its fields, custom args, headers and bodies (email HTML in an iframe)."""
    fields: list[tuple[str, object]] = [
        ("Provider", record.provider),
        ("Id", record.id),
        ("Received (UTC)", record.received_at.isoformat()),
        ("From", record.from_),
        ("To", record.to),
    ]
    if record.channel == "email":
        fields += [
            ("Subject", record.subject),
            ("Reply-To", record.reply_to or ""),
            ("Personalization", record.personalization_index),
            ("Template", record.template_id or ""),
        ]
    else:
        fields += [
            ("Segments", record.segments),
            ("Characters", len(record.body)),
            ("Status callback", record.status_callback or ""),
            ("Validity period (s)", "" if record.validity_period is None else record.validity_period),
        ]
    rows = "".join(f"<tr><th>{_e(name)}</th><td>{_e(value)}</td></tr>" for name, value in fields)
    for title, mapping in (("Custom args", record.custom_args), ("Headers", record.headers)):
        if mapping:
            inner = "".join(f"<span class=tag>{_e(k)}: {_e(v)}</span>" for k, v in mapping.items())
            rows += f"<tr><th>{title}</th><td>{inner}</td></tr>"
    if record.categories:
        inner = "".join(f"<span class=tag>{_e(c)}</span>" for c in record.categories)
        rows += f"<tr><th>Categories</th><td>{inner}</td></tr>"
    parts = [f"<h1>Message {index}</h1><table>{rows}</table>"]
    if record.channel == "email":
        if record.html:
            # srcdoc is an attribute, so escaping it is what keeps the email's markup inside the iframe;
            # the empty sandbox attribute disables scripts, forms and navigation within it.
            parts.append(f'<h2>HTML</h2><iframe sandbox srcdoc="{_e(record.html)}"></iframe>')
        if record.text:
            parts.append(f"<h2>Text</h2><pre>{_e(record.text)}</pre>")
    else:
        parts.append(f"<h2>SMS body</h2><pre>{_e(record.body)}</pre>")
    return page(record.subject or f"Message {index}", "".join(parts))


def headers(*, refresh: bool = False) -> list[tuple[str, str]]:
    """The headers every page goes out with; ``refresh`` reloads it every few seconds (the list of messages)."""
    headers = [
        # Email HTML is shown in a sandboxed iframe; the policy also keeps it from loading remote content.
        ("Content-Security-Policy", "default-src 'none'; style-src 'unsafe-inline'; img-src data:"),
        ("X-Content-Type-Options", "nosniff"),
    ]
    if refresh:
        headers.append(("Refresh", "5"))
    return headers
