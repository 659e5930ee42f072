"""Quality-vs-cost report over one or more ``lmslim compress`` runs.

Every variant (the baseline and the model after each measured stage) becomes one row with ratios to
the baseline, the cost-model figures and a verdict on whether its speedup is real on the device it
was measured on. The chart (``lmslim.report.chart``: ``pareto.png`` and an interactive SVG in
``report.html``) plots quality against decode speed, marker area proportional to size on disk,
shape by engine; the Pareto front (no other variant is both better in quality and faster) is drawn.
Runs given as ``background_dirs`` (a search's trials) are drawn as grey points for context only.
A setup table names, for every run, the input model, the task, the evaluation data and how
perplexity windows were built, as recorded in ``results.json`` and each variant's eval result.

``p`` (pruned fraction) comes from what pruning did, never from counting zeros alone: a model can
hold exact zeros by nature (weights dequantized from a k-quant GGUF do) and a quantizer rounds small
weights to 0.0. A variant is pruned when its stage is ``prune`` or its ``lmslim_pruning`` provenance
(the bench result's ``pruning``) has more steps than the variant before it. There ``p`` is the
share of the run's baseline weights that pruning removed or set to zero: ``(baseline non-zeros −
non-zeros) / baseline params``, so zeros the baseline already had do not count. Every other
variant keeps the ``p`` of the variant it was made from (0 for the baseline and its unpruned
descendants; a quantized child of a pruned model keeps its parent's ``p``). When pruning and
quantization both happened between two measurements the pruned zeros cannot be told from rounding
zeros, and ``p`` is left unknown (–).

Example:
    >>> from lmslim.report.build import verdict
    >>> verdict(1.45, sparse=False)
    'faster: 1.45× decode, measured on this device'
"""

from __future__ import annotations

import base64
import html
import json
import re
from pathlib import Path
from typing import Any

from lmslim.core.errors import UserError
from lmslim.measure.compare import QUALITY
from lmslim.report.chart import pareto_png
from lmslim.report.chart_svg import CHART_CSS, pareto_svg

# Decode-speed ratios within ±10% of 1 are treated as noise on a shared 2-core machine.
NOISE = 0.10


def verdict(speed_x: float | None, sparse: bool) -> str:
    """Plain statement of whether a variant is really faster than the baseline here."""
    if speed_x is None:
        return "no decode measurement"
    if speed_x >= 1 + NOISE:
        text = f"faster: {speed_x:.2f}× decode, measured on this device"
    elif speed_x > 1 - NOISE:
        text = f"no real speedup on this device ({speed_x:.2f}× decode, within ±{NOISE:.0%} noise)"
    else:
        text = f"slower on this device: {speed_x:.2f}× decode"
    if sparse:
        text += "; its zeros are not skipped by the dense kernels"
    return text


def load_runs(run_dirs: list[Path]) -> list[dict[str, Any]]:
    runs = []
    for d in run_dirs:
        f = Path(d) / "results.json"
        if not f.is_file():
            raise UserError(f"{d} is not an lmslim compress run (no results.json)")
        try:
            obj = json.loads(f.read_text())
        except ValueError as e:
            raise UserError(f"{f} is not valid JSON ({e})") from e
        if obj.get("kind") != "compress":
            raise UserError(f"{f} is not a compress result")
        obj["_dir"] = str(d)
        runs.append(obj)
    if not runs:
        raise UserError("give at least one run folder")
    return runs


def quality_metric(rows: list[dict[str, Any]]) -> tuple[str, str, bool] | None:
    for key, label, higher in QUALITY:
        if any(r.get(key) is not None for r in rows):
            return key, label, higher
    return None


def _pruning_steps(v: dict[str, Any]) -> int:
    """How many pruning steps the variant's ``lmslim_pruning`` provenance records (bench ``pruning``)."""
    return len(((v.get("bench") or {}).get("pruning") or {}).get("methods") or [])


def pruned_fractions(variants: list[dict[str, Any]]) -> list[tuple[float | None, bool]]:
    """``(p, pruned)`` for each variant of one run, in order (the rule is in the module docstring).

    ``pruned`` says whether pruning is in the variant's history (its zeros, if many, are pruned ones).
    """
    base = (variants[0].get("bench") or {}) if variants else {}
    base_params, base_nonzero = base.get("params"), base.get("nonzero_params")
    out: list[tuple[float | None, bool]] = []
    for i, v in enumerate(variants):
        if i == 0 or v.get("stage") is None:  # p is measured from here; an input pruned earlier keeps its zeros
            out.append((0.0, _pruning_steps(v) > 0))
            continue
        prev_p, prev_pruned = out[-1]
        be = v.get("bench") or {}
        if v["stage"] != "prune" and _pruning_steps(v) <= _pruning_steps(variants[i - 1]):
            out.append((prev_p, prev_pruned))  # not pruned here: the parent's p
        elif be.get("quantization") or not base_params or base_nonzero is None or be.get("nonzero_params") is None:
            out.append((None, True))  # pruned, but the count cannot say by how much
        else:
            out.append((max(0.0, (base_nonzero - be["nonzero_params"]) / base_params), True))
    return out


def recipe_stages(run: dict[str, Any]) -> list[str]:
    """The run's recipe stages as ``name(option=value, ...)`` from ``recipe.yaml`` in its folder ([] without one).

    Example:
        >>> import pathlib, tempfile
        >>> d = pathlib.Path(tempfile.mkdtemp())
        >>> _ = (d / "recipe.yaml").write_text("stages: [{prune: {method: wanda, sparsity: 0.5}}]")
        >>> recipe_stages({"_dir": str(d)})
        ['prune(method=wanda, sparsity=0.5)']
    """
    from lmslim.core.safeyaml import load_yaml_file

    f = Path(run.get("_dir") or ".") / "recipe.yaml"
    if "_dir" not in run or not f.is_file():
        return []
    try:
        stages = (load_yaml_file(f, str(f)) or {}).get("stages") or []
    except (UserError, AttributeError):  # a summary for the chart's hover only: never fail the report on it
        return []
    out = []
    for entry in stages:
        name, options = next(iter(entry.items())) if isinstance(entry, dict) and len(entry) == 1 else (entry, None)
        opts = ", ".join(f"{k}={json.dumps(v, separators=(',', ':')) if isinstance(v, (dict, list)) else v}"
                         for k, v in (options or {}).items())
        text = f"{name}({opts})"
        out.append(text if len(text) <= 160 else text[:159] + "…")
    return out


def _stage_index(name: str) -> int | None:
    """Index of the stage that made a variant, from the name ``lmslim compress`` gives it (``label · 2:prune``)."""
    m = re.search(r" · (\d+):[^·]*$", name)
    return int(m.group(1)) if m else None


def _variant_rows(runs: list[dict[str, Any]], seen_baselines: set[str], background: bool) -> list[dict[str, Any]]:
    """One row per variant of every run, skipping a baseline whose weights were seen already."""
    rows: list[dict[str, Any]] = []
    for run in runs:
        stages = recipe_stages(run)
        for v, (p, pruned) in zip(run["variants"], pruned_fractions(run["variants"])):
            if v["stage"] is None:
                key = v.get("weights_sha256") or v["model"]
                if key in seen_baselines:
                    continue
                seen_baselines.add(key)
            row = {"name": v["name"], "run": run["recipe"], "stage": v["stage"], "weights_sha256": v["weights_sha256"],
                   "prune_ratio": p, "pruned": pruned, "background": background}
            i = _stage_index(v["name"]) if v["stage"] is not None else None
            row["recipe_stages"] = stages[:i + 1] if i is not None and i < len(stages) else []
            ev, be = v.get("eval") or {}, v.get("bench") or {}
            for key, _, _ in QUALITY:
                if key in ev:
                    row[key] = ev[key]
            if isinstance(ev.get("micro"), dict):
                row["micro_f1"] = ev["micro"].get("f1-score")
            for key in ("decode_tokens_per_s", "prefill_ms_p50", "size_mb", "peak_rss_mb", "params", "nonzero_params",
                        "flops_per_token", "train_flops_per_token", "fraction_of_bound", "bytes_read_per_token"):
                row[key] = be.get(key)
            row["machine"] = (be.get("machine") or ev.get("machine") or {}).get("cpu")
            # The engine is part of the variant: the same weights run at another speed in another engine.
            row["engine"] = (be.get("engine") or ev.get("engine") or {}).get("name", "torch")
            if be.get("quantization") and not be.get("pruning") and row.get("params") is not None:
                # Zeros in a quantized, unpruned model are weights rounded to the grid's 0.0, not removed
                # weights (runs measured before lmslim.measure.cost excluded them still carry them).
                row["nonzero_params"] = row["params"]
            rows.append(row)
    return rows


def _derive(rows: list[dict[str, Any]], base: dict[str, Any], metric: tuple[str, str, bool] | None) -> None:
    """Ratios to ``base``, α, the quality change and the speed verdict of every row (in place)."""
    for r in rows:
        def ratio(key: str, invert: bool = False) -> float | None:
            a, b = base.get(key), r.get(key)
            if not a or not b:
                return None
            return a / b if invert else b / a

        r["decode_x"] = ratio("decode_tokens_per_s")
        r["prefill_x"] = ratio("prefill_ms_p50", invert=True)
        r["size_x"] = ratio("size_mb")
        r["flops_x"] = ratio("flops_per_token")
        # alpha: bytes per weight vs fp32 (p was set from pruning provenance above).
        if r.get("size_mb") and r.get("params"):
            r["quant_ratio"] = r["size_mb"] * 1e6 / (4 * r["params"])
        if metric:
            key, _, _ = metric
            if r.get(key) is not None and base.get(key) is not None:
                r["quality_delta_pct"] = 100 * (r[key] / base[key] - 1)
        # Many zeros matter only when pruning made them (natural and rounding zeros are few or not removable).
        sparse = bool(r["pruned"] and r.get("params") and r.get("nonzero_params") is not None
                      and r["nonzero_params"] < 0.95 * r["params"])
        r["verdict"] = "baseline" if r is base else verdict(r["decode_x"], sparse)


def collect_all(runs: list[dict[str, Any]], background_runs: list[dict[str, Any]] = ()
                ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``(rows, background)``: the table's rows (see ``collect``) and the background runs' rows.

    Background rows (search trials) are measured against the same baseline (the first run's) and
    carry ``background: True`` and ``pareto: False``; they never change which table rows are on the
    Pareto front. A background variant whose weights are already a table row's (the table's
    baseline; a trial given both as a run and as background) is not drawn twice.
    """
    seen: set[str] = set()
    rows = _variant_rows(runs, seen, background=False)
    if not rows or rows[0]["stage"] is not None:
        raise UserError("the first run has no baseline variant")
    metric = quality_metric(rows)
    _derive(rows, rows[0], metric)
    mark_pareto(rows, metric)
    shown = {r["weights_sha256"] for r in rows if r["weights_sha256"]}
    back = [r for r in _variant_rows(background_runs, seen, background=True) if r["weights_sha256"] not in shown]
    _derive(back, rows[0], metric)
    for r in back:
        r["pareto"] = False
    return rows, back


def collect(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Flat rows: baseline first (deduplicated by weights hash), then every run's stage variants."""
    return collect_all(runs)[0]


def describe_windows(ev: dict[str, Any]) -> str:
    """How an eval result's perplexity windows were built, in words ("–" when it scored no windows)."""
    w = ev.get("windows")
    if isinstance(w, dict):
        start = (f"each starting with {w.get('bos_token') or 'BOS'}" if w.get("bos")
                 else "no BOS (the tokenizer adds none)")
        sep = w.get("separator")
        sep = "a blank line" if sep == "\n\n" else repr(sep) if sep else "–"
        return f"{w.get('window')} tokens, stride {w.get('stride')}, {start}; documents separated by {sep}"
    if ev.get("window") is not None:  # measured before windows were recorded
        return f"{ev['window']} tokens, stride {ev.get('stride')} (BOS handling not recorded)"
    return "–"


def setup(runs: list[dict[str, Any]]) -> list[dict[str, str]]:
    """One line per run: recipe, input model, task, evaluation data and perplexity windows."""
    out = []
    for run in runs:
        evals = [v.get("eval") or {} for v in run.get("variants", [])]
        specs = [(e.get("data") or {}).get("spec") for e in evals]
        if not any(specs):  # results written before eval data was recorded per variant
            specs = [(run.get("data") or {}).get("eval")]
        tokens = sorted({(e.get("data") or {}).get("tokens") or e.get("tokens_scored") for e in evals} - {None})
        data = ", ".join(dict.fromkeys(str(x) for x in specs if x)) or "–"
        if tokens:
            data += f" ({', '.join(f'{t:,}' for t in tokens)} tokens scored)"
        model = (run.get("input") or {}).get("spec") or (run.get("variants") or [{}])[0].get("model") or "–"
        sha = (run.get("input") or {}).get("weights_sha256")
        windows = "; ".join(dict.fromkeys(describe_windows(e) for e in evals if e)) or "–"
        out.append({"run": str(run.get("recipe")), "model": str(model), "weights": sha[:12] if sha else "–",
                    "task": str(run.get("task") or next((e["task"] for e in evals if e.get("task")), "–")),
                    "data": data, "windows": windows})
    return out


def mark_pareto(rows: list[dict[str, Any]], metric: tuple[str, str, bool] | None) -> None:
    """``pareto`` = no other variant has better-or-equal quality AND speed, with one strictly better."""
    for r in rows:
        r["pareto"] = False
    if metric is None:
        return
    key, _, higher = metric
    pts = [r for r in rows if r.get(key) is not None and r.get("decode_tokens_per_s")]

    def q(r: dict) -> float:
        return r[key] if higher else -r[key]

    for r in pts:
        r["pareto"] = not any(q(o) >= q(r) and o["decode_tokens_per_s"] >= r["decode_tokens_per_s"]
                              and (q(o) > q(r) or o["decode_tokens_per_s"] > r["decode_tokens_per_s"])
                              for o in pts if o is not r)


def _fmt(v: Any, spec: str) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "★" if v else ""
    return format(v, spec)


def table(rows: list[dict[str, Any]], metric: tuple[str, str, bool] | None) -> tuple[list[str], list[list[str]]]:
    qlabel = metric[1] if metric else "quality"
    head = ["variant", "engine", qlabel, "Δ quality", "decode tok/s", "decode ×", "prefill ms", "prefill ×", "size MB",
            "size ×", "params", "non-zeros", "p (pruned)", "α (bytes/fp32)", "GFLOPs/token", "C train GFLOPs/token",
            "frac. of bound", "Pareto", "verdict"]
    body = []
    for r in rows:
        body.append([
            r["name"], r.get("engine", "torch"), _fmt(r.get(metric[0]) if metric else None, ".4g"),
            _fmt(r.get("quality_delta_pct"), "+.1f") + ("%" if r.get("quality_delta_pct") is not None else ""),
            _fmt(r.get("decode_tokens_per_s"), ".1f"), _fmt(r.get("decode_x"), ".2f"),
            _fmt(r.get("prefill_ms_p50"), ".1f"), _fmt(r.get("prefill_x"), ".2f"), _fmt(r.get("size_mb"), ".1f"),
            _fmt(r.get("size_x"), ".2f"), _fmt(r.get("params"), ",d"), _fmt(r.get("nonzero_params"), ",d"),
            _fmt(r.get("prune_ratio"), ".2f"), _fmt(r.get("quant_ratio"), ".2f"),
            _fmt(r["flops_per_token"] / 1e9 if r.get("flops_per_token") else None, ".3f"),
            _fmt(r["train_flops_per_token"] / 1e9 if r.get("train_flops_per_token") else None, ".3f"),
            _fmt(r.get("fraction_of_bound"), ".2f"), _fmt(r["pareto"], ""), r["verdict"]])
    return head, body


SETUP_HEAD = ["run", "model", "weights SHA-256", "task", "evaluation data", "perplexity windows"]
_P_NOTE = ("p = share of the baseline's weights that a pruning stage removed or set to zero (zeros the baseline "
           "already had, and weights a quantizer rounded to 0, do not count; a variant that was not pruned keeps "
           "the p of the model it was made from; – : pruned and quantized between two measurements, so the two "
           "kinds of zeros cannot be told apart)")


def _setup_cells(s: dict[str, str]) -> list[str]:
    return [s["run"], s["model"], s["weights"], s["task"], s["data"], s["windows"]]


def _models_line(setup_rows: list[dict[str, str]]) -> str:
    models = ", ".join(dict.fromkeys(s["model"] for s in setup_rows)) or "–"
    tasks = ", ".join(dict.fromkeys(s["task"] for s in setup_rows)) or "–"
    data = ", ".join(dict.fromkeys(s["data"] for s in setup_rows)) or "–"
    return f"Model: {models}. Task: {tasks}. Evaluation data: {data} (details under Setup)."


def to_markdown(rows, metric, png_name: str = "pareto.png", setup_rows: list[dict[str, str]] | None = None,
                background: list[dict[str, Any]] = ()) -> str:
    head, body = table(rows, metric)
    machine = rows[0].get("machine") or "unknown CPU"
    lines = ["# lmslim report", ""]
    if setup_rows:
        lines += [_models_line(setup_rows), ""]
    lines += [f"Measured on: {machine}. Ratios are to the baseline (first row); "
              f"decode-speed changes within ±{NOISE:.0%} are reported as no real speedup.", "",
              f"![quality vs decode speed]({png_name})", ""]
    lines += [_trials_line(background), ""] if background else []
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in row) + " |" for row in body]
    lines += ["", f"{_P_NOTE}; α = bytes on disk per parameter "
              "relative to fp32; C = training FLOPs per token (cost model, forward + backward); "
              "GFLOPs/token = decode forward FLOPs from the cost model.", ""]
    if setup_rows:
        lines += ["## Setup", "", "| " + " | ".join(SETUP_HEAD) + " |", "|" + "---|" * len(SETUP_HEAD)]
        lines += ["| " + " | ".join(c.replace("|", "/").replace("\n", " ") for c in _setup_cells(s)) + " |"
                  for s in setup_rows]
        lines += [""]
    return "\n".join(lines)


_CSS = """body{font-family:system-ui,sans-serif;margin:2em;color:#222}table{border-collapse:collapse;font-size:13px}
th,td{border:1px solid #ccc;padding:4px 6px;text-align:right}th{background:#f2f2f2}td:first-child,td:last-child{text-align:left}
tr.pareto td{background:#fff4f0}img{max-width:100%;border:1px solid #ddd}p.note{color:#555;font-size:13px}
#setup td{text-align:left}"""


def _trials_line(background: list[dict[str, Any]]) -> str:
    if not background:
        return ""
    return (f"Grey points: {len(background)} search trial(s), drawn for context; they are not in the table and "
            "not part of its Pareto front.")


def to_html(rows, metric, png: bytes, setup_rows: list[dict[str, str]] | None = None,
            background: list[dict[str, Any]] = ()) -> str:
    head, body = table(rows, metric)
    trials = f"<p class=\"note\">{html.escape(_trials_line(background))}</p>" if background else ""
    models = f"<p>{html.escape(_models_line(setup_rows))}</p>" if setup_rows else ""
    setup_html = ""
    if setup_rows:
        cells = ["<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in _setup_cells(s)) + "</tr>" for s in setup_rows]
        setup_html = ("<h2>Setup</h2><table id=\"setup\"><thead><tr>"
                      + "".join(f"<th>{html.escape(h)}</th>" for h in SETUP_HEAD) + "</tr></thead><tbody>"
                      + "".join(cells) + "</tbody></table>")
    machine = html.escape(rows[0].get("machine") or "unknown CPU")
    b64 = base64.b64encode(png).decode()
    trs = []
    for r, row in zip(rows, body):
        cls = ' class="pareto"' if r["pareto"] else ""
        trs.append(f"<tr{cls}>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>")
    return (f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>lmslim report</title>"
            f"<style>{_CSS}\n{CHART_CSS}</style></head><body><h1>lmslim report</h1>{models}"
            f"<p>Measured on: {machine}. Ratios are to the baseline (first row); decode-speed changes within "
            f"±{NOISE:.0%} are reported as no real speedup. Highlighted rows are on the Pareto front.</p>"
            f"{trials}<div class=\"chart\">{pareto_svg(rows, metric, background)}</div>"
            "<details><summary>the same chart as a picture (pareto.png)</summary>"
            f"<img id=\"pareto\" alt=\"quality vs decode speed\" src=\"data:image/png;base64,{b64}\"></details>"
            "<table id=\"variants\"><thead><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head)
            + "</tr></thead><tbody>" + "".join(trs) + "</tbody></table>"
            f"<p class=\"note\">{html.escape(_P_NOTE)}; α = bytes on disk per "
            "parameter relative to fp32; C = training FLOPs per token (cost model); GFLOPs/token = decode forward "
            f"FLOPs from the cost model.</p>{setup_html}</body></html>\n")


def build_report(run_dirs: list[Path], out: Path, *, background_dirs: list[Path] = ()) -> dict[str, Any]:
    """Write report.md, report.html, pareto.png and rows.json into ``out`` (atomically, as a folder).

    ``background_dirs``: more compress runs (a search's trials) drawn as grey points under the chart,
    with the hover working on them too; they are not in the table and do not change the Pareto
    marking of the table's rows. In ``rows.json`` (a list) they follow the table's rows with
    ``"background": true`` (table rows have ``"background": false``).

    Example (``runs/a`` and ``runs/b`` being ``lmslim compress`` outputs)::

        build_report([Path("runs/a"), Path("runs/b")], Path("report"), background_dirs=[Path("search/t1")])
    """
    from lmslim.core.io import atomic_dir

    runs = load_runs(run_dirs)
    table_dirs = {Path(d).resolve() for d in run_dirs}
    background_dirs = [d for d in background_dirs if Path(d).resolve() not in table_dirs]  # each run drawn once
    rows, background = collect_all(runs, load_runs(background_dirs) if background_dirs else [])
    setup_rows = setup(runs)
    metric = quality_metric(rows)
    png = pareto_png(rows, metric, background)
    with atomic_dir(out) as tmp:
        (tmp / "pareto.png").write_bytes(png)
        (tmp / "report.md").write_text(to_markdown(rows, metric, setup_rows=setup_rows, background=background))
        (tmp / "report.html").write_text(to_html(rows, metric, png, setup_rows, background))
        (tmp / "rows.json").write_text(json.dumps(rows + background, indent=2, default=str) + "\n")
    return {"rows": rows, "background": background, "metric": metric, "setup": setup_rows}
