"""A Hugging Face byte-level BPE tokenizer written as GGUF tokenizer metadata llama.cpp reads.

llama.cpp rebuilds a GPT-2-style tokenizer from four things: the token strings (in id order), each
token's type (normal, control, user-defined, unused), the merge list, and the name of the
pre-tokenizer (the regex that splits text before BPE). The pre-tokenizer is named, not stored, so
only tokenizers whose splitting llama.cpp knows are accepted:

- ``ByteLevel(use_regex=True)`` alone: GPT-2's regex (llama.cpp ``gpt-2``);
- ``Sequence[Digits(individual_digits=True), ByteLevel]``: every digit split off first, then
  GPT-2's regex (SmolLM2's original tokenizer; llama.cpp ``smollm``).

Anything else (SentencePiece, a normalizer, another split) is refused with a one-line error, since a
file whose tokenizer silently differs would be scored on different tokens than the user's.
"""

from __future__ import annotations

import json
from typing import Any

from lmslim.core.errors import UserError


def _pre_name(pre: dict | None) -> str | None:
    if pre is None:
        return None
    kind = pre.get("type")
    if kind == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space", False):
        return "gpt-2"
    if kind == "Sequence":
        parts = pre.get("pretokenizers", [])
        if (len(parts) == 2 and parts[0].get("type") == "Digits" and parts[0].get("individual_digits")
                and parts[1].get("type") == "ByteLevel" and parts[1].get("use_regex", True)
                and not parts[1].get("add_prefix_space", False)):
            return "smollm"
    return None


def _merges(model: dict) -> list[str]:
    return [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]


def add_tokenizer(writer, tokenizer, vocab_size: int, framing_prefix: bool, framing_suffix: bool) -> dict[str, Any]:
    """Write the tokenizer keys; ``vocab_size`` rows (the embedding's) get a token each.

    Raises:
        UserError: the tokenizer is not a byte-level BPE llama.cpp can reproduce.
    """
    from gguf import GGUFValueType, TokenType

    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    if backend is None:
        raise UserError("GGUF export needs a fast (tokenizer.json) tokenizer; this model's is a slow one")
    spec = json.loads(backend.to_str())
    model = spec.get("model", {})
    pre = _pre_name(spec.get("pre_tokenizer"))
    if model.get("type") != "BPE" or spec.get("normalizer") is not None or pre is None:
        raise UserError(f"GGUF export supports byte-level BPE tokenizers (GPT-2 or SmolLM2 splitting); this one "
                        f"is {model.get('type')} with pre-tokenizer {(spec.get('pre_tokenizer') or {}).get('type')} "
                        f"and normalizer {(spec.get('normalizer') or {}).get('type')}")
    vocab: dict[str, int] = dict(model.get("vocab", {}))
    added = {a["id"]: a for a in spec.get("added_tokens", [])}
    for i, a in added.items():
        vocab[a["content"]] = i
    by_id = {i: t for t, i in vocab.items()}
    if max(by_id) >= vocab_size:
        raise UserError(f"the tokenizer has token id {max(by_id)} but the model only {vocab_size} embedding rows")
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:  # embedding rows no token maps to (padding to a round size)
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(TokenType.CONTROL if added[i].get("special") else TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    # An empty merge list (a pure byte tokenizer) must still be present: llama.cpp requires the key.
    writer.add_key_value("tokenizer.ggml.merges", _merges(model), GGUFValueType.ARRAY, sub_type=GGUFValueType.STRING)
    for kind in ("bos", "eos", "unk", "pad"):
        tid = getattr(tokenizer, f"{kind}_token_id", None)
        if tid is not None and tid < vocab_size:
            getattr(writer, {"bos": "add_bos_token_id", "eos": "add_eos_token_id", "unk": "add_unk_token_id",
                             "pad": "add_pad_token_id"}[kind])(int(tid))
    writer.add_add_bos_token(framing_prefix)
    writer.add_add_eos_token(framing_suffix)
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and template:
        writer.add_chat_template(template)
    return {"model": "gpt2", "pre": pre, "tokens": vocab_size, "merges": len(model.get("merges", [])),
            "chat_template": bool(template)}
