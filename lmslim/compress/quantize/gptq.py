"""GPTQ: quantize a weight matrix column by column, folding each column's rounding error into the
columns not yet quantized, weighted by the inverse Hessian of the layer's inputs.

Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers",
https://arxiv.org/abs/2210.17323. For a linear layer with inputs X, the layer-wise loss
``||WX - ŴX||²`` has Hessian ``H = 2XXᵀ``; quantizing column j with error e_j is compensated by the
update ``-e_j / [H⁻¹]_jj · [H⁻¹]_j,:`` on the remaining columns. Columns are processed in blocks
(lazy batch updates), ``H⁻¹`` comes from a Cholesky factorisation of the damped Hessian
(``H + λ·mean(diag H)·I``), and calibration runs sequentially through the blocks
(``lmslim.compress.calibration``).

Group scales: without act-order, a group's scale and offset are fitted when its first column is
reached, on the already-updated weights. With act-order (columns in decreasing ``diag H``), groups
keep their original contiguous columns and their parameters are fitted up front ("static groups"),
so the stored format is the same as RTN's.

Example:
    >>> import torch
    >>> from lmslim.assets.tiny import build_tiny
    >>> from lmslim.compress.quantize import quantize_, GPTQConfig
    >>> model, _ = build_tiny("tiny-llama")
    >>> calib = torch.randint(10, 200, (4, 32))
    >>> quantize_(model, GPTQConfig(bits=4, group_size=32), calib)["modules"]
    14
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import torch

from lmslim.compress.calibration import InputStats, run_block, sequential, transformer_blocks
from lmslim.compress.quantize.awq import BlockStats, awq_scale_block_, collect_stats
from lmslim.compress.quantize.api import QUANTIZERS, TargetSpec, resolve_kernel, targets_of
from lmslim.nn.quant_linear import QuantLinear, linear_weight
from lmslim.nn.scheme import Scheme, _params_for, group_params, search_params
from lmslim.core.errors import UserError
from lmslim.core.progress import track
from lmslim.core.targeting import set_submodule

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GPTQConfig(TargetSpec):
    """GPTQ with group-wise scales.

    Args:
        bits: 2, 3, 4 or 8.
        group_size: columns per scale (``None``: per output channel).
        symmetric: symmetric or asymmetric grid.
        signed_scale: on a symmetric grid, ggml's Q4_0/Q8_0 rule (the signed largest weight on code 0,
            all 2^bits codes) instead of max|w| / (2^(bits-1) - 1).
        damp: λ, the Hessian dampening as a fraction of its mean diagonal.
        act_order: quantize columns in decreasing order of ``diag H`` (helps at 3 bits).
        true_sequential: inside a block, quantize the matrices in the order the block uses them
            (q/k/v, then o, then gate/up, then down), each calibrated on inputs that already pass
            through the quantized matrices before it; off: all of a block's matrices see the
            block's full-precision activations. Measured on SmolLM2 (w4 g128, 128×512 tokens):
            perplexity 27.36 on, 27.09 off, and ~1.5× the calibration time, so off by default.
        clip_search: fit each group's range by the clipping search of ``scheme.search_params``
            instead of its full [min, max].
        awq: before GPTQ, fold AWQ's activation-aware input-channel scales into each block
            (``awq.py``: norm -> q/k/v, norm -> gate/up, up -> down); GPTQ then runs on the scaled
            weights with the correspondingly scaled Hessians.
        awq_grid: number of ``α`` values the AWQ scale search tries.
        block_size: columns per lazy-update block.
        batch_size: calibration samples per forward pass.
    """

    bits: int = 4
    group_size: int | None = 128
    symmetric: bool = False
    minmax: bool = False
    signed_scale: bool = False  # symmetric: ggml's Q4_0/Q8_0 rule, all 2^bits codes (see scheme.py)
    # Defaults measured on SmolLM2-135M (w4 g128, 32×512 calibration tokens, 4096 test tokens):
    # damp 0.01 → ppl 35.4, act-order → 31.6, act-order + damp 0.1 → 30.8 (RTN: 33.3).
    damp: float = 0.1
    act_order: bool = True
    true_sequential: bool = False
    clip_search: bool = False
    awq: bool = False
    awq_grid: int = 20
    block_size: int = 128
    batch_size: int = 8
    needs_calibration: bool = True

    def __post_init__(self) -> None:
        self._check_targets()
        self.scheme  # validates bits, group size and the grid rule
        if not 0 < self.damp < 1:
            raise UserError(f"damp must be in (0, 1), got {self.damp}")
        if self.block_size < 1 or self.batch_size < 1 or self.awq_grid < 1:
            raise UserError("block_size, batch_size and awq_grid must be >= 1")

    @property
    def scheme(self) -> Scheme:
        return Scheme(self.bits, self.group_size, self.symmetric, self.minmax, self.signed_scale)


def _qdq(col: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, qmax: int
         ) -> tuple[torch.Tensor, torch.Tensor]:
    q = torch.clamp(torch.round((col - offset) / scale), 0, qmax)
    return q, q * scale + offset


def inverse_hessian_factor(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of the damped H⁻¹ (the rows GPTQ's updates use)."""
    h = h.clone()
    h.diagonal().add_(damp * h.diagonal().mean())
    for attempt in range(5):
        try:
            lower = torch.linalg.cholesky(h)
            break
        except RuntimeError:  # not positive definite: dampen more
            h.diagonal().add_(damp * h.diagonal().mean() * 10 ** attempt)
    else:
        raise UserError("GPTQ: the Hessian is not positive definite even after extra dampening; "
                        "use more calibration samples or a larger damp")
    del h  # K² each: hold at most two of these at once (streaming bounds memory by one block's working set)
    hinv = torch.cholesky_inverse(lower)
    del lower
    return torch.linalg.cholesky(hinv, upper=True)


@torch.no_grad()
def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, scheme: Scheme, damp: float = 0.01,
                  act_order: bool = False, block_size: int = 128, clip_search: bool = False
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ codes for ``weight`` (out, in) given ``hessian`` (in, in). Returns (codes, scale, offset)."""
    w = weight.detach().float().clone()
    h = hessian.detach().float().clone()
    out, k = w.shape
    dead = h.diagonal() == 0  # inputs that were always zero: any value works, make it exact
    h[dead, dead] = 1
    w[:, dead] = 0
    g = scheme.group(k)
    n_groups = scheme.n_groups(k)
    scale = torch.ones(out, n_groups)
    offset = torch.zeros(out, n_groups)
    static = act_order or scheme.group_size is None
    if static:
        scale, offset = group_params(w, scheme, clip_search)
    perm = torch.argsort(h.diagonal(), descending=True) if act_order else torch.arange(k)
    if act_order:  # (permuting by arange would only copy h twice)
        w = w[:, perm]
        h = h[perm][:, perm]
    u = inverse_hessian_factor(h, damp)
    del h
    codes = torch.zeros(out, k)
    if not static:
        block_size = max(g, (block_size // g) * g)  # group starts must fall inside the block being fitted

    def round_column(c: int, rest: torch.Tensor) -> torch.Tensor:
        col = int(perm[c])  # original column index
        grp = col // g
        if not static and col % g == 0:  # fit the group on its columns as updated so far
            fit = search_params if clip_search else _params_for
            scale[:, grp], offset[:, grp] = fit(rest[:, :g], scheme)
        q, dq = _qdq(rest[:, 0], scale[:, grp], offset[:, grp], scheme.qmax)
        codes[:, c] = q
        return dq

    gptq_sweep(w, u, block_size, round_column)
    unperm = torch.empty_like(codes)
    unperm[:, perm] = codes
    return unperm.to(torch.uint8), scale, offset


def gptq_sweep(w: torch.Tensor, u: torch.Tensor, block_size: int,
               round_column: Callable[[int, torch.Tensor], torch.Tensor]) -> None:
    """GPTQ's column sweep: round each column of ``w`` (out, K) in order, spreading its error onto the rest.

    ``u`` is the upper Cholesky factor of the damped H⁻¹ (``inverse_hessian_factor``), both in sweep
    order. ``round_column(c, rest)`` gets column ``c``'s index and the block's columns from ``c`` on as
    updated so far (``rest[:, 0]`` is the column, (out, ≤ block_size)), records its codes, and returns
    the rounded column. Errors are compensated inside the block at once and in later blocks lazily,
    one matrix product per block (Frantar et al., https://arxiv.org/abs/2210.17323, section 3).
    ``w`` is updated in place.
    """
    k = w.shape[1]
    for b0 in range(0, k, block_size):
        b1 = min(b0 + block_size, k)
        wb = w[:, b0:b1].clone()
        errs = torch.zeros_like(wb)
        ub = u[b0:b1, b0:b1]
        for i in range(b1 - b0):
            dq = round_column(b0 + i, wb[:, i:])
            err = (wb[:, i] - dq) / ub[i, i]
            wb[:, i:] -= err.unsqueeze(1) * ub[i, i:].unsqueeze(0)  # compensate in this block
            errs[:, i] = err
        w[:, b1:] -= errs @ u[b0:b1, b1:]  # lazy update of the later blocks


class _Stop(Exception):
    pass


def run_block_until(block: torch.nn.Module, inp, modules: list[torch.nn.Module]) -> None:
    """Run ``block`` on ``inp`` only as far as needed for every module in ``modules`` to have run."""
    pending = set(map(id, modules))

    def hook(mod, _args, _out):
        pending.discard(id(mod))
        if not pending:
            raise _Stop

    handles = [m.register_forward_hook(hook) for m in modules]
    try:
        run_block(block, inp)
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def input_groups(block: torch.nn.Module, mods: dict[str, torch.nn.Module], inp) -> list[list[str]]:
    """The block's matrices in call order, grouped by shared input (q/k/v; o; gate/up; down)."""
    # the inputs themselves are kept until grouped: a freed input's memory can be reused by a later
    # one, and then two different inputs would have the same address
    calls: list[tuple[str, torch.Tensor]] = []
    by_id = {id(m): n for n, m in mods.items()}

    def hook(mod, args):
        if by_id[id(mod)] not in {n for n, _ in calls}:
            calls.append((by_id[id(mod)], args[0]))

    handles = [m.register_forward_pre_hook(hook) for m in mods.values()]
    try:
        run_block(block, inp)
    finally:
        for h in handles:
            h.remove()
    groups: list[list[str]] = []
    last_ptr = None
    for name, x in calls:
        ptr = (x.data_ptr(), x.shape)
        if groups and ptr == last_ptr:
            groups[-1].append(name)
        else:
            groups.append([name])
        last_ptr = ptr
    missed = [n for n in mods if n not in {c for c, _ in calls}]
    return groups + ([missed] if missed else [])


@QUANTIZERS.register("gptq", GPTQConfig)
def _gptq(model, config: GPTQConfig, calib: torch.Tensor | None) -> dict:
    if calib is None or calib.numel() == 0:
        raise UserError("GPTQ needs calibration data; none was given")
    targets = dict(targets_of(model, config))
    scheme = config.scheme
    kernel = resolve_kernel(config.kernel)
    errors: dict[str, float] = {}

    awq_records: list[dict] = []

    def compress_block(path, block, mods, inputs):
        pre = None
        if config.awq:  # fold activation-aware scales first; GPTQ then sees the scaled weights and inputs
            pre = collect_stats(block, mods, inputs)
            awq_records.extend(awq_scale_block_(block, path, mods, pre, scheme, config.awq_grid))
        if config.true_sequential:
            for group in input_groups(block, mods, inputs[0]):
                quantize_group(block, {n: mods[n] for n in group}, inputs)
        else:
            quantize_group(block, mods, inputs, pre)

    def quantize_group(block, mods, inputs, pre: BlockStats | None = None):
        if pre is not None:  # statistics already gathered on this block's inputs (H = XᵀX / N)
            hessians = {n: pre.hessian[n] * 2 for n in mods}
            counts = {n: 1 for n in mods}
        else:
            widths = {n: linear_weight(m).shape[1] for n, m in mods.items()}
            hessians = {n: torch.zeros(k, k) for n, k in widths.items()}
            counts = {n: 0 for n in mods}

            def update(name, x):  # x: (N, K)
                hessians[name] += x.t() @ x
                counts[name] += x.shape[0]

            stats = InputStats(mods, update)
            try:
                for inp in inputs:
                    run_block_until(block, inp, list(mods.values()))
            finally:
                stats.remove()
            for n, h in hessians.items():
                h.mul_(2 / max(counts[n], 1))  # in place: a second set of K² Hessians would double the peak
        for name, mod in mods.items():
            h = hessians.pop(name)
            w = linear_weight(mod)
            codes, scale, offset = gptq_quantize(w, h, scheme, config.damp, config.act_order, config.block_size,
                                                 config.clip_search)
            bias = mod.bias.data if getattr(mod, "bias", None) is not None else None
            q = QuantLinear.from_codes(codes, scale, offset, scheme, bias, kernel)
            delta = w - q.dequantized_weight()
            errors[name] = float(torch.trace(delta @ h @ delta.t()) / max(torch.trace(w @ h @ w.t()), 1e-12))
            set_submodule(model, name, q)

    _, blocks = transformer_blocks(model)
    for _ in track(sequential(model, calib, set(targets), config.batch_size, compress_block), "GPTQ blocks",
                   total=len(blocks)):
        pass
    # Matrices outside the transformer blocks (e.g. a quantized LM head) get RTN: GPTQ needs block inputs.
    leftovers = [n for n in targets if n not in errors]
    if leftovers:
        from lmslim.compress.quantize.rtn import replace_with_quant

        for name in leftovers:
            replace_with_quant(model, name, targets[name], scheme, config.kernel, clip_search=config.clip_search)
        log.info("GPTQ: %d module(s) outside the transformer blocks used RTN: %s", len(leftovers), leftovers)
    report = {"calibration": {"samples": int(calib.shape[0]), "seq_len": int(calib.shape[1])},
              "relative_output_error_mean": sum(errors.values()) / max(len(errors), 1),
              "rtn_modules": leftovers}
    if config.awq:
        gain = [r["error"] / r["unscaled_error"] for r in awq_records if r["unscaled_error"] > 0]
        report.update(awq_scaled_groups=len(awq_records), awq_rtn_error_ratio_mean=sum(gain) / max(len(gain), 1))
    return report
