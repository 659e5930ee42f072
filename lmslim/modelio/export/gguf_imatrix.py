"""Importance of each input column of every exported matrix: the mean squared activation ``E[x_j²]``.

This is what llama.cpp's ``imatrix`` tool collects: the squared-error weight that makes a block's
rounding error ``Σ_j E[x_j²]·(w_j − ŵ_j)²`` the expected squared error of the layer's output for
diagonal input statistics (the diagonal of GPTQ's Hessian). lmslim's q5_0 / k-quant searches take
it as ``GGUFExportConfig.importance``; ``llama_cpp_quantize`` hands the same numbers to llama.cpp, so
both quantizers can see identical calibration statistics.

Example:
    >>> import torch
    >>> from lmslim.assets.tiny import build_tiny
    >>> model, _ = build_tiny("tiny-llama")
    >>> imp = activation_importance(model, torch.randint(10, 200, (2, 16)))
    >>> imp["blk.0.attn_q.weight"].shape
    (64,)
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from lmslim.modelio.export.gguf import gguf_names


@torch.no_grad()
def activation_importance(model: nn.Module, ids: torch.Tensor, batch_size: int = 4) -> dict[str, np.ndarray]:
    """GGUF tensor name -> (in_features,) mean of the squared inputs over every token of ``ids`` (N, T)."""
    names = gguf_names(model)
    modules = dict(model.named_modules())
    head = getattr(model, "lm_head", None)
    if head is not None and "lm_head" not in names:  # tied head: llama.cpp's matmul reads token_embd
        names["lm_head"] = "token_embd.weight"
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook_for(gguf_name):
        def hook(_mod, args):
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])  # (tokens, in)
            sums[gguf_name] = sums.get(gguf_name, 0) + (x * x).sum(0)
            counts[gguf_name] = counts.get(gguf_name, 0) + x.shape[0]
        return hook

    handles = [modules[m].register_forward_pre_hook(hook_for(g)) for m, g in names.items()]
    try:
        for start in range(0, len(ids), batch_size):
            model(input_ids=ids[start:start + batch_size])
    finally:
        for h in handles:
            h.remove()
    return {g: (sums[g] / counts[g]).numpy() for g in sums}
