"""The quality-vs-decode-speed chart, drawn twice from one layout: a PNG (matplotlib, here) and an inline
SVG (``lmslim.report.chart_svg``).

Both drawings take the same decisions from the same functions:

* an axis is logarithmic when its values span more than a decade (``axis_scale``), so one broken
  variant (perplexity 512 beside 25) does not squash every other point into a line;
* labels never collide (``place_labels``): each point's name tries a few positions around the
  marker and takes the first whose box overlaps no earlier label and no marker; when none fits the
  label is left out (the legend, the table and the SVG's hover still name the point);
* marker shape is the engine (torch circle, llama.cpp square, onnxruntime triangle), marker area
  grows with size on disk, the Pareto front is red and joined by a line, other variants blue;
* background rows (search trials) are small light-grey dots under everything else, unlabeled, and
  do not count as obstacles for labels (a search can draw hundreds; labels go over them on a halo).

Example:
    >>> from lmslim.report.chart import axis_scale
    >>> axis_scale([25.2, 31.9, 511.8]), axis_scale([25.2, 31.9])
    ('log', 'linear')
"""

from __future__ import annotations

import io
import math
from typing import Any, Sequence

LOG_SPAN = 10.0  # max/min above this: a log axis
ENGINE_MARKERS = {"torch": "o", "llama.cpp": "s", "onnxruntime": "^"}
FRONT, OTHER, TRIAL = "#d62728", "#1f77b4", "#c4c4c4"  # Pareto front, other variants, background (search trials)
LABEL_PT = 7  # PNG label font size (points)

Box = tuple[float, float, float, float]  # x0, y0, x1, y1 with x0 <= x1, y0 <= y1
Segment = tuple[tuple[float, float], tuple[float, float]]


def engine_marker(engine: str | None) -> str:
    """Matplotlib marker of an engine (``D`` for one not listed).

    Example:
        >>> engine_marker("llama.cpp"), engine_marker(None)
        ('s', 'o')
    """
    return ENGINE_MARKERS.get(engine or "torch", "D")


def axis_scale(values: Sequence[float | None]) -> str:
    """``"log"`` when the positive values span more than ``LOG_SPAN`` (max/min), else ``"linear"``.

    Example:
        >>> axis_scale([1.0, 10.0]), axis_scale([1.0, 10.5]), axis_scale([0.0, 50.0])
        ('linear', 'log', 'linear')
    """
    vals = [v for v in values if v is not None]
    if not vals or min(vals) <= 0:  # a log axis cannot show 0 or negative values
        return "linear"
    return "log" if max(vals) / min(vals) > LOG_SPAN else "linear"


def _fwd(v: float, scale: str) -> float:
    return math.log10(v) if scale == "log" else v


def axis_limits(values: Sequence[float], scale: str, pad: float = 0.08) -> tuple[float, float]:
    """Axis range with ``pad`` (a fraction of the span, measured in the axis's own scale) on both sides.

    Example:
        >>> axis_limits([10.0, 20.0], "linear")
        (9.2, 20.8)
    """
    lo, hi = _fwd(min(values), scale), _fwd(max(values), scale)
    span = hi - lo or (abs(hi) * 0.1 if scale == "linear" and hi else 0.1)
    lo, hi = lo - pad * span, hi + pad * span
    return (round(10 ** lo, 12), round(10 ** hi, 12)) if scale == "log" else (round(lo, 12), round(hi, 12))


def axis_ticks(lo: float, hi: float, scale: str) -> list[float]:
    """Tick values inside ``[lo, hi]``: 1-2-5 steps on a log axis, round steps on a linear one.

    Example:
        >>> axis_ticks(22.0, 600.0, "log")
        [50.0, 100.0, 200.0, 500.0]
    """
    from matplotlib.ticker import LogLocator, MaxNLocator

    if scale == "log":
        loc = LogLocator(base=10, subs=(1.0, 2.0, 5.0))
    else:
        loc = MaxNLocator(nbins=6, steps=[1, 2, 2.5, 5, 10])
    return [float(t) for t in loc.tick_values(lo, hi) if lo <= t <= hi]


def bubble_radius(size_mb: float | None, max_size: float) -> float:
    """Marker radius (points in the PNG): area grows linearly with size on disk, from 16 to 196 units.

    Example:
        >>> bubble_radius(0, 100), bubble_radius(100, 100)
        (4.0, 14.0)
    """
    frac = (size_mb or 0) / max_size if max_size else 0.0
    return math.sqrt(16 + 180 * min(max(frac, 0.0), 1.0))


def _overlaps(a: Box, b: Box) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _crosses(box: Box, p: tuple[float, float], q: tuple[float, float]) -> bool:
    """Whether the segment ``p``–``q`` passes through ``box`` (Liang–Barsky clipping)."""
    dx, dy = q[0] - p[0], q[1] - p[1]
    t0, t1 = 0.0, 1.0
    for pk, qk in ((-dx, p[0] - box[0]), (dx, box[2] - p[0]), (-dy, p[1] - box[1]), (dy, box[3] - p[1])):
        if pk == 0:
            if qk < 0:  # parallel to this edge and outside it
                return False
            continue
        t = qk / pk
        if pk < 0:
            t0 = max(t0, t)
        else:
            t1 = min(t1, t)
        if t0 > t1:
            return False
    return True


def place_labels(anchors: Sequence[tuple[float, float, float]], sizes: Sequence[tuple[float, float]], bounds: Box,
                 pad: float = 2.0, segments: Sequence[Segment] = ()) -> list[Box | None]:
    """Boxes for point labels that overlap no other label, no marker and no line; ``None`` where none fits.

    Deterministic: points are served in order; each tries right, upper right, lower right, left,
    upper left, lower left, above and below its marker, at three growing distances, and takes the
    first box that stays inside ``bounds`` and is at least ``pad`` away from every marker box, every
    label placed before it and every line segment (the Pareto front's). Units are any display units
    (pixels, points), the same for all arguments; the direction of the y axis does not matter.

    Args:
        anchors: ``(x, y, r)`` per point: marker centre and half-size (its box is ``x±r, y±r``).
        sizes: ``(width, height)`` of each label's text box.
        bounds: the area labels must stay in.
        pad: clearance between boxes.
        segments: ``((x0, y0), (x1, y1))`` line pieces labels must not cross.

    Example:
        >>> place_labels([(10, 10, 2), (14, 10, 2)], [(8, 4), (8, 4)], (0, 0, 100, 100))
        [(14.0, 14.0, 22.0, 18.0), (18.0, 8.0, 26.0, 12.0)]
    """
    markers = [(x - r, y - r, x + r, y + r) for x, y, r in anchors]
    placed: list[Box] = []
    out: list[Box | None] = []

    def fits(c: Box) -> bool:
        grown = (c[0] - pad, c[1] - pad, c[2] + pad, c[3] + pad)
        return (bounds[0] <= c[0] and c[2] <= bounds[2] and bounds[1] <= c[1] and c[3] <= bounds[3]
                and not any(_overlaps(grown, o) for o in (*markers, *placed))
                and not any(_crosses(grown, p, q) for p, q in segments))

    for (x, y, r), (w, h) in zip(anchors, sizes):
        box = next((c for c in _candidates(x, y, r, w, h, pad) if fits(c)), None)
        out.append(box)
        if box:
            placed.append(box)
    return out


def _candidates(x: float, y: float, r: float, w: float, h: float, pad: float):
    """Label boxes around a marker, nearest first: right, right ±y, left, left ±y, +y, −y."""
    for d in (r + pad, r + pad + 6, r + pad + 16):
        for x0, y0 in ((x + d, y - h / 2), (x + d, y + d), (x + d, y - d - h), (x - d - w, y - h / 2),
                       (x - d - w, y + d), (x - d - w, y - d - h), (x - w / 2, y + d), (x - w / 2, y - d - h)):
            yield float(x0), float(y0), float(x0 + w), float(y0 + h)


def plotted(rows: Sequence[dict[str, Any]], key: str) -> list[dict[str, Any]]:
    """Rows that have both a quality value under ``key`` and a decode speed."""
    return [r for r in rows if r.get(key) is not None and r.get("decode_tokens_per_s")]


def _front(pts: list[dict[str, Any]]) -> list[int]:
    """Indices of the Pareto-front points, slowest first (the order the front's line joins them)."""
    return sorted((i for i, r in enumerate(pts) if r.get("pareto")), key=lambda i: pts[i]["decode_tokens_per_s"])


def _label_order(pts: list[dict[str, Any]]) -> list[int]:
    """Front points get first pick of label positions, then the rest in table order."""
    return sorted(range(len(pts)), key=lambda i: (not pts[i].get("pareto"), i))


def _scales(pts: list[dict], bg: list[dict], key: str) -> tuple[str, str, tuple[float, float], tuple[float, float]]:
    xs = [r["decode_tokens_per_s"] for r in pts + bg]
    ys = [r[key] for r in pts + bg]
    xscale, yscale = axis_scale(xs), axis_scale(ys)
    return xscale, yscale, axis_limits(xs, xscale), axis_limits(ys, yscale)


def _axis_titles(metric: tuple[str, str, bool]) -> tuple[str, str]:
    _, label, higher = metric
    return "decode tokens/s (higher is better)", f"{label} ({'higher' if higher else 'lower'} is better)"


def pareto_figure(rows: list[dict[str, Any]], metric: tuple[str, str, bool] | None,
                  background: Sequence[dict[str, Any]] = ()):
    """The matplotlib figure behind ``pareto.png`` (the caller closes it).

    Example:
        >>> rows = [{"name": "a", "perplexity": 20.0, "decode_tokens_per_s": 10.0, "size_mb": 5, "pareto": True}]
        >>> fig = pareto_figure(rows, ("perplexity", "ppl", False))
        >>> [t.get_text() for t in fig.axes[0].texts]
        ['a']
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullLocator

    fig, ax = plt.subplots(figsize=(9, 5.5), dpi=110)
    pts = plotted(rows, metric[0]) if metric else []
    bg = plotted(background, metric[0]) if metric else []
    if not pts and not bg:
        ax.text(0.5, 0.5, "no quality measurement", ha="center", va="center")
        fig.tight_layout()
        return fig
    key = metric[0]
    xscale, yscale, xlim, ylim = _scales(pts, bg, key)
    ax.set_xscale(xscale)
    ax.set_yscale(yscale)
    ax.set_xlim(*xlim)
    ax.set_ylim(*ylim)
    for axis, lim, scale in ((ax.xaxis, xlim, xscale), (ax.yaxis, ylim, yscale)):
        ticks = axis_ticks(*lim, scale)
        if len(ticks) >= 2:  # else keep matplotlib's own ticks
            axis.set_ticks(ticks, labels=[f"{t:g}" for t in ticks])
            axis.set_minor_locator(NullLocator())
    if bg:
        ax.scatter([r["decode_tokens_per_s"] for r in bg], [r[key] for r in bg], s=14, color=TRIAL, linewidths=0,
                   zorder=1, label="search trial")
    max_size = max((r.get("size_mb") or 0) for r in pts) if pts else 0
    radii = [bubble_radius(r.get("size_mb"), max_size) for r in pts]
    for r, rad in zip(pts, radii):
        ax.scatter(r["decode_tokens_per_s"], r[key], s=(2 * rad) ** 2, alpha=0.6, marker=engine_marker(r.get("engine")),
                   color=FRONT if r.get("pareto") else OTHER, edgecolors="black", linewidths=0.6, zorder=3)
    front = [pts[i] for i in _front(pts)]
    if len(front) > 1:
        ax.plot([r["decode_tokens_per_s"] for r in front], [r[key] for r in front], color=FRONT, lw=1.2, zorder=2,
                label="Pareto front")
    engines = list(dict.fromkeys(r.get("engine") or "torch" for r in pts))
    for e in engines if len(engines) > 1 else []:  # marker shape = engine (legend only when there are several)
        ax.scatter([], [], marker=engine_marker(e), color="white", edgecolors="black", label=f"engine: {e}")
    if ax.get_legend_handles_labels()[0]:  # outside the plot area, so it never covers a point or a label
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, fontsize=8)
    xtitle, ytitle = _axis_titles(metric)
    ax.set_xlabel(xtitle + (" · log scale" if xscale == "log" else ""))
    ax.set_ylabel(ytitle + (" · log scale" if yscale == "log" else ""))
    ax.set_title("quality vs decode speed (marker area = size on disk, shape = engine)")
    ax.grid(alpha=0.3)
    fig.tight_layout()  # the axes' final place: label boxes are computed in these display pixels
    _annotate(fig, ax, pts, radii, key)
    return fig


def _annotate(fig, ax, pts: list[dict], radii: list[float], key: str) -> None:
    """Add the non-colliding point labels to a laid-out figure (display pixels via its transforms)."""
    renderer = fig.canvas.get_renderer()
    px_per_pt = fig.dpi / 72
    order = _label_order(pts)
    anchors, sizes = [], []
    for i in order:
        x, y = ax.transData.transform((pts[i]["decode_tokens_per_s"], pts[i][key]))
        anchors.append((float(x), float(y), radii[i] * px_per_pt))
        probe = ax.text(0, 0, pts[i]["name"], fontsize=LABEL_PT, transform=None)
        ext = probe.get_window_extent(renderer)  # matplotlib's own text box: what the test checks
        sizes.append((ext.width, ext.height))
        probe.remove()
    front = [anchors[order.index(i)][:2] for i in _front(pts)]
    x0, y0, x1, y1 = ax.bbox.extents
    boxes = place_labels(anchors, sizes, (x0 + 2, y0 + 2, x1 - 2, y1 - 2), segments=list(zip(front, front[1:])))
    for i, anchor, box in zip(order, anchors, boxes):
        if box is None:
            continue
        offset = ((box[0] - anchor[0]) / px_per_pt, (box[1] - anchor[1]) / px_per_pt)
        ax.annotate(pts[i]["name"], (pts[i]["decode_tokens_per_s"], pts[i][key]), xytext=offset,
                    textcoords="offset points", ha="left", va="bottom", fontsize=LABEL_PT, zorder=4,
                    bbox={"boxstyle": "square,pad=0", "facecolor": "white", "alpha": 0.6, "linewidth": 0})


def pareto_png(rows: list[dict[str, Any]], metric: tuple[str, str, bool] | None,
               background: Sequence[dict[str, Any]] = ()) -> bytes:
    """``pareto_figure`` as PNG bytes.

    Example:
        >>> pareto_png([], None)[:4]
        b'\\x89PNG'
    """
    import matplotlib.pyplot as plt

    fig = pareto_figure(rows, metric, background)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()
