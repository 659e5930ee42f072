"""Task-specific pieces of training: loading a model to train, and evaluating it during training.

- ``clm``: continued pretraining of a causal LM, or training from scratch from ``config:FILE.json``
  (a Hugging Face config; tokenizer from ``tokenizer=`` or lmslim's lossless byte-level one).
- ``seq-cls`` / ``token-cls``: a checkpoint that already has a head keeps it (data labels must be
  among its labels); any other checkpoint gets a new head with the data's labels.

Evaluation metrics per task (``eval_loss`` is the token/row-weighted mean loss):
clm ``eval_loss``, ``perplexity``; seq-cls ``eval_loss``, ``accuracy``, ``macro_f1``;
token-cls ``eval_loss``, ``f1``, ``precision``, ``recall`` (entity-level micro averages from
:func:`lmslim.measure.eval.token_classify`).

Example:
    >>> from lmslim.train.tasks import metric_names
    >>> metric_names("token-cls")
    ['eval_loss', 'f1', 'precision', 'recall']
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from lmslim.core.errors import UserError
from lmslim.modelio import LoadedModel, ResolvedModel, load_model, resolve
from lmslim.modelio.spec import architectures
from lmslim.core.runtime import Runtime
from lmslim.data.spec import Data
from lmslim.train.config import TrainConfig
from lmslim.train.data import Batcher, TokenizedSet, label_names_for

_METRICS = {"clm": ["eval_loss", "perplexity"], "seq-cls": ["eval_loss", "accuracy", "macro_f1"],
            "token-cls": ["eval_loss", "f1", "precision", "recall"]}
_HEADS = {"seq-cls": "ForSequenceClassification", "token-cls": "ForTokenClassification"}


def metric_names(task: str) -> list[str]:
    return list(_METRICS[task])


def load_for_training(spec: str, task: str, data: Data, runtime: Runtime, tokenizer: str | None = None,
                      trust_remote_code: bool = False) -> LoadedModel:
    """Load (or build) the model to train for ``task`` on ``data``, in fp32 on ``runtime.device``.

    Raises:
        UserError: an unusable model spec, or data labels that the model's trained head does not know.
    """
    if task not in _METRICS:
        raise UserError(f"cannot train task {task!r}; choose clm, seq-cls or token-cls")
    if spec.startswith("config:"):
        return _from_config(spec, task, data, runtime, tokenizer)
    if task == "clm":
        lm = load_model(spec, "clm", torch.float32, runtime.device, trust_remote_code)
    else:
        labels = label_names_for(data, task)
        config = _peek_config(resolve(spec))
        archs = architectures(config) if config is not None else []
        if any(a.endswith(_HEADS[task]) for a in archs):
            lm = load_model(spec, task, torch.float32, runtime.device, trust_remote_code)
            known = [str(v) for _, v in sorted(lm.model.config.id2label.items())]
            unknown = sorted(set(labels) - set(known))
            if unknown:
                raise UserError(f"labels {unknown[:5]} in {data.spec} are not among the labels of {spec}'s trained "
                                f"head {known}; use data with those labels or start from a model without a head")
        else:
            lm = load_model(spec, task, torch.float32, runtime.device, trust_remote_code, new_head_labels=labels)
    _ensure_pad(lm)
    return lm


def _peek_config(resolved: ResolvedModel) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(resolved.path)) if resolved.path is not None else None
    except Exception:  # noqa: BLE001 - load_model reports the real problem
        return None


def _ensure_pad(lm: LoadedModel) -> None:
    tok = lm.tokenizer
    if tok.pad_token_id is None and tok.eos_token_id is not None:
        tok.pad_token = tok.eos_token
    if getattr(lm.model.config, "pad_token_id", None) is None and tok.pad_token_id is not None:
        # Sequence classifiers on decoder models find each row's last token through pad_token_id.
        lm.model.config.pad_token_id = tok.pad_token_id


def _from_config(spec: str, task: str, data: Data, runtime: Runtime, tokenizer: str | None) -> LoadedModel:
    import transformers as tf

    from lmslim.assets.tiny import byte_tokenizer
    from lmslim.modelio.load import auto_class

    path = Path(spec.removeprefix("config:")).expanduser()
    if not path.is_file():
        raise UserError(f"model config {path} does not exist; give config:FILE.json (a Hugging Face config)")
    try:
        raw = json.loads(path.read_text())
        model_type = raw.pop("model_type")
        config = tf.AutoConfig.for_model(model_type, **raw)
    except (ValueError, KeyError) as e:
        raise UserError(f"{path} is not a Hugging Face model config with a model_type ({e})") from e
    tok = load_model(tokenizer, "clm").tokenizer if tokenizer else byte_tokenizer("causal")
    if getattr(config, "vocab_size", len(tok)) < len(tok):
        raise UserError(f"{path} has vocab_size {config.vocab_size} but the tokenizer has {len(tok)} tokens; "
                        f"set vocab_size >= {len(tok)}")
    if task != "clm":
        labels = label_names_for(data, task)
        config.id2label = dict(enumerate(labels))
        config.label2id = {n: i for i, n in enumerate(labels)}
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(config, name, None) is None and getattr(tok, name, None) is not None:
            setattr(config, name, getattr(tok, name))
    torch.manual_seed(0)  # a from-scratch model is reproducible
    model = auto_class(task).from_config(config).to(runtime.device)
    resolved = ResolvedModel(spec, "config", None)
    lm = LoadedModel(model=model, tokenizer=tok, resolved=resolved, task=task)
    _ensure_pad(lm)
    return lm


@torch.no_grad()
def evaluate(model, data: TokenizedSet, runtime: Runtime, config: TrainConfig) -> dict[str, float]:
    """Validation metrics of ``model`` on ``data`` (see the module docstring for the names)."""
    batcher = Batcher(data, config.batch, seed=0, shuffle=False)  # all ranks see all eval data
    total, units = 0.0, 0
    correct, preds, golds = 0, [], []
    for i, ids in enumerate(batcher.epoch(0)):
        if config.eval.max_batches and i >= config.eval.max_batches:
            break
        b = batcher.collate(ids).to(runtime.device)
        with runtime.autocast():
            outputs = model(**b)
        total += float(outputs.loss) * b.units
        units += b.units
        if data.task == "seq-cls":
            p = outputs.logits.argmax(-1)
            preds.extend(p.tolist())
            golds.extend(b["labels"].tolist())
            correct += int((p == b["labels"]).sum())
    out = {"eval_loss": total / max(units, 1)}
    if data.task == "clm":
        out["perplexity"] = math.exp(min(out["eval_loss"], 50.0))
    elif data.task == "seq-cls":
        from sklearn.metrics import f1_score

        out["accuracy"] = correct / max(len(golds), 1)
        out["macro_f1"] = float(f1_score(golds, preds, average="macro", zero_division=0))
    elif data.task == "token-cls" and data.source is not None:
        from lmslim.measure.eval import token_classify

        report = token_classify(model, data.tokenizer, data.source, batch_size=config.batch.batch_size,
                                device=runtime.device)
        micro = report.get("micro") or {}
        out.update(f1=micro.get("f1-score", 0.0), precision=micro.get("precision", 0.0),
                   recall=micro.get("recall", 0.0))
    return out
