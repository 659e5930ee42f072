"""Quantization: ``quantize_(model, Config(...))`` with RTN, dynamic int8, GPTQ, AWQ and SmoothQuant."""

from lmslim.compress.quantize.api import QUANTIZERS, is_quantized, quantize_
from lmslim.compress.quantize.awq import AWQConfig
from lmslim.compress.quantize.gptq import GPTQConfig
from lmslim.compress.quantize.rtn import DynamicInt8Config, RTNConfig
from lmslim.compress.quantize.smoothquant import SmoothQuantConfig

__all__ = ["QUANTIZERS", "quantize_", "is_quantized", "RTNConfig", "DynamicInt8Config", "GPTQConfig", "SmoothQuantConfig", "AWQConfig"]
