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
        if config.batch.token_budget or config.batch.batch_size % dcfg.pp_microbatches:
            raise UserError(f"distributed.pp needs batch.token_budget=0 and batch.batch_size "
                            f"({config.batch.batch_size}) a multiple of distributed.pp_microbatches "
                            f"({dcfg.pp_microbatches})")
        self.model, self.runtime, self.config = model, runtime, config
        self.pp, self.rank = layout.pp, layout.pp_rank
        self.group = layout.mesh["pp"].get_group()
        self.first, self.last = self.rank == 0, self.rank == self.pp - 1
        _, blocks = transformer_blocks(model)
        per = len(blocks) // self.pp
        self.stage = _Stage(model, self.first, self.last, blocks[self.rank * per:(self.rank + 1) * per])
        self._free_the_rest(model)
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
        # A tied head whose embedding moved to meta on this stage: keep the two names on one tensor.
        head, embed = model.get_output_embeddings(), model.get_input_embeddings()
        if head is not None and getattr(model.config, "tie_word_embeddings", False):
            if head.weight.device.type == "meta" and embed.weight.device.type != "meta":
                head.weight = embed.weight
            elif embed.weight.device.type == "meta" and head.weight.device.type != "meta":
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

        ranks = layout.mesh["pp"].mesh.tolist()
        return dist.new_group([ranks[0], ranks[-1]])

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
        if self.tied and self.tied_group is not None:  # the head's and the embedding's gradients, summed
            for p in self.tied:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                dist.all_reduce(p.grad, group=self.tied_group)
        dist.all_reduce(total, group=self.group)  # only the last stage has a loss; the others add 0
        return total

    def clip_grad_norm_(self, params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
        """The global gradient norm over all stages (a tied weight counted once); clips in place."""
        import torch.distributed as dist

        tied = {id(p) for p in self.tied}
        sq = torch.zeros((), dtype=torch.float64, device=self.runtime.device)
        for p in params:
            if p.grad is not None and (id(p) not in tied or self.first):
                sq += p.grad.detach().double().pow(2).sum()
        dist.all_reduce(sq, group=self.group)
        norm = sq.sqrt().float()
        if math.isfinite(max_norm):
            coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
            for p in params:
                if p.grad is not None:
                    p.grad.mul_(coef)
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

        mine = {n: p.detach().cpu() for n, p in self.named_parameters()}
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
