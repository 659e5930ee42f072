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

lmslim's rounding is the search of ``gguf_kquants`` (a least-squares-refined range search per
sub-block, weighted by per-column importance when given), then, because 2 and 3 bits leave little
room, refits on the final two-level grid: alternately (a) each sub-block's integer scale (and min)
refitted by least squares to its codes and re-rounded, (b) the super-block's fp16 ``d`` (and ``dmin``)
refitted by least squares to the integer sub-scales and codes; after each, the codes are re-rounded
and a change is kept only where it lowers that (sub-)block's weighted squared error. So the error
never rises above the first rounding on the grid.

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
from lmslim.modelio.export.gguf_kquants import QK, _fit_asym, _lsq, _pack_q4k_scales, _to_6bit, _weights, signed_fit

LOW_TYPES = ("q3_k", "q2_k", "q5_k")
LOW_BLOCK_BYTES = {"q3_k": 110, "q2_k": 84, "q5_k": 176}
_REFITS = 4  # rounds of (a) sub-block and (b) super-block refits
_NEIGHBOURS = (-2, -1, 1, 2)  # integer sub-block scales tried around the current one in (a)
_SPREAD = 1 / 4  # signed_fit's range search at 3 bits: ±25% around ggml's rule (its default ±1/8 is for 5-6 bits)


def _f16(a: np.ndarray) -> np.ndarray:
    return np.asarray(a, np.float32).astype(np.float16).astype(np.float32)


def _safe(a: np.ndarray) -> np.ndarray:
    return np.where(a != 0, a, 1)


def _sym_grid(x: np.ndarray, w: np.ndarray, sub: int, half: int, sc_half: int):
    """Signed two-level grid: d (S,), integer sc (S, n) in −sc_half…sc_half−1, codes (S·n, sub) in
    −half…half−1."""
    n_sb, per = len(x), QK // sub
    xs, ws = x.reshape(-1, sub), w.reshape(-1, sub)  # (S·n, sub)
    s = signed_fit(xs, ws, half, _SPREAD).reshape(n_sb, per)
    ext = np.take_along_axis(s, np.abs(s).argmax(1)[:, None], 1)[:, 0]
    d = _f16(ext / -sc_half)  # the largest sub-scale lands on −sc_half, as the codes' signed rule
    sc = np.clip(np.rint(s / _safe(d)[:, None]), -sc_half, sc_half - 1)

    def codes(d, sc):
        step = (d[:, None] * sc.astype(np.float32)).reshape(-1, 1)  # (S·n, 1)
        q = np.where(step != 0, np.clip(np.rint(xs / _safe(step)), -half, half - 1), 0)
        return q, (ws * (step * q - xs) ** 2).sum(1).reshape(n_sb, per)

    def best_scales(d, sc):
        # (a) on the final grid: each sub-block tries its integer scale's neighbours, keeps the best
        q, err = codes(d, sc)
        for k in _NEIGHBOURS:
            sc2 = np.clip(sc + k, -sc_half, sc_half - 1)
            q2, err2 = codes(d, sc2)
            better = err2 < err
            sc, err = np.where(better, sc2, sc), np.where(better, err2, err)
        return sc

    sc = best_scales(d, sc)
    q, err = codes(d, sc)
    for _ in range(_REFITS):
        a = (sc[:, :, None] * q.reshape(n_sb, per, sub)).reshape(n_sb, QK)  # (b) d for the integers sc·q
        den = (w * a * a).sum(1)
        d2 = _f16(np.where(den > 0, (w * a * x).sum(1) / np.maximum(den, 1e-30), d))
        sc2 = best_scales(d2, sc)
        q2, err2 = codes(d2, sc2)
        better = err2.sum(1) < err.sum(1)
        d, sc = np.where(better, d2, d), np.where(better[:, None], sc2, sc)
        q, err = codes(d, sc)
    return d, sc.astype(np.int32), q


def _asym_grid(x: np.ndarray, w: np.ndarray, sub: int, levels: int, top: int):
    """``w = d·sc·q − dmin·m``: d, dmin (S,), sc, m (S, n) in 0…top, codes (S·n, sub) in 0…levels."""
    n_sb, per = len(x), QK // sub
    xs, ws = x.reshape(-1, sub), w.reshape(-1, sub)  # (S·n, sub)
    s, o = _fit_asym(xs, ws, levels)
    d, sc = _to_6bit(s.reshape(n_sb, per), top)
    dmin, m = _to_6bit(-o.reshape(n_sb, per), top)

    def codes(d, dmin, sc, m):
        step = (d[:, None] * sc.astype(np.float32)).reshape(-1, 1)  # (S·n, 1)
        off = (dmin[:, None] * m.astype(np.float32)).reshape(-1, 1)
        q = np.where(step > 0, np.clip(np.rint((xs + off) / _safe(step)), 0, levels), 0)
        return q, (ws * (step * q - off - xs) ** 2).sum(1).reshape(n_sb, per)

    def best_params(d, dmin, sc, m):
        # (a) least squares per sub-block put back on the integer grid, then its neighbours on that grid
        q, err = codes(d, dmin, sc, m)
        s2, o2 = _lsq(xs, q, ws, nonpos_offset=True)
        cands = [(np.clip(np.rint(s2.reshape(n_sb, per) / _safe(d)[:, None]), 0, top),
                  np.clip(np.rint(-o2.reshape(n_sb, per) / _safe(dmin)[:, None]), 0, top))]
        cands += [(np.clip(sc + i, 0, top), np.clip(m + j, 0, top)) for i in (-1, 0, 1) for j in (-1, 0, 1) if i or j]
        for sc2, m2 in cands:
            err2 = codes(d, dmin, sc2, m2)[1]
            keep = err2 < err
            sc, m, err = np.where(keep, sc2, sc), np.where(keep, m2, m), np.where(keep, err2, err)
        return sc, m

    sc, m = best_params(d, dmin, sc, m)
    q, err = codes(d, dmin, sc, m)
    for _ in range(_REFITS):
        d2, dmin2 = _super_lsq(x, w, (sc[:, :, None] * q.reshape(n_sb, per, sub)).reshape(n_sb, QK),
                               np.repeat(m, sub, axis=1), d, dmin)  # (b)
        sc2, m2 = best_params(d2, dmin2, sc, m)
        q2, err2 = codes(d2, dmin2, sc2, m2)
        better = err2.sum(1) < err.sum(1)
        d, dmin = np.where(better, d2, d), np.where(better, dmin2, dmin)
        sc, m = np.where(better[:, None], sc2, sc), np.where(better[:, None], m2, m)
        q, err = codes(d, dmin, sc, m)
    return d, dmin, sc.astype(np.int32), m.astype(np.int32), q


def _super_lsq(x, w, a, b, d, dmin):
    """fp16 (d ≥ 0, dmin ≥ 0) minimizing Σ w·(d·a − dmin·b − x)² per super-block (rows of (S, 256))."""
    saa, sab, sbb = (w * a * a).sum(1), (w * a * b).sum(1), (w * b * b).sum(1)
    sax, sbx = (w * a * x).sum(1), (w * b * x).sum(1)
    det = saa * sbb - sab * sab
    ok = det > 1e-12 * np.maximum(saa * sbb, 1e-30)
    d2 = np.where(ok, (sbb * sax - sab * sbx) / _safe(det), d)
    dmin2 = np.where(ok, (sab * sax - saa * sbx) / _safe(det), dmin)
    return _f16(np.maximum(d2, 0)), _f16(np.maximum(dmin2, 0))


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


def _encode_q3k(x: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    d, sc, q = _sym_grid(x, w, 16, 4, 32)
    u = (q.reshape(-1, QK) + 4).astype(np.uint8)  # 0…7; the high bit is set exactly for q ≥ 0
    raw = np.concatenate([_pack_bits(u >> 2), _pack_2bit(u & 3), _pack_q3k_scales(sc + 32), _half_bytes(d)], 1)
    step = (d[:, None] * sc.astype(np.float32))[:, :, None]  # (S, 16, 1), as ggml multiplies
    return raw, (step * q.reshape(-1, 16, 16).astype(np.float32)).reshape(-1, QK)


def _encode_q2k(x: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    d, dmin, sc, m, q = _asym_grid(x, w, 16, 3, 15)
    raw = np.concatenate([(sc | (m << 4)).astype(np.uint8), _pack_2bit(q.reshape(-1, QK)), _half_bytes(d),
                          _half_bytes(dmin)], 1)
    step = (d[:, None] * sc.astype(np.float32))[:, :, None]  # (S, 16, 1)
    off = (dmin[:, None] * m.astype(np.float32))[:, :, None]
    return raw, (step * q.reshape(-1, 16, 16).astype(np.float32) - off).reshape(-1, QK)


def _encode_q5k(x: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    d, dmin, sc, m, q = _asym_grid(x, w, 32, 31, 63)
    u = q.reshape(-1, QK).astype(np.uint8)
    lo = (u & 0x0F).reshape(-1, 4, 2, 32)  # (S, pair, low/high nibble, 32), as Q4_K
    nib = (lo[:, :, 0] | (lo[:, :, 1] << 4)).reshape(-1, 128)
    raw = np.concatenate([_half_bytes(d), _half_bytes(dmin), _pack_q4k_scales(sc, m), _pack_bits(u >> 4), nib], 1)
    step = (d[:, None] * sc.astype(np.float32))[:, :, None]  # (S, 8, 1)
    off = (dmin[:, None] * m.astype(np.float32))[:, :, None]
    return raw, (step * q.reshape(-1, 8, 32).astype(np.float32) - off).reshape(-1, QK)


def quantize_low(weight: np.ndarray, kind: str, importance: np.ndarray | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
    """``kind`` (q3_k, q2_k, q5_k) blocks of ``weight`` (rows, cols) -> (raw uint8 rows, dequantized f32).

    Raises:
        UserError: ``cols`` is not a multiple of 256, the type is not one of these, or bad importance.
    """
    if kind not in LOW_TYPES:
        raise UserError(f"{kind} is not one of {', '.join(LOW_TYPES)}")
    rows, cols = weight.shape
    if cols % QK:
        raise UserError(f"rows of {cols} weights do not split into {kind}'s super-blocks of {QK}")
    x = np.ascontiguousarray(weight, dtype=np.float32).reshape(-1, QK)  # (rows·cols/256, 256)
    w = _weights(importance, rows, cols, QK)
    encode = {"q3_k": _encode_q3k, "q2_k": _encode_q2k, "q5_k": _encode_q5k}[kind]
    raw, deq = encode(x, w)
    return raw.reshape(rows, -1), deq.reshape(rows, cols)


def quantize_q5_1(weight: np.ndarray, importance: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Q5_1 blocks (24 bytes per 32) and their values: a weighted range search per block, then fp16 refits."""
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
    u = q.astype(np.uint8)
    nib = (u[:, :16] & 0x0F) | ((u[:, 16:] & 0x0F) << 4)
    qh = np.packbits((u >> 4).astype(np.uint8), axis=1, bitorder="little")  # bit j = high bit of weight j
    raw = np.concatenate([_half_bytes(d), _half_bytes(m), qh, nib], 1)
    deq = d[:, None] * q.astype(np.float32) + m[:, None]
    return raw.reshape(rows, -1), deq.reshape(rows, cols)
