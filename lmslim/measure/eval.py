"""Quality measurement: perplexity, classification accuracy/F1, entity-level F1, embedding similarity.

Perplexity method (``perplexity``):
    The text stream and the way every window starts are those of :mod:`lmslim.data.calib`: with a
    tokenizer that adds nothing, the documents are joined with blank lines and tokenized once; with
    one that puts a BOS before a text, each document is encoded as the tokenizer encodes a text on
    its own (``BOS doc``) and these are concatenated, and every forward pass starts with BOS (a
    window that does not begin at a document start has its first token replaced by BOS). BOS and
    other special tokens are context only, never scored; nor is the stream's first token.

    Forward passes are ``window`` tokens long and sit on a fixed grid: pass j covers stream
    positions ``[e_j - window, e_j)`` with ``e_j = window + j * step``, ``step = min(stride,
    window - 1 - len(prefix))``, and scores the text tokens in ``[e_(j-1), e_j)``. So every scored
    token is scored exactly once, with at least ``window - step - len(prefix)`` tokens of its real
    context (plus BOS), and the context of a token does not depend on where the stream ends: the
    NLL of the first N tokens is the same whatever ``max_tokens`` is (the last pass is cut at the
    end of the stream; a causal model's outputs before the cut do not change). Perplexity is
    ``exp(sum of token NLL / tokens_scored)``, accumulated in float64. Deterministic. How the
    windows were built is returned under ``windows``.

Example:
    >>> from lmslim.modelio import load_model
    >>> from lmslim.measure.eval import perplexity
    >>> lm = load_model("builtin:tiny-llama")
    >>> r = perplexity(lm.model, lm.tokenizer, ["some text to score"], window=8, stride=4)
    >>> r["tokens_scored"], r["windows"]["bos"]
    (17, False)
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from lmslim.core.errors import UserError
from lmslim.core.progress import track
from lmslim.data.calib import TokenStream, document_stream, frame_window
from lmslim.data.spec import Data


def _max_positions(model) -> int | None:
    cfg = model.config
    for key in ("max_position_embeddings", "n_positions", "n_ctx"):
        if getattr(cfg, key, None):
            return int(getattr(cfg, key))
    return None


def encode_stream(tokenizer, documents: list[str], max_tokens: int | None = None) -> TokenStream:
    """The documents' token stream as perplexity scores it (see the module docstring), cut to ``max_tokens``."""
    return document_stream(tokenizer, documents).truncated(max_tokens)


def window_step(window: int, stride: int, prefix_len: int) -> int:
    """How far consecutive passes advance: each pass's first scored token keeps >= 1 real context token."""
    return min(stride, window - 1 - prefix_len)


@torch.no_grad()
def token_nll(model, stream: TokenStream, window: int, step: int, device: torch.device | str = "cpu"
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """NLL (float64, NaN where not scored) of every stream position under the grid of windows, and
    which positions are scored (text tokens after the first; a model that outputs NaN shows as NaN)."""
    n = len(stream)
    prefix = stream.framing.prefix
    ids = torch.tensor(stream.ids, dtype=torch.long, device=device)
    scored = torch.tensor(stream.text, dtype=torch.bool, device=device)
    if n:
        scored[0] = False  # nothing before it to predict it from
    out = torch.full((n,), float("nan"), dtype=torch.float64, device=device)
    ends = list(range(window, n + step, step)) if n > window else [window]
    start = 0  # first position not yet scored
    for grid_end in track(ends, "perplexity", total=len(ends)):
        begin, end = max(0, grid_end - window), min(grid_end, n)
        chunk = frame_window(ids[begin:end], prefix).unsqueeze(0)  # (1, T)
        pos = torch.arange(start, end, device=device)
        pos = pos[scored[start:end]]
        if pos.numel():
            logits = model(input_ids=chunk).logits[0]  # (T, V): row i predicts position begin + i + 1
            logp = F.log_softmax(logits[pos - begin - 1].float(), dim=-1)  # (S, V)
            out[pos] = -logp.gather(1, ids[pos].unsqueeze(1)).squeeze(1).double()
        start = end
    return out, scored


def perplexity(model, tokenizer, documents: list[str], window: int = 512, stride: int = 256,
               max_tokens: int | None = None, device: torch.device | str = "cpu") -> dict[str, Any]:
    """Sliding-window perplexity of a causal LM (method in the module docstring).

    Args:
        window: tokens per forward pass, BOS included (capped at the model's maximum positions).
        stride: tokens the window advances; ``stride == window`` gives (nearly) disjoint windows.
        max_tokens: score only the first N tokens of the stream (BOS tokens count).

    Returns:
        ``perplexity``, ``mean_nll``, ``tokens_scored``, ``tokens_total``, ``window``, ``stride``,
        and ``windows``: how the windows were built (``window``, ``stride`` as used, ``bos``,
        ``separator`` between documents, ``min_context``).
    """
    if window < 2 or stride < 1 or stride > window:
        raise UserError(f"need window >= 2 and 1 <= stride <= window (got window={window}, stride={stride})")
    if max_tokens is not None and max_tokens < 2:
        raise UserError(f"--max-tokens must be >= 2, got {max_tokens}")
    limit = _max_positions(model)
    if limit is not None and window > limit:
        stride = max(1, stride * limit // window)
        window = limit
    stream = encode_stream(tokenizer, documents, max_tokens)
    k = len(stream.framing.prefix)
    step = window_step(window, stride, k)
    if step < 1:
        raise UserError(f"--window {window} is too short for this tokenizer's {k} start token(s); use a window "
                        f">= {k + 2}")
    if len(stream) < 2:
        raise UserError("the data has fewer than 2 tokens; nothing to score")
    nll, mask = token_nll(model, stream, window, step, device)
    scored = int(mask.sum())
    if scored == 0:
        raise UserError("the data has no token to score")
    mean = float(nll[mask].sum()) / scored
    bos = stream.framing.bos
    windows = {"window": window, "stride": step, "bos": bos,
               "bos_token": "".join(tokenizer.convert_ids_to_tokens(list(stream.framing.prefix))) if bos else None,
               "separator": stream.separator, "documents": "encoded one by one" if bos else "joined into one text",
               "min_context": window - step - k}
    method = ("sliding window on a fixed grid; every window starts with the tokenizer's BOS; documents encoded "
              "one by one, each starting with BOS; BOS never scored" if bos else
              "sliding window on a fixed grid over '\\n\\n'-joined documents; each token after the first scored once")
    return {"perplexity": math.exp(mean), "mean_nll": mean, "tokens_scored": scored, "tokens_total": len(stream),
            "window": window, "stride": stride, "windows": windows, "method": method}


def _batches(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i:i + size]


def _label_names(model) -> dict[int, str]:
    return {int(k): str(v) for k, v in model.config.id2label.items()}


@torch.no_grad()
def classify(model, tokenizer, data: Data, batch_size: int = 16, max_length: int = 256,
             device: torch.device | str = "cpu") -> dict[str, Any]:
    """Accuracy and macro-F1 of a sequence classifier on ``data.texts`` / ``data.labels``."""
    from sklearn.metrics import accuracy_score, f1_score

    names = _label_names(model)
    unknown = sorted(set(data.labels) - set(names.values()))
    if unknown:
        raise UserError(f"labels {unknown[:5]} in {data.spec} are not among the model's labels "
                        f"{sorted(names.values())}")
    preds: list[str] = []
    for texts in track(list(_batches(data.texts, batch_size)), "classify"):
        enc = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt").to(device)
        logits = model(**enc).logits
        preds.extend(names[int(i)] for i in logits.argmax(-1))
    labels = sorted(set(names.values()))
    return {"accuracy": accuracy_score(data.labels, preds),
            "macro_f1": f1_score(data.labels, preds, labels=labels, average="macro", zero_division=0),
            "examples": len(preds)}


def entity_report(true_tags: list[list[str]], pred_tags: list[list[str]]) -> dict[str, Any]:
    """Entity-level precision/recall/F1 per type plus micro/macro averages (seqeval, CoNLL rules)."""
    from seqeval.metrics import classification_report

    report = classification_report(true_tags, pred_tags, output_dict=True, zero_division=0)
    text = classification_report(true_tags, pred_tags, digits=4, zero_division=0)
    clean = {k: {m: float(v) for m, v in d.items()} for k, d in report.items()}
    return {"entities": {k: v for k, v in clean.items() if not k.endswith(" avg")},
            "micro": clean.get("micro avg"), "macro": clean.get("macro avg"), "report": text}


@torch.no_grad()
def token_classify(model, tokenizer, data: Data, batch_size: int = 16, device: torch.device | str = "cpu"
                   ) -> dict[str, Any]:
    """Entity-level report of a token classifier; each word is labelled by its first sub-token."""
    names = _label_names(model)
    unknown = sorted({t for seq in data.tags for t in seq} - set(names.values()))
    if unknown:
        raise UserError(f"tags {unknown[:5]} in {data.spec} are not among the model's labels "
                        f"{sorted(names.values())}")
    if not getattr(tokenizer, "is_fast", False):
        raise UserError("token classification needs a fast tokenizer (word alignment); this model's is not")
    limit = _max_positions(model) or 512
    preds: list[list[str]] = []
    truncated = 0
    for words in track(list(_batches(data.tokens, batch_size)), "token-cls"):
        enc = tokenizer(words, is_split_into_words=True, padding=True, truncation=True, max_length=limit,
                        return_tensors="pt")
        logits = model(**{k: v.to(device) for k, v in enc.items()}).logits  # (B, T, L)
        best = logits.argmax(-1).cpu()
        for b, sent in enumerate(words):
            out = ["O"] * len(sent)
            seen = set()
            for pos, w in enumerate(enc.word_ids(b)):
                if w is not None and w not in seen:
                    seen.add(w)
                    out[w] = names[int(best[b, pos])]
            truncated += len(sent) - len(seen)
            preds.append(out)
    result = entity_report(data.tags, preds)
    result["sentences"] = len(preds)
    result["words_truncated"] = truncated
    return result


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of token vectors where ``mask`` is 1: (B, T, D), (B, T) -> (B, D)."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)


@torch.no_grad()
def embed_texts(model, tokenizer, texts: list[str], batch_size: int = 32, max_length: int = 256,
                device: torch.device | str = "cpu") -> torch.Tensor:
    """Mean-pooled sentence embeddings (the pooling all-MiniLM-L6-v2 was trained with), (N, D)."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    out = []
    for texts_b in track(list(_batches(texts, batch_size)), "embed"):
        enc = tokenizer(texts_b, padding=True, truncation=True, max_length=max_length, return_tensors="pt").to(device)
        hidden = getattr(model(**enc), "last_hidden_state", None)
        if hidden is None:
            raise UserError("this model returns no hidden states to embed with")
        out.append(mean_pool(hidden.float(), enc["attention_mask"]))
    return torch.cat(out)


def embedding_quality(model, tokenizer, data: Data, reference=None, device: torch.device | str = "cpu"
                      ) -> dict[str, Any]:
    """Cosine similarity to a reference model's embeddings and/or Spearman vs human ratings."""
    from scipy.stats import spearmanr

    texts = data.documents or list(dict.fromkeys(data.texts + data.texts_b))
    result: dict[str, Any] = {"texts": len(texts)}
    emb = embed_texts(model, tokenizer, texts, device=device)
    if reference is not None:
        ref = embed_texts(reference.model, reference.tokenizer, texts, device=device)
        if ref.shape[1] != emb.shape[1]:
            raise UserError(f"embedding widths differ (model {emb.shape[1]}, reference {ref.shape[1]}); "
                            "cosine similarity needs equal widths")
        result["mean_cosine_to_reference"] = F.cosine_similarity(emb, ref, dim=-1).mean().item()
        result["reference"] = reference.resolved.spec
    if data.texts_b and data.labels:
        index = {t: i for i, t in enumerate(texts)}
        a = emb[[index[t] for t in data.texts]]
        b = emb[[index[t] for t in data.texts_b]]
        sims = F.cosine_similarity(a, b, dim=-1).tolist()
        result["spearman"] = float(spearmanr(sims, data.labels).statistic)
        result["pairs"] = len(sims)
    if len(result) == 1:
        raise UserError("--task embed needs --reference MODEL or data with sentence1/sentence2/score pairs")
    return result
