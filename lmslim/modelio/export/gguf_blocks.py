"""GGUF weight types and their block layouts, written from lmslim's integer codes.

The legacy block types are 32 weights along a row with fp16 parameters, and each is exactly one of
lmslim's grids (``lmslim.nn.scheme``), so a file carries lmslim's rounding as is:

=======  =====================================  ==========================================
type     block (bytes)                          lmslim grid (``Scheme``)
=======  =====================================  ==========================================
q8_0     d fp16, 32 × int8 (34)                 8 bits, group 32, symmetric: w = d·(q−128)
q4_0     d fp16, 16 bytes of nibbles (18)       4 bits, group 32, symmetric: w = d·(q−8)
q4_1     d fp16, m fp16, 16 bytes (20)          4 bits, group 32, asymmetric: w = d·q + m
=======  =====================================  ==========================================

Rounding float weights (``round_on``): each block takes the best (least squared error, weighted by
per-column importance when given) of three symmetric rules: a weighted scale search around the signed
rule (``signed_search``), ggml's own Q4_0 rule (``Scheme.signed_scale``:
``d = m / −2^(bits−1)`` with ``m`` the block's largest-magnitude weight *with its sign*, all 16 / 256
codes usable, ``d`` may be negative) and ggml's Q8_0 rule ``d = max|w| / (2^(bits−1) − 1)``. Measured on
SmolLM2-135M: its embedding already sits on the Q8_0 ``max/127`` grid, so only that rule keeps it
lossless (signed rule alone: +0.65% perplexity at q8_0 vs +0.005% with the embedding kept exact),
while the signed rule has the lower error on most other blocks.

The k-quants ``q4_k`` and ``q6_k`` (super-blocks of 256, ``gguf_kquants``), ``q5_k``, ``q3_k`` and
``q2_k`` (``gguf_kquants_low``), and ``q5_0`` / ``q5_1`` (lmslim's searches on ggml's 5-bit blocks) are
written from float weights (no ``QuantLinear`` holds their grids: a k-quant's step ``d·sc[j]`` is not an
fp16 scale). ``type_grid`` gives any quantized type's final grid as per-weight f32 ``step``/``off`` with the
RTN codes on it (``TypeGrid``); a calibrated method picks other codes on that grid and ``TypeGrid.encode``
packs them with the same block parameters, nothing re-rounded (``lmslim.compress.export``'s GPTQ). ``q4_k_m``, ``q3_k_m`` and ``q2_k`` are mixes mirroring llama.cpp's
presets of those names (``mix_type``; llama.cpp's Q2_K is itself a mix, so ``--type q2_k`` is too: for
q2_k everywhere give ``--tensor-type 'blk.*=q2_k'``). A k-quant tensor whose rows do not split into 256
takes llama.cpp's fallback type (``gguf_kquants.FALLBACK``), as llama.cpp does.

In a 4-bit block byte ``j`` holds weight ``j`` in its low nibble and weight ``j + 16`` in its high
nibble (ggml's layout). ``q4_1`` takes any asymmetric 4-bit group-32 grid (zero point or min/max):
its ``m`` is lmslim's fp16 offset.

Example:
    >>> import torch
    >>> w = torch.randn(4, 64)
    >>> q, s, o = round_on(w, "q4_0")
    >>> raw = encode_codes(q, s, o, "q4_0")
    >>> raw.shape, bool((decode_codes(raw, "q4_0", (4, 64)) == q.numpy()).all())
    ((4, 36), True)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from lmslim.core.errors import UserError
from lmslim.modelio.export.gguf_kquants import FALLBACK, K_BLOCK_BYTES, QK, signed_fit
from lmslim.modelio.export.gguf_kquants import K_TYPES as _KQ_TYPES
from lmslim.nn.scheme import Scheme, dequantize, quantize_weight, quantize_with

BLOCK = 32
FLOAT_TYPES = ("f32", "f16")
BLOCK_TYPES = ("q8_0", "q4_0", "q4_1")
K_TYPES = ("q5_0", "q5_1") + tuple(t for t in _KQ_TYPES if t != "q2_k")  # from float weights: gguf_kquants(_low)
MIX_TYPES = ("q4_k_m", "q3_k_m", "q2_k")  # presets: a type per tensor, as llama.cpp's of these names
GGUF_TYPES = FLOAT_TYPES + BLOCK_TYPES + K_TYPES + MIX_TYPES
_GRIDS = {"q8_0": Scheme(8, BLOCK, symmetric=True), "q4_0": Scheme(4, BLOCK, symmetric=True, signed_scale=True),
          "q4_1": Scheme(4, BLOCK, symmetric=False, minmax=True)}
_BLOCK_BYTES = {"q8_0": 34, "q4_0": 18, "q4_1": 20}


def check_type(name: str) -> str:
    if name not in GGUF_TYPES:
        raise UserError(f"unknown GGUF type {name!r}; choose one of: {', '.join(GGUF_TYPES)}")
    return name


def ggml_type(name: str):
    from gguf import GGMLQuantizationType

    return GGMLQuantizationType[check_type(name).upper()]


def _more_bits(i: int, n: int) -> bool:
    # llama.cpp's use_more_bits: the first and last eighth of the layers, and every third one between
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def mix_type(mix: str, name: str, n_layers: int, gqa: int = 1, tied: bool = True) -> str:
    """The type llama.cpp's ``mix`` gives tensor ``name`` before any row fallback (llama-quant.cpp's rules
    for a Llama; ``gqa``: query heads per KV head; ``tied``: the LM head reads ``token_embd``).

    Every mix: the LM head (or the tied embedding) q6_k; an untied embedding the mix's base type (it is
    only looked up, never multiplied). Q4_K_M: ``attn_v`` and ``ffn_down`` q6_k in the
    layers ``_more_bits`` picks, other matrices q4_k. Q3_K_M: ``attn_v`` q5_k in layers 0-1 then q4_k,
    ``ffn_down`` q5_k in the first sixteenth of the layers then q4_k, ``attn_output`` q4_k, others q3_k.
    Q2_K: ``attn_v`` q3_k (q4_k when ``gqa`` ≥ 4), ``ffn_down`` and ``attn_output`` q3_k, others q2_k.
    """
    if mix not in MIX_TYPES:
        raise UserError(f"unknown type mix {mix!r}; choose one of: {', '.join(MIX_TYPES)}")
    if name == "output.weight" or (name == "token_embd.weight" and tied):
        return "q6_k"
    if name == "token_embd.weight":
        return {"q4_k_m": "q4_k", "q3_k_m": "q3_k", "q2_k": "q2_k"}[mix]
    i = int(name.split(".")[1]) if name.startswith("blk.") else -1
    role = name.split(".")[-2]  # attn_v, ffn_down, ...
    if mix == "q4_k_m":
        return "q6_k" if role in ("attn_v", "ffn_down") and i >= 0 and _more_bits(i, n_layers) else "q4_k"
    if mix == "q3_k_m":
        if role == "attn_v":
            return "q5_k" if i < 2 else "q4_k"
        if role == "ffn_down":
            return "q5_k" if i < n_layers // 16 else "q4_k"
        return "q4_k" if role == "attn_output" else "q3_k"
    if role == "attn_v":
        return "q4_k" if gqa >= 4 else "q3_k"
    return "q3_k" if role in ("ffn_down", "attn_output") else "q2_k"


def storable_type(name: str, cols: int) -> str:
    """``name`` itself, or llama.cpp's fallback when rows of ``cols`` do not split into its super-blocks."""
    if name in FALLBACK and cols % QK:
        return FALLBACK[name]
    return name


def grid_of(name: str) -> Scheme:
    """The lmslim grid whose codes are exactly this block type's (used to round float weights onto it)."""
    if name not in _GRIDS:
        raise UserError(f"{name} is not a block-quantized GGUF type")
    return _GRIDS[name]


def round_on(w: torch.Tensor, name: str, clip_search: bool = False, importance=None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """lmslim's RTN onto ``name``'s blocks: (codes, scale, offset), per block the better symmetric rule.

    Args:
        importance: optional (cols,) weights of each column's squared error (e.g. calibration ``E[x²]``).
    """
    grid = grid_of(name)
    if not grid.symmetric:
        return quantize_weight(w, grid, clip_search)
    w = w.float()
    rows, cols = w.shape
    imp = torch.ones(cols) if importance is None else torch.as_tensor(importance, dtype=torch.float32).reshape(cols)
    best = None
    # The weighted search only with importance: on plain squared error it clips the largest weights more
    # than perplexity tolerates (SmolLM2 q4_0: 26.7 with it, 25.5 without; llama.cpp's own 26.0).
    for rule in ("max", "signed") + (("search",) if importance is not None else ()):
        q, s, o = (signed_search(w, grid.bits, imp) if rule == "search" else
                   quantize_weight(w, Scheme(grid.bits, BLOCK, symmetric=True, signed_scale=rule == "signed"),
                                   clip_search))
        err = ((dequantize(q, s, o, BLOCK) - w) ** 2 * imp).reshape(rows, cols // BLOCK, BLOCK).sum(2)  # (rows, G)
        if best is None:
            best = [q, s, o, err]
            continue
        better = err < best[3]
        best[0] = torch.where(better.repeat_interleave(BLOCK, 1), q, best[0])
        best[1], best[2] = torch.where(better, s, best[1]), torch.where(better, o, best[2])
        best[3] = torch.minimum(err, best[3])
    return best[0], best[1], best[2]


def signed_search(w: torch.Tensor, bits: int, importance: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Codes on the signed grid with each block's scale from ``gguf_kquants.signed_fit`` (weighted search)."""
    rows, cols = w.shape
    half = 2 ** (bits - 1)
    xs = w.numpy().reshape(-1, BLOCK)  # (rows·G, 32)
    ws = np.broadcast_to(importance.numpy().reshape(1, cols), (rows, cols)).reshape(-1, BLOCK) + 1e-12
    d = torch.from_numpy(signed_fit(xs, ws, half)).half().float()
    d = torch.where(d != 0, d, torch.ones_like(d)).reshape(rows, cols // BLOCK)
    offset = -half * d
    return quantize_with(w, d, offset, Scheme(bits, BLOCK, symmetric=True, signed_scale=True)), d, offset


def fits_grid(scheme: Scheme, name: str) -> bool:
    """Whether codes on ``scheme`` can be written as ``name`` blocks without any re-rounding."""
    if name not in _GRIDS or scheme.group_size != BLOCK:
        return False
    if name == "q4_1":
        return scheme.bits == 4
    return scheme.bits == _GRIDS[name].bits and scheme.symmetric


def block_bytes(name: str, rows: int, cols: int) -> int:
    if name in FLOAT_TYPES:
        return rows * cols * (4 if name == "f32" else 2)
    if name in K_BLOCK_BYTES:
        return rows * cols // QK * K_BLOCK_BYTES[name]
    return rows * cols // BLOCK * {"q5_0": 22, "q5_1": 24}.get(name, _BLOCK_BYTES.get(name, 0))


def _f16_bytes(t: torch.Tensor, rows: int, groups: int) -> np.ndarray:
    return t.to(torch.float16).numpy().reshape(rows, groups, 1).view(np.uint8)  # (rows, G, 2)


def _nibbles(codes: np.ndarray, rows: int, groups: int) -> np.ndarray:
    q = codes.reshape(rows, groups, 2, BLOCK // 2)  # (rows, G, halves, 16)
    return q[:, :, 0] | (q[:, :, 1] << 4)  # (rows, G, 16)


def encode_codes(codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, name: str) -> np.ndarray:
    """ggml blocks for codes (rows, cols) with per-(row, group) fp16 ``scale``/``offset`` (rows, cols/32).

    Raises:
        UserError: the parameters are not this type's (a symmetric type needs offset = -2^(bits-1)·scale).
    """
    rows, cols = codes.shape
    if cols % BLOCK:
        raise UserError(f"rows of {cols} weights do not split into {name}'s blocks of {BLOCK}")
    groups = cols // BLOCK
    scale, offset = scale.float(), offset.float()
    if name in ("q8_0", "q4_0"):
        half = 2 ** (_GRIDS[name].bits - 1)
        if not torch.equal(offset, -half * scale):
            raise UserError(f"weights are on an asymmetric grid; {name} stores symmetric blocks (use q4_1)")
    q = codes.to(torch.uint8).numpy()
    d = _f16_bytes(scale, rows, groups)
    if name == "q8_0":
        qs = (q.astype(np.int16) - 128).astype(np.int8).view(np.uint8).reshape(rows, groups, BLOCK)
        parts = [d, qs]
    elif name == "q4_0":
        parts = [d, _nibbles(q, rows, groups)]
    else:
        parts = [d, _f16_bytes(offset, rows, groups), _nibbles(q, rows, groups)]
    return np.concatenate(parts, axis=2).reshape(rows, groups * _BLOCK_BYTES[name])


def decode_codes(raw: np.ndarray, name: str, shape: tuple[int, int]) -> np.ndarray:
    """The unsigned codes stored in ``raw`` blocks (inverse of :func:`encode_codes`; for checks)."""
    rows, cols = shape
    blocks = np.asarray(raw, dtype=np.uint8).reshape(rows, cols // BLOCK, _BLOCK_BYTES[name])
    if name == "q8_0":
        return (blocks[:, :, 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8).reshape(rows, cols)
    qs = blocks[:, :, 2 if name == "q4_0" else 4:]  # (rows, G, 16)
    return np.concatenate([qs & 0x0F, qs >> 4], axis=2).reshape(rows, cols)


@dataclass(frozen=True)
class TypeGrid:
    """One tensor's final grid on a quantized GGUF type: ``w = step·q − off`` per weight, integer ``q`` in
    ``qmin … qmax`` (signed codes for the symmetric types), exactly as ggml dequantizes (f32).

    Built by :func:`type_grid` from lmslim's RTN search for the type; a calibrated method (GPTQ) then
    chooses other codes on this same grid, and :meth:`encode` writes them without re-rounding.
    """

    kind: str
    step: torch.Tensor  # (rows, cols) f32
    off: torch.Tensor  # (rows, cols) f32
    qmin: int
    qmax: int
    codes: torch.Tensor  # (rows, cols) int32: RTN's codes on this grid
    params: tuple  # the block parameters the packer writes

    def values(self, codes: torch.Tensor) -> torch.Tensor:
        return self.step * codes.float() - self.off

    def encode(self, codes: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """(raw blocks (rows, bytes), their f32 values) of ``codes`` on this grid."""
        from lmslim.modelio.export.gguf_kquants import pack_kquant, pack_q5_0
        from lmslim.modelio.export.gguf_kquants_low import pack_q5_1

        q = codes.to(torch.int32).numpy()
        if self.kind in _KQ_TYPES:
            return pack_kquant(self.kind, self.params[0], q)
        if self.kind == "q5_0":
            return pack_q5_0(self.params[0], q)
        if self.kind == "q5_1":
            return pack_q5_1(*self.params, q)
        scale, offset = self.params
        if q.min() < self.qmin or q.max() > self.qmax:
            raise UserError(f"{self.kind} codes must lie in {self.qmin}…{self.qmax}")
        unsigned = codes.to(torch.int32) - (self.qmin if self.kind != "q4_1" else 0)
        raw = encode_codes(unsigned, scale, offset, self.kind)
        return raw, self.values(codes).numpy()


def type_grid(w: torch.Tensor, kind: str, importance=None, clip_search: bool = False) -> TypeGrid:
    """The grid (and RTN codes) lmslim's writer would round float ``w`` (rows, cols) onto as ``kind``."""
    from lmslim.modelio.export.gguf_kquants import K_LAYOUT, kquant_params, kquant_steps, q5_0_params
    from lmslim.modelio.export.gguf_kquants_low import q5_1_params

    w = w.detach().float()
    shape = tuple(w.shape)
    x = w.numpy()
    per_block = lambda t: torch.from_numpy(np.repeat(np.asarray(t, np.float32), BLOCK, axis=1))  # (rows, G) -> cols
    if kind in _KQ_TYPES:
        params, codes = kquant_params(x, kind, importance)
        step, off = kquant_steps(params, kind, shape)
        _, lo, hi, _ = K_LAYOUT[kind]
        return TypeGrid(kind, torch.from_numpy(step), torch.from_numpy(off), lo, hi, torch.from_numpy(codes),
                        (params,))
    if kind == "q5_0":
        d, codes = q5_0_params(x, importance)
        return TypeGrid(kind, per_block(d), torch.zeros(shape), -16, 15, torch.from_numpy(codes), (d,))
    if kind == "q5_1":
        d, m, codes = q5_1_params(x, importance)
        return TypeGrid(kind, per_block(d), -per_block(m), 0, 31, torch.from_numpy(codes), (d, m))
    if kind not in BLOCK_TYPES:
        raise UserError(f"{kind} is not a quantized GGUF type")
    codes, scale, offset = round_on(w, kind, clip_search, importance)
    step = per_block(scale.numpy())
    if kind == "q4_1":  # w = d·q + m
        return TypeGrid(kind, step, -per_block(offset.numpy()), 0, 15, codes.to(torch.int32), (scale, offset))
    half = 2 ** (_GRIDS[kind].bits - 1)  # symmetric: ggml computes d·(q − half) with the signed code
    return TypeGrid(kind, step, torch.zeros(shape), -half, half - 1, codes.to(torch.int32) - half, (scale, offset))
