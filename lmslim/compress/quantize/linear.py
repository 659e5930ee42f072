"""The quantized linear layer and its CPU kernels.

``QuantLinear`` stores integer codes densely bit-packed (what goes to disk and what ``size_mb``
counts), with per-(row, group) scales and zero points. Two execution kernels:

- ``dequant``: unpack and dequantize the weight on every call, then an fp32 matmul. Exactly the
  weight-only math (activations stay fp32), but slower than fp32 on CPU: it is the reference.
- ``fbgemm``: the dequantized weight is re-quantized once to int8 per output channel (exact for
  int8 symmetric per-channel codes; for 4-bit group-wise codes it adds a rounding of at most half
  an int8 step, about 0.4% of the row's range) and run through fbgemm's dynamic int8 GEMM. Activations
  are quantized at run time **per token**: each row of the input is divided by its own max |x|
  before fbgemm's per-tensor quantization and the output row is multiplied back (a linear map
  commutes with scaling), so one outlier token does not coarsen the others. This is W8A8 compute.

Which kernel is faster depends on the shape and the CPU; ``lmslim bench`` measures it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmslim.compress.quantize.scheme import Scheme, dequantize, pack, unpack

KERNELS = ("dequant", "fbgemm")


class QuantLinear(nn.Module):
    """A linear layer with integer weights: ``y = x @ dequant(W)^T + b``.

    Example:
        >>> import torch
        >>> from lmslim.compress.quantize.linear import QuantLinear
        >>> from lmslim.compress.quantize.scheme import Scheme, quantize_weight
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
        self.in_features, self.out_features, self.scheme, self.kernel = in_features, out_features, scheme, kernel
        n_groups = scheme.n_groups(in_features)
        n_bytes = (in_features * out_features * scheme.bits + 7) // 8
        self.register_buffer("qweight", torch.zeros(n_bytes, dtype=torch.uint8))
        self.register_buffer("scale", torch.ones(out_features, n_groups))
        self.register_buffer("zero", torch.zeros(out_features, n_groups, dtype=torch.uint8))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        self._packed_int8 = None  # fbgemm prepacked weight, rebuilt from the codes, never saved

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, scheme: Scheme,
                   bias: torch.Tensor | None, kernel: str = "dequant") -> "QuantLinear":
        out, k = codes.shape
        mod = cls(k, out, scheme, bias is not None, kernel)
        mod.qweight.copy_(pack(codes, scheme.bits))
        mod.scale.copy_(scale.float())
        mod.zero.copy_(zero.round().to(torch.uint8))
        if bias is not None:
            mod.bias.copy_(bias.float())
        mod.prepare()
        return mod

    def codes(self) -> torch.Tensor:
        return unpack(self.qweight, self.scheme.bits, (self.out_features, self.in_features))

    def dequantized_weight(self) -> torch.Tensor:
        """fp32 weight (out, in) that the codes stand for."""
        return dequantize(self.codes(), self.scale, self.zero.float(), self.scheme.group(self.in_features))

    def prepare(self) -> None:
        """Build kernel-side state from the stored codes (after construction or loading)."""
        self._packed_int8 = None
        if self.kernel == "fbgemm":
            w = self.dequantized_weight()
            s = (w.abs().amax(1) / 127).clamp(min=1e-12).double()
            qw = torch.quantize_per_channel(w, s, torch.zeros(self.out_features, dtype=torch.long), 0, torch.qint8)
            self._packed_int8 = torch.ops.quantized.linear_prepack(qw, None)
        else:
            self._unpacked = self.codes()

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self.prepare()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel == "fbgemm":
            return self._forward_fbgemm(x)
        w = dequantize(self._unpacked, self.scale, self.zero.float(), self.scheme.group(self.in_features))
        return F.linear(x, w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def _forward_fbgemm(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features).float()  # (N, K)
        row_scale = x2.abs().amax(1, keepdim=True).clamp(min=1e-8)  # (N, 1): per-token range
        y = torch.ops.quantized.linear_dynamic(x2 / row_scale, self._packed_int8, False) * row_scale
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        g = self.scheme.group_size or "channel"
        sym = "sym" if self.scheme.symmetric else "asym"
        return f"in={self.in_features}, out={self.out_features}, w{self.scheme.bits} g={g} {sym}, kernel={self.kernel}"


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The (out, in) weight of an ``nn.Linear`` or a GPT-2 ``Conv1D`` (stored as (in, out))."""
    w = module.weight.data
    return w.t() if type(module).__name__ == "Conv1D" else w
