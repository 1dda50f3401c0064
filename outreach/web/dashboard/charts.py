"""The dashboard's charts: accessible inline SVG line and bar charts (their figures are also in a table below them)."""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from dataclasses import dataclass

from markupsafe import Markup

from outreach.web.dashboard.render import format_percent

__all__ = ["Series", "bar_chart", "line_chart"]

#: Okabe–Ito colours (told apart with colour-blindness) and a dash pattern each, so lines differ without colour.
_COLOURS = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#D55E00", "#56B4E9", "#000000")
_DASHES = ("", "6 3", "2 3", "8 3 2 3", "4 4", "1 2", "10 4")


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


@dataclass(frozen=True)
class Series:
    name: str
    values: Sequence[float | None]


def _nice_ceiling(value: float) -> float:
    if value <= 0:
        return 1.0
    magnitude = 10.0 ** math.floor(math.log10(value))
    for step in (1.0, 2.0, 2.5, 5.0, 10.0):
        if value <= step * magnitude:
            return step * magnitude
    return 10.0 * magnitude  # pragma: no cover - the loop always returns


def line_chart(
    title: str,
    labels: Sequence[str],
    series: Sequence[Series],
    *,
    x_label: str,
    y_label: str,
    percent: bool = True,
    width: int = 720,
    height: int = 280,
) -> Markup:
    """An accessible SVG line chart: a title and description, labelled axes, a tooltip on every point.

    Values are fractions when ``percent`` (shown as %), else counts; ``None`` leaves a gap.
    """
    left, right, top, bottom = 56, 12, 16, 52
    plot_w, plot_h = width - left - right, height - top - bottom
    known = [v for s in series for v in s.values if v is not None]
    top_value = _nice_ceiling(max(known, default=0.0))
    if percent:
        top_value = min(top_value, 1.0) if max(known, default=0.0) <= 1.0 else top_value

    def x(i: int) -> float:
        return left + (plot_w * (i + 0.5) / max(len(labels), 1))

    def y(v: float) -> float:
        return top + plot_h * (1 - v / top_value)

    def fmt(v: float) -> str:
        return format_percent(v) if percent else f"{v:g}"

    slug = "".join(c if c.isalnum() else "-" for c in title.lower()).strip("-")
    desc = f"{len(series)} series over {len(labels)} periods; the figures are also in the table below."
    out = [
        f'<svg class="chart" viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" '
        f'aria-labelledby="{slug}-t {slug}-d" data-chart="{_e(slug)}">',
        f'<title id="{slug}-t">{_e(title)}</title><desc id="{slug}-d">{_e(desc)}</desc>',
    ]
    for k in range(5):
        tick = top_value * k / 4
        out.append(
            f'<line x1="{left}" x2="{width - right}" y1="{y(tick):.1f}" y2="{y(tick):.1f}" stroke="#ddd" />'
            f'<text x="{left - 6}" y="{y(tick) + 4:.1f}" text-anchor="end" font-size="11">{_e(fmt(tick))}</text>'
        )
    every = max(1, math.ceil(len(labels) / 10))
    for i, label in enumerate(labels):
        if i % every == 0:
            out.append(
                f'<text x="{x(i):.1f}" y="{top + plot_h + 16}" text-anchor="middle" font-size="11">{_e(label)}</text>'
            )
    out.append(
        f'<line x1="{left}" x2="{left}" y1="{top}" y2="{top + plot_h}" stroke="#555" />'
        f'<line x1="{left}" x2="{width - right}" y1="{top + plot_h}" y2="{top + plot_h}" stroke="#555" />'
        f'<text x="{left + plot_w / 2:.1f}" y="{height - 8}" text-anchor="middle" font-size="12">{_e(x_label)}</text>'
        f'<text transform="translate(14 {top + plot_h / 2:.1f}) rotate(-90)" text-anchor="middle" '
        f'font-size="12">{_e(y_label)}</text>'
    )
    for n, s in enumerate(series):
        colour, dash = _COLOURS[n % len(_COLOURS)], _DASHES[n % len(_DASHES)]
        segments: list[list[tuple[float, float]]] = [[]]
        for i, v in enumerate(s.values):
            if v is None:
                segments.append([])
            else:
                segments[-1].append((x(i), y(v)))
        out.append(f'<g class="series" data-series="{_e(s.name)}">')
        for points in segments:
            if len(points) > 1:
                path = " ".join(f"{px:.1f},{py:.1f}" for px, py in points)
                dash_attr = f' stroke-dasharray="{dash}"' if dash else ""
                out.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="2"{dash_attr} />')
        for i, v in enumerate(s.values):
            if v is not None:
                out.append(
                    f'<circle cx="{x(i):.1f}" cy="{y(v):.1f}" r="3" fill="{colour}">'
                    f"<title>{_e(s.name)}, {_e(labels[i])}: {_e(fmt(v))}</title></circle>"
                )
        out.append("</g>")
    out.append("</svg>")
    legend = "".join(
        f'<li><svg width="28" height="10" aria-hidden="true"><line x1="0" x2="28" y1="5" y2="5" '
        f'stroke="{_COLOURS[n % len(_COLOURS)]}" stroke-width="2"'
        + (f' stroke-dasharray="{_DASHES[n % len(_DASHES)]}"' if _DASHES[n % len(_DASHES)] else "")
        + f" /></svg> {_e(s.name)}</li>"
        for n, s in enumerate(series)
    )
    return Markup(f'<figure>{"".join(out)}<figcaption><ul class="legend">{legend}</ul></figcaption></figure>')


def bar_chart(title: str, bars: Sequence[tuple[str, float]], *, x_label: str, width: int = 720) -> Markup:
    """Horizontal bars (counts), one per label, each with its number written next to it."""
    row, left, right, top = 24, 120, 60, 8
    height = top + row * len(bars) + 36
    plot_w = width - left - right
    top_value = max((v for _, v in bars), default=0.0) or 1.0
    slug = "".join(c if c.isalnum() else "-" for c in title.lower()).strip("-")
    out = [
        f'<svg class="chart" viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" '
        f'aria-labelledby="{slug}-t" data-chart="{_e(slug)}"><title id="{slug}-t">{_e(title)}</title>'
    ]
    for i, (label, value) in enumerate(bars):
        y0 = top + i * row
        w = plot_w * value / top_value
        out.append(
            f'<text x="{left - 6}" y="{y0 + 16}" text-anchor="end" font-size="12">{_e(label)}</text>'
            f'<rect x="{left}" y="{y0 + 3}" width="{w:.1f}" height="{row - 6}" fill="{_COLOURS[0]}">'
            f"<title>{_e(label)}: {value:g}</title></rect>"
            f'<text x="{left + w + 4:.1f}" y="{y0 + 16}" font-size="12">{value:g}</text>'
        )
    out.append(
        f'<text x="{left + plot_w / 2:.1f}" y="{height - 6}" text-anchor="middle" font-size="12">{_e(x_label)}</text>'
        "</svg>"
    )
    return Markup("".join(out))
