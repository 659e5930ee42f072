"""Data- and model-parallel training on ``torch.distributed`` (DDP, FSDP2), as the loop uses it.

Processes are started by ``torchrun`` (or ``lmslim train --nproc N``, which calls torchrun's own
launcher); each reads its rank from the environment (:class:`~lmslim.core.runtime.Runtime`) and
joins the process group here. The backend follows the device: gloo between CPU processes, nccl
between GPUs.

- **DDP** (`Li et al. 2020 <https://arxiv.org/abs/2006.15704>`_): every rank holds the whole model;
  gradients are averaged by an all-reduce that overlaps the backward pass bucket by bucket. Micro-steps
  of an accumulated step run under ``no_sync()``: only the last one communicates.
- **FSDP2** (``fully_shard``, `Zhao et al. 2023 <https://arxiv.org/abs/2304.11277>`_): parameters,
  gradients and optimizer state are sharded; each decoder layer is gathered just before it runs and
  its gradient reduce-scattered right after. Checkpoints are sharded (``torch.distributed.checkpoint``),
  the final model is consolidated into a normal Hugging Face folder.
- **Communication hooks** (DDP): fp16/bf16 compression halves the bytes; PowerSGD
  (`Vogels et al. 2019 <https://arxiv.org/abs/1905.13727>`_) sends each n x m gradient as rank-r factors
  ((n + m) x r numbers) with error feedback.

How the all-reduce itself runs: a ring all-reduce over p ranks cuts the buffer into p chunks; in
p - 1 reduce-scatter steps every rank sends one chunk to its right neighbour and adds the chunk from
its left one, after which each rank owns one fully reduced chunk; p - 1 all-gather steps then pass the
reduced chunks around the ring. Each rank sends 2 (p - 1) / p of the buffer, whatever p is, which is
why it is bandwidth-optimal. Gloo implements ring (and for small buffers, tree/halving-doubling)
algorithms over TCP; NCCL runs rings and trees over NVLink/PCIe/InfiniBand. :func:`comm_bytes_per_step`
uses the ring figure to estimate what a step sends.

Example (two CPU processes)::

    torchrun --nproc-per-node 2 -m lmslim.cli.main train builtin:tiny-llama --data builtin:wiki:train \\
        --out runs/ddp --max-steps 20
"""

from __future__ import annotations

import contextlib
import logging
import os
from datetime import timedelta
from typing import Any, ContextManager, Iterable

import torch
from torch import nn

from lmslim.core.errors import UserError
from lmslim.core.runtime import Runtime
from lmslim.train.config import DistributedConfig

log = logging.getLogger(__name__)


def setup(runtime: Runtime, timeout_s: int = 600) -> Runtime:
    """Join the process group that ``torchrun`` described in the environment (no-op for one process).

    Idempotent: a second call (the CLI joins early, the loop checks again) changes nothing.

    Raises:
        UserError: WORLD_SIZE > 1 without the rendezvous variables torchrun sets.
    """
    if not runtime.is_distributed:
        return runtime
    import torch.distributed as dist

    if not dist.is_available():
        raise UserError("this torch build has no torch.distributed; train with one process")
    if runtime.device.type == "cuda":
        torch.cuda.set_device(runtime.device)
    if not dist.is_initialized():
        if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
            raise UserError("WORLD_SIZE > 1 but MASTER_ADDR/MASTER_PORT are not set; start the job with "
                            "lmslim ... --nproc N or torchrun")
        dist.init_process_group(runtime.backend, timeout=timedelta(seconds=timeout_s))
    if dist.get_world_size() != runtime.world_size or dist.get_rank() != runtime.rank:
        raise UserError(f"process group (rank {dist.get_rank()} of {dist.get_world_size()}) does not match the "
                        f"environment (rank {runtime.rank} of {runtime.world_size})")
    return runtime


def barrier(runtime: Runtime) -> None:
    if runtime.is_distributed:
        import torch.distributed as dist

        dist.barrier()


def all_reduce_sum(values: list[float], runtime: Runtime, group: Any = None) -> list[float]:
    """Element-wise sum of ``values`` over all ranks, or over ``group`` (float64; one collective)."""
    if not runtime.is_distributed:
        return values
    import torch.distributed as dist

    if group is not None and dist.get_world_size(group) == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=runtime.device)
    dist.all_reduce(t, group=group)
    return t.tolist()


def all_gather_object(obj: Any, runtime: Runtime) -> list[Any]:
    """``obj`` of every rank, in rank order (pickled; small objects only)."""
    if not runtime.is_distributed:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * runtime.world_size
    dist.all_gather_object(out, obj)
    return out


# ------------------------------------------------------------------------------------------ wrapping

def wrap(model: nn.Module, runtime: Runtime, config: DistributedConfig, blocks: Iterable[nn.Module] = (),
         seed: int = 0, layout: Any = None) -> nn.Module:
    """The module the loop calls forward on: DDP around ``model``, or ``model`` itself sharded by FSDP2.

    Args:
        model: already on ``runtime.device``.
        blocks: the decoder layers (FSDP shards each one separately, so only one layer's full
            parameters exist at a time).
        seed: PowerSGD's random projection seed (the same on every rank).
        layout: a :class:`lmslim.train.parallel.Layout` with tensor parallelism: the model is split over
            its ``tp`` mesh dimension in place, then (``dp > 1``) sharded by FSDP2 over ``dp``.
    """
    if not runtime.is_distributed:
        return model
    if layout is not None and layout.pp > 1:
        return model  # the pipeline schedule runs the stages (lmslim.train.pipeline)
    if layout is not None and layout.tp > 1:
        from lmslim.train.parallel import tensor_parallel

        tensor_parallel(model, layout.mesh["tp"])
        if layout.dp > 1:  # 2-D: FSDP2 over the data-parallel ranks of each tensor-parallel shard
            from torch.distributed.fsdp import fully_shard

            for block in blocks:
                fully_shard(block, mesh=layout.mesh["dp"])
            fully_shard(model, mesh=layout.mesh["dp"])
        return model
    if config.strategy == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(runtime.device.type, (runtime.world_size,))
        for block in blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)  # the rest: embeddings, final norm, (tied) LM head
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    ddp = DDP(model, device_ids=[runtime.device.index] if runtime.device.type == "cuda" else None,
              bucket_cap_mb=config.bucket_mb, find_unused_parameters=config.find_unused_parameters)
    _register_hook(ddp, config, seed, ordered=runtime.backend == "gloo")
    return ddp


def _in_order(hook: Any) -> Any:
    """Run ``hook`` for one bucket to completion before backward hands DDP the next bucket.

    PowerSGD all-reduces P, then launches the all-reduce of Q from the first one's completion
    callback. Gloo completes futures on its own threads, so with several buckets in flight the ranks
    can issue these collectives in different orders (seen here as a gloo size mismatch or a hang).
    Waiting keeps the order identical on every rank, at the cost of overlapping communication.
    """

    def run(state, bucket):  # no annotations: DDP checks them against dist.GradBucket / Future types
        fut = hook(state, bucket)
        fut.wait()
        return fut

    return run


def _register_hook(ddp: nn.Module, config: DistributedConfig, seed: int, ordered: bool) -> None:
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook

    if config.comm_hook == "fp16":
        ddp.register_comm_hook(None, default_hooks.fp16_compress_hook)
    elif config.comm_hook == "bf16":
        ddp.register_comm_hook(None, default_hooks.bf16_compress_hook)
    elif config.comm_hook == "powersgd":
        state = powerSGD_hook.PowerSGDState(
            process_group=None, matrix_approximation_rank=config.powersgd_rank,
            start_powerSGD_iter=config.powersgd_start_step, use_error_feedback=True, warm_start=True,
            random_seed=seed)
        hook = powerSGD_hook.powerSGD_hook
        ddp.register_comm_hook(state, _in_order(hook) if ordered else hook)


def is_fsdp(module: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without FSDP2
        return False
    return isinstance(module, FSDPModule)


def sync_gradients(wrapped: nn.Module, sync: bool) -> ContextManager:
    """Context for one micro-step: communicate gradients only when ``sync`` (the step's last micro-batch)."""
    if sync:
        return contextlib.nullcontext()
    from torch.nn.parallel import DistributedDataParallel as DDP

    if isinstance(wrapped, DDP):
        return wrapped.no_sync()
    if is_fsdp(wrapped):
        return _fsdp_no_sync(wrapped)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _fsdp_no_sync(module: nn.Module):
    module.set_requires_gradient_sync(False)  # keep unsharded gradients; reduce-scatter on the last micro-step
    try:
        yield
    finally:
        module.set_requires_gradient_sync(True)


def average_gradients(params: list[nn.Parameter], runtime: Runtime) -> None:
    """All-reduce (mean) the gradients of parameters that DDP/FSDP do not manage (objective's own)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not runtime.is_distributed or not grads:
        return
    import torch.distributed as dist

    flat = torch.cat([g.reshape(-1) for g in grads])  # one collective for all of them
    dist.all_reduce(flat)
    flat /= runtime.world_size
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def local(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor for a DTensor (FSDP's sharded parameters and norms), ``t`` itself otherwise."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


# ------------------------------------------------------------------------------------------ cost model

def comm_bytes_per_step(params: Iterable[nn.Parameter], config: DistributedConfig, world_size: int,
                        step: int = 0) -> int:
    """Estimated bytes each rank sends per optimizer step for gradient (and FSDP parameter) traffic.

    Ring collectives: an all-reduce sends ``2 (p - 1) / p`` of the buffer per rank, a reduce-scatter or an
    all-gather ``(p - 1) / p``. FSDP gathers each layer's parameters in forward and again in backward and
    reduce-scatters its gradients: 3 x ``(p - 1) / p``. PowerSGD (from ``powersgd_start_step`` on) sends an
    n x m matrix as P (n x r) and Q (m x r) when that is at least 2x smaller (PyTorch's default), vectors
    uncompressed. Payload only: protocol headers and the extra small all-reduces of the loop are ignored.
    """
    if world_size <= 1:
        return 0
    params = [p for p in params if p.requires_grad]
    ring = (world_size - 1) / world_size
    numel = sum(p.numel() for p in params)
    if config.strategy == "fsdp":
        return int(3 * ring * numel * 4)
    if config.comm_hook in ("fp16", "bf16"):
        return int(2 * ring * numel * 2)
    if config.comm_hook == "powersgd" and step >= config.powersgd_start_step:
        sent = 0
        for p in params:
            if p.dim() < 2:
                sent += p.numel()
                continue
            n, m = p.shape[0], p.numel() // p.shape[0]
            r = config.powersgd_rank
            sent += (n + m) * r if (n + m) * r * 2 <= n * m else n * m
        return int(2 * ring * sent * 4)
    return int(2 * ring * numel * 4)


# ------------------------------------------------------------------------------------------ state

def full_state_dict(model: nn.Module, runtime: Runtime) -> dict[str, torch.Tensor] | None:
    """The whole model's state dict on rank 0's CPU (FSDP, tensor parallel: gathered from the shards; every
    rank must call)."""
    from lmslim.train.parallel import has_dtensors

    if is_fsdp(model) or has_dtensors(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not runtime.is_main:
            return None
        # Gathering unties tied weights (an LM head sharing the embedding): keep the first name only, as
        # save_pretrained would for the module itself, so the folder matches a single-process one.
        seen: set[int] = set()
        for name, p in model.named_parameters(remove_duplicate=False):
            if id(p) in seen:
                sd.pop(name, None)
            seen.add(id(p))
        return sd
    return None  # not sharded: save_pretrained reads the module directly


def save_sharded(folder: os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Each rank writes its own shards of the model and optimizer state (collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, optimizer)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(folder))


def load_sharded(folder: os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Read the shards written by :func:`save_sharded` back into ``model`` and ``optimizer`` (collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    msd, osd = get_state_dict(model, optimizer)
    state = {"model": msd, "optim": osd}
    dcp.load(state, checkpoint_id=str(folder))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


def describe(runtime: Runtime, config: DistributedConfig) -> dict[str, Any]:
    """What the run used, for metrics and checkpoints (``tp``/``pp`` only when used)."""
    out = {"world_size": runtime.world_size, "backend": runtime.backend if runtime.is_distributed else None,
           "strategy": config.strategy if runtime.is_distributed else None,
           "comm_hook": config.comm_hook if runtime.is_distributed else None}
    if config.model_parallel > 1:
        out.update(tp=config.tp, pp=config.pp, dp=config.data_parallel(runtime.world_size))
    return out


__all__ = ["setup", "wrap", "sync_gradients", "average_gradients", "comm_bytes_per_step", "full_state_dict",
           "save_sharded", "load_sharded", "all_reduce_sum", "all_gather_object", "barrier", "is_fsdp", "local",
           "describe"]
