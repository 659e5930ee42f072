"""Token windows the model sees: the text stream, how each window starts, and calibration samples.

A model is trained on text framed the way its tokenizer frames it. A tokenizer that puts a BOS
token before every text (Llama-style; detected by :func:`text_framing`) produced training rows that
start with BOS, and such models rely on it (the first position is where attention "sinks"): a
window that starts mid-text without BOS is scored far worse than the model really is. So:

- **Stream.** A tokenizer that adds nothing: the documents are joined with blank lines and
  tokenized once (``"\\n\\n".join(docs)``), as before. A tokenizer that adds a prefix (BOS): each
  document is tokenized on its own without special tokens and framed exactly as the tokenizer frames
  a text (``BOS doc`` — plus a suffix such as EOS if the tokenizer appends one), and the framed
  documents are concatenated. The separator between two documents is therefore the tokenizer's own
  framing (usually one BOS): it is what the tokenizer does at every text boundary, it gives the model
  the document boundary it was trained with, and it needs no guess about a training pipeline's
  packing. Special positions are marked as not text (never scored).
- **Windows.** Every window of the stream is given to the model starting with the prefix: a window
  that does not already begin with it has its first ``len(prefix)`` tokens replaced by the prefix
  (:func:`frame_window`), so its length is unchanged and it still ends where it ended.

Calibration windows (:func:`calibration_ids`) start at seeded random offsets in that stream, so the
same data, tokenizer, count, length and seed always give the same samples.

Example:
    >>> from lmslim.assets.tiny import byte_tokenizer
    >>> tok = byte_tokenizer()  # adds no special tokens
    >>> text_framing(tok).prefix
    ()
    >>> s = document_stream(tok, ["ab", "c"])
    >>> tok.decode(s.ids), s.separator
    ('ab\\n\\nc', '\\n\\n')
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmslim.core.errors import UserError

_PROBE = "Hello world, 42 times."


@dataclass(frozen=True)
class TextFraming:
    """The special token ids a tokenizer puts before (``prefix``, e.g. BOS) and after one text."""

    prefix: tuple[int, ...] = ()
    suffix: tuple[int, ...] = ()

    @property
    def bos(self) -> bool:
        return bool(self.prefix)


def text_framing(tokenizer) -> TextFraming:
    """What the tokenizer adds around a text, found by encoding a sample with and without special tokens.

    Reading ``add_bos_token`` is not enough: fast tokenizers add BOS through a post-processor that
    the flag may not describe (and some tokenizers have a ``bos_token`` they never add). Encoding
    tells what the model's own pipeline really does.
    """
    framed = list(tokenizer(_PROBE, add_special_tokens=True, verbose=False)["input_ids"])
    bare = list(tokenizer(_PROBE, add_special_tokens=False, verbose=False)["input_ids"])
    for p in range(len(framed) - len(bare) + 1):
        if framed[p:p + len(bare)] == bare:
            return TextFraming(tuple(framed[:p]), tuple(framed[p + len(bare):]))
    # The text itself encodes differently with special tokens on (rare): keep only what is certain.
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    prefix = (bos,) if bos is not None and framed[:1] == [bos] and bare[:1] != [bos] else ()
    suffix = (eos,) if eos is not None and framed[-1:] == [eos] and bare[-1:] != [eos] else ()
    return TextFraming(prefix, suffix)


@dataclass(frozen=True)
class TokenStream:
    """Token ids of a set of documents as the model sees text, and which positions hold text."""

    ids: list[int]
    text: list[bool]  # False at special tokens (BOS, a suffix): never scored
    framing: TextFraming
    separator: str  # what stands between two documents, as text

    def __len__(self) -> int:
        return len(self.ids)

    def truncated(self, max_tokens: int | None) -> "TokenStream":
        if not max_tokens or max_tokens >= len(self.ids):
            return self
        return TokenStream(self.ids[:max_tokens], self.text[:max_tokens], self.framing, self.separator)


def document_stream(tokenizer, documents: list[str], framing: TextFraming | None = None,
                    keep_suffix: bool = True) -> TokenStream:
    """The documents as one token stream (see the module docstring for how they are joined).

    Args:
        framing: the tokenizer's framing, if already known (else detected).
        keep_suffix: for a tokenizer without a prefix, keep the suffix it puts after the joined text
            (perplexity has always scored it; calibration never took it).
    """
    framing = framing if framing is not None else text_framing(tokenizer)
    docs = [d.strip() for d in documents if d.strip()]
    if not framing.prefix:
        ids = list(tokenizer("\n\n".join(docs), add_special_tokens=False, verbose=False)["input_ids"])
        if keep_suffix and docs:
            ids += framing.suffix
        return TokenStream(ids, [True] * len(ids), framing, "\n\n")
    ids: list[int] = []
    text: list[bool] = []
    encoded = tokenizer(docs, add_special_tokens=False, verbose=False)["input_ids"] if docs else []
    for doc in encoded:
        ids += [*framing.prefix, *doc, *framing.suffix]
        text += [False] * len(framing.prefix) + [True] * len(doc) + [False] * len(framing.suffix)
    separator = "".join(tokenizer.convert_ids_to_tokens([*framing.suffix, *framing.prefix]))
    return TokenStream(ids, text, framing, separator)


def frame_window(window: torch.Tensor, prefix: tuple[int, ...]) -> torch.Tensor:
    """``window`` (1-D ids) starting with ``prefix``: its first ``len(prefix)`` ids replaced unless already so."""
    k = len(prefix)
    if not k:
        return window
    head = torch.tensor(prefix, dtype=window.dtype, device=window.device)
    if window.shape[0] >= k and torch.equal(window[:k], head):
        return window
    return torch.cat([head, window[k:]])


MAX_CALIB_TOKENS = 1 << 24  # 16.8 M tokens: 64x the usual 128 x 2048; beyond that memory, not quality, is the limit


def calibration_ids(tokenizer, documents: list[str], n_samples: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """(n_samples, seq_len) token ids; each row starts with the tokenizer's BOS when it adds one.

    Raises:
        UserError: when the text has fewer than ``seq_len + 1`` tokens or the counts are not positive.
    """
    if n_samples < 1 or seq_len < 2:
        raise UserError(f"need --calib-samples >= 1 and --seq-len >= 2 (got {n_samples}, {seq_len})")
    if n_samples * seq_len > MAX_CALIB_TOKENS:  # the samples are held in memory at once, with activations
        raise UserError(f"--calib-samples x --seq-len = {n_samples * seq_len:,} tokens; at most "
                        f"{MAX_CALIB_TOKENS:,} are supported (typical: 128 x 2048)")
    stream = document_stream(tokenizer, documents, keep_suffix=False)
    prefix = stream.framing.prefix
    if seq_len <= len(prefix):
        raise UserError(f"--seq-len {seq_len} leaves no room for text after the tokenizer's {len(prefix)} "
                        "start token(s); raise --seq-len")
    if len(stream) <= seq_len:
        raise UserError(f"calibration data too short: {len(stream)} tokens, need more than --seq-len {seq_len}")
    ids = torch.tensor(stream.ids, dtype=torch.long)
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(stream) - seq_len, (n_samples,), generator=gen)
    return torch.stack([frame_window(ids[s:s + seq_len], prefix) for s in starts.tolist()])
