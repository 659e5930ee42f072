"""ggml's Q3_K and Q2_K blocks, and the Q5_K / Q5_1 that llama.cpp's Q3_K_M mix also uses, rounded by lmslim.

Block layouts (256 weights of one row per super-block; Q5_1 is a legacy block of 32):

- **Q3_K** (110 bytes): 32 bytes ``hmask``, 64 bytes ``qs``, 12 bytes of 6-bit scales, fp16 ``d``.
  16 sub-blocks of 16, signed codes ``q ∈ −4…3``, ``w = d·(sc[j] − 32)·q``. The code's low 2 bits sit
  in ``qs``, its high bit, *set* for ``q ≥ 0``, in ``hmask`` (``_pack_2bit``, ``_pack_q3k_scales``).
- **Q2_K** (84 bytes): 16 bytes of 4-bit (scale | min << 4), 64 bytes ``qs``, fp16 ``d`` and ``dmin``.
  16 sub-blocks of 16, codes ``0…3``, ``w = d·sc[j]·q − dmin·m[j]``.
- **Q5_K** (176 bytes): Q4_K's fp16 ``d``/``dmin`` and 12 bytes of 6-bit scales/mins, 32 bytes of high
  bits, 128 of nibbles: codes ``0…31``, ``w = d·sc[j]·q − dmin·m[j]`` over 8 sub-blocks of 32.
- **Q5_1** (24 bytes per 32): fp16 ``d`` and ``m``, 4 bytes of high bits, 16 of nibbles: ``w = d·q + m``.

lmslim's rounding is the search of ``gguf_kquants`` on the final two-level grid (``_asym_grid`` for
Q2_K and Q5_K, as Q4_K; ``_sym_grid`` for Q3_K, its range search widened to ±25% at 3 bits): a
least-squares-refined range search per sub-block, weighted by per-column importance when given,
then alternating refits of the integer sub-scales (with their integer neighbours) and of the fp16
super-block scales, each kept only where it lowers the weighted squared error. Q5_1 takes the range
search per block of 32 and least-squares refits of its fp16 ``d`` and ``m``.

Example:
    >>> import numpy as np
    >>> from gguf import GGMLQuantizationType
    >>> from gguf.quants import dequantize
    >>> w = np.random.default_rng(0).normal(size=(2, 256)).astype(np.float32)
    >>> raw, deq = quantize_low(w, "q3_k")
    >>> raw.shape, bool((dequantize(raw, GGMLQuantizationType.Q3_K) == deq).all())
    ((2, 110), True)
"""

from __future__ import annotations

import numpy as np

from lmslim.core.errors import UserError
from lmslim.modelio.export.gguf_kquants import _f16, _fit_asym, _lsq, _pack_q4k_scales, _safe, _weights

LOW_TYPES = ("q3_k", "q2_k", "q5_k")
LOW_BLOCK_BYTES = {"q3_k": 110, "q2_k": 84, "q5_k": 176}


def _pack_2bit(low: np.ndarray) -> np.ndarray:
    """(S, 256) values 0…3 -> (S, 64) bytes: byte 32h + l holds weight 128h + 32j + l at bits 2j."""
    v = low.reshape(-1, 2, 4, 32).astype(np.uint8)  # (S, half, j, l)
    return (v[:, :, 0] | (v[:, :, 1] << 2) | (v[:, :, 2] << 4) | (v[:, :, 3] << 6)).reshape(-1, 64)


def _pack_bits(high: np.ndarray) -> np.ndarray:
    """(S, 256) bits -> (S, 32) bytes: byte l holds weight 32b + l at bit b."""
    v = high.reshape(-1, 8, 32).astype(np.uint8)  # (S, b, l)
    return np.bitwise_or.reduce(v << np.arange(8, dtype=np.uint8)[None, :, None], axis=1)


def _pack_q3k_scales(u6: np.ndarray) -> np.ndarray:
    """(S, 16) 6-bit values -> 12 bytes: low nibbles of scales j and j+8 in byte j, high 2-bit pairs after."""
    u6 = u6.astype(np.uint8)
    low = (u6[:, :8] & 0x0F) | ((u6[:, 8:] & 0x0F) << 4)  # (S, 8)
    hi = (u6 >> 4).reshape(-1, 4, 4)  # (S, t, i): scale 4t + i
    high = hi[:, 0] | (hi[:, 1] << 2) | (hi[:, 2] << 4) | (hi[:, 3] << 6)  # (S, 4)
    return np.concatenate([low, high], 1)


def _half_bytes(a: np.ndarray) -> np.ndarray:
    return a.astype(np.float16).view(np.uint8).reshape(-1, 2)


def pack_low(kind: str, p, q: np.ndarray) -> np.ndarray:
    """``kind`` (q3_k, q2_k, q5_k) bytes (S, bytes) of ``gguf_kquants.KParams`` ``p`` and codes ``q`` (S, 256)
    (signed −4…3 for Q3_K)."""
    if kind == "q3_k":
        u = (q + 4).astype(np.uint8)  # 0…7; the high bit is set exactly for q ≥ 0
        return np.concatenate([_pack_bits(u >> 2), _pack_2bit(u & 3), _pack_q3k_scales(p.sc + 32), _half_bytes(p.d)],
                              1)
    if kind == "q2_k":
        return np.concatenate([(p.sc | (p.m << 4)).astype(np.uint8), _pack_2bit(q), _half_bytes(p.d),
                               _half_bytes(p.dmin)], 1)
    u = q.astype(np.uint8)
    lo = (u & 0x0F).reshape(-1, 4, 2, 32)  # (S, pair, low/high nibble, 32), as Q4_K
    nib = (lo[:, :, 0] | (lo[:, :, 1] << 4)).reshape(-1, 128)
    return np.concatenate([_half_bytes(p.d), _half_bytes(p.dmin), _pack_q4k_scales(p.sc, p.m), _pack_bits(u >> 4),
                           nib], 1)


def quantize_low(weight: np.ndarray, kind: str, importance: np.ndarray | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
    """``kind`` (q3_k, q2_k, q5_k) blocks of ``weight`` (rows, cols) -> (raw uint8 rows, dequantized f32).

    Raises:
        UserError: ``cols`` is not a multiple of 256, the type is not one of these, or bad importance.
    """
    if kind not in LOW_TYPES:
        raise UserError(f"{kind} is not one of {', '.join(LOW_TYPES)}")
    from lmslim.modelio.export.gguf_kquants import quantize_kquant

    return quantize_kquant(weight, kind, importance)


def quantize_q5_1(weight: np.ndarray, importance: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Q5_1 blocks (24 bytes per 32) and their values: a weighted range search per block, then fp16 refits."""
    d, m, q = q5_1_params(weight, importance)
    return pack_q5_1(d, m, q)


def q5_1_params(weight: np.ndarray, importance: np.ndarray | None = None
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Q5_1's grid and RTN codes: fp16 ``d``, ``m`` (rows, cols/32) as f32 and codes (rows, cols) in 0…31."""
    rows, cols = weight.shape
    if cols % 32:
        raise UserError(f"rows of {cols} weights do not split into q5_1's blocks of 32")
    xs = np.ascontiguousarray(weight, dtype=np.float32).reshape(-1, 32)  # (B, 32)
    ws = _weights(importance, rows, cols, 32)
    s, o = _fit_asym(xs, ws, 31, nonpos=False)
    d, m = _f16(s), _f16(o)

    def codes(d, m):
        q = np.where(d[:, None] > 0, np.clip(np.rint((xs - m[:, None]) / _safe(d)[:, None]), 0, 31), 0)
        return q, (ws * (d[:, None] * q + m[:, None] - xs) ** 2).sum(1)

    q, err = codes(d, m)
    for _ in range(2):  # the fp16 rounding of (d, m) moved the grid: refit both to the codes
        s2, o2 = _lsq(xs, q, ws, nonpos_offset=False)
        q2, err2 = codes(_f16(s2), _f16(o2))
        better = (err2 < err) & (s2 > 0)
        d, m = np.where(better, _f16(s2), d), np.where(better, _f16(o2), m)
        q, err = codes(d, m)
    return d.reshape(rows, -1), m.reshape(rows, -1), q.astype(np.int32).reshape(rows, cols)


def pack_q5_1(d: np.ndarray, m: np.ndarray, codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q5_1 bytes (rows, cols/32·24) of fp16 ``d``, ``m`` (rows, cols/32) and codes (rows, cols) in 0…31, and
    their values ``d·q + m``."""
    rows, cols = codes.shape
    if codes.min() < 0 or codes.max() > 31:
        raise UserError("q5_1 codes must lie in 0…31")
    d, m = np.asarray(d, np.float32).reshape(-1), np.asarray(m, np.float32).reshape(-1)
    u = codes.reshape(-1, 32).astype(np.uint8)  # (B, 32)
    nib = (u[:, :16] & 0x0F) | ((u[:, 16:] & 0x0F) << 4)
    qh = np.packbits((u >> 4).astype(np.uint8), axis=1, bitorder="little")  # bit j = high bit of weight j
    raw = np.concatenate([_half_bytes(d), _half_bytes(m), qh, nib], 1)
    deq = d[:, None] * u.astype(np.float32) + m[:, None]
    return raw.reshape(rows, -1), deq.reshape(rows, cols)
