"""Structured pruning: remove attention heads, FFN neurons or whole decoder layers, so the matrices
physically shrink and the model is faster on every device (no sparse kernel needed).

Importance criteria (all calibrated on a forward pass of the unpruned model over the calibration
tokens):

- **FFN neuron j** of a block: ``RMS(a_j) · ‖W_down[:, j]‖₂`` — the typical size of the neuron's
  contribution to the residual stream (a_j is its activation entering the down projection). This is
  Wanda's |W|·‖X‖ score summed into a column norm.
- **Attention head h**: the mean over tokens of ``‖a_h W_o,hᵀ‖₂``, the norm of what the head adds to
  the residual stream (a_h is the head's attention output, W_o,h its slice of the output projection).
  For grouped-query attention (Llama, SmolLM2: 9 query heads share 3 KV heads) the unit removed is a
  whole KV group — one KV head and the query heads that read it — scored by the sum of its query
  heads, so ``repeat_kv`` stays valid and the KV cache shrinks too.
- **Decoder layer i**: Block Influence ``BI_i = 1 − mean_t cos(x_t, y_t)`` between the layer's input
  and output hidden states (Men et al., "ShortGPT: Layers in Large Language Models are More Redundant
  Than You Expect", https://arxiv.org/abs/2403.03853): a layer that barely rotates the residual
  stream is dropped first.

Counts: ``fraction`` of the units is removed, rounded half up (``round(0.25 · 3 groups) = 1``, i.e.
3 of SmolLM2's 9 query heads = 33% per layer). ``scope="layer"`` removes the same count from every
block, so shapes stay uniform and the saved folder reloads with plain ``transformers``
``from_pretrained`` (the config gets the new ``intermediate_size`` / ``num_attention_heads`` /
``num_key_value_heads`` and an explicit ``head_dim``). ``scope="global"`` ranks units across all
blocks (closer to the requested fraction, e.g. 23 of SmolLM2's 90 KV groups = 25.6%), giving
per-layer shapes that differ; those are recorded in ``config.lmslim_structure`` and rebuilt by
``lmslim.modelio.load_model`` (every ``lmslim`` command loads them).

Supported layouts: Llama-style blocks (``self_attn.{q,k,v,o}_proj``, ``mlp.{gate,up,down}_proj``:
Llama, SmolLM2, Mistral, Qwen2) and GPT-2 (``attn.c_attn``/``c_proj``, ``mlp.c_fc``/``c_proj``).
Layer dropping works for any model whose blocks ``lmslim.compress.calibration`` finds.

Example:
    >>> import torch
    >>> from lmslim.assets.tiny import build_tiny
    >>> from lmslim.compress.prune import prune_, NeuronsConfig
    >>> model, _ = build_tiny("tiny-llama")
    >>> r = prune_(model, NeuronsConfig(fraction=0.5), torch.randint(10, 200, (2, 16)))
    >>> model.config.intermediate_size
    88
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lmslim.compress.prune.api import PRUNERS, check_fraction, linear_weight
from lmslim.core.configs import check_fields
from lmslim.core.errors import UserError
from lmslim.core.targeting import set_submodule
from lmslim.nn.blocks import attention, family, new_linear_like, transformer_blocks
from lmslim.nn.structure import STRUCTURE_FORMAT



def round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


@dataclass(frozen=True)
class _StructSpec:
    scope: str = "layer"
    batch_size: int = 8
    needs_calibration: bool = True

    def _check_struct(self, fraction: float | None) -> None:
        check_fields(self)  # types first: every rule below (and in the subclasses) may trust them
        fraction = getattr(self, "fraction", fraction)  # the checked value, not the caller's raw one
        if fraction is not None:
            check_fraction("the fraction to remove (--sparsity)", fraction)
        if self.scope not in ("layer", "global"):
            raise UserError(f"scope must be layer or global, got {self.scope!r}")
        if self.batch_size < 1:
            raise UserError("batch_size must be >= 1")


@dataclass(frozen=True)
class NeuronsConfig(_StructSpec):
    """Remove ``fraction`` of the FFN intermediate neurons (gate/up rows and down columns).

    Args:
        fraction: share of neurons removed, in [0, 1).
        scope: ``layer`` (same count per block: uniform shapes) or ``global`` (ranked across blocks).
    """

    fraction: float = 0.5

    def __post_init__(self) -> None:
        self._check_struct(self.fraction)


@dataclass(frozen=True)
class HeadsConfig(_StructSpec):
    """Remove attention heads (whole KV groups under grouped-query attention).

    Args:
        fraction: share of heads removed, in [0, 1) (rounded to whole groups, half up).
        drop_heads: instead of ``fraction``: query heads removed from every block (a multiple of the
            GQA group size); must leave at least one group.
        scope: ``layer`` or ``global`` (``drop_heads`` implies ``layer``).
    """

    fraction: float = 0.25
    drop_heads: int | None = None

    def __post_init__(self) -> None:
        self._check_struct(self.fraction)
        if self.drop_heads is not None and self.drop_heads < 1:
            raise UserError(f"drop_heads must be >= 1, got {self.drop_heads}")


@dataclass(frozen=True)
class LayersConfig(_StructSpec):
    """Drop whole decoder layers with the lowest Block Influence (ShortGPT).

    Args:
        drop: number of layers to remove (takes precedence over ``fraction``).
        fraction: share of layers removed, rounded half up.
    """

    drop: int | None = None
    fraction: float | None = None

    def __post_init__(self) -> None:
        self._check_struct(self.fraction)
        if self.drop is None and self.fraction is None:
            raise UserError("say how many layers to drop (--drop-layers K or --sparsity FRACTION)")
        if self.drop is not None and self.drop < 1:
            raise UserError(f"the number of layers to drop must be >= 1, got {self.drop}")


# --- architecture access ---------------------------------------------------------------------------

def _need_family(model: nn.Module, what: str) -> str:
    fam = family(model)
    if fam is None:
        raise UserError(f"{type(model).__name__}: pruning {what} supports Llama-style and GPT-2 blocks only")
    return fam


def _down(block, fam):
    return block.mlp.down_proj if fam == "llama" else block.mlp.c_proj


def _head_layout(block, fam) -> tuple[int, int, int]:
    """(query heads, KV heads, head_dim) of one block as its modules are now."""
    attn = attention(block)
    if fam == "llama":
        d = attn.head_dim
        return linear_weight(attn.q_proj).shape[0] // d, linear_weight(attn.k_proj).shape[0] // d, d
    return attn.num_heads, attn.num_heads, attn.head_dim


def _select(mod: nn.Module, out_idx: torch.Tensor | None = None, in_idx: torch.Tensor | None = None) -> nn.Module:
    """A copy of ``mod`` keeping only the given output rows / input columns."""
    w = linear_weight(mod)  # (out, in)
    if out_idx is not None:
        w = w[out_idx]
    if in_idx is not None:
        w = w[:, in_idx]
    bias = getattr(mod, "bias", None)
    new = new_linear_like(mod, w.shape[0], w.shape[1], bias is not None)
    linear_weight(new).copy_(w)
    if bias is not None:
        new.bias.data.copy_(bias.data if out_idx is None else bias.data[out_idx])
    return new


def _rows(units: torch.Tensor, width: int) -> torch.Tensor:
    """Row indices of ``units`` consecutive blocks of ``width`` rows: [u·w, …, u·w + w − 1] each."""
    return (units.unsqueeze(1) * width + torch.arange(width)).reshape(-1)


def _calibrate(model: nn.Module, calib: torch.Tensor, batch_size: int) -> None:
    for i in range(0, calib.shape[0], batch_size):
        model(input_ids=calib[i:i + batch_size], use_cache=False)


# --- scores ----------------------------------------------------------------------------------------

@torch.no_grad()
def neuron_scores(model: nn.Module, calib: torch.Tensor, batch_size: int = 8) -> list[torch.Tensor]:
    """Per block, ``RMS(a_j) · ‖W_down[:, j]‖₂`` for every intermediate neuron j."""
    fam = _need_family(model, "FFN neurons")
    _, blocks = transformer_blocks(model)
    downs = [_down(b, fam) for b in blocks]
    sq = [torch.zeros(linear_weight(d).shape[1]) for d in downs]
    count = [0] * len(downs)

    def hook(i):
        def fn(_mod, args):
            x = args[0].reshape(-1, args[0].shape[-1]).float()  # (N, I)
            sq[i] += (x * x).sum(0)
            count[i] += x.shape[0]
        return fn

    handles = [d.register_forward_pre_hook(hook(i)) for i, d in enumerate(downs)]
    try:
        _calibrate(model, calib, batch_size)
    finally:
        for h in handles:
            h.remove()
    return [(s / max(c, 1)).sqrt() * linear_weight(d).float().norm(dim=0) for s, c, d in zip(sq, count, downs)]


@torch.no_grad()
def head_scores(model: nn.Module, calib: torch.Tensor, batch_size: int = 8) -> list[torch.Tensor]:
    """Per block, the mean over tokens of ‖a_h W_o,hᵀ‖₂ for every query head h."""
    fam = _need_family(model, "attention heads")
    _, blocks = transformer_blocks(model)
    outs = [attention(b).o_proj if fam == "llama" else attention(b).c_proj for b in blocks]
    grams, sums, count = [], [], [0] * len(blocks)
    for b, o in zip(blocks, outs):
        h, _, d = _head_layout(b, fam)
        w = linear_weight(o).float().reshape(-1, h, d)  # (hidden, H, D)
        grams.append(torch.einsum("ehd,ehf->hdf", w, w))  # (H, D, D): W_hᵀW_h
        sums.append(torch.zeros(h))

    def hook(i):
        def fn(_mod, args):
            g = grams[i]
            x = args[0].reshape(-1, g.shape[0], g.shape[1]).float()  # (N, H, D)
            sq = torch.einsum("nhd,hdf,nhf->nh", x, g, x).clamp_min(0)  # ‖a_h W_hᵀ‖² per token and head
            sums[i] += sq.sqrt().sum(0)
            count[i] += x.shape[0]
        return fn

    handles = [o.register_forward_pre_hook(hook(i)) for i, o in enumerate(outs)]
    try:
        _calibrate(model, calib, batch_size)
    finally:
        for h in handles:
            h.remove()
    return [s / max(c, 1) for s, c in zip(sums, count)]


@torch.no_grad()
def block_influence(model: nn.Module, calib: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """(L,) Block Influence ``1 − mean cos(input, output)`` of every decoder layer (ShortGPT)."""
    _, blocks = transformer_blocks(model)
    cos_sum = torch.zeros(len(blocks), dtype=torch.float64)
    count = [0] * len(blocks)

    def hook(i):
        def fn(_mod, args, kwargs, output):
            x = args[0] if args else kwargs["hidden_states"]
            y = output[0] if isinstance(output, (tuple, list)) else output
            cos = F.cosine_similarity(x.float(), y.float(), dim=-1)  # (B, T)
            cos_sum[i] += cos.double().sum()
            count[i] += cos.numel()
        return fn

    handles = [b.register_forward_hook(hook(i), with_kwargs=True) for i, b in enumerate(blocks)]
    try:
        _calibrate(model, calib, batch_size)
    finally:
        for h in handles:
            h.remove()
    return (1 - cos_sum / torch.tensor(count, dtype=torch.float64).clamp_min(1)).float()


def choose_removed(scores: list[torch.Tensor], fraction: float, scope: str, what: str,
                   per_layer: int | None = None) -> list[torch.Tensor]:
    """Indices of the lowest-scoring units to remove in each block (sorted), keeping ≥ 1 per block."""
    sizes = [len(s) for s in scores]
    if per_layer is not None or scope == "layer":
        counts = [per_layer if per_layer is not None else round_half_up(fraction * n) for n in sizes]
        for n, c in zip(sizes, counts):
            if c >= n:
                raise UserError(f"removing {c} of the {n} {what} in a layer would leave none; remove fewer")
        if sum(counts) == 0:
            raise UserError(f"removing {fraction:g} of {sizes[0]} {what} per layer rounds to none; the smallest "
                            f"step is 1/{sizes[0]} (or use scope global)")
        return [s.argsort()[:c].sort().values for s, c in zip(scores, counts)]
    total = round_half_up(fraction * sum(sizes))
    if total == 0:
        raise UserError(f"removing {fraction:g} of {sum(sizes)} {what} rounds to none; ask for more")
    if total > sum(sizes) - len(sizes):
        raise UserError(f"removing {total} of {sum(sizes)} {what} would leave a layer with none")
    flat = torch.cat(scores)
    layer_of = torch.cat([torch.full((n,), i) for i, n in enumerate(sizes)])
    unit_of = torch.cat([torch.arange(n) for n in sizes])
    removed: list[list[int]] = [[] for _ in sizes]
    for j in flat.argsort().tolist():  # lowest first; the best unit of each layer is never taken
        i = int(layer_of[j])
        if len(removed[i]) < sizes[i] - 1:
            removed[i].append(int(unit_of[j]))
            total -= 1
            if total == 0:
                break
    return [torch.tensor(sorted(r), dtype=torch.long) for r in removed]


def _complement(removed: torch.Tensor, n: int) -> torch.Tensor:
    keep = torch.ones(n, dtype=torch.bool)
    keep[removed] = False
    return keep.nonzero().flatten()


# --- surgery ---------------------------------------------------------------------------------------

def shrink_neurons(block: nn.Module, fam: str, keep: torch.Tensor) -> None:
    mlp = block.mlp
    if fam == "llama":
        mlp.gate_proj = _select(mlp.gate_proj, out_idx=keep)
        mlp.up_proj = _select(mlp.up_proj, out_idx=keep)
        mlp.down_proj = _select(mlp.down_proj, in_idx=keep)
    else:
        mlp.c_fc = _select(mlp.c_fc, out_idx=keep)
        mlp.c_proj = _select(mlp.c_proj, in_idx=keep)


def shrink_heads(block: nn.Module, fam: str, keep_groups: torch.Tensor) -> None:
    """Keep the given KV groups (Llama) / heads (GPT-2) of one block."""
    attn = attention(block)
    h, kv, d = _head_layout(block, fam)
    if fam == "llama":
        r = h // kv  # query heads per KV head; repeat_kv maps query head q to KV head q // r
        q_rows = _rows(_rows(keep_groups, r), d)
        kv_rows = _rows(keep_groups, d)
        attn.q_proj = _select(attn.q_proj, out_idx=q_rows)
        attn.k_proj = _select(attn.k_proj, out_idx=kv_rows)
        attn.v_proj = _select(attn.v_proj, out_idx=kv_rows)
        attn.o_proj = _select(attn.o_proj, in_idx=q_rows)
        attn.num_key_value_groups = r
    else:
        rows = _rows(keep_groups, d)
        width = h * d
        attn.c_attn = _select(attn.c_attn, out_idx=torch.cat([rows, rows + width, rows + 2 * width]))  # q | k | v
        attn.c_proj = _select(attn.c_proj, in_idx=rows)
        attn.num_heads = len(keep_groups)
        attn.split_size = len(rows)


def drop_layers(model: nn.Module, drop: list[int]) -> None:
    """Remove decoder layers ``drop`` and keep the model consistent for generation with a KV cache."""
    path, blocks = transformer_blocks(model)
    keep = [i for i in range(len(blocks)) if i not in set(drop)]
    set_submodule(model, path, nn.ModuleList([blocks[i] for i in keep]))
    for j, block in enumerate(model.get_submodule(path)):
        for m in block.modules():  # the KV cache is indexed by layer_idx: it must be 0..L'-1 again
            if isinstance(getattr(m, "layer_idx", None), int):
                m.layer_idx = j
    cfg = model.config
    cfg.num_hidden_layers = len(keep)  # GPT-2 maps this onto n_layer
    if isinstance(getattr(cfg, "layer_types", None), (list, tuple)) and len(cfg.layer_types) == len(blocks):
        cfg.layer_types = [cfg.layer_types[i] for i in keep]
    record = getattr(cfg, "lmslim_structure", None)
    if record:
        record["layers"] = [record["layers"][i] for i in keep]


def layer_shapes(model: nn.Module) -> list[dict[str, int]]:
    fam = family(model)
    if fam is None:
        return []
    _, blocks = transformer_blocks(model)
    shapes = []
    for b in blocks:
        h, kv, _ = _head_layout(b, fam)
        inter = linear_weight(_down(b, fam)).shape[1]
        shapes.append({"intermediate_size": inter, "num_attention_heads": h, "num_key_value_heads": kv})
    return shapes


def sync_config(model: nn.Module) -> None:
    """Make the config describe the pruned shapes: plain fields when every block is alike (and the
    architecture's config can say so), else a per-layer ``lmslim_structure`` record."""
    fam = family(model)
    if fam is None:
        return
    cfg = model.config
    shapes = layer_shapes(model)
    uniform = all(s == shapes[0] for s in shapes)
    s0 = shapes[0]
    if fam == "llama":
        _, blocks = transformer_blocks(model)
        cfg.head_dim = attention(blocks[0]).head_dim  # explicit: hidden / heads no longer gives it
        expressible = uniform
        if uniform:
            cfg.intermediate_size = s0["intermediate_size"]
            cfg.num_attention_heads = s0["num_attention_heads"]
            cfg.num_key_value_heads = s0["num_key_value_heads"]
    else:
        heads_same = all(s["num_attention_heads"] == cfg.n_head for s in shapes)
        expressible = uniform and heads_same  # GPT-2's config has no head_dim: fewer heads change it
        if all(s["intermediate_size"] == s0["intermediate_size"] for s in shapes):
            cfg.n_inner = s0["intermediate_size"]
    if expressible:
        if hasattr(cfg, "lmslim_structure"):
            del cfg.lmslim_structure
    else:
        cfg.lmslim_structure = {"format": STRUCTURE_FORMAT, "family": fam, "layers": shapes}


# --- handlers --------------------------------------------------------------------------------------

@PRUNERS.register("neurons", NeuronsConfig)
def _neurons(model, config: NeuronsConfig, calib: torch.Tensor) -> dict:
    fam = _need_family(model, "FFN neurons")
    scores = neuron_scores(model, calib, config.batch_size)
    removed = choose_removed(scores, config.fraction, config.scope, "FFN neurons")
    _, blocks = transformer_blocks(model)
    before = [len(s) for s in scores]
    for block, rem, n in zip(blocks, removed, before):
        shrink_neurons(block, fam, _complement(rem, n))
    sync_config(model)
    after = [n - len(r) for n, r in zip(before, removed)]
    return {"removed_fraction": 1 - sum(after) / sum(before), "intermediate_before": before,
            "intermediate_after": after, "criterion": "RMS(activation) * ||W_down column||",
            "uniform": len(set(after)) == 1}


@PRUNERS.register("heads", HeadsConfig)
def _heads(model, config: HeadsConfig, calib: torch.Tensor) -> dict:
    fam = _need_family(model, "attention heads")
    _, blocks = transformer_blocks(model)
    layouts = [_head_layout(b, fam) for b in blocks]
    per_layer = None
    if config.drop_heads is not None:
        h, kv, _ = layouts[0]
        r = h // kv
        if any(lay[0] <= config.drop_heads for lay in layouts):
            raise UserError(f"cannot remove {config.drop_heads} heads per layer: a layer has only "
                            f"{min(lay[0] for lay in layouts)} (at least one KV group must stay)")
        if config.drop_heads % r:
            raise UserError(f"with grouped-query attention heads go in groups of {r} (one KV head each); "
                            f"--drop-heads must be a multiple of {r}, got {config.drop_heads}")
        per_layer = config.drop_heads // r
    scores = head_scores(model, calib, config.batch_size)
    # One unit per KV group: the query heads that share a KV head are scored and removed together.
    group_scores = [s.reshape(kv, h // kv).sum(1) for s, (h, kv, _) in zip(scores, layouts)]
    removed = choose_removed(group_scores, config.fraction, config.scope, "attention head groups", per_layer)
    for block, rem, (_, kv, _) in zip(blocks, removed, layouts):
        if len(rem):
            shrink_heads(block, fam, _complement(rem, kv))
    sync_config(model)
    after = [_head_layout(b, fam)[0] for b in blocks]
    before = [lay[0] for lay in layouts]
    return {"removed_fraction": 1 - sum(after) / sum(before), "heads_before": before, "heads_after": after,
            "kv_heads_after": [_head_layout(b, fam)[1] for b in blocks],
            "criterion": "mean ||head output @ W_o,h|| (whole KV groups under GQA)", "uniform": len(set(after)) == 1}


@PRUNERS.register("layers", LayersConfig)
def _layers(model, config: LayersConfig, calib: torch.Tensor) -> dict:
    _, blocks = transformer_blocks(model)
    n = len(blocks)
    k = config.drop if config.drop is not None else round_half_up(config.fraction * n)
    if k >= n:
        raise UserError(f"cannot drop {k} of the model's {n} layers: at least one must stay")
    if k == 0:
        raise UserError(f"dropping {config.fraction:g} of {n} layers rounds to none; ask for more")
    if getattr(model.config, "scale_attn_by_inverse_layer_idx", False):
        raise UserError("this GPT-2 scales attention by 1/(layer index); dropping layers would change the "
                        "remaining layers' computation")
    bi = block_influence(model, calib, config.batch_size)
    drop = sorted(bi.argsort()[:k].tolist())
    drop_layers(model, drop)
    return {"dropped_layers": drop, "block_influence": [round(float(v), 6) for v in bi], "layers_before": n,
            "layers_after": n - k, "criterion": "Block Influence 1 - cos(layer input, layer output) (ShortGPT)"}
