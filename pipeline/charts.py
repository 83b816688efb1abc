"""The report's charts as inline SVG: bars, a stacked histogram, paired bars.

Written out by hand rather than drawn by a plotting library: a run writes its report every time,
and matplotlib's import, layout and PNG encoding cost ~2 s of a small run's ~6 (measured on the
1,000-document DSIR run); these take milliseconds, stay sharp at any zoom, and the browser sets
their text in the page's own font. Every function returns one ``<svg>`` element sized by its
``viewBox`` to the panel's width.
"""

from __future__ import annotations

import html
import math

WIDTH = 640
FONT = 11
CHAR = 6.3  # the mean advance of a character at FONT px in a sans-serif face, for layout
AXIS, GRID, INK = "#59636e", "#e6e9ed", "#1d2329"


def _e(s) -> str:
    return html.escape(str(s), quote=True)


def number(v: float) -> str:
    """A tick or bar label: whole numbers with thousands separators, else three significant digits."""
    v = float(v)
    if v == int(v) and abs(v) < 1e15:
        return f"{int(v):,}"
    return f"{v:.3g}"


def ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """Round values (1, 2 or 5 × 10^k apart) that cover [lo, hi] in about n steps."""
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return [lo] if math.isfinite(lo) else []
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw * (1 - 1e-9))
    first = math.ceil(lo / step - 1e-9)
    return [round(k * step, 12) for k in range(first, math.floor(hi / step + 1e-9) + 1)]


def _svg(height: float, body: list[str], label: str) -> str:
    return (
        f"<svg xmlns='http://www.w3.org/2000/svg' viewBox='0 0 {WIDTH} {height:.0f}' width='100%' role='img' "
        f"aria-label='{_e(label)}' font-size='{FONT}' font-family='system-ui,sans-serif' fill='{INK}'>"
        + "".join(body)
        + "</svg>"
    )


def _text(x, y, s, anchor="start", **attrs) -> str:
    extra = "".join(f" {k.replace('_', '-')}='{v}'" for k, v in attrs.items())
    return f"<text x='{x:.1f}' y='{y:.1f}' text-anchor='{anchor}'{extra}>{_e(s)}</text>"


def _rect(x, y, w, h, color, **attrs) -> str:
    extra = "".join(f" {k.replace('_', '-')}='{v}'" for k, v in attrs.items())
    return f"<rect x='{x:.1f}' y='{y:.1f}' width='{max(w, 0):.1f}' height='{max(h, 0):.1f}' fill='{color}'{extra}/>"


def _legend(x_right: float, y: float, entries: list[tuple[str, str]]) -> list[str]:
    out, x = [], x_right
    for name, color in reversed(entries):
        x -= len(name) * CHAR + 4
        out.append(_text(x, y + 9, name))
        x -= 14
        out.append(_rect(x, y, 10, 10, color))
        x -= 10
    return out


def _label_width(labels) -> float:
    return min(220.0, max([40.0] + [len(str(s)) * CHAR + 16 for s in labels]))


def _short(s, width: float) -> str:
    s, n = str(s), max(3, int(width / CHAR))
    return s if len(s) <= n else s[: n - 1] + "…"


def _x_axis(left, right, y, lo, hi, label, x_of, top) -> list[str]:
    """A horizontal axis at y with its ticks, and grid lines from each tick up to ``top``."""
    out = [f"<line x1='{left}' y1='{y}' x2='{right}' y2='{y}' stroke='{AXIS}'/>"]
    for t in ticks(lo, hi):
        x = x_of(t)
        out.append(f"<line x1='{x:.1f}' y1='{top}' x2='{x:.1f}' y2='{y}' stroke='{GRID}'/>")
        out.append(_text(x, y + 13, number(t), "middle", fill=AXIS))
    out.append(_text((left + right) / 2, y + 29, label, "middle", fill=AXIS))
    return out


def _y_axis(left, right, top, bottom, values, y_of, label) -> list[str]:
    """Grid lines across the plot at ``values`` with their labels, and the axis's title turned."""
    out = []
    for t in values:
        y = y_of(t)
        out.append(f"<line x1='{left}' y1='{y:.1f}' x2='{right}' y2='{y:.1f}' stroke='{GRID}'/>")
        out.append(_text(left - 5, y + 4, number(t), "end", fill=AXIS))
    middle = (top + bottom) / 2
    out.append(_text(14, middle, label, "middle", fill=AXIS, transform=f"rotate(-90 14 {middle:.0f})"))
    return out


def bar_chart(rows: list[tuple[str, float, str]], xlabel: str, value_labels: list[str] | None = None) -> str:
    """Horizontal bars, one a row, top to bottom as given: [(label, value, color)]; each bar's
    value written at its end."""
    left = _label_width(r[0] for r in rows)
    right = WIDTH - 70
    row, top = 22, 8
    bottom = top + row * len(rows)
    hi = max([r[1] for r in rows] + [0]) or 1
    x_of = lambda v: left + (right - left) * v / hi  # noqa: E731
    body = _x_axis(left, right, bottom, 0, hi, xlabel, x_of, top)
    labels = value_labels or [number(r[1]) for r in rows]
    for i, ((name, value, color), text) in enumerate(zip(rows, labels)):
        y = top + i * row
        body.append(_text(left - 6, y + row / 2 + 4, _short(name, left - 6), "end"))
        body.append(_rect(left, y + 3, x_of(value) - left, row - 6, color))
        body.append(_text(x_of(value) + 4, y + row / 2 + 4, text))
    return _svg(bottom + 36, body, xlabel)


def histogram_chart(
    edges: list[float],
    rest: list[int],
    selected: list[int],
    xlabel: str,
    colors: tuple[str, str],
    cut: tuple[float, float] | None = None,
) -> str:
    """Counts per bin stacked (the rest below, the selection above), on a log scale when the
    tallest bin dwarfs the others; ``cut``: the lowest and highest selected value, drawn dashed."""
    left, right, top, bottom = 58, WIDTH - 12, 22, 190
    totals = [a + b for a, b in zip(rest, selected)]
    peak = max(totals + [1])
    quarter = sorted(totals)[-max(1, len(edges) // 4)]
    log = peak > 50 * max(1, quarter)
    if log:
        lo_y, hi_y = -0.3, math.log10(peak) * 1.05
        y_of = lambda v: bottom - (bottom - top) * ((math.log10(v) if v > 0 else lo_y) - lo_y) / (hi_y - lo_y)  # noqa: E731
        y_ticks = [10**k for k in range(0, int(math.floor(hi_y)) + 1)]
    else:
        hi_y = peak * 1.05
        y_of = lambda v: bottom - (bottom - top) * v / hi_y  # noqa: E731
        y_ticks = ticks(0, hi_y)
    e0, e1 = edges[0], edges[-1]
    span = (e1 - e0) or 1
    x_of = lambda v: left + (right - left) * (v - e0) / span  # noqa: E731
    body = _y_axis(left, right, top, bottom, y_ticks, y_of, "documents" + (" (log)" if log else ""))
    body += _x_axis(left, right, bottom, e0, e1, xlabel, x_of, bottom)
    for a, b, r, s in zip(edges[:-1], edges[1:], rest, selected):
        x, w = x_of(a), max(x_of(b) - x_of(a) - 0.5, 0.5)
        if r:
            body.append(_rect(x, y_of(r), w, bottom - y_of(r), colors[1]))
        if s:
            base = y_of(r) if r else bottom
            body.append(_rect(x, y_of(r + s), w, base - y_of(r + s), colors[0]))
    if cut:
        for v in cut:
            x = x_of(v)
            line = f"<line x1='{x:.1f}' y1='{top}' x2='{x:.1f}' y2='{bottom}' stroke='{INK}'"
            body.append(line + " stroke-dasharray='4 3'/>")
        body.append(_text(x_of(cut[0]) + 3, top + 10, "cut"))
    body += _legend(right, 4, [("not selected", colors[1]), ("selected", colors[0])])
    return _svg(bottom + 36, body, f"histogram of {xlabel}")


def paired_bar_chart(rows: list[tuple[str, float, float]], xlabel: str, names: tuple[str, str],
                     colors: tuple[str, str]) -> str:  # fmt: skip
    """Two horizontal bars a row ([(label, a, b)]): a above in colors[0], b below in colors[1]."""
    left = _label_width(r[0] for r in rows)
    right, top, row = WIDTH - 50, 22, 24
    bottom = top + row * len(rows)
    hi = max([max(a, b) for _, a, b in rows] + [0]) or 1
    x_of = lambda v: left + (right - left) * v / hi  # noqa: E731
    body = _x_axis(left, right, bottom, 0, hi, xlabel, x_of, top)
    for i, (name, a, b) in enumerate(rows):
        y = top + i * row
        body.append(_text(left - 6, y + row / 2 + 4, _short(name, left - 6), "end"))
        body.append(_rect(left, y + 2, x_of(a) - left, (row - 4) / 2, colors[0]))
        body.append(_rect(left, y + row / 2, x_of(b) - left, (row - 4) / 2, colors[1]))
    body += _legend(WIDTH - 12, 4, list(zip(names, colors)))
    return _svg(bottom + 36, body, xlabel)


def column_chart(rows: list[tuple[str, float, float]], xlabel: str, names: tuple[str, str],
                 colors: tuple[str, str]) -> str:  # fmt: skip
    """Vertical bars a column ([(label, whole, part)]): the part (colors[1]) drawn over the whole
    (colors[0])."""
    left, right, top, bottom = 58, WIDTH - 12, 22, 190
    hi = max([r[1] for r in rows] + [1]) * 1.05
    y_of = lambda v: bottom - (bottom - top) * v / hi  # noqa: E731
    step = (right - left) / max(1, len(rows))
    body = _y_axis(left, right, top, bottom, ticks(0, hi), y_of, "documents")
    body.append(f"<line x1='{left}' y1='{bottom}' x2='{right}' y2='{bottom}' stroke='{AXIS}'/>")
    for i, (name, whole, part) in enumerate(rows):
        x = left + i * step
        body.append(_rect(x + step * 0.1, y_of(whole), step * 0.8, bottom - y_of(whole), colors[0]))
        body.append(_rect(x + step * 0.1, y_of(part), step * 0.8, bottom - y_of(part), colors[1]))
        body.append(_text(x + step / 2, bottom + 13, _short(name, step + 4), "middle", fill=AXIS, font_size="9"))
    body.append(_text((left + right) / 2, bottom + 29, xlabel, "middle", fill=AXIS))
    body += _legend(right, 4, list(zip(names, colors)))
    return _svg(bottom + 36, body, xlabel)
