"""Loading a saved folder without building the model twice: architecture on the meta device, tensors read in.

Every lmslim format loader goes through three steps:

1. :func:`empty_model`: the architecture from its config on the ``meta`` device (no memory), so a
   loader can swap in quantized or reshaped modules before any weight exists;
2. :func:`stored_tensors` / :func:`open_stored`: the folder's safetensors files, read one tensor at a
   time (memory-mapped), so a loader can hold one module's stored tensors at a time;
3. :func:`fill`: the stored tensors become the model's tensors (``assign``, no copy into a second,
   randomly initialised model); ties are restored, non-persistent buffers (rotary frequencies,
   position ids) are computed by transformers' own initialisation, and any parameter the files do
   not provide is an error, never a random value.

Peak memory on load is then the returned model plus one tensor, not a full fp32 model plus the
compressed one (see BENCHMARKS.md, ``benchmarks/load_bench.py``).

Example:
    >>> from transformers import AutoModelForCausalLM
    >>> from lmslim.assets.tiny import build_tiny
    >>> model, _ = build_tiny("tiny-llama")
    >>> empty = empty_model(AutoModelForCausalLM, model.config)
    >>> next(empty.parameters()).device.type
    'meta'
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from lmslim.core.errors import UserError


def empty_model(auto_class: Any, config: Any, edit: Callable[[nn.Module], None] | None = None) -> nn.Module:
    """The architecture of ``config`` on the meta device; ``edit`` (e.g. swapping modules) runs there too."""
    with torch.device("meta"):
        model = auto_class.from_config(config, dtype=torch.float32)
        if edit is not None:
            edit(model)
    return model


def stored_tensors(folder: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor in the folder's ``*.safetensors`` files, one at a time."""
    with open_stored(folder) as stored:
        for name in stored.names():
            yield name, stored.read(name)


class StoredTensors:
    """The tensors of a folder's safetensors files by name, each read only when asked for.

    A loader that turns stored tensors into other modules (packed codes into ``QuantLinear``) reads
    one module's tensors, builds the module and drops them, so the file is never held whole in memory
    beside the model being built.
    """

    def __init__(self, handles: dict[str, Any]):
        self._where = handles  # tensor name -> open safe_open handle

    def names(self) -> list[str]:
        return list(self._where)

    def read(self, name: str) -> torch.Tensor:
        return self._where[name].get_tensor(name)


@contextlib.contextmanager
def open_stored(folder: Path) -> Iterator[StoredTensors]:
    """Open every ``*.safetensors`` file of ``folder`` (memory-mapped) for the duration of a load."""
    from safetensors import safe_open

    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise UserError(f"{folder}: no .safetensors weights found; re-export the model")
    with contextlib.ExitStack() as stack:
        where = {}
        for f in files:
            handle = stack.enter_context(safe_open(str(f), framework="pt"))
            where.update(dict.fromkeys(handle.keys(), handle))
        yield StoredTensors(where)


def fill(model: nn.Module, state: dict[str, torch.Tensor], folder: Path, *, dtype: torch.dtype = torch.float32,
         retie: Callable[[nn.Module], None] | None = None) -> nn.Module:
    """Make the stored tensors the model's own, then restore ties and computed buffers.

    Args:
        state: full names -> tensors (what the files hold, already converted to the model's layout).
        dtype: floating-point parameters are cast to it (quantized modules' buffers keep their types).
        retie: re-creates parameter sharing that assigning tensors broke (e.g. cross-layer sharing).

    Raises:
        UserError: a stored tensor the model has no place for, or a parameter no file provides.
    """
    for name, t in state.items():
        if t.is_floating_point() and _is_parameter(model, name):
            state[name] = t.to(dtype)
    _, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if getattr(model.config, "tie_word_embeddings", False) and isinstance(model.get_input_embeddings(), nn.Embedding):
        model.tie_weights()  # (a quantized table and its head were tied when they were built)
    if retie is not None:
        retie(model)
    compute_buffers(model)
    missing = sorted(n for n, p in [*model.named_parameters(), *model.named_buffers()] if p.is_meta)
    if missing or unexpected:
        raise UserError(f"{folder}: stored weights do not match the recorded layout (missing {missing[:3]}, "
                        f"unexpected {sorted(unexpected)[:3]}); the folder is damaged or mixes models, re-export it")
    return model


def _is_parameter(model: nn.Module, name: str) -> bool:
    mod_name, _, leaf = name.rpartition(".")
    try:
        return leaf in model.get_submodule(mod_name)._parameters
    except AttributeError:
        return False


def compute_buffers(model: nn.Module) -> None:
    """Give every buffer still on meta (non-persistent ones: not in any file) real storage and its value.

    transformers computes these in its ``_init_weights`` (which it also runs on meta-built models),
    so only the modules that own such a buffer are initialised; everything loaded stays untouched.
    """
    owners = []
    for mod_name, mod in model.named_modules():
        meta = [k for k, b in mod._buffers.items() if b is not None and b.is_meta]
        for k in meta:
            mod._buffers[k] = torch.empty_like(mod._buffers[k], device="cpu")
        if meta:
            owners.append(mod)
    if not owners:
        return
    if not hasattr(model, "_init_weights"):
        raise UserError(f"{type(model).__name__}: cannot compute its non-persistent buffers outside transformers")
    with torch.no_grad():
        for mod in owners:
            model._init_weights(mod)
