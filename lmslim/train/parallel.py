"""Tensor and pipeline parallelism on a ``DeviceMesh``, combined with data parallelism.

The processes of a job form a mesh ``pp x dp x tp`` (``init_device_mesh``); ``distributed.tp`` and
``distributed.pp`` come from the training config, the data-parallel degree is what is left
(world size / (tp x pp)).

- **Tensor parallelism** (Megatron-style, `Shoeybi et al. 2019 <https://arxiv.org/abs/1909.08053>`_),
  with ``torch.distributed.tensor.parallel.parallelize_module``: in every decoder layer q/k/v and
  gate/up are split by output columns (each rank computes its own heads / MLP columns), o and down by
  input rows (their partial outputs are summed by one all-reduce per block). The embedding is split
  by vocabulary rows (each rank looks up the tokens it owns; an all-reduce completes the rows) and the
  LM head by vocabulary columns (an all-gather assembles the logits); a tied head keeps sharing the
  embedding's shard. Norms and any other parameter are replicated DTensors, so every parameter is a
  DTensor and the optimizer and gradient clipping see one kind of tensor. Attention needs no change:
  transformers' Llama attention infers the number of heads from the projection's (local) width.
- **Pipeline parallelism**: :mod:`lmslim.train.pipeline` (consecutive layers per rank, micro-batched).
- **Data parallelism** over the ``dp`` dimension: DDP (``tp = pp = 1``) or FSDP2 (``fully_shard`` on the
  ``dp`` sub-mesh of a 2-D ``dp x tp`` mesh); with ``pp > 1`` every stage (tensor-parallel or not) is
  replicated over ``dp`` and its gradients are summed by one all-reduce per step (``pp x dp``,
  ``pp x tp``, ``dp x tp x pp``).

Every collective these plans need (all-reduce, all-gather, reduce-scatter, send/recv) exists in gloo in
this torch (2.13), so each plan runs on CPU for tests as on GPUs with nccl.

Example (two CPU processes, one model split in two)::

    lmslim train builtin:tiny-llama --data builtin:wiki:train --out runs/tp --max-steps 20 --nproc 2 \\
        distributed.tp=2
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmslim.core.errors import UserError
from lmslim.train.config import DistributedConfig

log = logging.getLogger(__name__)

# Llama-family projections: column-parallel (output split) and row-parallel (input split).
COLWISE = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")
ROWWISE = ("self_attn.o_proj", "mlp.down_proj")


@dataclass
class Layout:
    """Where this rank sits in the ``pp x dp x tp`` mesh."""

    dp: int
    tp: int
    pp: int
    mesh: Any = None  # DeviceMesh with dims ("pp", "dp", "tp"); None without tensor/pipeline parallelism
    rank: int = 0

    @property
    def model_parallel(self) -> bool:
        return self.tp * self.pp > 1

    @property
    def dp_rank(self) -> int:
        return self.mesh["dp"].get_local_rank() if self.mesh is not None else self.rank

    @property
    def dp_group(self) -> Any:
        """Process group of the data-parallel ranks (None: the whole world)."""
        return self.mesh["dp"].get_group() if self.mesh is not None else None

    @property
    def pp_rank(self) -> int:
        return self.mesh["pp"].get_local_rank() if self.mesh is not None else 0

    def describe(self) -> dict[str, int]:
        return {"dp": self.dp, "tp": self.tp, "pp": self.pp}


def layout(runtime: Any, config: DistributedConfig) -> Layout:
    """The mesh for this job (collective: every rank calls it). Plain DDP/FSDP runs need no mesh."""
    world = runtime.world_size if runtime.is_distributed else 1
    if not runtime.is_distributed and config.model_parallel > 1:
        raise UserError(f"distributed.tp={config.tp} x distributed.pp={config.pp} needs {config.model_parallel} "
                        f"processes; add --nproc {config.model_parallel}")
    dp = config.data_parallel(world)
    if config.model_parallel == 1:
        return Layout(dp, 1, 1, None, runtime.rank)
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(runtime.device.type, (config.pp, dp, config.tp), mesh_dim_names=("pp", "dp", "tp"))
    if dp > 1:
        # dp x tp: DTensor warns at every gradient-norm and export that it reduces the two mesh dimensions one
        # after the other; that is the intended order here, not something for the user to act on.
        logging.getLogger("torch.distributed.tensor._redistribute").setLevel(logging.ERROR)
    return Layout(dp, config.tp, config.pp, mesh, runtime.rank)


# ------------------------------------------------------------------------------------------ checks

def model_dims(spec: str) -> dict[str, Any] | None:
    """The shape numbers of a model spec's ``config.json`` (None when there is no local one to read)."""
    if spec.startswith("config:"):
        path = Path(spec[len("config:"):])
    else:
        from lmslim.modelio.spec import resolve

        folder = resolve(spec).path
        path = folder / "config.json" if folder is not None else None
    if path is None or not path.is_file():
        return None
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return cfg.get("text_config", cfg) if isinstance(cfg, dict) else None


def check_model(config: DistributedConfig, dims: dict[str, Any] | None) -> None:
    """Refuse a plan the model's shape cannot take (heads, KV groups, MLP width, vocabulary, layers).

    Args:
        dims: a Hugging Face ``config.json`` as a dict (:func:`model_dims`); None skips the checks.

    Example:
        >>> check_model(DistributedConfig(tp=2), {"num_attention_heads": 3, "num_hidden_layers": 2})
        Traceback (most recent call last):
        ...
        lmslim.core.errors.UserError: distributed.tp=2 does not divide num_attention_heads=3; use a tp that divides it
    """
    if not dims:
        return
    need = []
    if config.tp > 1:
        need += ["num_attention_heads", "num_key_value_heads", "intermediate_size", "vocab_size"]
    if config.pp > 1:
        need += ["num_hidden_layers"]
    for key in need:
        value = dims.get(key)
        if key == "num_key_value_heads" and value is None:
            value = dims.get("num_attention_heads")
        degree = config.tp if key != "num_hidden_layers" else config.pp
        if value is None:
            raise UserError(f"distributed.{'pp' if key == 'num_hidden_layers' else 'tp'}={degree} needs a Llama-style "
                            f"model; this config has no {key}")
        if value % degree:
            name = "pp" if key == "num_hidden_layers" else "tp"
            raise UserError(f"distributed.{name}={degree} does not divide {key}={value}; use a {name} that "
                            "divides it")


def check_plan(config: DistributedConfig, spec: str | None, world_size: int, train: Any = None,
               dims: dict[str, Any] | None = None, objective: str | None = None, evaluates: bool = False) -> None:
    """Everything that can be refused before a worker starts: degrees vs world size, the model's shape, and
    (given the :class:`~lmslim.train.config.TrainConfig` ``train``) features the plan cannot combine with.

    Args:
        dims: the model's ``config.json`` numbers when ``spec`` alone does not give them (a distilled student).
        objective: what the run trains with besides the causal LM loss (``"distillation"``), if anything.
        evaluates: the run evaluates during training (``--eval-data``).
    """
    config.data_parallel(world_size)
    if config.model_parallel > 1:
        check_model(config, dims if dims is not None else model_dims(spec) if spec is not None else None)
    if train is not None and config.pp > 1:
        check_pipeline(train, objective, evaluates)


def check_pipeline(train: Any, objective: str | None = None, evaluates: bool = False, extras: Any = ()) -> None:
    """Refuse what ``distributed.pp`` cannot combine with (``train``: the whole TrainConfig)."""
    if objective:
        raise UserError(f"distributed.pp trains with the causal LM loss only, not {objective}; use distributed.tp "
                        "(student split, teacher replicated) or data parallelism (distributed.strategy=ddp or fsdp)")
    if train.precision.mode == "fp16":
        raise UserError("distributed.pp with precision.mode=fp16 (loss scaling) is not supported; use bf16 or fp32")
    if extras:
        raise UserError("distributed.pp cannot train parameters outside the model yet (e.g. a distillation "
                        "projection); use distributed.strategy=ddp")
    if evaluates:
        raise UserError("distributed.pp cannot evaluate during training yet (each rank holds some layers only); "
                        "drop --eval-data and evaluate the saved model with lmslim eval")
    dcfg = train.distributed
    if train.batch.token_budget or train.batch.batch_size % dcfg.pp_microbatches:
        raise UserError(f"distributed.pp needs batch.token_budget=0 and batch.batch_size "
                        f"({train.batch.batch_size}) a multiple of distributed.pp_microbatches "
                        f"({dcfg.pp_microbatches})")


# ------------------------------------------------------------------------------------------ tensor parallel

def _replicate_rest(module: nn.Module, mesh: Any) -> None:
    """Make the remaining plain parameters replicated DTensors; their module runs on DTensor inputs."""
    from torch.distributed.tensor import DTensor, Replicate, distribute_module

    def to_dtensor(_mod: nn.Module, inputs: tuple, device_mesh: Any) -> tuple:
        return tuple(DTensor.from_local(x, device_mesh, [Replicate()], run_check=False)
                     if isinstance(x, torch.Tensor) and not isinstance(x, DTensor) else x for x in inputs)

    def to_local(_mod: nn.Module, output: Any, _mesh: Any) -> Any:
        return output.to_local() if isinstance(output, DTensor) else output

    for _, sub in list(module.named_modules()):
        if any(not isinstance(p, DTensor) for p in sub.parameters(recurse=False)):
            distribute_module(sub, mesh, input_fn=to_dtensor, output_fn=to_local)


def tensor_parallel(model: nn.Module, mesh: Any) -> None:
    """Split a Llama-family model over the 1-D ``mesh`` in place (see the module docstring)."""
    from lmslim.nn.blocks import family, transformer_blocks

    if family(model) != "llama":
        raise UserError(f"distributed.tp needs a Llama-style model (q/k/v/o and gate/up/down projections); "
                        f"{type(model).__name__} is not one")
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    split_modules(model, transformer_blocks(model)[1], model.get_input_embeddings(), head, mesh)


def split_modules(root: nn.Module, blocks: Any, embed: nn.Module | None, head: nn.Module | None, mesh: Any) -> None:
    """Tensor-parallel split of ``blocks``, ``embed`` and ``head`` (each may be absent: a pipeline stage holds
    some of them only), then every other parameter under ``root`` made a replicated DTensor."""
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    plan = {**{name: ColwiseParallel() for name in COLWISE}, **{name: RowwiseParallel() for name in ROWWISE}}
    for block in blocks:
        parallelize_module(block, mesh, plan)
    tied = head is not None and embed is not None and head.weight is embed.weight
    if embed is not None:
        # The embedding by vocabulary rows: each rank looks up its own tokens, an all-reduce completes the rows.
        parallelize_module(embed, mesh, RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate()))
    if isinstance(head, nn.Linear) and head.bias is None:
        # The LM head by vocabulary columns (the same Shard(0) of the weight); the logits are all-gathered.
        parallelize_module(head, mesh, ColwiseParallel(output_layouts=Replicate()))
        if tied:  # parallelize_module gave the head its own copy: share the embedding's shard again
            head.weight = embed.weight
    _replicate_rest(root, mesh)


def parameter_bytes(model: nn.Module) -> int:
    """Bytes of the parameters this rank holds (DTensor: its local shard; shared tensors once)."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        t = p.to_local() if hasattr(p, "to_local") else p
        if id(p) in seen or t.device.type == "meta":
            continue
        seen.add(id(p))
        total += t.numel() * t.element_size()
    return total


def has_dtensors(model: nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def tp_comm_bytes(dims: dict[str, int], tokens: int, tp: int, bytes_per_value: int = 4) -> int:
    """Activation bytes each rank sends per step for tensor parallelism (ring collectives, payload only).

    Per decoder layer: forward all-reduces the attention and MLP outputs (2 x tokens x hidden), backward
    all-reduces the gradients at the inputs of q/k/v and gate/up (2 more). The embedding adds one
    all-reduce forward, the LM head one backward (the gradient at its input) and an all-gather of the
    logits (tokens x vocab) forward. An all-reduce sends 2 (t - 1) / t of its buffer per rank, an
    all-gather (t - 1) / t.

    Example:
        >>> tp_comm_bytes({"hidden_size": 8, "num_hidden_layers": 1, "vocab_size": 16}, tokens=4, tp=2)
        896
    """
    if tp <= 1:
        return 0
    ring = (tp - 1) / tp
    h, layers, vocab = dims["hidden_size"], dims["num_hidden_layers"], dims["vocab_size"]
    all_reduced = (4 * layers + 2) * tokens * h
    gathered = tokens * vocab
    return int((2 * ring * all_reduced + ring * gathered) * bytes_per_value)




def pipeline(model: nn.Module, layout: Layout, config: Any, runtime: Any, extras: dict[str, Any],
             evaluates: bool, custom_objective: bool = False) -> Any:
    """This rank's :class:`~lmslim.train.pipeline.Pipeline` when ``pp > 1`` (None otherwise); refuses what it
    cannot do yet."""
    if layout.pp <= 1:
        return None
    check_pipeline(config, "a custom objective" if custom_objective else None, evaluates, extras)
    from lmslim.train.pipeline import Pipeline

    return Pipeline(model, layout, config, runtime)


def step_comm_bytes(model: nn.Module, config: Any, layout: Layout, step: int, tokens: int | None = None) -> int:
    """Bytes each rank sends per optimizer step: gradient traffic over ``dp`` plus tensor-parallel activations.

    ``config`` is the :class:`~lmslim.train.config.TrainConfig`; ``tokens`` the step's tokens over all
    data-parallel ranks (None: ``batch_size x max_length x grad_accum`` per rank, the padded bound).
    """
    from lmslim.train.distributed import comm_bytes_per_step

    dist_cfg = config.distributed
    # pp: a rank all-reduces its own stage's gradients only (the other stages' parameters are on meta)
    own = [p for p in model.parameters() if p.device.type != "meta"]
    grads = comm_bytes_per_step(own, dist_cfg, layout.dp, step) // max(1, layout.tp)
    if not layout.model_parallel:
        return grads
    per_rank = tokens // layout.dp if tokens is not None else \
        config.batch.batch_size * config.batch.max_length * config.batch.grad_accum
    dims = model.config.to_dict()
    if layout.pp > 1:  # the padded stage buffers travel, whatever the real tokens
        from lmslim.train.pipeline import comm_bytes

        padded = config.batch.batch_size * config.batch.max_length * config.batch.grad_accum
        stage = {**dims, "num_hidden_layers": dims["num_hidden_layers"] // layout.pp}  # tp inside one stage
        return grads + comm_bytes(dims, padded, layout.pp) + tp_comm_bytes(stage, padded, layout.tp)
    return grads + tp_comm_bytes(dims, per_rank, layout.tp)


__all__ = ["Layout", "layout", "check_model", "check_plan", "check_pipeline", "split_modules", "model_dims",
           "tensor_parallel", "parameter_bytes", "has_dtensors", "tp_comm_bytes", "step_comm_bytes", "pipeline"]
