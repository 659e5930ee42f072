"""The chart as an inline SVG for report.html: same layout decisions as the PNG (``lmslim.report.chart``).

Self-contained (no script library, no network): one ``<g class="pt">`` per variant carries ``data-*``
attributes with its numbers and a ``data-tip`` text, and a few lines of inline script show that text
in a tooltip while the pointer (or keyboard focus) is on the point. Style it with ``CHART_CSS``.

Example:
    >>> from lmslim.report.chart_svg import pareto_svg
    >>> rows = [{"name": "base", "perplexity": 25.0, "decode_tokens_per_s": 30.0, "size_mb": 540.0, "front": True}]
    >>> pareto_svg(rows, ("perplexity", "perplexity", False)).startswith("<svg")
    True
"""

from __future__ import annotations

import html
from typing import Any

from lmslim.report.chart import (FRONT, OTHER, TRIAL, _axis_titles, _front, _fwd, _label_order, _scales, axis_ticks,
                                 bubble_radius, engine_marker, place_labels, plotted)

SVG_W, SVG_H, SVG_FONT = 960, 560, 11  # SVG size and label font size (CSS px)
SVG_MARGIN = (72, 24, 44, 56)  # left, right, top (legend), bottom
SVG_R = 1.4  # SVG px per bubble-radius unit (the PNG uses points)


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
