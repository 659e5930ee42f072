"""The quantized linear layer and its CPU kernels.

``QuantLinear`` stores integer codes densely bit-packed (what goes to disk and what ``size_mb``
counts), with per-(row, group) fp16 scales and offsets. Two execution kernels:

- ``dequant``: unpack and dequantize the weight on every call, then an fp32 matmul. Exactly the
  weight-only math (activations stay fp32), but slower than fp32 on CPU: it is the reference.
- ``int8``: W8A8 with exact int32 accumulation (``torch._int_mm``, oneDNN on CPU). The weight is
  held as int8 per output channel (exact for int8 symmetric per-channel codes; 4-bit group-wise
  codes are re-quantized once, adding at most half an int8 step, ~0.4% of the row's range).
  Activations are quantized **per token** (asymmetric, 8 bits) at run time, so one outlier token
  does not coarsen the others. Measured here: 2× faster than fp32 for one token, 3.4× for 128 tokens on
  SmolLM2's block matrices.
- ``fbgemm``: the same int8 weights through fbgemm's dynamic int8 GEMM, per-token ranges applied by
  scaling each input row to unit max |x| first. Faster than ``int8`` on very wide matrices at one
  token (the 49152-wide LM head). On AVX2 without VNNI its u8×s8 pair products accumulate in
  saturating int16 (255·127·2 > 32767), which silently wrecks results when activations span the
  full 8-bit grid (22% relative error on a layer with an outlier channel). ``fbgemm_saturates``
  probes the kernel once per process with a worst-case product; where it saturates, activations are
  quantized to 7 bits (fbgemm's ``reduce_range``), which cannot overflow, at the cost of one bit.

Which kernel is faster depends on the shape and the CPU; ``lmslim bench`` measures it.
"""

from __future__ import annotations

import functools
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from lmslim.nn.scheme import Scheme, dequantize, pack, unpack

KERNELS = ("dequant", "int8", "fbgemm")


def _quantized_int8_weight(w: torch.Tensor) -> torch.Tensor:
    """fbgemm's int8 per-output-channel symmetric weight for an fp32 (out, in) matrix."""
    s = (w.abs().amax(1) / 127).clamp(min=1e-12).double()
    zero = torch.zeros(w.shape[0], dtype=torch.long)
    with warnings.catch_warnings():
        # torch marks quantized tensor types deprecated; fbgemm's prepack still takes only them.
        warnings.simplefilter("ignore", UserWarning)
        return torch.quantize_per_channel(w, s, zero, 0, torch.qint8)


@functools.cache
def fbgemm_saturates() -> bool:
    """Whether fbgemm's dynamic int8 GEMM overflows int16 on this CPU with 8-bit activations.

    The probe multiplies activation code 255 by weight code 127 in every pair: the exact sum is the
    number of ones (63); an AVX2 kernel without VNNI clamps each pair sum to 32767 and returns about
    half. A property of the machine, so it is probed once per process.
    """
    packed = torch.ops.quantized.linear_prepack(_quantized_int8_weight(torch.ones(8, 64)), None)
    x = torch.ones(1, 64)
    x[0, 0] = 0.0  # the range [0, 1] maps 1.0 to activation code 255
    y = torch.ops.quantized.linear_dynamic(x, packed, False)
    return not torch.allclose(y, torch.full_like(y, 63.0), rtol=1e-3)


class PackedCodes:
    """What every module with packed integer weights shares: the (out, in) grid and its codes.

    The owner registers ``qweight`` (flat uint8, ``scheme.pack``'s layout), ``scale`` and ``offset``
    ((out, groups) fp16) as buffers and sets ``in_features``/``out_features``/``scheme``.
    """

    def _register_grid(self, in_features: int, out_features: int, scheme: Scheme) -> None:
        self.in_features, self.out_features, self.scheme = in_features, out_features, scheme
        n_groups = scheme.n_groups(in_features)
        n_bytes = (in_features * out_features * scheme.bits + 7) // 8
        self.register_buffer("qweight", torch.zeros(n_bytes, dtype=torch.uint8))
        self.register_buffer("scale", torch.ones(out_features, n_groups, dtype=torch.float16))
        self.register_buffer("offset", torch.zeros(out_features, n_groups, dtype=torch.float16))

    def _set_grid(self, qweight: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> None:
        if qweight.shape != self.qweight.shape:
            raise ValueError(f"packed codes hold {qweight.numel()} bytes; a {self.out_features}x{self.in_features} "
                             f"w{self.scheme.bits} grid needs {self.qweight.numel()}")
        self.qweight = qweight.to(torch.uint8).contiguous()
        self.scale.copy_(scale.half())
        self.offset.copy_(offset.half())

    def codes(self) -> torch.Tensor:
        return unpack(self.qweight, self.scheme.bits, (self.out_features, self.in_features))

    def dequantized_weight(self) -> torch.Tensor:
        """fp32 weight (out, in) that the codes stand for."""
        return dequantize(self.codes(), self.scale, self.offset, self.scheme.group(self.in_features))


class QuantLinear(PackedCodes, nn.Module):
    """A linear layer with integer weights: ``y = x @ dequant(W)^T + b``.

    Example:
        >>> import torch
        >>> from lmslim.nn.quant_linear import QuantLinear
        >>> from lmslim.nn.scheme import Scheme, quantize_weight
        >>> lin = torch.nn.Linear(16, 4)
        >>> s = Scheme(bits=8, group_size=None, symmetric=True)
        >>> q = QuantLinear.from_codes(*quantize_weight(lin.weight.data, s), s, lin.bias.data)
        >>> q(torch.randn(2, 16)).shape
        torch.Size([2, 4])
    """

    def __init__(self, in_features: int, out_features: int, scheme: Scheme, bias: bool, kernel: str = "dequant"):
        super().__init__()
        if kernel not in KERNELS:
            raise ValueError(f"unknown kernel {kernel!r}; choose from {KERNELS}")
        self.kernel = kernel
        self._register_grid(in_features, out_features, scheme)
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        self._packed_int8 = None  # fbgemm prepacked weight, rebuilt from the codes, never saved
        self._reduce_range = False  # fbgemm: 7-bit activations (set by prepare where 8 bits overflow)

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, scheme: Scheme,
                   bias: torch.Tensor | None, kernel: str = "dequant") -> "QuantLinear":
        out, k = codes.shape
        return cls.from_packed(pack(codes, scheme.bits), (out, k), scale, offset, scheme, bias, kernel)

    @classmethod
    def from_packed(cls, qweight: torch.Tensor, shape: tuple[int, int], scale: torch.Tensor, offset: torch.Tensor,
                    scheme: Scheme, bias: torch.Tensor | None, kernel: str = "dequant") -> "QuantLinear":
        """A layer from codes already packed as :func:`lmslim.nn.scheme.pack` lays them out (flat uint8)."""
        out, k = shape
        mod = cls(k, out, scheme, bias is not None, kernel)
        mod._set_grid(qweight, scale, offset)
        if bias is not None:
            mod.bias.copy_(bias.float())
        mod.prepare()
        return mod

    def prepare(self) -> None:
        """Build kernel-side state from the stored codes (after construction or loading)."""
        self._packed_int8 = None
        if self.kernel == "int8":
            w = self.dequantized_weight()
            self._w_scale = (w.abs().amax(1) / 127).clamp(min=1e-12)  # (N,)
            w8 = torch.round(w / self._w_scale[:, None]).clamp(-127, 127).to(torch.int8)  # (N, K)
            self._w8_t = w8.t()  # (K, N) column-major view: the layout _int_mm is fastest with
            self._w8_sum = w8.sum(1, dtype=torch.int32).float()  # (N,): for the activation zero point
        elif self.kernel == "fbgemm":
            qw = _quantized_int8_weight(self.dequantized_weight())
            self._packed_int8 = torch.ops.quantized.linear_prepack(qw, None)
            self._w_rowsum = qw.dequantize().sum(1)  # (out,): the weight fbgemm multiplies, summed over inputs
            self._reduce_range = fbgemm_saturates()  # 7-bit activations where 8 would overflow int16
        else:
            self._unpacked = self.codes()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        # Only when this layer's codes or grid were loaded: a whole-model load_state_dict that fills
        # other modules must not rebuild every layer's kernel state (a second prepacked copy per layer).
        if any(prefix + k in state_dict for k in ("qweight", "scale", "offset")):
            self.prepare()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel == "int8":
            return self._forward_int8(x)
        if self.kernel == "fbgemm":
            return self._forward_fbgemm(x)
        w = dequantize(self._unpacked, self.scale, self.offset, self.scheme.group(self.in_features))
        return F.linear(x, w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def _forward_int8(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features).float()  # (N, K)
        # Asymmetric per-token grid: each token's [min, max] spans all 256 codes. Activations after
        # RMSNorm are lopsided, and a symmetric grid wastes half its codes on them (measured on
        # SmolLM2: perplexity +2.9% symmetric vs +0.8% asymmetric).
        lo = x2.amin(1, keepdim=True).clamp(max=0)
        hi = x2.amax(1, keepdim=True).clamp(min=0)
        x_scale = ((hi - lo) / 255).clamp(min=1e-10)  # (N, 1)
        zero = torch.round(-lo / x_scale) - 128  # (N, 1), codes shifted into int8's range
        xq = (torch.round(x2 / x_scale) + zero).clamp_(-128, 127).to(torch.int8)
        acc = torch._int_mm(xq, self._w8_t).float()  # (N, out) exact int32 sums of xq·w8
        # sum_k (xq - zero)·w8 = acc - zero·sum_k w8
        y = acc.sub_(zero * self._w8_sum).mul_(x_scale).mul_(self._w_scale)
        if self.bias is not None:
            y.add_(self.bias)
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)

    def _forward_fbgemm(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features).float()  # (N, K)
        # fbgemm quantizes the whole input on one grid that must include zero. Mapping each token
        # affinely onto [-1, 1] first gives every token the full grid over its own [min, max]
        # (an asymmetric per-token grid, as the int8 kernel has): a lopsided token (after RMSNorm)
        # would otherwise waste codes. With 7-bit activations the grid's coarseness dominates:
        # SmolLM2 dynamic int8 measured +5.8% perplexity either way, vs +1.2% on the exact int8
        # kernel (tests/integration/test_quantize_real.py, 1024 tokens).
        lo, hi = x2.amin(1, keepdim=True), x2.amax(1, keepdim=True)  # (N, 1)
        mid = (hi + lo) / 2
        half = ((hi - lo) / 2).clamp(min=1e-8)
        y = torch.ops.quantized.linear_dynamic((x2 - mid) / half, self._packed_int8, self._reduce_range)
        # x = half·x' + mid  ⇒  x·Wᵀ = half·(x'·Wᵀ) + mid·Σ_k W[:, k]
        y = y.mul_(half).add_(mid * self._w_rowsum)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)

    def cost_profile(self) -> dict[str, int]:
        """Logical parameters, non-zeros, and bytes a forward pass reads (for ``lmslim.measure.cost``)."""
        params = self.in_features * self.out_features
        nonzero = int(torch.count_nonzero(self.dequantized_weight()).item())
        if self.kernel in ("int8", "fbgemm"):
            weight_bytes = params + self.out_features * 4  # int8 weights + per-channel scales
        else:
            weight_bytes = params + (self.scale.numel() + self.offset.numel()) * 2  # uint8 codes, fp16 params
        extra = 0 if self.bias is None else self.out_features
        return {"params": params + extra, "nonzero": nonzero + extra, "weight_bytes": weight_bytes + extra * 4,
                "matmul_params": params}

    def extra_repr(self) -> str:
        g = self.scheme.group_size or "channel"
        sym = "sym" if self.scheme.symmetric else "asym"
        kernel = self.kernel + (" (7-bit activations)" if self.kernel == "fbgemm" and self._reduce_range else "")
        return f"in={self.in_features}, out={self.out_features}, w{self.scheme.bits} g={g} {sym}, kernel={kernel}"


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The (out, in) weight of an ``nn.Linear`` or a GPT-2 ``Conv1D`` (stored as (in, out))."""
    w = module.weight.data
    return w.t() if type(module).__name__ == "Conv1D" else w
