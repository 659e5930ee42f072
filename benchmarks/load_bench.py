"""Peak memory of loading a saved model: SmolLM2-135M fp32 vs int8 vs int4, each load in a fresh process.

Each output folder is built once (under ``--work``), then loaded in a new Python process, which
reports its peak RSS (``VmHWM``) after importing lmslim and after ``load_model`` (and, for the
compressed-tensors folders, after plain ``transformers`` ``from_pretrained``). Peaks, not current
RSS: a loader that builds a full fp32 model and then swaps in smaller modules shows up here even if
it frees the fp32 copy afterwards.

Usage:
    .venv/bin/python benchmarks/load_bench.py [--work /tmp/lmslim-load-bench] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

# VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec, so a child would report its parent's peak.
CHILD = r"""
import json, sys
def peak_mb():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
import torch, transformers
from lmslim.modelio import load_model
base = peak_mb()
if sys.argv[2] == "lmslim":
    model = load_model(sys.argv[1]).model
else:
    model = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1])
with torch.no_grad():
    model(input_ids=torch.tensor([[1, 2, 3, 4]]))
print(json.dumps({"after_imports_mb": base, "peak_mb": peak_mb()}))
"""


def build(work: Path) -> dict[str, str]:
    """The three folders (built once): fp32 as shipped, dynamic int8, RTN int4 g128 (weight-only)."""
    from lmslim.compress.quantize import DynamicInt8Config, RTNConfig, quantize_
    from lmslim.modelio import load_model
    from lmslim.modelio.formats import save_model

    folders = {"fp32": str(load_model("builtin:smollm2-135m").resolved.path)}
    for name, cfg in [("int8 (dynamic-int8, default kernel)", DynamicInt8Config()),
                      ("int4 (RTN w4 g128 asym, kernel dequant)", RTNConfig(bits=4, group_size=128,
                                                                             kernel="dequant")),
                      ("int4+emb (RTN w4 g128 asym + embedding table, tied head, kernel dequant)",
                       RTNConfig(bits=4, group_size=128, kernel="dequant", include_embeddings=True))]:
        out = work / name.split()[0].replace("+", "-")
        if not (out / "config.json").exists():
            lm = load_model("builtin:smollm2-135m")
            quantize_(lm.model, cfg)
            out.mkdir(parents=True, exist_ok=True)
            save_model(lm.model, lm.tokenizer, out)
        folders[name] = str(out)
    return folders


def measure(folder: str, loader: str) -> dict[str, float] | None:
    """Peaks of one load in a fresh process; None when the loader refuses the folder (an lmslim-only one)."""
    res = subprocess.run([sys.executable, "-c", CHILD, folder, loader], capture_output=True, text=True)
    if res.returncode != 0:
        return None
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/lmslim-load-bench"))
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    folders = build(args.work)
    print("| model | loader | size on disk (MB) | peak RSS after imports (MB) | peak RSS after load + 4-token forward (MB) |")
    print("|---|---|---|---|---|")
    for name, folder in folders.items():
        size = sum(f.stat().st_size for f in Path(folder).glob("*.safetensors")) / 1e6
        for loader in ("lmslim", "transformers"):
            runs = [r for r in (measure(folder, loader) for _ in range(args.repeats)) if r is not None]
            if not runs:
                print(f"| SmolLM2-135M {name} | {loader} | {size:,.0f} | refuses the folder | – |", flush=True)
                continue
            best = min(runs, key=lambda r: r["peak_mb"])  # the least disturbed run on a shared box
            print(f"| SmolLM2-135M {name} | {loader} | {size:,.0f} | {best['after_imports_mb']:,.0f} | "
                  f"{best['peak_mb']:,.0f} |", flush=True)


if __name__ == "__main__":
    main()
