"""The format registry: every way lmslim writes a model folder, and how each is read back.

A format registers four things in one place (its own module):

- ``claims(model)``: whether an in-memory model must be written in this format (e.g. it holds
  quantized modules); the first registered format that claims a model saves it;
- ``save(model, tokenizer, folder, dense)``: write into an existing, empty ``folder`` (callers wrap
  it in ``lmslim.core.io.atomic_dir`` so a folder is published only when complete); ``dense``
  asks for zeros stored as ordinary dense tensors (no sparse compression), for tools that need that;
- ``detects(config)``: whether a saved folder, judged by its ``config.json``, is in this format;
- ``load(folder, config, auto_class, dtype)``: rebuild the model.

A model no format claims is a plain transformers model (``save_pretrained``); a folder no format
detects is read by ``from_pretrained``. Measurement and training never ask which format a model
came from: they load through ``lmslim.modelio.load_model``.

Example:
    >>> from lmslim.modelio.formats import registered_formats
    >>> [f.name for f in registered_formats()][:2]
    ['compressed-tensors', 'lmslim-quantized']
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn


@dataclass(frozen=True)
class ModelFormat:
    name: str
    claims: Callable[[nn.Module], bool]
    save: Callable[[nn.Module, Any, Path, bool], None]
    detects: Callable[[Any], bool]
    load: Callable[[Path, Any, Any, torch.dtype], nn.Module]


class _FormatTable:
    """Formats in registration order (the order decides which format claims a model first)."""

    def __init__(self) -> None:
        self._formats: list[ModelFormat] = []

    def add(self, fmt: ModelFormat) -> ModelFormat:
        if any(f.name == fmt.name for f in self._formats):
            raise ValueError(f"model format {fmt.name!r} registered twice")
        self._formats.append(fmt)
        return fmt

    def all(self) -> tuple[ModelFormat, ...]:
        _ensure_builtin_formats()
        # Built-in formats in a fixed order whatever imported their modules first (a test or tool
        # importing lmslim_quantized directly must not let it claim models before compressed-tensors).
        rank = {name: i for i, name in enumerate(_BUILTIN_ORDER)}
        return tuple(sorted(self._formats, key=lambda f: rank.get(f.name, len(rank))))


# compressed-tensors first: a quantized model it can express is written in that standard layout;
# the lmslim_* formats take what no standard layout holds (their folders refuse plain transformers).
_BUILTIN_ORDER = ("compressed-tensors", "lmslim-quantized", "lmslim-shared", "lmslim-sparse")
_TABLE = _FormatTable()
register_format = _TABLE.add


def registered_formats() -> tuple[ModelFormat, ...]:
    return _TABLE.all()


def _ensure_builtin_formats() -> None:
    # Imported on first use (not at package import) so each format module can import this one.
    from lmslim.modelio.formats import compressed_tensors  # noqa: F401
    from lmslim.modelio.formats import lmslim_quantized, lmslim_shared, lmslim_sparse  # noqa: F401


def format_for_config(config: Any) -> ModelFormat | None:
    """The registered format a saved folder's config belongs to, or None for a plain transformers folder."""
    return next((f for f in registered_formats() if f.detects(config)), None)


def format_for_model(model: nn.Module) -> ModelFormat | None:
    return next((f for f in registered_formats() if f.claims(model)), None)


def save_model(model: nn.Module, tokenizer: Any, folder: Path, *, dense: bool = False) -> str:
    """Write any model lmslim produces into an empty ``folder`` in the format ``load_model`` reads.

    Args:
        dense: store pruned zeros densely instead of sparse-compressed (same numbers, larger file).

    Returns:
        The format's name (``hf`` for a plain transformers folder).
    """
    folder = Path(folder)
    fmt = format_for_model(model)
    if fmt is not None:
        fmt.save(model, tokenizer, folder, dense)
        return fmt.name
    model.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return "hf"


def unique_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """State dict with tied tensors stored once (the first name wins), contiguous for safetensors."""
    seen: dict[tuple[int, int], str] = {}
    out = {}
    for name, t in model.state_dict().items():
        key = (t.data_ptr(), t.numel())
        if t.numel() and key in seen:
            continue
        seen[key] = name
        out[name] = t.detach().contiguous().cpu()
    return out


def save_config_and_tokenizer(model: nn.Module, tokenizer: Any, folder: Path) -> None:
    """config.json, generation_config.json and the tokenizer files, as transformers writes them."""
    model.config.save_pretrained(folder)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
