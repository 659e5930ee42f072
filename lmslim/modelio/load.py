"""Loading any model lmslim accepts, in any format registered in ``lmslim.modelio.formats``.

Example:
    >>> from lmslim.modelio import load_model
    >>> lm = load_model("builtin:tiny-llama", task="clm")
    >>> lm.model.config.model_type
    'llama'
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lmslim.core.errors import UserError
from lmslim.modelio.formats import format_for_config
from lmslim.modelio.formats.lmslim_only import is_lmslim_only, read_config
from lmslim.modelio.spec import TASKS, ResolvedModel, architectures, check_task, resolve

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    resolved: ResolvedModel
    task: str
    info: dict = field(default_factory=dict)


def auto_class(task: str):
    import transformers as tf

    return {"clm": tf.AutoModelForCausalLM, "seq-cls": tf.AutoModelForSequenceClassification,
            "token-cls": tf.AutoModelForTokenClassification, "embed": tf.AutoModel}[task]


def load_model(spec: str, task: str = "clm", dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
               trust_remote_code: bool = False, new_head_labels: list[str] | None = None) -> LoadedModel:
    """Resolve ``spec`` and load model + tokenizer for ``task`` in eval mode.

    Args:
        new_head_labels: training only (seq-cls / token-cls): attach a NEW, randomly initialised
            classification head with these labels, even if the checkpoint has no such head (an
            explicit opt-in; evaluation keeps refusing models without a trained head).

    Raises:
        UserError: for any problem the user can fix (missing path, not a model, wrong task, offline hub id).
    """
    from transformers import AutoConfig, AutoTokenizer

    if task not in TASKS:
        raise UserError(f"unknown task {task!r}; choose one of: {', '.join(TASKS)}")
    resolved = resolve(spec)
    where = str(resolved.path) if resolved.path is not None else spec
    try:
        if resolved.path is not None and is_lmslim_only(resolved.path):
            config = read_config(resolved.path)  # its model_type is hidden from plain transformers
        else:
            config = AutoConfig.from_pretrained(where, trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001 - transformers raises many types for the same user problem
        raise _load_error(spec, resolved, e) from e
    if new_head_labels is None:
        check_task(config, task, spec)
    elif task not in ("seq-cls", "token-cls"):
        raise UserError(f"a new classification head needs task seq-cls or token-cls, not {task}")
    else:
        config.id2label = dict(enumerate(new_head_labels))  # also sets num_labels
        config.label2id = {name: i for i, name in enumerate(new_head_labels)}
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, trust_remote_code=trust_remote_code, config=config)
        fmt = format_for_config(config) if resolved.path is not None else None
        if fmt is not None:
            model = fmt.load(resolved.path, config, auto_class(task), dtype)
        else:
            model, info = auto_class(task).from_pretrained(
                where, dtype=dtype, trust_remote_code=trust_remote_code, output_loading_info=True,
                ignore_mismatched_sizes=True,  # mismatches are reported below by name, not as a generic error
                **({"config": config} if new_head_labels else {}))
            check_loading_info(model, info, spec, new_head=new_head_labels is not None)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001
        raise _load_error(spec, resolved, e) from e
    model.to(device)
    model.eval()
    if resolved.source == "hub":
        resolved.path = _hub_snapshot(spec)
    return LoadedModel(model=model, tokenizer=tokenizer, resolved=resolved, task=task)


def check_loading_info(model: Any, info: dict, spec: str, *, new_head: bool = False) -> None:
    """Refuse a model whose stored tensors do not fit its architecture.

    transformers initialises any parameter the checkpoint lacks (or holds in another shape) at random
    and only logs a report, so a folder whose ``config.json`` and weights disagree would otherwise be
    measured as a random model. Allowed differences: parts the loaded class does not use when it is
    another class than the one saved (a base model loaded from a checkpoint with an LM head, a
    token classifier loaded from an encoder with a pooler), and, with ``new_head``, the new
    classification head.

    Raises:
        UserError: naming the first few missing, unexpected and wrongly shaped tensors.
    """
    prefix = getattr(model, "base_model_prefix", "") or ""
    saved_as = architectures(getattr(model, "config", None))
    other_class = getattr(model, "base_model", model) is model or (saved_as and type(model).__name__ not in saved_as)

    def in_base(key: str) -> bool:
        return bool(prefix) and (key == prefix or key.startswith(prefix + "."))

    missing = sorted(k for k in info.get("missing_keys") or () if not (new_head and not in_base(k)))
    unexpected = sorted(k for k in info.get("unexpected_keys") or () if not (other_class and not in_base(k)))
    mismatched = [f"{k} (file {tuple(a)}, model {tuple(b)})" for k, a, b in
                  sorted(info.get("mismatched_keys") or (), key=lambda m: m[0])]
    problems = [(f"{len(v)} missing", v) for v in (missing,) if v]
    problems += [(f"{len(v)} unexpected", v) for v in (unexpected,) if v]
    problems += [(f"{len(v)} wrongly shaped", v) for v in (mismatched,) if v]
    if problems:
        detail = "; ".join(f"{label}: {', '.join(v[:3])}{' …' if len(v) > 3 else ''}" for label, v in problems)
        raise UserError(f"{spec}: its weights do not fit its config.json ({detail}); the folder mixes files of "
                        "different models or was saved incompletely; re-export it")


def _hub_snapshot(spec: str) -> Path | None:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(spec, local_files_only=True))
    except Exception:  # noqa: BLE001 - only used for size and hash reporting
        return None


def _load_error(spec: str, resolved: ResolvedModel, e: Exception) -> UserError:
    first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
    if resolved.source == "hub":
        return UserError(f"could not load {spec!r} from the Hugging Face hub ({first}); offline? pass a local "
                         "folder, a .gguf file or builtin:<name>")
    return UserError(f"could not load model {spec}: {type(e).__name__}: {first}")
