"""Compress a model larger than memory: one decoder block's weights in memory at a time.

The model is built on the meta device (no memory). Its parts outside the decoder blocks (embedding,
final norm, LM head, rotary tables) are read from the safetensors files; then the technique runs
exactly as on a model in memory (``quantize_`` / ``prune_`` with the same handler), except that the
block-by-block driver (``lmslim.compress.calibration.sequential``) asks the :class:`BlockStream` to

1. read block i's tensors from the shards (memory-mapped, ``lmslim.modelio.stream.ShardReader``),
   cast them as ``load_model`` does and move the block to the runtime's device;
2. after the technique compressed it and its outputs became block i+1's inputs, write its
   compressed tensors as one output shard (``ShardWriter``) and move it back to ``meta`` (freed).

Calibration activations live in an :class:`~lmslim.compress.calibration.ActivationStore`: in memory
up to ``max_activation_mb`` (shared by a block's inputs and its outputs), on disk beyond it. The
output is a sharded folder (``model.safetensors.index.json``) in the compressed-tensors layout for
quantization (``quantization_config`` in ``config.json``) or plain dense weights for pruning, built
in a temporary sibling and published by one rename only when complete.

Peak memory is then about one block's weights (plus the technique's per-block working set, e.g.
GPTQ's Hessians), the non-block weights, the bounded activations and a fixed overhead (Python,
torch, tokenizer); docs/scale.md has the measured arithmetic.

Example:
    >>> import tempfile, torch
    >>> from pathlib import Path
    >>> from lmslim.assets.tiny import build_tiny
    >>> from lmslim.compress.quantize import RTNConfig
    >>> model, tok = build_tiny("tiny-llama")
    >>> src, out = Path(tempfile.mkdtemp()) / "m", Path(tempfile.mkdtemp()) / "q"
    >>> model.save_pretrained(src); _ = tok.save_pretrained(src)
    >>> stream_compress(src, "quantize", RTNConfig(bits=4, group_size=32), out)["modules"]
    14
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from lmslim.compress.calibration import STREAM_ATTR, ActivationStore
from lmslim.core.errors import UserError
from lmslim.core.hostmem import map_large_allocations, return_free_memory
from lmslim.modelio.stream import ShardWriter, StreamedModel, open_streamed
from lmslim.nn.blocks import transformer_blocks
from lmslim.nn.quant_linear import QuantLinear

log = logging.getLogger(__name__)

# Methods whose handler goes through the block-by-block driver (sequential / each_block) and so streams.
STREAMABLE = {"quantize": ("gptq", "rtn", "awq", "smoothquant", "dynamic-int8"), "prune": ("sparsegpt", "wanda")}


def check_stage_streamable(stage: str, config: Any) -> None:
    """One-line refusal for a ``quantize`` / ``prune`` config (or any other stage) that cannot stream (yet)."""
    from lmslim.compress.prune.api import PRUNERS
    from lmslim.compress.quantize.api import QUANTIZERS

    ok = ", ".join(f"{s} {'/'.join(m)}" for s, m in STREAMABLE.items())
    if stage not in STREAMABLE:
        raise UserError(f"stage {stage} cannot stream (streaming supports {ok}); run it without --stream")
    method = (QUANTIZERS if stage == "quantize" else PRUNERS).handler_for(config)[0]
    if method not in STREAMABLE[stage]:
        raise UserError(f"{stage} {method} cannot stream yet (streaming supports {ok}); run it without --stream")
    if getattr(config, "minmax", False):
        raise UserError("streaming writes the compressed-tensors layout, which has no form for minmax grids; "
                        "drop minmax or run without --stream")


def module_tensors(module: nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    """What a (possibly quantized) module saves: compressed-tensors tensors for each ``QuantLinear``."""
    from lmslim.modelio.formats.compressed_tensors import module_tensors as grid_tensors

    quant = {n: m for n, m in module.named_modules() if isinstance(m, QuantLinear)}
    out = {}
    seen: set[tuple[int, int]] = set()  # tied tensors (an LM head sharing the embedding) are stored once
    for key, t in module.state_dict().items():
        owner = key.rpartition(".")[0]
        if owner in quant or t.is_meta:
            continue
        ident = (t.data_ptr(), t.numel())
        if t.numel() and ident in seen:
            continue
        seen.add(ident)
        out[prefix + key] = t
    for name, mod in quant.items():
        if not mod.scale.is_meta:
            out.update({f"{prefix}{name}.{k}": v for k, v in grid_tensors(mod).items()})
    return out


@dataclass
class BlockStream:
    """Loads block i from the shards before its turn and writes and frees it after (see the module docstring)."""

    source: StreamedModel
    writer: ShardWriter
    activation_bytes: float
    spill_dir: Path
    free_outside: bool = False
    outside_written: bool = False
    peak_block_bytes: int = 0
    spilled_bytes: int = 0
    _loaded: list = field(default_factory=list)

    @property
    def device(self) -> torch.device:
        return self.source.device

    def load(self, index: int, block: nn.Module) -> None:
        self.source.load_block(index)  # the driver's ``block`` is this model's own block ``index``
        # every module the block holds now: a technique may swap some out (GPTQ puts QuantLinear in
        # place of nn.Linear) while its handler still refers to the old ones, whose weights must go too
        self._loaded = list(block.modules())
        size = sum(t.numel() * t.element_size() for t in [*block.parameters(), *block.buffers()])
        self.peak_block_bytes = max(self.peak_block_bytes, size)

    def release(self, index: int, block: nn.Module) -> None:
        self.writer.write(module_tensors(block, f"{self.source.path}.{index}."))
        for mod in [*self._loaded, block]:
            mod.to("meta")
        self._loaded = []
        for mod in block.modules():  # kernel state (prepacked int8 weights, unpacked codes) is no parameter
            if isinstance(mod, QuantLinear):  # or buffer, so .to("meta") leaves it: drop it
                for key, value in list(vars(mod).items()):
                    if isinstance(value, (torch.Tensor, torch.ScriptObject)):
                        setattr(mod, key, None)
        self.source.reader.evict(f"{self.source.path}.{index}.")  # its pages are unmapped now
        return_free_memory()

    def captured(self) -> None:
        """After the first block's inputs are captured: write and free what lies outside the blocks.

        Only when the technique will not touch it (``free_outside``: no LM head among the targets),
        so the embedding (often the largest tensor) is not held through the whole block loop.
        """
        if self.free_outside and not self.outside_written:
            model, inside = self.source.model, self.source.path + "."
            self.writer.write(module_tensors(model, ""))
            self.outside_written = True
            moved: dict[int, nn.Parameter] = {}  # shared (tied) parameters stay shared on meta
            for name, mod in model.named_modules(remove_duplicate=False):
                if name.startswith(inside) or name == self.source.path:
                    continue
                for key, p in mod._parameters.items():
                    if p is not None and not p.is_meta:
                        mod._parameters[key] = moved.setdefault(id(p), nn.Parameter(p.to("meta"), p.requires_grad))
                for key, b in mod._buffers.items():
                    if b is not None:
                        mod._buffers[key] = b.to("meta")
            self.source.reader.evict("", exclude=(inside,))  # unmapped now: drop their pages
            return_free_memory()

    def store(self) -> ActivationStore:
        # a block's inputs and its outputs are alive together: each gets half the bound
        return _CountingStore(self, self.activation_bytes / 2, self.spill_dir)


class _CountingStore(ActivationStore):
    def __init__(self, stream: BlockStream, limit: float, folder: Path):
        super().__init__(limit, folder)
        self._stream = stream

    def close(self) -> None:
        self._stream.spilled_bytes = max(self._stream.spilled_bytes, self.spilled)
        super().close()


def _finish_config(model: nn.Module, tokenizer: Any, folder: Path) -> str:
    """config.json (with quantization_config for a quantized model), generation config, tokenizer."""
    from lmslim.modelio.formats import save_config_and_tokenizer
    from lmslim.modelio.formats.compressed_tensors import RECORD_FORMAT, quantization_config

    save_config_and_tokenizer(model, tokenizer, folder)
    quant = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    if not quant:
        return "hf"
    path = folder / "config.json"
    data = json.loads(path.read_text())
    data["lmslim_quantization"] = {**(data.get("lmslim_quantization") or {}), "format": RECORD_FORMAT}
    data["quantization_config"] = quantization_config(quant)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    return "compressed-tensors"


def stream_compress(folder: str | Path, stage: str, config: Any, out: str | Path,
                    calib: torch.Tensor | Callable[[Any], torch.Tensor] | None = None, *, runtime: Any = None,
                    max_activation_mb: float = 1024.0,
                    finalize: Callable[[Path, dict], None] | None = None) -> dict[str, Any]:
    """Quantize (``stage="quantize"``) or prune a safetensors model folder into ``out``, one block in memory.

    Args:
        folder: a full-precision transformers folder (``config.json`` + ``*.safetensors``, sharded or not).
        config: the technique config (``GPTQConfig``, ``RTNConfig``, ``AWQConfig``, ``SparseGPTConfig``,
            ``WandaConfig``).
        calib: (n_samples, seq_len) token ids for calibrated methods, or a function of the tokenizer
            that returns them.
        runtime: ``lmslim.core.runtime.Runtime``; blocks are moved to its device one at a time (default CPU).
        max_activation_mb: calibration activations kept in memory; beyond it they are spilled to disk.
        finalize: called as ``(folder, report)`` on the finished folder before it is published (to add files).

    Returns:
        The technique's report plus ``streaming``: block bytes, activation bound, spilled bytes, shards.

    Raises:
        UserError: a method that cannot stream, a bound below one calibration batch, a damaged shard;
            ``out`` is then left untouched.
    """
    from lmslim.compress.prune.api import prune_
    from lmslim.compress.quantize.api import quantize_
    from lmslim.core.io import atomic_dir
    from lmslim.core.runtime import Runtime

    folder, out = Path(folder), Path(out)
    if not max_activation_mb > 0:
        raise UserError(f"max_activation_mb must be a positive number of MB, got {max_activation_mb}")
    runtime = runtime or Runtime.create(device="cpu")
    check_stage_streamable(stage, config)
    source = open_streamed(folder, dtype=runtime.dtype, device=runtime.device, quantized_ok=False)
    # whatever of the input is cached (a caller's hash of the weights read it all) is charged to this
    # process's cgroup: drop it; blocks are read again when their turn comes (mapped pages stay)
    source.reader.evict("")
    model, tokenizer, hf_config = source.model, source.tokenizer, source.model.config
    if callable(calib):
        calib = calib(tokenizer)
    if calib is not None and getattr(config, "needs_calibration", False):
        batch = min(int(getattr(config, "batch_size", calib.shape[0])), calib.shape[0])
        one = batch * calib.shape[1] * hf_config.hidden_size * torch.finfo(runtime.dtype).bits // 8
        if max_activation_mb * 1e6 / 2 < one:
            raise UserError(f"max_activation_mb {max_activation_mb:g} is below what one block needs: a calibration "
                            f"batch's input and output ({2 * one / 1e6:.1f} MB); raise it or lower batch_size/seq_len")
    # Each block allocates and frees Hessians and activations of many MB: as separate mappings they go
    # back to the OS when freed, instead of piling up in glibc's heap (lmslim.core.hostmem)
    map_large_allocations()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lmslim-spill-") as spill, atomic_dir(out) as tmp:
        writer = ShardWriter(tmp)
        stream = BlockStream(source, writer, max_activation_mb * 1e6, Path(spill),
                             free_outside=not getattr(config, "include_lm_head", False))
        model.__dict__[STREAM_ATTR] = stream
        try:
            with torch.no_grad():
                report = (quantize_ if stage == "quantize" else prune_)(model, config, calib)
        finally:
            del model.__dict__[STREAM_ATTR]
        if not stream.outside_written:
            writer.write(module_tensors(model, ""))  # everything outside the blocks (they are on meta now)
        shards = writer.finish()
        fmt = _finish_config(model, tokenizer, tmp)
        report["streaming"] = {"blocks": len(transformer_blocks(model)[1]),
                               "max_block_mb": stream.peak_block_bytes / 1e6,
                               "max_activation_mb": max_activation_mb, "spilled_mb": stream.spilled_bytes / 1e6,
                               "shards": shards, "format": fmt, "seconds": time.perf_counter() - t0}
        if finalize is not None:
            finalize(tmp, report)
    return report
