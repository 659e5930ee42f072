"""From a loaded :class:`~lmslim.data.spec.Data` to padded micro-batches.

Two steps, both reusable outside the loop (distillation uses them too):

1. :func:`tokenize` turns documents / labelled texts / tagged words into token-id examples
   (clm: documents cut into ``max_length`` pieces, short ones packed together; seq-cls: one label id
   per text; token-cls: the tag id on each word's first sub-token, ``-100`` elsewhere).
2. :class:`Batcher` plans each epoch's micro-batches (seeded shuffle, length bucketing, a token
   budget per batch, rank sharding) and :func:`collate` pads one batch to its longest row.

The plan of epoch ``e`` depends only on ``(seed, e)``, so a resumed run finds its place from
``(epoch, index)`` alone, and under ``torchrun`` every rank takes a disjoint slice of the same plan.

Example:
    >>> from lmslim.assets.tiny import byte_tokenizer
    >>> from lmslim.data.spec import Data
    >>> from lmslim.train.config import BatchConfig
    >>> from lmslim.train.data import Batcher, tokenize
    >>> ts = tokenize(Data("x", "clm", documents=["short", "a longer document"]), byte_tokenizer(), "clm",
    ...               max_length=32, pack=False)
    >>> b = Batcher(ts, BatchConfig(batch_size=2, max_length=32), seed=0)
    >>> batch = b.collate(b.epoch(0)[0])
    >>> batch["input_ids"].shape, batch.units  # (B, T): 5 + 17 bytes, each + </s>; targets = tokens - 1 per row
    (torch.Size([2, 18]), 22)
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
import torch.utils.data

from lmslim.core.errors import UserError
from lmslim.data.spec import Data
from lmslim.train.config import BatchConfig

IGNORE = -100  # label value cross-entropy skips (padding, non-first sub-tokens)
_BIO = ("B-", "I-", "E-", "S-")


class Batch(dict):
    """A dict of model inputs (``model(**batch)`` works) that also knows its size.

    Attributes:
        units: how many loss terms the batch holds (target tokens for clm/token-cls, rows for
            seq-cls). The loop weights each micro-batch's mean loss by ``units / step_units``, so an
            accumulated step equals one big batch exactly, whatever the lengths.
        tokens: real (non-padding) input tokens, for tokens/s.
    """

    units: int = 0
    tokens: int = 0

    def to(self, device: torch.device | str) -> "Batch":
        out = Batch({k: v.to(device, non_blocking=True) for k, v in self.items()})
        out.units, out.tokens = self.units, self.tokens
        return out


@dataclass
class TokenizedSet:
    """Token-id examples for one task, plus what is needed to pad and evaluate them."""

    task: str
    examples: list[dict[str, Any]]  # {"input_ids": [...], "labels": [...] | int}
    pad_id: int
    tokenizer: Any = None
    label_names: list[str] | None = None  # seq-cls / token-cls: id -> name
    source: Data | None = None  # the raw data (token-cls evaluation needs the words)
    lengths: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.lengths:
            self.lengths = [len(e["input_ids"]) for e in self.examples]

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def total_tokens(self) -> int:
        return sum(self.lengths)


# ---------------------------------------------------------------------------------------------- labels

def label_names_for(data: Data, task: str) -> list[str]:
    """The sorted label set of ``data``; validates that the labels fit the task."""
    if task == "seq-cls":
        names = sorted({str(x) for x in data.labels})
        if not data.texts or len(data.labels) != len(data.texts):
            raise UserError(f"data {data.spec} has no text/label pairs for task seq-cls")
        if len(names) < 2:
            raise UserError(f"data {data.spec} has only one label ({names[0] if names else 'none'}); "
                            "sequence classification needs at least 2 classes")
        return names
    if task == "token-cls":
        if not data.tokens:
            raise UserError(f"data {data.spec} has no tagged words for task token-cls")
        names = sorted({t for seq in data.tags for t in seq})
        bad = [t for t in names if t != "O" and not t.startswith(_BIO)]
        if bad:
            raise UserError(f"tags {bad[:5]} in {data.spec} are not BIO tags (O, B-X, I-X); "
                            "token classification is evaluated on BIO entities")
        # "O" first keeps id 0 = outside, as most NER checkpoints do.
        return sorted(names, key=lambda t: (t != "O", t[2:], t))
    raise UserError(f"task {task} has no labels")


# ---------------------------------------------------------------------------------------------- tokenize

def tokenize(data: Data, tokenizer, task: str, max_length: int = 512, pack: bool = True,
             label_names: list[str] | None = None) -> TokenizedSet:
    """Tokenize ``data`` for ``task`` (clm, seq-cls, token-cls).

    Args:
        max_length: longest example in tokens (clm documents are split into pieces this long).
        pack: clm only: concatenate consecutive short pieces into rows of up to ``max_length``
            tokens (rows may then attend across a document boundary, as in GPT pretraining).
        label_names: id -> name for classification; default: the sorted labels of ``data``. Labels
            of ``data`` that are not in this list raise UserError.

    Raises:
        UserError: no usable examples, labels that do not fit the task or the model.
    """
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise UserError("the tokenizer has neither a pad nor an end-of-sequence token; cannot pad batches")
        tokenizer.pad_token = tokenizer.eos_token
    if task == "clm":
        return _tokenize_clm(data, tokenizer, max_length, pack)
    if task not in ("seq-cls", "token-cls"):
        raise UserError(f"cannot train task {task!r}; choose clm, seq-cls or token-cls")
    names = label_names or label_names_for(data, task)
    index = {n: i for i, n in enumerate(names)}
    present = set(map(str, data.labels)) if task == "seq-cls" else {t for s in data.tags for t in s}
    unknown = sorted(present - set(index))
    if unknown:
        raise UserError(f"labels {unknown[:5]} in {data.spec} are not among the model's labels {names}")
    if task == "seq-cls":
        enc = tokenizer(list(data.texts), truncation=True, max_length=max_length, verbose=False)
        examples = [{"input_ids": ids, "labels": index[str(y)]} for ids, y in zip(enc["input_ids"], data.labels)]
    else:
        if not getattr(tokenizer, "is_fast", False):
            raise UserError("token classification needs a fast tokenizer (word alignment); this model's is not")
        enc = tokenizer(data.tokens, is_split_into_words=True, truncation=True, max_length=max_length,
                        verbose=False)
        examples = []
        for b, (ids, tags) in enumerate(zip(enc["input_ids"], data.tags)):
            labels, seen = [], set()
            for w in enc.word_ids(b):
                # Only a word's first sub-token carries its tag, matching measure.eval.token_classify.
                labels.append(index[tags[w]] if w is not None and w not in seen else IGNORE)
                if w is not None:
                    seen.add(w)
            examples.append({"input_ids": ids, "labels": labels})
    examples = [e for e in examples if len(e["input_ids"]) > 0]
    if not examples:
        raise UserError(f"data {data.spec} gives no non-empty examples after tokenization")
    return TokenizedSet(task, examples, tokenizer.pad_token_id, tokenizer, names, data)


def _tokenize_clm(data: Data, tokenizer, max_length: int, pack: bool) -> TokenizedSet:
    docs = [d for d in data.documents if d.strip()]
    if not docs:
        raise UserError(f"data {data.spec} has no text for task clm")
    eos = tokenizer.eos_token_id
    pieces: list[list[int]] = []
    for ids in tokenizer(docs, add_special_tokens=True, verbose=False)["input_ids"]:
        if eos is not None and (not ids or ids[-1] != eos):
            ids = ids + [eos]  # the model learns where a document ends
        pieces.extend(ids[i:i + max_length] for i in range(0, len(ids), max_length))
    pieces = [p for p in pieces if len(p) >= 2]  # a 1-token row has nothing to predict
    if pack:
        packed: list[list[int]] = []
        for p in pieces:  # next-fit in document order: deterministic and keeps neighbours together
            if packed and len(packed[-1]) + len(p) <= max_length:
                packed[-1] = packed[-1] + p
            else:
                packed.append(list(p))
        pieces = packed
    if not pieces:
        raise UserError(f"data {data.spec} is too short to train on (fewer than 2 tokens)")
    return TokenizedSet("clm", [{"input_ids": p} for p in pieces], tokenizer.pad_token_id, tokenizer, None, data)


# ---------------------------------------------------------------------------------------------- batches

class Batcher:
    """Seeded, resumable, rank-sharded micro-batch plans over a :class:`TokenizedSet`."""

    BUCKET_WINDOW = 64  # sort by length inside windows of this many batches: bucketed but still random

    def __init__(self, data: TokenizedSet, config: BatchConfig, seed: int = 0, rank: int = 0, world_size: int = 1,
                 shuffle: bool | None = None) -> None:
        self.data, self.cfg, self.seed = data, config, seed
        self.rank, self.world = rank, world_size
        self.shuffle = config.shuffle if shuffle is None else shuffle
        if len(self.epoch(0)) == 0:
            raise UserError(f"{len(data)} examples give no batch for rank {rank} of {world_size} "
                            "(drop_last with too few examples?); use more data or a smaller batch")

    def _row_len(self, i: int) -> int:
        return self.cfg.max_length if self.cfg.padding == "max_length" else self.data.lengths[i]

    def epoch(self, epoch: int) -> list[list[int]]:
        """This rank's micro-batches (lists of example indices) for ``epoch``; same result every call."""
        rng = random.Random(self.seed * 1_000_003 + epoch)  # private RNG: never touches the global state
        order = list(range(len(self.data)))
        if self.shuffle:
            rng.shuffle(order)
        if self.cfg.bucketing:
            rows = self.cfg.batch_size if not self.cfg.token_budget else max(
                1, self.cfg.token_budget // max(1, sum(self.data.lengths) // len(self.data)))
            win = self.BUCKET_WINDOW * rows
            order = [i for s in range(0, len(order), win)
                     for i in sorted(order[s:s + win], key=self._row_len, reverse=True)]
        batches: list[list[int]] = []
        cur: list[int] = []
        longest = 0
        for i in order:
            n = self._row_len(i)
            full = (len(cur) >= self.cfg.batch_size if not self.cfg.token_budget
                    else max(longest, n) * (len(cur) + 1) > self.cfg.token_budget)
            if cur and full:
                batches.append(cur)
                cur, longest = [], 0
            cur.append(i)
            longest = max(longest, n)
        if cur and not (self.cfg.drop_last and not self.cfg.token_budget and len(cur) < self.cfg.batch_size):
            batches.append(cur)
        if self.shuffle and self.cfg.bucketing:
            rng.shuffle(batches)  # otherwise every epoch would start with the longest rows
        # Every rank must take the same number of steps: drop the remainder, then deal round-robin.
        batches = batches[:len(batches) - len(batches) % self.world]
        return batches[self.rank::self.world]

    def batches(self, plan: list[list[int]], num_workers: int = 0) -> Iterator[Batch]:
        """Collated batches of ``plan`` in order; ``num_workers`` > 0 collates them in background processes.

        The plan is fixed before any worker starts and a DataLoader returns items in index order, so
        the batches are identical for every ``num_workers`` (deterministic parallel loading).
        """
        if num_workers == 0:
            yield from (self.collate(ids) for ids in plan)
            return
        from torch.utils.data import DataLoader

        # batch_size=None: each item is already a batch; the identity collate_fn keeps Batch.units/tokens.
        yield from DataLoader(_PlanItems(self, plan), batch_size=None, shuffle=False, num_workers=num_workers,
                              collate_fn=_identity)

    def collate(self, indices: list[int]) -> Batch:
        return collate([self.data.examples[i] for i in indices], self.data.task, self.data.pad_id,
                       self.cfg.max_length if self.cfg.padding == "max_length" else None)


class _PlanItems(torch.utils.data.Dataset):
    """Item i = the collated i-th micro-batch of a fixed plan (what DataLoader workers compute)."""

    def __init__(self, batcher: Batcher, plan: list[list[int]]) -> None:
        self.batcher, self.plan = batcher, plan

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, i: int) -> Batch:
        return self.batcher.collate(self.plan[i])


def _identity(x: Any) -> Any:
    return x


def collate(examples: list[dict[str, Any]], task: str, pad_id: int, pad_to: int | None = None) -> Batch:
    """Right-pad ``examples`` to the longest row (or ``pad_to``) into a :class:`Batch`."""
    width = pad_to or max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for r, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[r, :n] = torch.tensor(e["input_ids"], dtype=torch.long)
        mask[r, :n] = 1
    batch = Batch(input_ids=ids, attention_mask=mask)
    if task == "clm":
        labels = ids.masked_fill(mask == 0, IGNORE)  # the model shifts labels itself
        units = int((labels[:, 1:] != IGNORE).sum())
    elif task == "seq-cls":
        labels = torch.tensor([e["labels"] for e in examples], dtype=torch.long)  # (B,)
        units = len(examples)
    else:
        labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
        for r, e in enumerate(examples):
            labels[r, :len(e["labels"])] = torch.tensor(e["labels"], dtype=torch.long)
        units = int((labels != IGNORE).sum())
    batch["labels"] = labels
    batch.units, batch.tokens = units, int(mask.sum())
    return batch
