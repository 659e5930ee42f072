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
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from lmslim.core.errors import UserError

log = logging.getLogger(__name__)

INDEX = "model.safetensors.index.json"


# ------------------------------------------------------------------ block inputs (shared by calibration and eval)

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


class ActivationStore:
    """A block's calibration inputs: kept in memory up to ``limit_bytes``, written to ``folder`` beyond.

    Only the hidden states (B, T, D) are spilled; the per-batch keyword arguments (rotary cos/sin,
    masks, positions) are a fraction of them and stay in memory. Spilled tensors are written with
    ``torch.save`` and read back with ``weights_only=True``, exactly (same bits).
    """

    def __init__(self, limit_bytes: float, folder: Path | None):
        self.limit, self.folder = limit_bytes, folder
        self.held = 0
        self.spilled = 0
        self._items: list[tuple[torch.Tensor | Path, dict[str, Any], torch.device]] = []
        self._tag = uuid.uuid4().hex[:8]

    def append(self, inp: BlockInput) -> None:
        size = inp.hidden.numel() * inp.hidden.element_size()
        if self.held + size <= self.limit or self.folder is None:
            self.held += size
            self._items.append((inp.hidden, inp.kwargs, inp.hidden.device))
            return
        path = self.folder / f"act-{self._tag}-{len(self._items)}.pt"
        torch.save(inp.hidden.cpu(), path)
        self.spilled += size
        self._items.append((path, inp.kwargs, inp.hidden.device))

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, i: int) -> BlockInput:
        hidden, kwargs, device = self._items[i]
        if isinstance(hidden, Path):
            hidden = torch.load(hidden, weights_only=True).to(device)
        return BlockInput(hidden, kwargs)

    def __iter__(self) -> Iterator[BlockInput]:
        return (self[i] for i in range(len(self)))

    def close(self) -> None:
        for hidden, _, _ in self._items:
            if isinstance(hidden, Path):
                hidden.unlink(missing_ok=True)
        self._items.clear()


def run_block(block: nn.Module, inp: BlockInput) -> torch.Tensor:
    out = block(inp.hidden, **inp.kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out



# ------------------------------------------------------------------ shards

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

    def evict(self, prefix: str = "", exclude: tuple[str, ...] = ()) -> None:
        """Drop the byte ranges of the tensors under ``prefix`` (none of ``exclude``) from the page cache.

        Pages read through the mmap are charged to the reading process's memory cgroup; they are clean
        and reclaimable, but a cgroup near its limit reclaims them only under pressure, slowly, while
        the block loop needs the room. ``POSIX_FADV_DONTNEED`` drops them as soon as a block is done
        (only ranges no longer mapped go; other blocks' pages in the same shard stay).
        """
        if not hasattr(os, "posix_fadvise"):
            return
        for f, names in self._by_file(prefix).items():
            try:
                with open(f, "rb") as fh:
                    n = int.from_bytes(fh.read(8), "little")
                    header = json.loads(fh.read(n))
                    start = 8 + n  # tensor data offsets count from the end of the header
                    for name in (n for n in names if not any(n.startswith(e) for e in exclude)):
                        lo, hi = header[name]["data_offsets"]
                        os.posix_fadvise(fh.fileno(), start + lo, hi - lo, os.POSIX_FADV_DONTNEED)
            except (OSError, ValueError, KeyError) as e:  # advisory only: a read error surfaces on load
                log.debug("page-cache eviction of %s skipped: %s", f, e)


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
        # Written pages are charged to the process's memory (cgroup) until written back: flush the
        # shard and drop it from the page cache, so output larger than memory does not count against it.
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
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


# ------------------------------------------------------------------ a model whose blocks stay on meta until used

@dataclass
class StreamedModel:
    """A model built on meta with everything outside its blocks loaded; blocks are loaded one at a time.

    ``quant`` holds the lmslim compressed-tensors record's modules (``{name: spec}``) for a quantized
    folder (their tensors become ``QuantLinear`` modules when the block is loaded), empty otherwise.
    """

    model: nn.Module
    tokenizer: Any
    reader: ShardReader
    path: str  # dotted path of the block list
    dtype: torch.dtype
    device: torch.device
    quant: dict[str, dict]

    def _state(self, tensors: dict[str, torch.Tensor], strip: str) -> dict[str, torch.Tensor]:
        """Stored tensors -> module tensors: quantized modules become QuantLinear (set on the model)."""
        from lmslim.core.targeting import set_submodule

        per: dict[str, dict[str, torch.Tensor]] = {}
        state = {}
        for key, t in tensors.items():
            owner, _, leaf = key.rpartition(".")
            if owner in self.quant:
                per.setdefault(owner, {})[leaf] = t
            else:
                state[key[len(strip):]] = t.to(self.dtype) if t.is_floating_point() else t
        for name, t in per.items():
            set_submodule(self.model, name, _quant_linear(name, self.quant[name], t, self.reader.folder))
        return state

    def load_block(self, index: int) -> nn.Module:
        """Read block ``index`` from the shards into the model, on the device; returns the block."""
        from lmslim.nn.blocks import transformer_blocks

        prefix = f"{self.path}.{index}."
        state = self._state(self.reader.load(prefix), prefix)
        block = transformer_blocks(self.model)[1][index]
        _, unexpected = block.load_state_dict(state, strict=False, assign=True)
        missing = [n for n, t in [*block.named_parameters(), *block.named_buffers()] if t.is_meta]
        if missing or unexpected:
            raise UserError(f"{self.reader.folder}: block {index}'s stored weights do not match the config "
                            f"(missing {missing[:3]}, unexpected {sorted(unexpected)[:3]}); re-export the model")
        return block.to(self.device)

    def load_outside(self) -> None:
        """Embedding, final norm, LM head and computed buffers: everything but the blocks."""
        from lmslim.modelio.formats.meta_load import compute_buffers

        state = self._state(self.reader.load("", exclude=(self.path + ".",)), "")
        _, unexpected = self.model.load_state_dict(state, strict=False, assign=True)
        if getattr(self.model.config, "tie_word_embeddings", False):
            self.model.tie_weights()
        compute_buffers(self.model)
        inside = self.path + "."
        missing = [n for n, t in [*self.model.named_parameters(), *self.model.named_buffers()]
                   if t.is_meta and not n.startswith(inside)]
        if missing or unexpected:
            raise UserError(f"{self.reader.folder}: stored weights do not match the config (missing {missing[:3]}, "
                            f"unexpected {sorted(unexpected)[:3]}); re-export the model")
        for name, mod in self.model.named_modules():
            if not name.startswith(inside) and name != self.path:
                for t in [*mod._parameters.values(), *mod._buffers.values()]:
                    if t is not None:
                        t.data = t.data.to(self.device)


def _quant_linear(name: str, spec: dict, tensors: dict[str, torch.Tensor], folder: Path) -> nn.Module:
    """One stored compressed-tensors module as lmslim's QuantLinear (the format module's own reader)."""
    from lmslim.modelio.formats import compressed_tensors as ct
    from lmslim.nn.quant_linear import QuantLinear

    grid = ct.read_grid(name, spec, tensors, folder)
    return QuantLinear.from_packed(**grid, bias=tensors.get("bias"), kernel=spec["kernel"])


def open_streamed(folder: str | Path, *, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                  quantized_ok: bool = True) -> StreamedModel:
    """A causal LM folder (plain transformers, or lmslim's compressed-tensors) with only its non-block parts loaded."""
    import copy

    from transformers import AutoConfig, AutoTokenizer

    from lmslim.modelio.formats import format_for_config
    from lmslim.modelio.formats.meta_load import empty_model
    from lmslim.modelio.load import auto_class
    from lmslim.nn.blocks import transformer_blocks

    folder = Path(folder)
    try:
        config = AutoConfig.from_pretrained(folder)
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except Exception as e:  # noqa: BLE001 - transformers raises many types for the same user problem
        raise UserError(f"{folder}: not a transformers model folder ({str(e).splitlines()[0][:200]})") from e
    fmt = format_for_config(config)
    quant: dict[str, dict] = {}
    if fmt is not None:
        record = getattr(config, "lmslim_quantization", None) or {}
        if not quantized_ok or fmt.name != "compressed-tensors" or record.get("format") != 3:
            raise UserError(f"{folder}: a {fmt.name} folder cannot be streamed"
                            + (" (streaming reads full-precision transformers folders)" if not quantized_ok else
                               "; streaming reads transformers folders and lmslim's compressed-tensors folders"))
        if record.get("embeddings"):
            raise UserError(f"{folder}: quantized embeddings cannot be streamed yet; evaluate it without --stream")
        quant = record["modules"]
        config = copy.deepcopy(config)
        del config.quantization_config  # the blocks get lmslim QuantLinear modules (as load_compressed does)
        config.lmslim_quantization = {**record, "format": 2}
    reader = ShardReader(folder)
    model = empty_model(auto_class("clm"), config)
    model.eval()
    path, _ = transformer_blocks(model)
    sm = StreamedModel(model, tokenizer, reader, path, dtype, torch.device(device), quant)
    sm.load_outside()
    return sm
