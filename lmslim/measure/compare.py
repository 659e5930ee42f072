"""Side-by-side comparison of result JSONs, with ratios to the first model.

Eval and bench results of the same weights (same ``weights_sha256``) are merged into one row, so
``lmslim compare base-eval.json base-bench.json q-eval.json q-bench.json`` gives two rows.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lmslim.core.errors import UserError

# (key, label, higher_is_better)
QUALITY = [("perplexity", "ppl", False), ("accuracy", "acc", True), ("macro_f1", "macro-F1", True),
           ("micro_f1", "micro-F1", True), ("mean_cosine_to_reference", "cos→ref", True), ("spearman", "spearman", True)]


def load_result(path: str) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"result file {path} does not exist")
    try:
        obj = json.loads(p.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not a JSON result file ({e})") from e
    if not isinstance(obj, dict) or obj.get("kind") not in ("eval", "bench"):
        raise UserError(f"{path} is not an lmslim eval or bench result (no kind: eval|bench)")
    return obj


def merge_rows(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows: dict[str, dict[str, Any]] = {}
    for r in results:
        model = r.get("model", {})
        key = model.get("weights_sha256") or model.get("spec")
        row = rows.setdefault(key, {"model": model.get("spec"), "weights_sha256": model.get("weights_sha256")})
        if r["kind"] == "eval" and "micro" in r and isinstance(r["micro"], dict):
            row["micro_f1"] = r["micro"].get("f1-score")
        for k, v in r.items():
            if k not in ("model", "machine", "libraries", "kind", "timestamp", "data") and not isinstance(v, (dict, list)):
                row.setdefault(k, v)
    return list(rows.values())


def with_ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Add ``*_x`` speed/size ratios and quality deltas relative to the first row."""
    base = rows[0]
    out = []
    for row in rows:
        r = dict(row)

        def ratio(key: str, invert: bool = False) -> float | None:
            a, b = base.get(key), row.get(key)
            if not a or not b:
                return None
            return (a / b) if invert else (b / a)

        r["decode_speed_x"] = ratio("decode_tokens_per_s")
        r["prefill_speed_x"] = ratio("prefill_ms_p50", invert=True)
        r["size_x"] = ratio("size_mb")
        r["peak_rss_x"] = ratio("peak_rss_mb")
        for key, _, _ in QUALITY:
            if base.get(key) is not None and row.get(key) is not None:
                r[f"{key}_delta"] = row[key] - base[key]
                if key == "perplexity":
                    r["perplexity_delta_pct"] = 100 * (row[key] / base[key] - 1)
        out.append(r)
    return out


def compare(paths: list[str]) -> list[dict[str, Any]]:
    if not paths:
        raise UserError("give at least one result JSON")
    return with_ratios(merge_rows([load_result(p) for p in paths]))


def to_markdown(rows: list[dict[str, Any]]) -> str:
    """A markdown table of the rows (quality columns present in any row, then cost)."""
    qual = [(k, lbl) for k, lbl, _ in QUALITY if any(r.get(k) is not None for r in rows)]

    def f(v: Any, fmt: str = "{:.2f}") -> str:
        return "–" if v is None else fmt.format(v)

    head = ["model"] + [lbl for _, lbl in qual] + ["Δ quality", "decode tok/s", "speed ×", "prefill ms p50",
                                                   "prefill ×", "size MB", "size ×", "peak RSS MB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        delta = next((r.get(f"{k}_delta") for k, _ in qual if r.get(f"{k}_delta") is not None), None)
        if r.get("perplexity_delta_pct") is not None:
            dq = f"{r['perplexity_delta_pct']:+.1f}% ppl"
        else:
            dq = f(delta, "{:+.4f}")
        cells = [str(r.get("model"))] + [f(r.get(k), "{:.4g}") for k, _ in qual] + [
            dq, f(r.get("decode_tokens_per_s"), "{:.1f}"), f(r.get("decode_speed_x"), "{:.2f}×"),
            f(r.get("prefill_ms_p50"), "{:.1f}"), f(r.get("prefill_speed_x"), "{:.2f}×"),
            f(r.get("size_mb"), "{:.1f}"), f(r.get("size_x"), "{:.2f}×"), f(r.get("peak_rss_mb"), "{:.0f}")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
