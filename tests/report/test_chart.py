"""The chart: log axes past a decade, labels that never collide, background trials, the interactive SVG."""

import itertools
import json
import os
import random
import re
import xml.etree.ElementTree as ET

import pytest

from lmslim.report.build import build_report, collect_all, load_runs
from lmslim.report.chart import axis_scale, axis_ticks, bubble_radius, pareto_figure, place_labels
from lmslim.report.chart_svg import CHART_CSS, pareto_svg
from tests.report.test_report import CHROMIUM, make_run, variant

PPL = ("perplexity", "ppl", False)


def _intersect(a, b):
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _row(name, ppl, tok_s, size, pareto=False, engine="torch"):
    return {"name": name, "perplexity": ppl, "decode_tokens_per_s": tok_s, "size_mb": size, "pareto": pareto,
            "engine": engine, "run": "r"}


def test_log_axis_only_past_a_decade():
    assert axis_scale([25.2, 31.9, 57.6, 511.8]) == "log"  # the demo's perplexities
    assert axis_scale([25.2, 31.9, 57.6]) == "linear"
    assert axis_scale([3.0, 30.0]) == "linear"  # exactly a decade stays linear
    assert axis_scale([3.0, 30.01]) == "log"
    assert axis_scale([0.0, 0.5, 0.9]) == "linear"  # accuracy can be 0: no log axis for it
    assert axis_scale([]) == "linear"
    assert axis_ticks(20.0, 600.0, "log") == [20.0, 50.0, 100.0, 200.0, 500.0]


def test_png_and_svg_take_the_same_axis_decision():
    rows = [_row("base", 25.2, 26.3, 538, True), _row("kd", 511.8, 41.6, 308), _row("gguf", 25.3, 187.9, 145, True)]
    fig = pareto_figure(rows, PPL)
    ax = fig.axes[0]
    assert (ax.get_xscale(), ax.get_yscale()) == ("linear", "log")  # speed spans 7×, perplexity 20×
    assert {t.get_text() for t in ax.get_yticklabels()} >= {"50", "100", "200", "500"}
    svg = pareto_svg(rows, PPL)
    assert "ppl (lower is better) · log scale" in svg and "tokens/s (higher is better) · log" not in svg
    assert all(f">{t}</text>" in svg for t in ("50", "100", "200", "500"))
    # Speed spanning more than a decade switches that axis too, independently.
    fig2 = pareto_figure([_row("a", 20, 2.0, 1), _row("b", 21, 50.0, 1)], PPL)
    assert (fig2.axes[0].get_xscale(), fig2.axes[0].get_yscale()) == ("log", "linear")


def _crowd(n=30, seed=0):
    rnd = random.Random(seed)
    return [_row(f"variant-{i:02d} · {i % 4}:quantize", 20 + rnd.random() * 3, 40 + rnd.random() * 8,
                 rnd.choice([100, 300, 500]), pareto=i % 7 == 0,
                 engine=rnd.choice(["torch", "llama.cpp", "onnxruntime"]))
            for i in range(n)]


def test_place_labels_never_overlaps_on_a_crowded_set():
    rnd = random.Random(1)
    anchors = [(200 + rnd.random() * 80, 150 + rnd.random() * 60, rnd.choice([4.0, 8.0, 14.0])) for _ in range(30)]
    sizes = [(40 + rnd.random() * 60, 10.0) for _ in anchors]
    bounds = (0.0, 0.0, 500.0, 350.0)
    line = [(150.0, 250.0), (240.0, 180.0), (400.0, 120.0)]  # a front through the crowd
    boxes = place_labels(anchors, sizes, bounds, segments=list(zip(line, line[1:])))
    placed = [b for b in boxes if b is not None]
    assert 5 <= len(placed) < 30  # crowded: some fit, some must be left out rather than overlap
    for a, b in itertools.combinations(placed, 2):
        assert not _intersect(a, b)
    markers = [(x - r, y - r, x + r, y + r) for x, y, r in anchors]
    for box, (w, h) in zip(boxes, sizes):
        if box:
            assert not any(_intersect(box, m) for m in markers)
            assert bounds[0] <= box[0] and box[2] <= bounds[2] and bounds[1] <= box[1] and box[3] <= bounds[3]
            assert (box[2] - box[0], box[3] - box[1]) == pytest.approx((w, h))
    assert not any(_on_line(b, line) for b in placed)
    assert place_labels(anchors, sizes, bounds, segments=list(zip(line, line[1:]))) == boxes  # deterministic
    assert place_labels(anchors, sizes, bounds) != boxes  # the line did move labels


def _on_line(box, line, steps=400):
    """Whether any of many points along the polyline falls inside ``box`` (a check independent of the code's)."""
    for (ax, ay), (bx, by) in zip(line, line[1:]):
        for k in range(steps + 1):
            x, y = ax + (bx - ax) * k / steps, ay + (by - ay) * k / steps
            if box[0] <= x <= box[2] and box[1] <= y <= box[3]:
                return True
    return False


def test_png_labels_do_not_collide_as_drawn():
    """Matplotlib's own text boxes, after drawing, overlap neither each other nor any marker."""
    import matplotlib.pyplot as plt

    rows = _crowd()
    fig = pareto_figure(rows, PPL)
    ax = fig.axes[0]
    renderer = fig.canvas.get_renderer()
    fig.canvas.draw()
    texts = [t for t in ax.texts]
    assert 3 <= len(texts) < len(rows)
    boxes = [tuple(t.get_window_extent(renderer).extents) for t in texts]
    for a, b in itertools.combinations(boxes, 2):
        assert not _intersect(a, b)
    front = sorted((r for r in rows if r["pareto"]), key=lambda r: r["decode_tokens_per_s"])
    line = [tuple(ax.transData.transform((r["decode_tokens_per_s"], r["perplexity"]))) for r in front]
    assert len(line) >= 3 and not any(_on_line(b, line) for b in boxes)
    max_size = max(r["size_mb"] for r in rows)
    for r in rows:
        x, y = ax.transData.transform((r["decode_tokens_per_s"], r["perplexity"]))
        rad = bubble_radius(r["size_mb"], max_size) * fig.dpi / 72
        assert not any(_intersect(b, (x - rad, y - rad, x + rad, y + rad)) for b in boxes)
    plt.close(fig)


def test_svg_one_point_per_variant_with_data():
    rows = _crowd(12)
    trials = [dict(_row(f"trial {i}", 22 + i, 30 + i, 100)) for i in range(5)]
    svg = pareto_svg(rows, PPL, trials)
    root = ET.fromstring(svg[:svg.index("</svg>") + 6])  # well-formed XML (inline in HTML: no xmlns needed)
    pts = [g for g in root.iter("g") if "pt" in g.get("class", "").split()]
    assert len(pts) == len(rows) + len(trials)
    by = {g.get("data-name"): g for g in pts}
    g = by[rows[3]["name"]]
    assert float(g.get("data-quality")) == pytest.approx(rows[3]["perplexity"])
    assert float(g.get("data-decode")) == pytest.approx(rows[3]["decode_tokens_per_s"])
    assert g.get("data-engine") == rows[3]["engine"] and g.get("data-background") == "false"
    assert rows[3]["name"] in g.get("data-tip") and f"{rows[3]['decode_tokens_per_s']:.1f} tok/s" in g.get("data-tip")
    assert by["trial 2"].get("data-background") == "true" and "search trial" in by["trial 2"].get("data-tip")
    labels = [t.text for t in root.iter("text") if t.get("class") == "lbl"]
    assert labels and not any(t.startswith("trial") for t in labels)  # trials are never labeled
    shapes = {g.get("data-engine"): next(iter(g)).tag for g in pts if g.get("data-background") == "false"}
    assert shapes == {"torch": "circle", "llama.cpp": "rect", "onnxruntime": "polygon"}
    assert "http://" not in svg and "https://" not in svg


def _search_runs(tmp_path):
    """Two table runs (with recipe.yaml) and two background trials, one of which beats every table row."""
    base = variant("baseline", None, 20.0, 10.0, 500, sha="B")
    a = make_run(tmp_path / "a", "int8", [base, variant("int8 · 0:quantize", "quantize", 20.3, 14.5, 200)])
    (a / "recipe.yaml").write_text("name: int8\nstages:\n- quantize: {method: dynamic-int8}\n")
    b = make_run(tmp_path / "b", "bad", [base, variant("bad · 0:quantize", "quantize", 30.0, 5.0, 300)])
    t1 = make_run(tmp_path / "t1", "trial-1", [base, variant("trial-1 · 0:quantize", "quantize", 19.0, 40.0, 90)])
    (t1 / "recipe.yaml").write_text("stages:\n- quantize: {method: gptq, bits: 4}\n")
    t2 = make_run(tmp_path / "t2", "trial-2", [variant("other base", None, 50.0, 3.0, 800, sha="O")])
    return [a, b], [t1, t2]


def test_background_rows_not_in_table_nor_pareto(tmp_path):
    fg, bg = _search_runs(tmp_path)
    alone = collect_all(load_runs(fg))[0]
    res = build_report(fg, tmp_path / "rep", background_dirs=bg)
    assert [r["name"] for r in res["rows"]] == [r["name"] for r in alone] == ["baseline", "int8 · 0:quantize",
                                                                               "bad · 0:quantize"]
    # trial-1 is better and faster than everything, yet the table's front is what it was without trials.
    assert [r["pareto"] for r in res["rows"]] == [r["pareto"] for r in alone] == [True, True, False]
    assert [r["name"] for r in res["background"]] == ["trial-1 · 0:quantize", "other base"]  # shared baseline once
    trial = res["background"][0]
    assert trial["background"] and not trial["pareto"] and trial["decode_x"] == pytest.approx(4.0)
    assert trial["recipe_stages"] == ["quantize(method=gptq, bits=4)"]
    assert res["rows"][1]["recipe_stages"] == ["quantize(method=dynamic-int8)"]
    assert res["rows"][0]["recipe_stages"] == []  # the baseline has no stages
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "trial-1" not in md and "2 search trial(s)" in md
    saved = json.loads((tmp_path / "rep" / "rows.json").read_text())
    assert [r["background"] for r in saved] == [False, False, False, True, True]
    page = (tmp_path / "rep" / "report.html").read_text()
    table = page[page.index('<table id="variants"'):]
    assert "trial-1" not in table[:table.index("</table>")]
    assert len(re.findall(r'data-background="true"', page)) == 2
    assert "stage 1: quantize(method=dynamic-int8)" in page
    build_report(fg, tmp_path / "rep2")  # the old call still works, with no trials drawn
    assert 'data-background="true"' not in (tmp_path / "rep2" / "report.html").read_text()
    # A search passes its front as runs and every trial as background: each variant is drawn once.
    res = build_report([fg[0], bg[0]], tmp_path / "rep3", background_dirs=[*fg, *bg])
    assert [r["name"] for r in res["background"]] == ["bad · 0:quantize", "other base"]
    assert [r["name"] for r in res["rows"] if r["pareto"]] == ["trial-1 · 0:quantize"]  # it dominates the baseline


@pytest.mark.skipif(CHROMIUM is None and not os.environ.get("LMSLIM_REQUIRE_BROWSER"),
                    reason="no chromium here (CI installs it and sets LMSLIM_REQUIRE_BROWSER=1)")
def test_chart_hover_in_headless_chromium(tmp_path):
    """Hovering a point shows its name and numbers; labels do not collide as the browser lays them out."""
    from PIL import Image
    from playwright.sync_api import sync_playwright

    assert CHROMIUM, "LMSLIM_REQUIRE_BROWSER is set but chromium is not installed"
    fg, bg = _search_runs(tmp_path)
    build_report(fg, tmp_path / "rep", background_dirs=bg)
    artifacts = os.environ.get("LMSLIM_TEST_ARTIFACTS", str(tmp_path))
    os.makedirs(artifacts, exist_ok=True)
    shot = os.path.join(artifacts, "chart-hover.png")
    errors = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.route("**/*", lambda route: route.abort() if not route.request.url.startswith(("file:", "data:"))
                   else route.continue_())  # self-contained: anything from the network would fail
        page.goto((tmp_path / "rep" / "report.html").as_uri())
        tip = page.locator("#tip")
        assert not tip.is_visible()
        page.hover('#chart .pt[data-name="int8 · 0:quantize"]')
        tip.wait_for(state="visible", timeout=5000)
        text = tip.inner_text()
        page.screenshot(path=shot)
        page.hover('#chart .pt[data-name="trial-1 · 0:quantize"]')
        trial_text = tip.inner_text()
        page.mouse.move(2, 2)
        tip.wait_for(state="hidden", timeout=5000)
        page.focus('#chart .pt[data-name="bad · 0:quantize"]')  # keyboard users get the same tooltip
        tip.wait_for(state="visible", timeout=5000)
        focus_text = tip.inner_text()
        # Label boxes as the browser lays them out, on a crowded chart (30 variants in a small area).
        crowded = pareto_svg(_crowd(), PPL)
        page.set_content(f"<html><head><style>{CHART_CSS}</style></head><body>{crowded}</body></html>")
        boxes = page.evaluate("""[...document.querySelectorAll('#chart .lbl, #chart .pt:not(.trial) > *')].map(e => {
            const b = e.getBoundingClientRect(); return [e.tagName, b.left, b.top, b.right, b.bottom]; })""")
        browser.close()
    assert errors == []
    assert "int8 · 0:quantize" in text and "ppl: 20.3 (+1.5% vs baseline)" in text
    assert "decode: 14.5 tok/s (1.45× baseline)" in text and "size: 200.0 MB (0.40× baseline)" in text
    assert "stage 1: quantize(method=dynamic-int8)" in text
    assert "bad · 0:quantize" in focus_text and "decode: 5.0 tok/s (0.50× baseline)" in focus_text
    assert "trial-1" in trial_text and "search trial" in trial_text and "40.0 tok/s" in trial_text
    labels = [b[1:] for b in boxes if b[0] == "text"]
    shapes = [b[1:] for b in boxes if b[0] != "text"]
    assert 5 <= len(labels) < 30 and len(shapes) == 30
    for a, b in itertools.combinations(labels, 2):
        assert not _intersect(a, b)
    for a in labels:
        assert not any(_intersect(a, s) for s in shapes)
    img = Image.open(shot).convert("RGB")
    assert img.size == (1280, 900)
    colors = img.getcolors(maxcolors=1 << 20)
    assert len(colors) > 50 and max(c for c, _ in colors) < 0.98 * img.size[0] * img.size[1]  # not a blank page
    assert any(rgb[0] > 180 and rgb[1] < 140 and rgb[2] < 140 for _, rgb in colors)  # the red Pareto markers
