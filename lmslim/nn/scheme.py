"""Integer weight formats: group-wise round-to-nearest, bit packing, and the fake-quant reference.

A weight ``W`` of shape (out, in) is split along the input dimension into groups of ``group_size``
columns (``None`` = one group per row, i.e. per output channel). Each (row, group) gets a scale and
an offset, both stored as fp16; codes are unsigned integers in ``[0, 2^bits - 1]`` and dequantize as
``q * scale + offset`` (the "scale + min" layout of llama.cpp's Q4_1). Three ways to fit a grid:

- symmetric: ``scale = max|w| / (2^(bits-1) - 1)``, ``offset = -2^(bits-1) * scale``;
- symmetric ``signed_scale`` (ggml's Q4_0/Q8_0 rule): ``scale = m / -2^(bits-1)`` with ``m`` the
  group's largest-magnitude value *with its sign*, so ``m`` lands exactly on code 0 and all 2^bits
  codes are used (16 levels at 4 bits instead of 15); the scale may be negative;
- asymmetric, integer zero point (default, the GPTQ/AWQ convention): the range is widened to
  include 0 and the zero point rounded to an integer code, so 0 is exactly representable;
- asymmetric ``minmax``: the group's ``[min, max]`` maps onto the full code range (``offset = min``),
  Q4_1's rule. On SmolLM2 (w4 g128 RTN, 4096 test tokens) it measured worse than the zero-point
  grid (perplexity 39.0 vs 33.4), but it reproduces SmolLM2's released Q4_1 g32 weights exactly.

Codes are computed against the fp16-rounded parameters, so stored and fitted grids agree.

**Partial groups.** When ``group_size`` does not divide ``in`` (SmolLM2: 576 columns, group 128),
the last group is simply shorter (576 = 4·128 + 64): its scale and offset come from its own 64
columns. Nothing is padded in the stored codes.

Example:
    >>> import torch
    >>> from lmslim.nn.scheme import Scheme, quantize_weight, dequantize
    >>> w = torch.randn(8, 20)
    >>> q, s, z = quantize_weight(w, Scheme(bits=4, group_size=8))
    >>> dequantize(q, s, z, 8).shape
    torch.Size([8, 20])
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from lmslim.core.errors import UserError

SUPPORTED_BITS = (2, 3, 4, 8)


@dataclass(frozen=True)
class Scheme:
    """How one weight matrix is quantized."""

    bits: int = 4
    group_size: int | None = 128  # None: per output channel
    symmetric: bool = False
    minmax: bool = False  # asymmetric only: offset = group min (Q4_1) instead of an integer zero point
    signed_scale: bool = False  # symmetric only: scale = m / -half with m the signed max-|w| value (ggml's Q4_0)

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise UserError(f"unsupported bits {self.bits}; integer weight formats support {SUPPORTED_BITS}")
        if self.group_size is not None and self.group_size < 1:
            raise UserError(f"group size must be >= 1 (or omitted for per-channel), got {self.group_size}")
        if self.signed_scale and not self.symmetric:
            raise UserError("signed_scale is a rule for symmetric grids (ggml's Q4_0/Q8_0)")

    @property
    def half(self) -> int:
        return 2 ** (self.bits - 1)

    @property
    def qmax(self) -> int:
        return 2 ** self.bits - 1

    def record(self) -> dict:
        """The grid as saved folders record it per module (``lmslim_quantization``'s module entries)."""
        return {"bits": self.bits, "group_size": self.group_size, "symmetric": self.symmetric, "minmax": self.minmax}

    @classmethod
    def from_record(cls, spec: dict) -> "Scheme":
        """The grid of a saved module entry (folders written before ``minmax`` existed lack it)."""
        return cls(spec["bits"], spec["group_size"], spec["symmetric"], spec.get("minmax", False))

    def n_groups(self, in_features: int) -> int:
        return 1 if self.group_size is None else math.ceil(in_features / self.group_size)

    def group(self, in_features: int) -> int:
        # A group wider than the layer is the whole row (one scale per output channel).
        return in_features if self.group_size is None else min(self.group_size, in_features)


# Range shrink factors tried by the clipping search (1.0 = the full range).
CLIP_GRID = tuple(1 - 0.025 * i for i in range(13))  # 1.0 … 0.7


def group_params(w: torch.Tensor, scheme: Scheme, clip_search: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and offset for each (row, group) of ``w`` (out, in) -> two (out, n_groups) tensors.

    With ``clip_search``, each (row, group) range is shrunk by the factor in ``CLIP_GRID`` that gives
    the smallest squared rounding error (outliers are clipped when that lowers the total error).
    """
    out, k = w.shape
    g = scheme.group(k)
    scales, zeros = [], []
    fit = search_params if clip_search else _params_for
    for start in range(0, k, g):
        s, z = fit(w[:, start:start + g], scheme)
        scales.append(s)
        zeros.append(z)
    return torch.stack(scales, 1), torch.stack(zeros, 1)


def search_params(block: torch.Tensor, scheme: Scheme) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the clipped grid (see ``CLIP_GRID``) with the least squared rounding error."""
    block = block.float()
    best_err = torch.full((block.shape[0],), float("inf"))
    best_s = best_o = None
    for shrink in CLIP_GRID:
        s, o = _params_for(block, scheme, shrink)
        q = torch.clamp(torch.round((block - o[:, None]) / s[:, None]), 0, scheme.qmax)
        err = ((q * s[:, None] + o[:, None] - block) ** 2).sum(1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_s = s if best_s is None else torch.where(better, s, best_s)
        best_o = o if best_o is None else torch.where(better, o, best_o)
    return best_s, best_o


def _params_for(block: torch.Tensor, scheme: Scheme, shrink: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and offset for each row of a (out, cols) block, rounded to fp16 (their stored type)."""
    block = block.float()
    if scheme.signed_scale:
        # The signed extreme value maps onto code 0 (w = scale·(0 − half)), using the code the plain
        # symmetric rule leaves unused: 2^bits levels, like ggml's Q4_0.
        peak = block.gather(1, block.abs().argmax(1, keepdim=True)).squeeze(1)  # (out,)
        scale = (peak * shrink / -scheme.half).half().float()
        scale = torch.where(scale != 0, scale, torch.ones_like(scale))
        return scale, -scheme.half * scale
    if scheme.symmetric:
        scale = block.abs().amax(1) * shrink / (scheme.half - 1)
    else:
        lo, hi = block.amin(1) * shrink, block.amax(1) * shrink
        if not scheme.minmax:
            lo, hi = lo.clamp(max=0), hi.clamp(min=0)
        scale = (hi - lo) / scheme.qmax
    scale = torch.where(scale > 0, scale, torch.ones_like(scale)).half().float()  # constant rows: any scale
    if scheme.symmetric:
        offset = -scheme.half * scale
    elif scheme.minmax:
        offset = lo.half().float()
    else:
        offset = (-torch.round(-lo / scale).clamp(0, scheme.qmax) * scale).half().float()
    return scale, offset


def quantize_with(w: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, scheme: Scheme) -> torch.Tensor:
    """Codes for ``w`` given per-(row, group) ``scale``/``offset`` of shape (out, n_groups)."""
    k = w.shape[1]
    s = expand_groups(scale, scheme.group(k), k)
    o = expand_groups(offset, scheme.group(k), k)
    return torch.clamp(torch.round((w.float() - o) / s), 0, scheme.qmax).to(torch.uint8)


def quantize_weight(w: torch.Tensor, scheme: Scheme, clip_search: bool = False
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest: (codes uint8 (out, in), scale (out, G), offset (out, G)), params fp16-exact."""
    scale, offset = group_params(w, scheme, clip_search)
    return quantize_with(w, scale, offset, scheme), scale, offset


def expand_groups(t: torch.Tensor, group: int, in_features: int) -> torch.Tensor:
    """(out, G) per-group values -> (out, in) per-column values (last group may be partial)."""
    return t.repeat_interleave(group, dim=1)[:, :in_features]


def dequantize(q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, group: int) -> torch.Tensor:
    k = q.shape[1]
    return q.float() * expand_groups(scale.float(), group, k) + expand_groups(offset.float(), group, k)


def fake_quantize(w: torch.Tensor, scheme: Scheme) -> torch.Tensor:
    """The plain-PyTorch reference: quantize and immediately dequantize."""
    q, s, z = quantize_weight(w, scheme)
    return dequantize(q, s, z, scheme.group(w.shape[1])).to(w.dtype)


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned ``bits``-bit codes (any shape) densely into a flat uint8 tensor."""
    flat = codes.reshape(-1).cpu().numpy().astype(np.uint8)
    if bits == 8:
        return torch.from_numpy(flat.copy())
    if bits == 4:  # the same stream, two codes a byte (even index in the low nibble), without bit planes
        flat = np.concatenate([flat, np.zeros(len(flat) % 2, np.uint8)])
        return torch.from_numpy(flat[0::2] | (flat[1::2] << 4))
    # One row per code, its bits little-endian; then the bit stream is cut into bytes.
    bitplanes = np.unpackbits(flat[:, None], axis=1, bitorder="little")[:, :bits]  # (N, bits)
    return torch.from_numpy(np.packbits(bitplanes.reshape(-1), bitorder="little"))


def unpack(packed: torch.Tensor, bits: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of :func:`pack`."""
    n = int(np.prod(shape))
    raw = packed.cpu().numpy().astype(np.uint8)
    if bits == 8:
        return torch.from_numpy(raw[:n].copy()).reshape(shape)
    if bits == 4:
        return torch.from_numpy(np.stack([raw & 0xF, raw >> 4], 1).reshape(-1)[:n].copy()).reshape(shape)
    bitstream = np.unpackbits(raw, bitorder="little")[: n * bits].reshape(n, bits)
    padded = np.zeros((n, 8), dtype=np.uint8)
    padded[:, :bits] = bitstream
    return torch.from_numpy(np.packbits(padded, axis=1, bitorder="little").reshape(shape))
