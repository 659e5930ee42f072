"""Pipeline parallelism (``distributed.pp``): consecutive decoder layers on consecutive ranks, micro-batched.

Rank s of ``pp`` holds layers ``[s L/pp, (s+1) L/pp)``; the first stage also the embedding, the last the
final norm and the LM head. Everything a rank does not hold is moved to the ``meta`` device (no memory),
so each rank's parameters, gradients and optimizer state are its own stage's only. Each batch is cut
into ``distributed.pp_microbatches`` micro-batches that flow through the stages with
``torch.distributed.pipelining`` (GPipe: all forwards then all backwards; 1F1B: alternating, so at most
``pp`` micro-batches' activations are alive); activations and their gradients travel by send/recv.

Exactness: every micro-batch's loss is its summed token losses divided by the step's loss terms, and
gradients are not rescaled by the schedule, so the summed gradient is that of the whole batch (as in
one process). A tied LM head (the embedding's weight, on the first and the last stage) gets the sum of
both stages' gradients by one all-reduce, so the two copies stay equal. Batches are padded to
``batch.batch_size`` rows of ``batch.max_length`` tokens (masked, ignored by the loss): pipeline stages
exchange buffers of fixed shape.

With other plans: ``pp x dp`` replicates each stage over the data-parallel ranks (each replica runs its
own share of the step's examples through its own pipeline) and sums the stage's gradients over them by one
all-reduce; ``pp x tp`` splits each stage's layers (and its embedding or LM head) over its tensor-parallel
ranks with the same plan as :func:`lmslim.train.parallel.tensor_parallel`; the hidden states between stages
stay plain (replicated) tensors. Activation checkpointing and bf16 autocast apply inside each stage.

Checkpoints: ``torch.distributed.checkpoint`` with each rank's own parameters and optimizer state under
their model names (the tied weight, held by two stages, is stored once); the final model is gathered
on rank 0 into a normal Hugging Face folder.

Example (two CPU processes, one layer each for a 2-layer model)::

    lmslim train builtin:tiny-llama --data builtin:wiki:train --out runs/pp --max-steps 20 --nproc 2 \\
        distributed.pp=2 distributed.pp_microbatches=2 batch.batch_size=4
"""

from __future__ import annotations

import logging
import math
from typing import Any, Sequence

import torch
from torch import nn

from lmslim.core.errors import UserError

log = logging.getLogger(__name__)

IGNORE = -100


class _Stage(nn.Module):
    """The part of a Llama-family causal LM one stage runs (the layers of transformers' ``LlamaModel``)."""

    def __init__(self, model: nn.Module, first: bool, last: bool, layers: Sequence[nn.Module]) -> None:
        super().__init__()
        self.config = model.config
        self.first, self.last = first, last
        self.embed = model.get_input_embeddings() if first else None
        self.layers = nn.ModuleList(layers)
        self.rotary = model.model.rotary_emb
        self.norm = model.model.norm if last else None
        self.head = model.get_output_embeddings() if last else None

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        from transformers.masking_utils import create_causal_mask

        h = self.embed(x) if self.first else x  # (b, t, d)
        positions = torch.arange(h.shape[1], device=h.device).unsqueeze(0)  # as LlamaModel without a cache
        mask = create_causal_mask(config=self.config, inputs_embeds=h, attention_mask=attention_mask, cache=None,
                                  position_ids=positions)
        rope = self.rotary(h, position_ids=positions)
        for layer in self.layers:
            h = layer(h, attention_mask=mask, position_embeddings=rope, position_ids=positions)
        return self.head(self.norm(h)) if self.last else h  # last: logits (b, t, vocab)


class Pipeline:
    """This rank's stage, its schedule and what the loop needs from it (step, clipping, saving)."""

    def __init__(self, model: nn.Module, layout: Any, config: Any, runtime: Any) -> None:
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

        from lmslim.nn.blocks import family, transformer_blocks

        dcfg = config.distributed
        if family(model) != "llama" or not hasattr(model, "model") or not hasattr(model.model, "rotary_emb") \
                or model.get_output_embeddings() is None:
            raise UserError(f"distributed.pp needs a Llama-style causal LM (task clm); {type(model).__name__} is "
                            "not one")
        self.model, self.runtime, self.config = model, runtime, config
        self.pp, self.rank = layout.pp, layout.pp_rank
        self.group = layout.mesh["pp"].get_group()
        # pp x dp: each stage is replicated over the dp ranks; its gradients are summed over them (the loss is
        # already divided by the loss terms of all dp ranks, so the sum is the whole batch's gradient).
        self.dp_group = layout.dp_group if layout.dp > 1 else None
        self.first, self.last = self.rank == 0, self.rank == self.pp - 1
        _, blocks = transformer_blocks(model)
        per = len(blocks) // self.pp
        self.stage = _Stage(model, self.first, self.last, blocks[self.rank * per:(self.rank + 1) * per])
        self._free_the_rest(model)
        self.tp_group = None
        if layout.tp > 1:  # pp x tp: this stage's layers (and embedding / head) split over its tp ranks
            from lmslim.train.parallel import split_modules

            split_modules(self.stage, self.stage.layers, self.stage.embed, self.stage.head, layout.mesh["tp"])
            self._retie(model)
            self.tp_group = layout.mesh["tp"].get_group()
        if config.precision.activation_checkpointing:
            # transformers' decoder layers recompute themselves in backward once enabled (the loop did).
            if not all(getattr(layer, "gradient_checkpointing", False) for layer in self.stage.layers):
                raise UserError("precision.activation_checkpointing: this model's decoder layers do not "
                                "checkpoint themselves inside a pipeline stage; set it to false")
            log.info("pipeline stage %d: %d layers recomputed in backward", self.rank, len(self.stage.layers))
        self.tied = self._tied(model)
        self.tied_group = self._tied_group(layout)
        self.step_units = 1
        stage = PipelineStage(self.stage, self.rank, self.pp, runtime.device, group=self.group)
        cls = Schedule1F1B if dcfg.pp_schedule == "1f1b" else ScheduleGPipe
        # scale_grads=False: the loss below is already normalised by the step's loss terms.
        self.schedule = cls(stage, dcfg.pp_microbatches, loss_fn=self._loss, scale_grads=False)

    # -------------------------------------------------------------------------------------- structure
    def _free_the_rest(self, model: nn.Module) -> None:
        """Move every parameter this stage does not use to ``meta`` (it keeps its name, loses its memory)."""
        mine = {id(p) for p in self.stage.parameters()}
        with torch.no_grad():
            for module in model.modules():
                for name, p in list(module.named_parameters(recurse=False)):
                    if id(p) not in mine and p.device.type != "meta":
                        module._parameters[name] = nn.Parameter(p.to("meta"), requires_grad=p.requires_grad)
        self._retie(model)

    def _retie(self, model: nn.Module) -> None:
        """A tied head and embedding: keep the two names on the one tensor this stage holds (if any)."""
        head, embed = model.get_output_embeddings(), model.get_input_embeddings()
        if head is None or not getattr(model.config, "tie_word_embeddings", False) or self.pp == 1:
            return
        if self.stage.embed is not None and self.stage.head is None:
            head.weight = embed.weight
        elif self.stage.head is not None and self.stage.embed is None:
            embed.weight = head.weight

    def _tied(self, model: nn.Module) -> list[nn.Parameter]:
        head = model.get_output_embeddings()
        if head is None or not getattr(model.config, "tie_word_embeddings", False) or self.pp == 1:
            return []
        return [head.weight] if (self.first or self.last) and head.weight.device.type != "meta" else []

    def _tied_group(self, layout: Any) -> Any:
        """The group of the first and the last stage (all ranks must create it, in the same order)."""
        if not getattr(self.model.config, "tie_word_embeddings", False):
            return None
        if self.pp == 2:
            return self.group
        import torch.distributed as dist

        # One group per pipeline (each dp/tp position); every rank creates all of them, in the same order.
        grid = layout.mesh.mesh  # (pp, dp, tp) global ranks
        mine = None
        for d in range(grid.shape[1]):
            for t in range(grid.shape[2]):
                pair = [int(grid[0, d, t]), int(grid[-1, d, t])]
                group = dist.new_group(pair)
                if layout.rank in pair:
                    mine = group
        return mine

    def named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """This stage's parameters under their model names (each once)."""
        seen: set[int] = set()
        out = []
        for name, p in self.model.named_parameters():
            if p.device.type != "meta" and id(p) not in seen:
                seen.add(id(p))
                out.append((name, p))
        return out

    # -------------------------------------------------------------------------------------- step
    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Summed next-token losses of one micro-batch over the step's loss terms (as the model's own loss)."""
        shifted = logits[:, :-1].reshape(-1, logits.shape[-1]).float()  # (b (t-1), vocab)
        return nn.functional.cross_entropy(shifted, labels[:, 1:].reshape(-1), ignore_index=IGNORE,
                                           reduction="sum") / self.step_units

    def _pad(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Pad to (batch_size, max_length): masked positions, ignored labels; a padded row keeps one visible
        token so that its attention is never over an empty set."""
        rows, length = self.config.batch.batch_size, self.config.batch.max_length
        ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        b, t = ids.shape
        if t > length or b > rows:
            raise UserError(f"a batch of {b} x {t} exceeds batch.batch_size x batch.max_length; pipeline stages "
                            "need fixed shapes")
        out_ids = ids.new_zeros(rows, length)
        out_mask = mask.new_zeros(rows, length)
        out_labels = labels.new_full((rows, length), IGNORE)
        out_ids[:b, :t], out_mask[:b, :t], out_labels[:b, :t] = ids, mask, labels
        out_mask[b:, 0] = 1
        return {"input_ids": out_ids, "attention_mask": out_mask, "labels": out_labels}

    def step(self, micro: Sequence[Any], step_units: int) -> torch.Tensor:
        """Forward and backward of one optimizer step's micro-batches through the pipeline.

        Returns the step's loss (the mean over its loss terms), the same on every stage.
        """
        import torch.distributed as dist

        if any(set(b) != {"input_ids", "attention_mask", "labels"} for b in micro):
            raise UserError("distributed.pp trains causal LMs on input_ids/attention_mask/labels batches only")
        self.step_units = max(1, step_units)
        total = torch.zeros((), device=self.runtime.device)
        for b in micro:
            b = self._pad(b.to(self.runtime.device))
            losses: list[torch.Tensor] = []
            with self.runtime.autocast():
                if self.first:
                    self.schedule.step(b["input_ids"], attention_mask=b["attention_mask"])
                elif self.last:
                    self.schedule.step(attention_mask=b["attention_mask"], target=b["labels"], losses=losses)
                else:
                    self.schedule.step(attention_mask=b["attention_mask"])
            if self.last:
                total += torch.stack([x.detach().float() for x in losses]).sum()
        if self.tp_group is not None:
            self._align_grads()
        if self.tied and self.tied_group is not None:  # the head's and the embedding's gradients, summed
            for p in self.tied:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                dist.all_reduce(_local(p.grad), group=self.tied_group)  # pp x tp: the same vocabulary shard
        if self.dp_group is not None:
            self._sum_over_dp()
        dist.all_reduce(total, group=self.group)  # only the last stage has a loss; the others add 0
        return total

    def _align_grads(self) -> None:
        """pp x tp: give every gradient its parameter's layout (an embedding's arrives as a pending sum of
        full-size tensors), so the collectives below and the optimizer see each rank's own shard."""
        for _, p in self.named_parameters():
            if p.grad is not None and _is_dtensor(p.grad) and p.grad.placements != p.placements:
                p.grad = p.grad.redistribute(p.device_mesh, p.placements)

    def _sum_over_dp(self) -> None:
        """Sum this stage's gradients over its data-parallel replicas (one flat all-reduce)."""
        import torch.distributed as dist

        params = [p for _, p in self.named_parameters() if p.requires_grad]
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        grads = [_local(p.grad) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=self.dp_group)
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    def clip_grad_norm_(self, params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
        """The global gradient norm over all stages (a tied weight counted once); clips in place."""
        import torch.distributed as dist

        tied = {id(p) for p in self.tied}
        # pp x tp: a sharded parameter's squares are summed over the tp ranks, a replicated one's counted once.
        sq = torch.zeros(2, dtype=torch.float64, device=self.runtime.device)  # (sharded, whole)
        for p in params:
            if p.grad is not None and (id(p) not in tied or self.first):
                sq[int(not _sharded(p))] += _local(p.grad).detach().double().pow(2).sum()
        if self.tp_group is not None:
            sq[0] = _sum(sq[0], self.tp_group)
        total = sq.sum()
        dist.all_reduce(total, group=self.group)
        norm = total.sqrt().float()
        if math.isfinite(max_norm):
            coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
            for p in params:
                if p.grad is not None:
                    _local(p.grad).mul_(coef)
        return norm

    # -------------------------------------------------------------------------------------- state
    def _optim_state(self, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
        """The optimizer's per-parameter tensors under ``name.key`` (created first if it has not stepped)."""
        from torch.distributed.checkpoint.state_dict import _init_optim_state

        _init_optim_state(optimizer)
        names = {id(p): n for n, p in self.named_parameters()}
        out = {}
        for p, state in optimizer.state.items():
            for k, v in state.items():
                if isinstance(v, torch.Tensor):
                    out[f"{names[id(p)]}.{k}"] = v
        return out

    def save(self, folder: Any, optimizer: torch.optim.Optimizer) -> None:
        """Every stage writes its parameters and optimizer state (collective)."""
        import torch.distributed.checkpoint as dcp

        state = {"model": dict(self.named_parameters()), "optim": self._optim_state(optimizer)}
        dcp.save({k: {n: t.detach() for n, t in v.items()} for k, v in state.items()}, checkpoint_id=str(folder))

    def load(self, folder: Any, optimizer: torch.optim.Optimizer) -> None:
        """Read :meth:`save`'s files back into this stage's parameters and optimizer state, in place."""
        import torch.distributed.checkpoint as dcp

        state = {"model": {n: p.detach() for n, p in self.named_parameters()}, "optim": self._optim_state(optimizer)}
        dcp.load(state, checkpoint_id=str(folder))

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The whole model's weights on rank 0 (every stage sends its own; tied names once)."""
        import torch.distributed as dist

        mine = {n: _local(p.full_tensor() if _is_dtensor(p) else p).detach().cpu() for n, p in self.named_parameters()}
        parts: list[Any] = [None] * self.pp
        dist.all_gather_object(parts, mine, group=self.group)
        if not self.first:
            return None
        full: dict[str, torch.Tensor] = {}
        for part in parts:
            for n, t in part.items():
                full.setdefault(n, t)
        head = self.model.get_output_embeddings()
        if getattr(self.model.config, "tie_word_embeddings", False) and head is not None:
            names = [n for n, p in self.model.named_parameters(remove_duplicate=False) if p is head.weight]
            for n in names[1:]:  # stored once, as save_pretrained does for a tied module
                full.pop(n, None)
        return full


def _is_dtensor(t: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a DTensor (in place edits reach it), ``t`` itself otherwise."""
    return t._local_tensor if _is_dtensor(t) else t


def _sharded(p: torch.Tensor) -> bool:
    return _is_dtensor(p) and any(pl.is_shard() for pl in p.placements)


def _sum(value: torch.Tensor, group: Any) -> torch.Tensor:
    import torch.distributed as dist

    value = value.clone()
    dist.all_reduce(value, group=group)
    return value


def comm_bytes(dims: dict[str, int], tokens: int, pp: int, bytes_per_value: int = 4) -> int:
    """Activation bytes a middle stage sends per step: the hidden states forward and their gradients back.

    Example:
        >>> comm_bytes({"hidden_size": 8}, tokens=16, pp=2)
        1024
    """
    if pp <= 1:
        return 0
    return int(2 * tokens * dims["hidden_size"] * bytes_per_value)


__all__ = ["Pipeline", "comm_bytes"]
