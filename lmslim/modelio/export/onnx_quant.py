"""Matrices of the ONNX export: float ``MatMul`` or ONNX Runtime's ``MatMulNBits`` with lmslim's codes.

``MatMulNBits`` (com.microsoft) holds a weight (N out, K in) as unsigned ``bits``-bit codes in
blocks of ``block_size`` inputs, one scale and one zero point per (row, block), and computes
``y = x · ((code - zero_point) · scale)ᵀ``. lmslim's grid is ``code · scale + offset`` per (row,
group), so a group is a block and ``zero_point = -offset / scale``:

- symmetric grids: ``offset = -2^(bits-1) · scale`` exactly, the zero point is the integer 2^(bits-1);
- asymmetric zero-point grids (lmslim's default) under ORT's int8 compute (``accuracy_level=4``,
  which takes integer zero points only): the zero point is the integer ``z`` lmslim rounded
  against; lmslim stores ``offset = -z · scale`` rounded to fp16, so each group's weights shift by
  at most half an fp16 step of the offset (≤ 2^-12 relative), never by a code. That is far below
  the rounding of the activations the int8 compute adds;
- under float32 compute (``int8_compute=False``) 4-bit zero points are float32 ``-offset/scale``:
  the weight is lmslim's to float32 rounding (8-bit MatMulNBits takes integer zero points only);
- ``minmax`` grids (Q4_1's rule, offset = group minimum): 4-bit only, float zero points, computed
  in float32 (8-bit minmax grids are refused).

Codes, scales and the integer zero points are copied, never re-rounded. A group size must be a
power of two >= 16 (MatMulNBits' block sizes). A per-channel grid (one scale per row: dynamic int8,
SmoothQuant, ``--bits 8`` RTN/GPTQ) is written as blocks of 128 inputs (fewer for narrower rows)
that all repeat their row's scale and zero point: the same weights exactly, for 4 bytes of scale
per block. A last group shorter than the block (lmslim's partial groups, e.g. 176 = 5·32 + 16) is
padded with code 0, which multiplies nothing: ORT reads K inputs.

Float weights exported as int8/int4 are rounded here with lmslim's RTN on the asymmetric
zero-point grid at the configured group size (``lmslim.nn.scheme.quantize_weight``).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from lmslim.core.errors import UserError
from lmslim.nn.quant_linear import QuantLinear
from lmslim.nn.scheme import Scheme, quantize_weight

BITS = {"int8": 8, "int4": 4}
ROW_BLOCK = 128  # MatMulNBits block for a per-channel grid's rows (their scale repeated per block)


def check_block(group_size: int | None, where: str) -> int:
    if group_size is None or group_size < 16 or group_size & (group_size - 1):
        raise UserError(f"{where}: group size {group_size or 'per-channel'} cannot be an ONNX Runtime MatMulNBits "
                        "block (a power of two >= 16: 16, 32, 64, 128, 256); quantize with such a group size or "
                        "export --type f32")
    return group_size


def _zero_points(scale: torch.Tensor, offset: torch.Tensor, scheme: Scheme, exact: bool, where: str) -> np.ndarray:
    """Per-(row, group) zero points: integer codes as uint8, or float32 ones (4-bit) where asked or needed."""
    s, o = scale.double(), offset.double()
    if scheme.symmetric:
        return np.full(tuple(scale.shape), scheme.half, np.uint8)  # offset = -half·scale exactly
    if scheme.bits == 4 and (exact or scheme.minmax):
        return (-o / s).float().numpy()  # exact to float32 rounding
    if scheme.minmax:
        raise UserError(f"{where}: an 8-bit minmax grid needs float zero points, which ONNX Runtime's 8-bit "
                        "MatMulNBits does not take; export --type f32")
    z = torch.round(-o / s)  # lmslim's integer zero point; -o/s is within 2^-11·z of it
    return z.clamp(0, scheme.qmax).to(torch.uint8).numpy()


def _pack(codes: np.ndarray, bits: int, block: int) -> np.ndarray:
    """(N, K) codes -> (N, n_blocks, block·bits/8) bytes, the last block padded with code 0."""
    n, k = codes.shape
    blocks = -(-k // block)
    padded = np.zeros((n, blocks * block), np.uint8)
    padded[:, :k] = codes
    if bits == 4:
        padded = padded[:, 0::2] | (padded[:, 1::2] << 4)  # even index in the low nibble
    return np.ascontiguousarray(padded.reshape(n, blocks, block * bits // 8))


def _pack_zero_points(z: np.ndarray, bits: int) -> np.ndarray:
    """(N, n_blocks) integer zero points -> MatMulNBits' layout: 4-bit ones two a byte per row."""
    if z.dtype != np.uint8 or bits == 8:
        return z.reshape(-1)
    n, blocks = z.shape
    padded = np.zeros((n, blocks + blocks % 2), np.uint8)
    padded[:, :blocks] = z
    return (padded[:, 0::2] | (padded[:, 1::2] << 4)).reshape(-1)


def quantized_parts(module, kind: str, group_size: int, where: str):
    """(codes (N, K) uint8, scale (N, G), offset (N, G), scheme) of one matrix for ``kind``."""
    bits = BITS[kind]
    if isinstance(module, QuantLinear):
        s = module.scheme
        if s.bits != bits:
            raise UserError(f"{where} is already quantized to {s.bits} bits, not {kind}; re-rounding it would add "
                            f"error: export --type {'int8' if s.bits == 8 else 'int4' if s.bits == 4 else 'f32'}")
        codes, scale, offset = module.codes(), module.scale.float(), module.offset.float()
        if s.group_size is None:  # per-channel: every block of a row repeats the row's scale and offset
            k = codes.shape[1]
            block = min(ROW_BLOCK, max(16, 1 << (k.bit_length() - 1)))  # a power of two, at most the row
            blocks = -(-k // block)
            return codes, scale.repeat(1, blocks), offset.repeat(1, blocks), dataclasses.replace(s, group_size=block)
        check_block(s.group_size, where)
        return codes, scale, offset, s
    scheme = Scheme(bits=bits, group_size=group_size, symmetric=False)
    codes, scale, offset = quantize_weight(module.weight.detach().float(), scheme)
    return codes, scale, offset, scheme


def matmul_nbits(g, x: str, module, kind: str, group_size: int, accuracy_level: int, where: str) -> str:
    """A ``MatMulNBits`` node for ``module`` (float: rounded by RTN; QuantLinear: its own codes)."""
    codes, scale, offset, scheme = quantized_parts(module, kind, group_size, where)
    block = check_block(scheme.group_size, where)
    n, k = codes.shape
    zero = _zero_points(scale, offset, scheme, accuracy_level == 0, where)
    inputs = [x, g.const(_pack(codes.numpy(), scheme.bits, block), where + ".qweight"),
              g.const(scale.float().numpy().reshape(-1), where + ".scales"),
              g.const(_pack_zero_points(zero, scheme.bits), where + ".zero_points")]
    # ORT's int8-compute path (accuracy_level 4) takes integer zero points only; float ones run in fp32.
    level = accuracy_level if zero.dtype == np.uint8 else 0
    return g.op("MatMulNBits", inputs, where, domain="com.microsoft", K=k, N=n, bits=scheme.bits, block_size=block,
                accuracy_level=level)


def float_matmul(g, x: str, module, where: str) -> str:
    """A plain ``MatMul`` with the (in, out) weight; a QuantLinear is written as its exact float weight."""
    w = module.dequantized_weight() if isinstance(module, QuantLinear) else module.weight.detach().float()
    return g.op("MatMul", [x, g.const(np.ascontiguousarray(w.t().numpy()), where + ".weight")], where)
