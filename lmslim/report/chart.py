"""The quality-vs-decode-speed chart, drawn twice from one layout: a PNG (matplotlib) and an inline SVG.

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

The SVG is self-contained (no script library, no network): one ``<g class="pt">`` per variant
carries ``data-*`` attributes with its numbers and a ``data-tip`` text, and a few lines of inline
script show that text in a tooltip while the pointer (or keyboard focus) is on the point.

Example:
    >>> from lmslim.report.chart import axis_scale
    >>> axis_scale([25.2, 31.9, 511.8]), axis_scale([25.2, 31.9])
    ('log', 'linear')
"""

from __future__ import annotations

import html
import io
import math
from typing import Any, Sequence

LOG_SPAN = 10.0  # max/min above this: a log axis
ENGINE_MARKERS = {"torch": "o", "llama.cpp": "s", "onnxruntime": "^"}
FRONT, OTHER, TRIAL = "#d62728", "#1f77b4", "#c4c4c4"  # Pareto front, other variants, background (search trials)
LABEL_PT = 7  # PNG label font size (points)
SVG_W, SVG_H, SVG_FONT = 960, 560, 11  # SVG size and label font size (CSS px)
SVG_MARGIN = (72, 24, 44, 56)  # left, right, top (legend), bottom
SVG_R = 1.4  # SVG px per bubble-radius unit (the PNG uses points)

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


CHART_CSS = """#chart{font-family:'DejaVu Sans',Verdana,sans-serif;max-width:100%;height:auto;border:1px solid #ddd}
#chart .pt{cursor:pointer}#chart .pt:hover>*,#chart .pt:focus>*{stroke-width:2.5}#chart .pt:focus{outline:none}
#chart .lbl,#chart .front{pointer-events:none}#chart .lbl{paint-order:stroke;stroke:#fff;stroke-width:3px;stroke-opacity:.8}
#tip{position:fixed;z-index:10;pointer-events:none;background:#fff;border:1px solid #888;border-radius:4px;
padding:6px 8px;font-size:12px;line-height:1.4;white-space:pre-line;box-shadow:0 2px 6px rgba(0,0,0,.2);max-width:520px}"""

# Shows a point's data-tip beside the pointer (or the focused point); hides it when the pointer leaves.
_CHART_JS = """(function(){var svg=document.getElementById('chart'),tip=document.getElementById('tip');
function show(p,x,y){tip.textContent=p.getAttribute('data-tip');tip.hidden=false;var w=tip.offsetWidth,h=tip.offsetHeight;
tip.style.left=Math.max(4,Math.min(x+14,innerWidth-w-8))+'px';tip.style.top=(y+h+18>innerHeight?Math.max(4,y-h-10):y+14)+'px';}
svg.addEventListener('mousemove',function(e){var p=e.target.closest('.pt');if(p){show(p,e.clientX,e.clientY);}else{tip.hidden=true;}});
svg.addEventListener('mouseleave',function(){tip.hidden=true;});
svg.addEventListener('focusin',function(e){var p=e.target.closest('.pt');if(p){var b=p.getBoundingClientRect();show(p,b.right,b.bottom);}});
svg.addEventListener('focusout',function(){tip.hidden=true;});})();"""


def _num(v: float | None, spec: str, suffix: str = "") -> str | None:
    return None if v is None else format(v, spec) + suffix


def tooltip(row: dict[str, Any], metric: tuple[str, str, bool] | None) -> str:
    """The hover text of a chart point: name, engine and run, numbers with their ratios, the recipe's stages.

    Example:
        >>> print(tooltip({"name": "int8", "engine": "torch", "run": "q", "perplexity": 20.3, "quality_delta_pct": 1.5,
        ...                "decode_tokens_per_s": 14.5, "decode_x": 1.45, "size_mb": 200.0, "size_x": 0.4}, 
        ...               ("perplexity", "ppl", False)))
        int8
        engine: torch · run: q
        ppl: 20.3 (+1.5% vs baseline)
        decode: 14.5 tok/s (1.45× baseline)
        size: 200.0 MB (0.40× baseline)
    """
    lines = [str(row["name"]),
             f"engine: {row.get('engine') or 'torch'} · run: {row.get('run')}"
             + (" · search trial (not in the table)" if row.get("background") else "")]
    if metric and row.get(metric[0]) is not None:
        delta = _num(row.get("quality_delta_pct"), "+.1f", "% vs baseline")
        lines.append(f"{metric[1]}: {row[metric[0]]:.4g}" + (f" ({delta})" if delta else ""))
    for what, key, spec, unit, ratio in (("decode", "decode_tokens_per_s", ".1f", " tok/s", "decode_x"),
                                         ("size", "size_mb", ".1f", " MB", "size_x")):
        if row.get(key) is not None:
            x = _num(row.get(ratio), ".2f", "× baseline")
            lines.append(f"{what}: {row[key]:{spec}}{unit}" + (f" ({x})" if x else ""))
    if row.get("pareto"):
        lines.append("on the Pareto front")
    stages = row.get("recipe_stages") or []
    lines += [f"stage {i + 1}: {s}" for i, s in enumerate(stages)]
    return "\n".join(lines)


class _Frame:
    """Data → SVG pixel mapping of the plot area (y grows downwards in SVG)."""

    def __init__(self, xscale: str, yscale: str, xlim: tuple[float, float], ylim: tuple[float, float]):
        ml, mr, mt, mb = SVG_MARGIN
        self.box = (float(ml), float(mt), float(SVG_W - mr), float(SVG_H - mb))
        self.xscale, self.yscale, self.xlim, self.ylim = xscale, yscale, xlim, ylim

    def x(self, v: float) -> float:
        lo, hi = (_fwd(t, self.xscale) for t in self.xlim)
        return self.box[0] + (self.box[2] - self.box[0]) * (_fwd(v, self.xscale) - lo) / (hi - lo)

    def y(self, v: float) -> float:
        lo, hi = (_fwd(t, self.yscale) for t in self.ylim)
        return self.box[3] - (self.box[3] - self.box[1]) * (_fwd(v, self.yscale) - lo) / (hi - lo)


def text_width(text: str, size_px: float) -> float:
    """Advance width of ``text`` in DejaVu Sans at ``size_px`` CSS pixels (matplotlib's font metrics).

    Example:
        >>> 20 < text_width("baseline", 11) < 60
        True
    """
    from matplotlib.backends.backend_agg import RendererAgg
    from matplotlib.font_manager import FontProperties

    # At 72 dpi one point is one pixel, so a size in points measures a size in CSS pixels.
    w, _, _ = RendererAgg(10, 10, 72).get_text_width_height_descent(
        text, FontProperties(family="DejaVu Sans", size=size_px), ismath=False)
    return float(w)


def _shape(marker: str, x: float, y: float, r: float, attrs: str) -> str:
    if marker == "o":
        return f'<circle cx="{x:.1f}" cy="{y:.1f}" r="{r:.1f}" {attrs}/>'
    if marker == "s":  # same area as the circle
        h = r * 0.886
        return f'<rect x="{x - h:.1f}" y="{y - h:.1f}" width="{2 * h:.1f}" height="{2 * h:.1f}" {attrs}/>'
    corners = ([(x, y - r), (x - r, y + 0.75 * r), (x + r, y + 0.75 * r)] if marker == "^"
               else [(x, y - r), (x + r, y), (x, y + r), (x - r, y)])
    return f'<polygon points="{" ".join(f"{a:.1f},{b:.1f}" for a, b in corners)}" {attrs}/>'


def _point(row: dict[str, Any], metric: tuple[str, str, bool], x: float, y: float, r: float) -> str:
    """One variant: a ``<g class="pt">`` with its numbers as ``data-*`` attributes and one marker shape."""
    key = metric[0]
    data = {"name": row["name"], "engine": row.get("engine") or "torch", "run": row.get("run"), "quality": row[key],
            "decode": row["decode_tokens_per_s"], "size-mb": row.get("size_mb"), "decode-x": row.get("decode_x"),
            "pareto": str(bool(row.get("pareto"))).lower(), "background": str(bool(row.get("background"))).lower(),
            "tip": tooltip(row, metric)}
    attrs = " ".join(f'data-{k}="{html.escape(str(v), quote=True)}"' for k, v in data.items() if v is not None)
    if row.get("background"):
        return (f'<g class="pt trial" {attrs}><circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{TRIAL}"/></g>')
    color = FRONT if row.get("pareto") else OTHER
    style = f'fill="{color}" fill-opacity="0.6" stroke="#000" stroke-width="0.8"'
    return (f'<g class="pt" tabindex="0" aria-label="{html.escape(str(row["name"]), quote=True)}" {attrs}>'
            + _shape(engine_marker(row.get("engine")), x, y, r, style) + "</g>")


def _svg_axes(f: _Frame, metric: tuple[str, str, bool]) -> list[str]:
    x0, y0, x1, y1 = f.box
    out = [f'<rect x="{x0}" y="{y0}" width="{x1 - x0}" height="{y1 - y0}" fill="#fff" stroke="#999"/>']
    for t in axis_ticks(*f.xlim, f.xscale):
        x = f.x(t)
        out.append(f'<line x1="{x:.1f}" y1="{y0}" x2="{x:.1f}" y2="{y1}" stroke="#e6e6e6"/>'
                   f'<text x="{x:.1f}" y="{y1 + 16}" font-size="11" text-anchor="middle">{t:g}</text>')
    for t in axis_ticks(*f.ylim, f.yscale):
        y = f.y(t)
        out.append(f'<line x1="{x0}" y1="{y:.1f}" x2="{x1}" y2="{y:.1f}" stroke="#e6e6e6"/>'
                   f'<text x="{x0 - 6}" y="{y + 4:.1f}" font-size="11" text-anchor="end">{t:g}</text>')
    xtitle, ytitle = _axis_titles(metric)
    xtitle += " · log scale" if f.xscale == "log" else ""
    ytitle += " · log scale" if f.yscale == "log" else ""
    out.append(f'<text x="{(x0 + x1) / 2:.1f}" y="{SVG_H - 14}" font-size="12" text-anchor="middle">'
               f'{html.escape(xtitle)}</text>'
               f'<text transform="translate(16 {(y0 + y1) / 2:.1f}) rotate(-90)" font-size="12" text-anchor="middle">'
               f'{html.escape(ytitle)}</text>')
    return out


def _svg_legend(pts: list[dict], bg: list[dict]) -> list[str]:
    items = [("o", FRONT, "Pareto front"), ("o", OTHER, "other variant")]
    engines = list(dict.fromkeys(r.get("engine") or "torch" for r in pts))
    items += [(engine_marker(e), "#fff", f"engine: {e}") for e in engines if len(engines) > 1]
    items += [("o", TRIAL, "search trial")] if bg else []
    out, x = [], float(SVG_MARGIN[0])
    for marker, color, text in items:
        out.append(_shape(marker, x + 6, 20, 5, f'fill="{color}" stroke="#000" stroke-width="0.6"'))
        x += 16
        out.append(f'<text x="{x:.1f}" y="24" font-size="11">{html.escape(text)}</text>')
        x += text_width(text, 11) + 18
    return out


def pareto_svg(rows: list[dict[str, Any]], metric: tuple[str, str, bool] | None,
               background: Sequence[dict[str, Any]] = ()) -> str:
    """The interactive chart for report.html: inline SVG, its tooltip ``<div id="tip">`` and inline script.

    Same axes (``axis_scale``), marker shapes and label placement as the PNG; style it with ``CHART_CSS``.

    Example:
        >>> rows = [{"name": "a", "perplexity": 20.0, "decode_tokens_per_s": 10.0, "size_mb": 5, "pareto": True}]
        >>> pareto_svg(rows, ("perplexity", "ppl", False)).count('class="pt"')
        1
    """
    pts = plotted(rows, metric[0]) if metric else []
    bg = plotted(background, metric[0]) if metric else []
    if not pts and not bg:
        return '<p class="note">no quality measurement to chart</p>'
    key = metric[0]
    f = _Frame(*_scales(pts, bg, key))
    parts = [f'<svg id="chart" viewBox="0 0 {SVG_W} {SVG_H}" width="{SVG_W}" height="{SVG_H}" role="img" '
             'aria-label="quality vs decode speed" font-family="DejaVu Sans,Verdana,sans-serif">']
    parts += _svg_axes(f, metric) + _svg_legend(pts, bg)
    parts += [_point(dict(r, background=True), metric, f.x(r["decode_tokens_per_s"]), f.y(r[key]), 3) for r in bg]
    max_size = max((r.get("size_mb") or 0) for r in pts) if pts else 0
    anchors = [(f.x(r["decode_tokens_per_s"]), f.y(r[key]), SVG_R * bubble_radius(r.get("size_mb"), max_size))
               for r in pts]
    line = [anchors[i][:2] for i in _front(pts)]
    if len(line) > 1:
        coords = " ".join(f"{x:.1f},{y:.1f}" for x, y in line)
        parts.append(f'<polyline class="front" points="{coords}" fill="none" stroke="{FRONT}" stroke-width="1.5"/>')
    parts += [_point(r, metric, *a) for r, a in zip(pts, anchors)]
    order = _label_order(pts)
    # textLength pins each label to its measured width, so a browser with another font cannot make it collide.
    sizes = [(text_width(str(pts[i]["name"]), SVG_FONT) + 1, 1.2 * SVG_FONT) for i in order]
    x0, y0, x1, y1 = f.box
    boxes = place_labels([anchors[i] for i in order], sizes, (x0 + 2, y0 + 2, x1 - 2, y1 - 2),
                         segments=list(zip(line, line[1:])))
    for i, box in zip(order, boxes):
        if box is not None:
            baseline = box[3] - 0.26 * SVG_FONT  # the box's bottom holds the font's descent
            parts.append(f'<text class="lbl" x="{box[0]:.1f}" y="{baseline:.1f}" font-size="{SVG_FONT}" '
                         f'textLength="{box[2] - box[0]:.1f}" lengthAdjust="spacingAndGlyphs">'
                         f'{html.escape(str(pts[i]["name"]))}</text>')
    parts.append("</svg>")
    return ("".join(parts) + '<p class="note">Marker area = size on disk, shape = engine. Hover a point (or reach it '
            'with Tab) for its recipe and numbers.</p><div id="tip" role="tooltip" hidden></div><script>'
            + _CHART_JS + "</script>")
