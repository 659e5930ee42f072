"""ggml's k-quant blocks (Q4_K, Q6_K) rounded by lmslim and packed byte for byte as ggml lays them out
(Q3_K, Q2_K and Q5_K: ``gguf_kquants_low``, built on this module's searches).

A k-quant super-block holds 256 weights of one row and quantizes the *block parameters* too:

- **Q4_K** (144 bytes): fp16 ``d`` and ``dmin``, 8 sub-blocks of 32 with 6-bit ``sc[j]`` and ``m[j]``,
  4-bit codes: ``w = d·sc[j]·q − dmin·m[j]``. Sub-block ``j`` of a pair ``(2i, 2i+1)`` sits in the low
  / high nibbles of bytes ``32i … 32i+31``; the 6-bit pairs share 12 bytes (``_pack_q4k_scales``).
- **Q6_K** (210 bytes): 16 sub-blocks of 16 with int8 ``sc[j]``, fp16 ``d``, 6-bit codes:
  ``w = d·sc[j]·(q − 32)``; low nibbles in 128 bytes, the high 2 bits in 64 (``_pack_q6k``).

lmslim's rounding (RTN) is a search on the final two-level grid, not only on the float sub-block
parameters: (1) each sub-block's (scale, min) is fitted by trying ``_STEPS`` candidate ranges, each
refined by least squares on its codes (as llama.cpp's ``make_qkx2_quants`` does, but on plain squared
error or on per-column importance, e.g. calibration ``E[x²]``, instead of ggml's ``|x|``-based
weights); (2) the sub-block parameters are rounded onto the 6-bit grid of the super-block; then, on the
final grid, alternately: (3) each sub-block's integer scale (and min) is refitted by least squares to
its codes and re-rounded, and its integer neighbours are tried; (4) the super-block's fp16 ``d`` (and
``dmin``) is refitted by least squares to the integer sub-scales and codes. After each, the codes are
re-rounded and a change is kept only where it lowers that (sub-)block's weighted squared error
(``_asym_grid``; ``_sym_grid`` for the signed Q3_K). Q6_K keeps steps (1)-(2) (``_q6k_grid``: the
refits gained ~1% there). Rows whose length is not a multiple of 256 cannot hold k-quant blocks; the
exporter uses llama.cpp's fallback type for them (``FALLBACK``).

Example:
    >>> import numpy as np
    >>> from gguf import GGMLQuantizationType
    >>> from gguf.quants import dequantize
    >>> w = np.random.default_rng(0).normal(size=(4, 512)).astype(np.float32)
    >>> raw, deq = quantize_kquant(w, "q4_k")
    >>> raw.shape, bool((dequantize(raw, GGMLQuantizationType.Q4_K) == deq).all())
    ((4, 288), True)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lmslim.core.errors import UserError

QK = 256
# q3_k, q2_k, q5_k are written by gguf_kquants_low (quantize_kquant hands them over)
K_TYPES = ("q4_k", "q6_k", "q5_k", "q3_k", "q2_k")
# llama.cpp's own substitute when a row does not split into 256 (llama-quant.cpp, as its Q4_K_M, Q3_K_M and
# Q2_K files of SmolLM2's 576-wide rows show): what it writes instead.
FALLBACK = {"q4_k": "q5_0", "q6_k": "q8_0", "q5_k": "q5_1", "q3_k": "q4_0", "q2_k": "q4_0"}
# (weights per sub-block, lowest code, highest code, has mins): w = d·sc[j]·q − dmin·m[j]
K_LAYOUT = {"q4_k": (32, 0, 15, True), "q5_k": (32, 0, 31, True), "q2_k": (16, 0, 3, True),
            "q3_k": (16, -4, 3, False), "q6_k": (16, -32, 31, False)}
K_BLOCK_BYTES = {"q4_k": 144, "q6_k": 210, "q5_k": 176, "q3_k": 110, "q2_k": 84}
_STEPS = 24  # candidate ranges per sub-block in step (1)
_GRID_REFITS = 4  # rounds of (3) and (4)
_NEIGHBOURS = (-2, -1, 1, 2)  # integer sub-block scales tried around the current one in (3), signed grids


def _lsq(x: np.ndarray, q: np.ndarray, w: np.ndarray, nonpos_offset: bool) -> tuple[np.ndarray, np.ndarray]:
    """Weighted least-squares (scale, offset) of ``x ≈ scale·q + offset`` per row; offset ≤ 0 if asked."""
    sw, sq, sx = w.sum(1), (w * q).sum(1), (w * x).sum(1)
    sqq, sqx = (w * q * q).sum(1), (w * q * x).sum(1)
    det = sw * sqq - sq * sq
    ok = det > 0
    scale = np.where(ok, (sw * sqx - sq * sx) / np.where(ok, det, 1), 0)
    offset = np.where(ok, (sqq * sx - sq * sqx) / np.where(ok, det, 1), 0)
    if nonpos_offset:
        pos = offset > 0  # Q4_K subtracts dmin·m with m ≥ 0: refit without offset
        scale = np.where(pos, sqx / np.maximum(sqq, 1e-30), scale)
        offset = np.where(pos, 0, offset)
    return scale.astype(np.float32), offset.astype(np.float32)


def _fit_asym(x: np.ndarray, w: np.ndarray, levels: int, nonpos: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Step (1) for Q4_K: (scale ≥ 0, offset ≤ 0 unless ``nonpos`` is off) per row of ``x`` (N, n) minimizing
    weighted error."""
    lo = np.minimum(x.min(1), 0) if nonpos else x.min(1)
    hi = x.max(1)
    span = np.maximum(hi - lo, 1e-30)
    best_s, best_o = span / levels, lo.copy()
    best_err = np.full(len(x), np.inf, dtype=np.float32)
    for step in range(_STEPS + 1):
        iscale = (levels - 1.0 + 2.0 * step / _STEPS) / span  # ranges 1/16 wider … 1/16 narrower than [lo, hi]
        q = np.clip(np.rint((x - lo[:, None]) * iscale[:, None]), 0, levels)
        s, o = _lsq(x, q, w, nonpos_offset=nonpos)
        err = (w * (np.clip(np.rint((x - o[:, None]) / np.where(s > 0, s, 1)[:, None]), 0, levels) * s[:, None]
                    + o[:, None] - x) ** 2).sum(1)
        better = (err < best_err) & (s > 0)
        best_err = np.where(better, err, best_err)
        best_s, best_o = np.where(better, s, best_s), np.where(better, o, best_o)
    return best_s, best_o


def _to_6bit(values: np.ndarray, top: int) -> tuple[np.ndarray, np.ndarray]:
    """Super-block scale (fp16 as f32, (S,)) and integer multipliers (S, n) of non-negative ``values``."""
    peak = values.max(1)
    d = (peak / top).astype(np.float16).astype(np.float32)
    safe = np.where(d > 0, d, 1)
    return d, np.clip(np.rint(values / safe[:, None]), 0, top).astype(np.int32)


def _f16(a: np.ndarray) -> np.ndarray:
    return np.asarray(a, np.float32).astype(np.float16).astype(np.float32)


def _safe(a: np.ndarray) -> np.ndarray:
    return np.where(a != 0, a, 1)


def _sym_grid(x: np.ndarray, w: np.ndarray, sub: int, half: int, sc_half: int, spread: float = 1 / 8):
    """Signed two-level grid: d (S,), integer sc (S, n) in −sc_half…sc_half−1, codes (S·n, sub) in
    −half…half−1."""
    n_sb, per = len(x), QK // sub
    xs, ws = x.reshape(-1, sub), w.reshape(-1, sub)  # (S·n, sub)
    s = signed_fit(xs, ws, half, spread).reshape(n_sb, per)
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
    for _ in range(_GRID_REFITS):
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
    for _ in range(_GRID_REFITS):
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


def _pack_q4k_scales(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """(S, 8) 6-bit scales and mins -> (S, 12) bytes in ggml's ``get_scale_min_k4`` order."""
    sc, m = sc.astype(np.uint8), m.astype(np.uint8)
    out = np.empty((len(sc), 12), np.uint8)
    out[:, 0:4] = (sc[:, :4] & 0x3F) | ((sc[:, 4:] >> 4) << 6)  # top 2 bits of sub-blocks 4-7 ride along
    out[:, 4:8] = (m[:, :4] & 0x3F) | ((m[:, 4:] >> 4) << 6)
    out[:, 8:12] = (sc[:, 4:] & 0x0F) | ((m[:, 4:] & 0x0F) << 4)
    return out


def _pack_q4k(p: "KParams", q: np.ndarray) -> np.ndarray:
    """Q4_K bytes (S, 144) of parameters ``p`` and codes ``q`` (S, 256) in 0…15."""
    qs = q.astype(np.uint8).reshape(-1, 4, 2, 32)  # (S, pair, low/high, 32)
    nib = (qs[:, :, 0] | (qs[:, :, 1] << 4)).reshape(-1, 128)
    return np.concatenate([p.d.astype(np.float16).view(np.uint8).reshape(-1, 2),
                           p.dmin.astype(np.float16).view(np.uint8).reshape(-1, 2), _pack_q4k_scales(p.sc, p.m), nib],
                          1)


def signed_fit(xs: np.ndarray, ws: np.ndarray, half: int, spread: float = 1 / 8) -> np.ndarray:
    """Scale per row of ``xs`` for codes ``−half … half−1`` (ggml's signed rule, then a search).

    Starts from the signed extreme on code ``−half`` (``d = m / −half``), tries ranges up to ``spread``
    narrower and wider, refits each by least squares on its codes, and keeps the least weighted error.
    """
    peak = np.take_along_axis(xs, np.abs(xs).argmax(1)[:, None], 1)[:, 0]
    best_s, best_err = peak / -half, np.full(len(xs), np.inf, np.float32)
    for step in range(_STEPS + 1):
        s = peak / (-half + 2 * half * spread * (step / _STEPS - 0.5))  # ±spread of the range around the rule
        q = np.clip(np.rint(xs / np.where(s != 0, s, 1)[:, None]), -half, half - 1)
        den = (ws * q * q).sum(1)
        s = np.where(den > 0, (ws * q * xs).sum(1) / np.maximum(den, 1e-30), s)  # least squares for these codes
        q = np.clip(np.rint(xs / np.where(s != 0, s, 1)[:, None]), -half, half - 1)
        err = (ws * (q * s[:, None] - xs) ** 2).sum(1)
        better = err < best_err
        best_err, best_s = np.where(better, err, best_err), np.where(better, s, best_s)
    return best_s.astype(np.float32)


def quantize_q5_0(weight: np.ndarray, importance: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Q5_0 blocks (22 bytes per 32: fp16 d, 32 high bits, 16 bytes of nibbles) and their values.

    ``w = d·(q − 16)``; the scale is ``signed_fit``'s search (llama.cpp's reference rule is its start).
    """
    d, q = q5_0_params(weight, importance)
    return pack_q5_0(d, q)


def q5_0_params(weight: np.ndarray, importance: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Q5_0's grid and RTN codes: fp16 ``d`` (rows, cols/32) as f32 and signed codes (rows, cols) in −16…15."""
    rows, cols = weight.shape
    if cols % 32:
        raise UserError(f"rows of {cols} weights do not split into q5_0's blocks of 32")
    xs = np.ascontiguousarray(weight, dtype=np.float32).reshape(-1, 32)  # (rows·cols/32, 32)
    ws = _weights(importance, rows, cols, 32)
    d = signed_fit(xs, ws, 16).astype(np.float16).astype(np.float32)
    q = np.clip(np.rint(xs / np.where(d != 0, d, 1)[:, None]), -16, 15)
    q = np.where(d[:, None] != 0, q, 0).astype(np.int32)
    return d.reshape(rows, -1), q.reshape(rows, cols)


def pack_q5_0(d: np.ndarray, codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q5_0 bytes (rows, cols/32·22) of fp16 ``d`` (rows, cols/32) and signed codes (rows, cols), and their values."""
    rows, cols = codes.shape
    if codes.min() < -16 or codes.max() > 15:
        raise UserError("q5_0 codes must lie in -16…15")
    d = np.asarray(d, np.float32).reshape(-1)
    q = (codes.reshape(-1, 32) + 16).astype(np.uint8)  # (B, 32) codes 0..31
    nib = (q[:, :16] & 0x0F) | ((q[:, 16:] & 0x0F) << 4)
    qh = np.packbits((q >> 4).astype(np.uint8), axis=1, bitorder="little")  # bit j = high bit of weight j
    raw = np.concatenate([d.astype(np.float16).view(np.uint8).reshape(-1, 2), qh, nib], 1)
    deq = d[:, None] * (q.astype(np.int8) - np.int8(16)).astype(np.float32)
    return raw.reshape(rows, -1), deq.reshape(rows, cols)


def _weights(importance: np.ndarray | None, rows: int, cols: int, block: int) -> np.ndarray:
    """Per-weight error weights (rows·cols/block, block) from per-column importance (cols,)."""
    if importance is None:
        return np.ones((rows * cols // block, block), np.float32)
    imp = np.asarray(importance, np.float32).reshape(1, cols)
    if imp.shape[1] != cols or not np.isfinite(imp).all() or (imp < 0).any():
        raise UserError(f"importance must be {cols} finite non-negative values per column")
    return np.ascontiguousarray(np.broadcast_to(imp, (rows, cols))).reshape(-1, block) + 1e-12


def _q6k_grid(x: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Q6_K: d (S,), int8 sc (S, 16), codes 0..63 (S, 256) for ``x`` (S, 256)."""
    n_sb = len(x)
    xs, ws = x.reshape(-1, 16), w.reshape(-1, 16)  # (S·16, 16)
    best_s = signed_fit(xs, ws, 32)
    sub = best_s.reshape(n_sb, 16).astype(np.float32)
    ext = np.take_along_axis(sub, np.abs(sub).argmax(1)[:, None], 1)[:, 0]
    d = (ext / -128).astype(np.float16).astype(np.float32)  # the extreme sub-scale lands on −128
    sc = np.clip(np.rint(sub / np.where(d != 0, d, 1)[:, None]), -128, 127).astype(np.int8)
    step = (d[:, None] * sc.astype(np.float32)).reshape(-1)
    q = np.clip(np.rint(xs / np.where(step != 0, step, 1)[:, None]), -32, 31)
    q = np.where(step[:, None] != 0, q, 0)
    return d, sc, (q + 32).reshape(n_sb, QK).astype(np.uint8)


def _pack_q6k(p: "KParams", q: np.ndarray) -> np.ndarray:
    """Q6_K bytes (S, 210) of parameters ``p`` and signed codes ``q`` (S, 256) in −32…31."""
    halves = (q + 32).astype(np.uint8).reshape(-1, 2, 128)  # (S, half, 128): each half is 4 rows of 32
    ql = (halves[:, :, :64] & 0x0F) | ((halves[:, :, 64:] & 0x0F) << 4)  # (S, 2, 64)
    hi = (halves >> 4).reshape(-1, 2, 4, 32)  # (S, half, quarter, 32)
    qh = hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)  # (S, 2, 32)
    return np.concatenate([ql.reshape(-1, 128), qh.reshape(-1, 64), p.sc.astype(np.int8).view(np.uint8),
                           p.d.astype(np.float16).view(np.uint8).reshape(-1, 2)], 1)


@dataclass(frozen=True)
class KParams:
    """A k-quant tensor's block parameters, flat over super-blocks: ``w = d·sc[j]·q − dmin·m[j]``.

    ``d``/``dmin`` (S,) fp16 values held as f32; ``sc``/``m`` (S, sub-blocks) integers; no ``dmin``/``m``
    for the signed types (Q3_K, Q6_K).
    """

    d: np.ndarray
    sc: np.ndarray
    dmin: np.ndarray | None = None
    m: np.ndarray | None = None


def kquant_params(weight: np.ndarray, kind: str, importance: np.ndarray | None = None
                  ) -> tuple[KParams, np.ndarray]:
    """lmslim's RTN search for ``kind``: its grid (``KParams``) and codes (rows, cols) on it (signed for
    Q3_K / Q6_K, as ``K_LAYOUT``'s range).

    Raises:
        UserError: ``cols`` is not a multiple of 256, bad importance, or not a k-quant.
    """
    if kind not in K_TYPES:
        raise UserError(f"{kind} is not a k-quant type lmslim writes ({', '.join(K_TYPES)})")
    rows, cols = weight.shape
    if cols % QK:
        raise UserError(f"rows of {cols} weights do not split into {kind}'s super-blocks of {QK}")
    x = np.ascontiguousarray(weight, dtype=np.float32).reshape(-1, QK)  # (rows·cols/256, 256)
    w = _weights(importance, rows, cols, QK)
    sub, lo, hi, _ = K_LAYOUT[kind]
    if kind == "q6_k":
        d, sc, q = _q6k_grid(x, w)
        return KParams(d, sc.astype(np.int32)), (q.astype(np.int32) - 32).reshape(rows, cols)
    if kind == "q3_k":  # ±25% range search at 3 bits
        d, sc, q = _sym_grid(x, w, sub, -lo, 32, spread=1 / 4)
        return KParams(d, sc), q.astype(np.int32).reshape(rows, cols)
    d, dmin, sc, m, q = _asym_grid(x, w, sub, hi, 63 if sub == 32 else 15)
    return KParams(d, sc, dmin, m), q.astype(np.int32).reshape(rows, cols)


def kquant_steps(p: KParams, kind: str, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Per weight (rows, cols): the step ``d·sc[j]`` and offset ``dmin·m[j]`` (f32, as ggml multiplies)."""
    sub = K_LAYOUT[kind][0]
    step = np.repeat(p.d[:, None] * p.sc.astype(np.float32), sub, axis=1).reshape(shape)  # (S, 256) -> (rows, cols)
    if p.m is None:
        return step, np.zeros(shape, np.float32)
    return step, np.repeat(p.dmin[:, None] * p.m.astype(np.float32), sub, axis=1).reshape(shape)


def pack_kquant(kind: str, p: KParams, codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``kind`` bytes (rows, cols/256·bytes) of codes (rows, cols) on the fixed grid ``p``, and their f32
    values ``step·q − off`` (what ggml and ``gguf.quants.dequantize`` compute). Nothing is re-rounded.

    Raises:
        UserError: a code outside ``kind``'s range.
    """
    rows, cols = codes.shape
    _, lo, hi, _ = K_LAYOUT[kind]
    q = np.asarray(codes).astype(np.int32)
    if q.min() < lo or q.max() > hi:
        raise UserError(f"{kind} codes must lie in {lo}…{hi}")
    if kind in ("q4_k", "q6_k"):
        raw = (_pack_q4k if kind == "q4_k" else _pack_q6k)(p, q.reshape(-1, QK))
    else:
        from lmslim.modelio.export.gguf_kquants_low import pack_low  # it builds on this module

        raw = pack_low(kind, p, q.reshape(-1, QK))
    step, off = kquant_steps(p, kind, (rows, cols))
    return raw.reshape(rows, -1), step * q.astype(np.float32) - off


def quantize_kquant(weight: np.ndarray, kind: str, importance: np.ndarray | None = None
                    ) -> tuple[np.ndarray, np.ndarray]:
    """``kind`` blocks for ``weight`` (rows, cols) -> (raw uint8 (rows, cols/256·bytes), dequantized f32).

    Args:
        importance: optional per-column weights (cols,) of the squared error, e.g. calibration ``E[x²]``.

    Raises:
        UserError: ``cols`` is not a multiple of 256 or the type is not a k-quant lmslim writes.
    """
    params, codes = kquant_params(weight, kind, importance)
    return pack_kquant(kind, params, codes)


def quantize_float(weight: np.ndarray, kind: str, importance: np.ndarray | None = None) -> np.ndarray:
    """Raw blocks of the types lmslim writes from float weights only: q5_0, q5_1 and the k-quants."""
    if kind == "q5_0":
        return quantize_q5_0(weight, importance)[0]
    if kind == "q5_1":
        from lmslim.modelio.export.gguf_kquants_low import quantize_q5_1

        return quantize_q5_1(weight, importance)[0]
    return quantize_kquant(weight, kind, importance)[0]
