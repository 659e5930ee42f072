"""Per-matrix kernel timings on SmolLM2's shapes (BENCHMARKS.md, "kernels").

For each (in → out) shape and token count, times in one process: fp32 ``F.linear``, the ``int8``
QuantLinear kernel (torch._int_mm + per-token activation quantization), the ``fbgemm`` kernel, and
the ``dequant`` kernel on 4-bit g128 codes. Median of repeated runs after warm-up.

Usage: .venv/bin/python benchmarks/int8_kernels.py [--repeats 30]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from lmslim.nn.quant_linear import QuantLinear
from lmslim.nn.scheme import Scheme, quantize_weight

SHAPES = [(576, 1536), (1536, 576), (576, 576), (576, 49152)]


def median_us(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    ts.sort()
    return ts[len(ts) // 2] * 1e6


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=30)
    args = ap.parse_args()
    torch.manual_seed(0)
    print(f"threads={torch.get_num_threads()} torch={torch.__version__}")
    print("| shape (in→out) | tokens | fp32 µs | int8 µs (×) | fbgemm µs (×) | w4 dequant µs (×) |")
    print("|---|---|---|---|---|---|")
    s8, s4 = Scheme(8, None, True), Scheme(4, 128, False)
    for k, n in SHAPES:
        w = torch.randn(n, k) * 0.02
        kernels = {name: QuantLinear.from_codes(*quantize_weight(w, s8), s8, None, kernel=name)
                   for name in ("int8", "fbgemm")}
        kernels["dequant"] = QuantLinear.from_codes(*quantize_weight(w, s4), s4, None, kernel="dequant")
        for t in (1, 128):
            x = torch.randn(t, k)
            base = median_us(lambda: F.linear(x, w), args.repeats)
            cells = []
            for name in ("int8", "fbgemm", "dequant"):
                us = median_us(lambda: kernels[name](x), max(3, args.repeats // (10 if name == "dequant" else 1)))
                cells.append(f"{us:.0f} ({base / us:.2f}×)")
            print(f"| {k}→{n} | {t} | {base:.0f} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
