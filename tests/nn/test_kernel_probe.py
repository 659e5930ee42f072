import torch

from lmslim.assets.tiny import build_tiny
from lmslim.compress.quantize import DynamicInt8Config, quantize_
from lmslim.nn.kernel_probe import fastest_int8_kernel, int8_kernel_timings
from lmslim.nn.quant_linear import QuantLinear


def test_probe_times_every_kernel_and_picks_the_faster():
    t = int8_kernel_timings()
    assert set(t) == {"fp32", "int8", "fbgemm"} and all(v > 0 for v in t.values())
    assert fastest_int8_kernel() == min(("int8", "fbgemm"), key=t.__getitem__)


def test_auto_kernel_is_the_measured_one_and_recorded_per_module():
    model, _ = build_tiny("tiny-llama")
    report = quantize_(model, DynamicInt8Config())
    kernels = {m.kernel for m in model.modules() if isinstance(m, QuantLinear)}
    assert kernels == {fastest_int8_kernel()} and report["kernels"] == sorted(kernels)
    recorded = {spec["kernel"] for spec in model.config.lmslim_quantization["modules"].values()}
    assert recorded == kernels
    x = torch.randint(0, model.config.vocab_size, (1, 8))
    assert torch.isfinite(model(x).logits).all()
