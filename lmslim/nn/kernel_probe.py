"""Choosing the int8 kernel by measuring it on this machine, once per process.

The two int8 paths of ``QuantLinear`` differ by an order of magnitude depending on the CPU and the
torch build: on an AVX2 EPYC without VNNI under torch 2.13, ``torch._int_mm`` measured 20–30× slower
than the fp32 matmul of the same shape, while fbgemm's dynamic GEMM was 1.3–2.6× faster than fp32
(benchmarks/int8_kernels.py). Earlier builds on the same kind of machine had the order reversed. So
``kernel: auto`` is decided by a timing here, not assumed; the choice is stored per module in the
saved folder, so reloading reproduces the same numerics.

Example:
    >>> from lmslim.nn.kernel_probe import fastest_int8_kernel
    >>> fastest_int8_kernel() in ("int8", "fbgemm")
    True
"""

from __future__ import annotations

import functools
import logging
import time

import torch

log = logging.getLogger(__name__)


@functools.cache
def int8_kernel_timings() -> dict[str, float]:
    """Seconds per call of each int8 kernel (and fp32) on a 32×1024 @ 1024×1024 layer, best of 3 interleaved rounds."""
    from lmslim.nn.quant_linear import QuantLinear
    from lmslim.nn.scheme import Scheme, quantize_weight

    gen = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(1024, 1024)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(1024, 1024, generator=gen) * 0.02)
    scheme = Scheme(8, None, True)
    codes = quantize_weight(lin.weight.data, scheme)
    layers = {"fp32": lin}
    layers.update({k: QuantLinear.from_codes(*codes, scheme, lin.bias.data, kernel=k) for k in ("int8", "fbgemm")})
    x = torch.randn(32, 1024, generator=gen)
    best = dict.fromkeys(layers, float("inf"))
    with torch.no_grad():
        for layer in layers.values():
            layer(x)  # warm-up: first calls allocate and pick code paths
        for _ in range(3):  # interleaved rounds: a burst of load from elsewhere hits every kernel alike
            for name, layer in layers.items():
                t0 = time.perf_counter()
                for _ in range(3):
                    layer(x)
                best[name] = min(best[name], (time.perf_counter() - t0) / 3)
    return best


def fastest_int8_kernel() -> str:
    """``int8`` or ``fbgemm``, whichever measured faster here (logged with both timings)."""
    t = int8_kernel_timings()
    choice = min(("int8", "fbgemm"), key=t.__getitem__)
    log.info("int8 kernel auto: %s (int8 %.2f ms, fbgemm %.2f ms, fp32 %.2f ms on a 32x1024x1024 probe)",
             choice, t["int8"] * 1e3, t["fbgemm"] * 1e3, t["fp32"] * 1e3)
    return choice
