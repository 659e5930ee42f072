"""Choosing which modules a technique acts on, by module-name pattern.

Patterns are ``fnmatch`` globs over dotted module names (``model.layers.*.mlp.*``); a pattern that
starts with ``re:`` is a regular expression instead. The matrix-multiply modules are ``nn.Linear``
and GPT-2's ``Conv1D`` (a Linear with a transposed weight), which ``torch.ao`` skips silently.
"""

from __future__ import annotations

import fnmatch
import re
from typing import Iterator

from torch import nn


def is_linear_like(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def matches(name: str, pattern: str) -> bool:
    if pattern.startswith("re:"):
        return re.search(pattern[3:], name) is not None
    return fnmatch.fnmatchcase(name, pattern)


def output_embedding_names(model: nn.Module) -> set[str]:
    """Names of the LM head module(s) (``lm_head`` for most HF causal LMs)."""
    names = set()
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    for name, mod in model.named_modules():
        if head is not None and mod is head:
            names.add(name)
    return names


def select_linears(model: nn.Module, targets: tuple[str, ...] = ("*",), ignore: tuple[str, ...] = (),
                   include_lm_head: bool = False) -> Iterator[tuple[str, nn.Module]]:
    """Linear-like modules whose name matches a target and no ignore pattern.

    The LM head is skipped unless ``include_lm_head`` (it is usually tied to the input embedding,
    and its quality matters more than any single block matrix).
    """
    heads = output_embedding_names(model)
    for name, mod in model.named_modules():
        if not is_linear_like(mod):
            continue
        if name in heads and not include_lm_head:
            continue
        if any(matches(name, p) for p in targets) and not any(matches(name, p) for p in ignore):
            yield name, mod


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
