"""Line charts drawn on the server as inline SVG: the stats page needs no script
and no CDN, so the demo works offline."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from html import escape

COLORS = ("#c2410c", "#2563eb", "#15803d", "#7c3aed", "#b45309", "#0e7490", "#be123c")
WIDTH, HEIGHT = 640, 220
LEFT, RIGHT, TOP, BOTTOM = 48, 12, 12, 28


def _clock(epoch: int) -> str:
    return time.strftime("%H:%M", time.gmtime(epoch))


def line_chart(
    title: str,
    minutes: Sequence[int],
    series: Mapping[str, Sequence[float | None]],
    *,
    percent: bool = False,
    chart_id: str = "",
) -> str:
    """One line per series (``None``: no point that minute), x = ``minutes``
    (epoch seconds, UTC labels), y from 0 to the largest value (or 100 %)."""
    values = [v for points in series.values() for v in points if v is not None]
    top = 1.0 if percent else max([1.0, *values])
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    step = plot_w / max(1, len(minutes) - 1)

    def xy(index: int, value: float) -> str:
        return f"{LEFT + index * step:.1f},{TOP + plot_h * (1 - value / top):.1f}"

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {HEIGHT}" '
        f'role="img" aria-label="{escape(title)}" id="{escape(chart_id)}" class="chart">',
        f'<rect x="{LEFT}" y="{TOP}" width="{plot_w}" height="{plot_h}" fill="#fff" '
        'stroke="#e4e7eb"/>',
    ]
    for fraction in (0.0, 0.5, 1.0):
        y = TOP + plot_h * (1 - fraction)
        label = f"{fraction * 100:.0f}%" if percent else f"{top * fraction:.0f}"
        parts.append(
            f'<line x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{y:.1f}" y2="{y:.1f}" stroke="#e4e7eb"/>'
            f'<text x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end" font-size="11" '
            f'fill="#616e7c">{label}</text>'
        )
    if minutes:
        last = len(minutes) - 1
        for index in sorted({0, len(minutes) // 2, last}):
            # The end labels are anchored inwards, so they are not cut at the edges.
            anchor = "start" if index == 0 else "end" if index == last else "middle"
            parts.append(
                f'<text x="{LEFT + index * step:.1f}" y="{HEIGHT - 8}" text-anchor="{anchor}" '
                f'font-size="11" fill="#616e7c">{_clock(minutes[index])}</text>'
            )
    for number, (name, points) in enumerate(series.items()):
        color = COLORS[number % len(COLORS)]
        coords = [xy(i, v) for i, v in enumerate(points) if v is not None]
        label = escape(name)
        if len(coords) > 1:
            parts.append(
                f'<polyline fill="none" stroke="{color}" stroke-width="2" '
                f'points="{" ".join(coords)}" data-instance="{label}"/>'
            )
        for coord in coords:
            cx, cy = coord.split(",")
            parts.append(
                f'<circle cx="{cx}" cy="{cy}" r="3" fill="{color}"><title>{label}</title></circle>'
            )
    parts.append("</svg>")
    legend = "".join(
        f'<span class="legend"><i style="background:{COLORS[n % len(COLORS)]}"></i>'
        f"{escape(name)}</span>"
        for n, name in enumerate(series)
    )
    return (
        f"<figure><figcaption>{escape(title)}</figcaption>{''.join(parts)}"
        f'<div class="row">{legend}</div></figure>'
    )
