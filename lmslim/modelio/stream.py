"""Streaming model I/O: read one group of tensors at a time from safetensors shards, write shards as they come.

:class:`ShardReader` maps every tensor name of a folder's ``*.safetensors`` files (through
``model.safetensors.index.json`` when there is one, else each file's header) to its file, and reads
only the tensors a caller asks for (``load(prefix)``: e.g. one decoder block). A file is opened
(memory-mapped by safetensors) for the read and closed after it, so its pages leave the process's
resident set with the block: a 6 GB model is never resident as a whole. A shard that is damaged or
truncated is found when its turn comes and raises a one-line ``UserError``.

:class:`ShardWriter` writes each batch of tensors (one compressed block) as its own shard and, on
``finish``, renames the shards ``model-0000i-of-0000N.safetensors`` and writes
``model.safetensors.index.json`` — the sharded layout transformers and lmslim's loaders read. It
writes into a folder the caller publishes atomically (``lmslim.core.io.atomic_dir``), so a run that
fails leaves no partial output.

Example:
    >>> import tempfile, torch
    >>> from pathlib import Path
    >>> d = Path(tempfile.mkdtemp())
    >>> w = ShardWriter(d)
    >>> w.write({"a.weight": torch.ones(2)}); w.write({"b.weight": torch.zeros(3)})
    >>> w.finish()
    2
    >>> sorted(ShardReader(d).load("b."))
    ['b.weight']
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from lmslim.core.errors import UserError

log = logging.getLogger(__name__)

INDEX = "model.safetensors.index.json"


def _damaged(path: Path, e: Exception) -> UserError:
    first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
    return UserError(f"{path}: damaged or truncated safetensors file ({first}); re-download or re-export the model")


class ShardReader:
    """Tensor name -> shard file for a folder of safetensors files; reads tensors by name prefix."""

    def __init__(self, folder: str | Path):
        from safetensors import safe_open

        self.folder = Path(folder)
        index = self.folder / INDEX
        self.where: dict[str, Path] = {}
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError) as e:
                raise UserError(f"{index}: not a safetensors index ({e}); re-export the model") from None
            self.where = {name: self.folder / f for name, f in weight_map.items()}
            missing = sorted({p for p in self.where.values() if not p.is_file()})
            if missing:
                raise UserError(f"{self.folder}: {missing[0].name} named by {INDEX} is missing; re-download the model")
        else:
            files = sorted(self.folder.glob("*.safetensors"))
            if not files:
                raise UserError(f"{self.folder}: no .safetensors weights found; streaming reads safetensors folders")
            for f in files:  # only headers are read here
                try:
                    with safe_open(str(f), framework="pt") as h:
                        self.where.update({name: f for name in h.keys()})
                except Exception as e:  # noqa: BLE001 - safetensors raises its own error type
                    raise _damaged(f, e) from e

    def names(self) -> list[str]:
        return list(self.where)

    def nbytes(self, prefix: str = "") -> int:
        """Bytes the tensors under ``prefix`` take once read as float32 (what a block costs in memory)."""
        from safetensors import safe_open

        total = 0
        for f, names in self._by_file(prefix).items():
            try:
                with safe_open(str(f), framework="pt") as h:
                    for n in names:
                        sl = h.get_slice(n)
                        numel = 1
                        for d in sl.get_shape():
                            numel *= d
                        total += numel * 4
            except Exception as e:  # noqa: BLE001
                raise _damaged(f, e) from e
        return total

    def _by_file(self, prefix: str) -> dict[Path, list[str]]:
        out: dict[Path, list[str]] = {}
        for name, f in self.where.items():
            if name.startswith(prefix):
                out.setdefault(f, []).append(name)
        return out

    def load(self, prefix: str = "", exclude: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
        """Every tensor whose name starts with ``prefix`` (and with none of ``exclude``), read now."""
        from safetensors import safe_open

        out = {}
        for f, names in self._by_file(prefix).items():
            try:
                with safe_open(str(f), framework="pt") as h:  # mmap: closed (unmapped) right after the read
                    for n in names:
                        if not any(n.startswith(e) for e in exclude):
                            out[n] = h.get_tensor(n)
            except Exception as e:  # noqa: BLE001
                raise _damaged(f, e) from e
        return out


class ShardWriter:
    """Writes each ``write(tensors)`` call as one shard; ``finish`` names them and writes the index."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.shards: list[tuple[Path, list[str]]] = []
        self.total = 0

    def write(self, tensors: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        if not tensors:
            return
        path = self.folder / f".shard-{len(self.shards):05d}.safetensors"
        state = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        save_file(state, str(path), metadata={"format": "pt"})
        self.total += sum(v.numel() * v.element_size() for v in state.values())
        self.shards.append((path, list(state)))

    def finish(self) -> int:
        """Rename the shards to transformers' names, write the index; returns the shard count."""
        n = len(self.shards)
        weight_map = {}
        for i, (path, names) in enumerate(self.shards):
            final = self.folder / f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            path.rename(final)
            weight_map.update({name: final.name for name in names})
        index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(weight_map.items()))}
        (self.folder / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        return n
