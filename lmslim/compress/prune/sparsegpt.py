"""SparseGPT: choose which weights to drop and update the remaining ones so the layer's output on
calibration data changes as little as possible.

Frantar & Alistarh, "SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot",
https://arxiv.org/abs/2301.00774. For a linear layer with inputs X, the layer-wise loss
``||WX − ŴX||²`` has Hessian ``H = 2XXᵀ``. Columns are visited left to right (Optimal Brain
Surgeon restricted to the columns not yet visited): removing weight w_ij costs ``w_ij² / [H⁻¹]_jj²``
(in terms of the Cholesky factor of H⁻¹) and its error is folded into row i's later columns via
``−err / [U]_jj · U_j,:``. As in GPTQ, the update is done in blocks of columns (lazy batch
updates) and ``H⁻¹``'s Cholesky factor is computed once from the damped Hessian
(``H + λ·mean(diag H)·I``).

Mask selection is adaptive: at the start of every block of ``block_size`` columns the lowest-cost
``sparsity`` fraction of that block is chosen on the already-updated weights; for N:M, each run of
M columns picks its M−N drops per row when it is reached. Calibration runs block by block through
the model (``lmslim.compress.calibration.sequential``), so every transformer block's Hessians come
from what the already-pruned blocks produce, and only one block's activations are held at a time.

Example:
    >>> import torch
    >>> from lmslim.assets.tiny import build_tiny
    >>> from lmslim.compress.prune import prune_, SparseGPTConfig
    >>> model, _ = build_tiny("tiny-llama")
    >>> r = prune_(model, SparseGPTConfig(n_m="2:4"), torch.randint(10, 200, (4, 32)))
    >>> r["sparsity"]
    0.5
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmslim.compress.calibration import InputStats, run_block, sequential, transformer_blocks
from lmslim.compress.prune.api import PRUNERS, SparsitySpec, linear_weight, sparse_targets, keep_mask
from lmslim.compress.prune.wanda import prune_outside_blocks, sparsity_summary
from lmslim.compress.quantize.gptq import inverse_hessian_factor
from lmslim.core.errors import UserError
from lmslim.core.progress import track


@dataclass(frozen=True)
class SparseGPTConfig(SparsitySpec):
    """SparseGPT.

    Args:
        damp: λ, Hessian dampening as a fraction of its mean diagonal (the paper uses 0.01).
        block_size: columns per lazy-update block (and per mask-selection block).
        batch_size: calibration samples per forward pass.
    """

    damp: float = 0.01
    block_size: int = 128
    batch_size: int = 8
    needs_calibration: bool = True

    def __post_init__(self) -> None:
        self._check_sparsity()
        if not 0 < self.damp < 1:
            raise UserError(f"damp must be in (0, 1), got {self.damp}")
        if self.block_size < 1 or self.batch_size < 1:
            raise UserError("block_size and batch_size must be >= 1")
        if self.n_m is not None and self.block_size % self.n_m[1]:
            raise UserError(f"block_size {self.block_size} must be a multiple of M={self.n_m[1]}")


@torch.no_grad()
def sparsegpt_prune(weight: torch.Tensor, hessian: torch.Tensor, sparsity: float,
                    n_m: tuple[int, int] | None = None, damp: float = 0.01, block_size: int = 128) -> torch.Tensor:
    """Pruned and reconstructed copy of ``weight`` (out, in) for inputs with ``hessian`` (in, in)."""
    w = weight.detach().float().clone()
    h = hessian.detach().float().clone()
    out, k = w.shape
    dead = h.diagonal() == 0  # inputs that were always zero: their weights never matter
    h[dead, dead] = 1
    w[:, dead] = 0
    u = inverse_hessian_factor(h, damp)  # upper Cholesky factor of H⁻¹
    del h
    keep = torch.ones(out, k, dtype=torch.bool)
    for b0 in range(0, k, block_size):
        b1 = min(b0 + block_size, k)
        wb = w[:, b0:b1].clone()  # (out, bs)
        ub = u[b0:b1, b0:b1]
        d = ub.diagonal()
        errs = torch.zeros_like(wb)
        kb = keep[:, b0:b1]
        if n_m is None:
            kb.copy_(keep_mask(wb.pow(2) / d.pow(2).unsqueeze(0), sparsity))
        for i in range(b1 - b0):
            if n_m is not None and i % n_m[1] == 0:
                m = n_m[1]
                kb[:, i:i + m] = keep_mask(wb[:, i:i + m].pow(2) / d[i:i + m].pow(2).unsqueeze(0), 0, n_m)
            col = wb[:, i]
            target = col * kb[:, i]
            err = (col - target) / ub[i, i]  # (out,)
            wb[:, i:] -= err.unsqueeze(1) * ub[i, i:].unsqueeze(0)  # compensate in this block
            wb[:, i] = target  # exact zeros, not round-off residue
            errs[:, i] = err
        w[:, b0:b1] = wb
        w[:, b1:] -= errs @ u[b0:b1, b1:]  # lazy update of the later blocks
    w[~keep] = 0
    return w


@PRUNERS.register("sparsegpt", SparseGPTConfig)
def _sparsegpt(model, config: SparseGPTConfig, calib: torch.Tensor) -> dict:
    targets = sparse_targets(model, config)
    errors: dict[str, float] = {}
    zeros: dict[str, tuple[int, int]] = {}

    def compress_block(_path, block, mods, inputs):
        hessians = {n: torch.zeros(linear_weight(m).shape[1], linear_weight(m).shape[1]) for n, m in mods.items()}
        counts = {n: 0 for n in mods}

        def update(name, x):  # x: (N, in)
            hessians[name] += x.t() @ x
            counts[name] += x.shape[0]

        stats = InputStats(mods, update)
        try:
            for inp in inputs:
                run_block(block, inp)
        finally:
            stats.remove()
        for name, mod in mods.items():
            h = hessians.pop(name).mul_(2 / max(counts[name], 1))  # in place, and freed after this matrix
            w = linear_weight(mod)
            new = sparsegpt_prune(w, h, config.sparsity_for(name), config.n_m, config.damp, config.block_size)
            delta = w - new
            errors[name] = float(torch.trace(delta @ h @ delta.t()) / max(torch.trace(w @ h @ w.t()), 1e-12))
            w.copy_(new.to(w.dtype))
            zeros[name] = (int((w == 0).sum()), w.numel())

    _, blocks = transformer_blocks(model)
    for _ in track(sequential(model, calib, set(targets), config.batch_size, compress_block), "SparseGPT blocks",
                   total=len(blocks)):
        pass
    leftovers = [n for n in targets if n not in errors]
    prune_outside_blocks(model, config, leftovers, "SparseGPT")
    total, per = sparsity_summary(model, list(targets), zeros)
    return {"sparsity": total, "modules": len(targets), "module_sparsity": per, "magnitude_modules": leftovers,
            "relative_output_error_mean": sum(errors.values()) / max(len(errors), 1)}
