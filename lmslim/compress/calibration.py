"""Sequential, layer-by-layer calibration for one-shot compression (GPTQ; later SparseGPT, Wanda).

The model's inputs to its first transformer block are captured once; then each block in turn:
statistics are collected from its matrices' inputs, the block is compressed, and the block is run
again — now compressed — to produce the inputs of the next block. Only one block's activations are
live at a time, so peak memory stays near the model size plus one block's working set, and every
block is calibrated on what the already-compressed blocks before it really produce.

Streaming (``lmslim.compress.streaming``): a model built on the meta device carries a block stream
(attribute ``lmslim_block_stream``); :func:`sequential` and :func:`each_block` then ask it to load
each block's weights just before the block's turn and to write and free them right after, and keep
the activations in its :class:`ActivationStore` (in memory up to a bound, on disk beyond). The
techniques' per-block code is the same on both paths, so streaming gives the same codes.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import torch
from torch import nn

from lmslim.modelio.stream import ActivationStore, BlockInput, capture_block_inputs, run_block  # noqa: F401
from lmslim.nn.blocks import transformer_blocks  # noqa: F401 - techniques find blocks through here too

STREAM_ATTR = "lmslim_block_stream"


def block_stream(model: nn.Module) -> Any:
    """The block stream a streaming run attached to ``model`` (None for a model in memory)."""
    return model.__dict__.get(STREAM_ATTR)


class InputStats:
    """Accumulates statistics of the inputs of a set of linear modules during forward passes."""

    def __init__(self, modules: dict[str, nn.Module], update: Callable[[str, torch.Tensor], None]):
        self._handles = [m.register_forward_hook(self._hook(name, update)) for name, m in modules.items()]

    @staticmethod
    def _hook(name: str, update: Callable[[str, torch.Tensor], None]):
        def fn(_mod, args, _out):
            x = args[0]
            update(name, x.reshape(-1, x.shape[-1]).float())  # (N, K)
        return fn

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


@torch.no_grad()
def sequential(model: nn.Module, calib: torch.Tensor, target_names: set[str], batch_size: int,
               compress_block: Callable[[str, nn.Module, dict[str, nn.Module], list[BlockInput]], None],
               after_block: Callable[[str, nn.Module, dict[str, nn.Module]], None] | None = None,
               ) -> Iterator[int]:
    """Drive block-by-block calibration; ``compress_block`` compresses one block in place.

    Args:
        target_names: full dotted names of the modules to compress.
        compress_block: called as ``(block_path, block, {full_name: module}, inputs)``; it may run
            the block on the inputs to gather statistics, then must replace/modify the modules.
        after_block: called as ``(block_path, block, {full_name: module})`` once the block's outputs
            (the next block's inputs) are computed, before a stream frees it: a technique that wants
            the next block calibrated on this block's uncompressed outputs compresses here instead
            (SmoothQuant: statistics gathered by hooks during that same forward pass).

    Yields:
        The index of each block once it is done (for progress reporting).
    """
    path, blocks = transformer_blocks(model)
    stream = block_stream(model)
    use_cache = getattr(model.config, "use_cache", None)
    model.config.use_cache = False
    try:
        if stream is None:
            inputs = capture_block_inputs(model, blocks[0], calib, batch_size)
        else:  # one batch at a time into the bounded store: the whole set may not fit in memory
            inputs = stream.store()
            for j in range(0, calib.shape[0], batch_size):
                for inp in capture_block_inputs(model, blocks[0], calib[j:j + batch_size].to(stream.device),
                                                batch_size):
                    inputs.append(inp)
            stream.captured()  # the embedding's work is done: a stream may write and free it now
        for i, block in enumerate(blocks):
            prefix = f"{path}.{i}."
            if stream is not None:
                stream.load(i, block)
            mods = {n: m for n, m in model.named_modules() if n in target_names and n.startswith(prefix)}
            if mods:
                compress_block(f"{path}.{i}", block, mods, inputs)
            if stream is None:
                inputs = [BlockInput(run_block(block, inp), inp.kwargs) for inp in inputs]
            else:
                outputs = stream.store()
                for inp in inputs:
                    outputs.append(BlockInput(run_block(block, inp), inp.kwargs))
                inputs.close()
                inputs = outputs
            if mods and after_block is not None:
                after_block(f"{path}.{i}", block, mods)
            if stream is not None:
                stream.release(i, block)
            yield i
        if stream is not None:
            inputs.close()
    finally:
        model.config.use_cache = use_cache


def each_block(model: nn.Module, target_names: set[str]) -> Iterator[tuple[str, nn.Module, dict[str, nn.Module]]]:
    """``(block_path, block, {full_name: module})`` for every block, without calibration data.

    On a streamed model each block is loaded before it is yielded and written and freed after.
    """
    path, blocks = transformer_blocks(model)
    stream = block_stream(model)
    for i, block in enumerate(blocks):
        if stream is not None:
            stream.load(i, block)
        prefix = f"{path}.{i}."
        yield f"{path}.{i}", block, {n: m for n, m in model.named_modules()
                                     if n in target_names and n.startswith(prefix)}
        if stream is not None:
            stream.release(i, block)
