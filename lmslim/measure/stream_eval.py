"""Perplexity of a model that does not fit in memory: block-by-block forward over all evaluation windows.

``lmslim eval --stream``. The windows, the scoring and the result are those of
:func:`lmslim.measure.eval.perplexity`, which runs unchanged twice against stand-in models:

1. a *recorder* that notes each window's token ids and answers with zero logits (no model runs);
2. the real forward, reordered: every window enters the first block (embedding only), then block i
   is read from the shards (``lmslim.modelio.stream.StreamedModel``), run on every window's hidden
   states, and freed before block i+1 is read. Hidden states between blocks live in an
   ``ActivationStore`` (in memory up to ``max_activation_mb``, on disk beyond);
3. a *replayer* that answers window j with the model's own final norm and LM head applied to window
   j's last hidden state (the blocks are swapped for pass-throughs that hand it over), so
   ``perplexity`` scores the same logits the in-memory model gives, in the same order.

Peak memory is one block, the non-block weights, one window's logits and the bounded activations.

Example:
    >>> import tempfile
    >>> from pathlib import Path
    >>> from lmslim.assets.tiny import build_tiny
    >>> model, tok = build_tiny("tiny-llama")
    >>> d = Path(tempfile.mkdtemp()); model.save_pretrained(d); _ = tok.save_pretrained(d)
    >>> r = stream_perplexity(d, ["some text to score, twice over: some text to score"], window=8, stride=4)
    >>> r["tokens_scored"] > 0
    True
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from lmslim.core.errors import UserError
from lmslim.core.progress import track
from lmslim.measure.eval import perplexity
from lmslim.modelio.stream import ActivationStore, BlockInput, capture_block_inputs, open_streamed, run_block
from lmslim.nn.blocks import transformer_blocks

log = logging.getLogger(__name__)


class _Recorder:
    """Stands in for the model in pass 1: keeps every window's ids, returns zero logits (a broadcast view)."""

    def __init__(self, config: Any, vocab: int):
        self.config, self.vocab, self.windows = config, vocab, []

    def __call__(self, input_ids: torch.Tensor, **_kw) -> Any:
        self.windows.append(input_ids)
        return SimpleNamespace(logits=torch.zeros(1).expand(*input_ids.shape, self.vocab))


class _Handover(nn.Module):
    """Replaces a block in pass 3: the first returns the stored final hidden state, the others pass it on."""

    def __init__(self, first: bool, box: dict):
        super().__init__()
        self.first, self.box = first, box

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return self.box["hidden"] if self.first else hidden_states


@torch.no_grad()
def stream_perplexity(folder: str | Path, documents: list[str], window: int = 512, stride: int = 256,
                      max_tokens: int | None = None, device: torch.device | str = "cpu",
                      max_activation_mb: float = 1024.0) -> dict[str, Any]:
    """``perplexity`` of the causal LM in ``folder`` with one decoder block in memory at a time.

    Args:
        folder: a transformers folder or an lmslim compressed-tensors folder (safetensors, sharded or not).
        max_activation_mb: hidden states of all windows kept in memory; beyond it they go to disk.

    Returns:
        What :func:`lmslim.measure.eval.perplexity` returns, plus ``streaming`` (blocks, spilled MB).
    """
    if not max_activation_mb > 0:
        raise UserError(f"max_activation_mb must be a positive number of MB, got {max_activation_mb}")
    sm = open_streamed(folder, device=device)
    model = sm.model
    vocab = model.get_output_embeddings().weight.shape[0] if hasattr(model.get_output_embeddings(), "weight") \
        else model.config.vocab_size
    recorder = _Recorder(model.config, vocab)
    perplexity(recorder, sm.tokenizer, documents, window=window, stride=stride, max_tokens=max_tokens, device=device)
    path, blocks = transformer_blocks(model)
    use_cache = getattr(model.config, "use_cache", None)
    model.config.use_cache = False
    with tempfile.TemporaryDirectory(prefix="lmslim-eval-spill-") as spill:
        limit = max_activation_mb * 1e6 / 2  # a block's inputs and outputs are alive together
        hidden = ActivationStore(limit, Path(spill))
        for ids in recorder.windows:
            for inp in capture_block_inputs(model, blocks[0], ids, ids.shape[0]):
                hidden.append(inp)
        spilled = 0
        for i in track(range(len(blocks)), "blocks", total=len(blocks)):
            block = sm.load_block(i)
            outputs = ActivationStore(limit, Path(spill))
            for inp in hidden:
                outputs.append(BlockInput(run_block(block, inp), inp.kwargs))
            spilled = max(spilled, hidden.spilled + outputs.spilled)
            hidden.close()
            hidden = outputs
            block.to("meta")
        box: dict[str, torch.Tensor] = {}
        for j in range(len(blocks)):
            blocks[j] = _Handover(j == 0, box)
        finals = iter(hidden)

        def replay(input_ids: torch.Tensor, **_kw) -> Any:
            box["hidden"] = next(finals).hidden
            return model(input_ids=input_ids)

        replay.config = model.config  # perplexity caps the window by the model's positions
        result = perplexity(replay, sm.tokenizer, documents, window=window, stride=stride, max_tokens=max_tokens,
                            device=device)
        hidden.close()
    model.config.use_cache = use_cache
    result["streaming"] = {"blocks": len(blocks), "windows": len(recorder.windows), "spilled_mb": spilled / 1e6,
                           "max_activation_mb": max_activation_mb, "path": path,
                           "architecture": type(model).__name__}
    return result
