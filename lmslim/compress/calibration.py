"""Sequential, layer-by-layer calibration for one-shot compression (GPTQ; later SparseGPT, Wanda).

The model's inputs to its first transformer block are captured once; then each block in turn:
statistics are collected from its matrices' inputs, the block is compressed, and the block is run
again — now compressed — to produce the inputs of the next block. Only one block's activations are
live at a time, so peak memory stays near the model size plus one block's working set, and every
block is calibrated on what the already-compressed blocks before it really produce.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch import nn

from lmslim.nn.blocks import transformer_blocks  # noqa: F401 - techniques find blocks through here too

class _Captured(Exception):
    pass


@dataclass
class BlockInput:
    hidden: torch.Tensor  # (B, T, D)
    kwargs: dict[str, Any]


@torch.no_grad()
def capture_block_inputs(model: nn.Module, first_block: nn.Module, calib: torch.Tensor, batch_size: int
                         ) -> list[BlockInput]:
    """Run the model up to ``first_block`` for each calibration batch and keep what enters it."""
    captured: list[BlockInput] = []

    def hook(_mod, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.append(BlockInput(hidden.detach(), {k: v for k, v in kwargs.items() if k != "hidden_states"}))
        raise _Captured

    handle = first_block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for i in range(0, calib.shape[0], batch_size):
            try:
                model(input_ids=calib[i:i + batch_size], use_cache=False)
            except _Captured:
                pass
    finally:
        handle.remove()
    return captured


def run_block(block: nn.Module, inp: BlockInput) -> torch.Tensor:
    out = block(inp.hidden, **inp.kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


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
               ) -> Iterator[int]:
    """Drive block-by-block calibration; ``compress_block`` compresses one block in place.

    Args:
        target_names: full dotted names of the modules to compress.
        compress_block: called as ``(block_path, block, {full_name: module}, inputs)``; it may run
            the block on the inputs to gather statistics, then must replace/modify the modules.

    Yields:
        The index of each block once it is done (for progress reporting).
    """
    path, blocks = transformer_blocks(model)
    use_cache = getattr(model.config, "use_cache", None)
    model.config.use_cache = False
    try:
        inputs = capture_block_inputs(model, blocks[0], calib, batch_size)
        for i, block in enumerate(blocks):
            prefix = f"{path}.{i}."
            mods = {n: m for n, m in model.named_modules() if n in target_names and n.startswith(prefix)}
            if mods:
                compress_block(f"{path}.{i}", block, mods, inputs)
            inputs = [BlockInput(run_block(block, inp), inp.kwargs) for inp in inputs]
            yield i
    finally:
        model.config.use_cache = use_cache
