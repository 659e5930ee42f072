"""Calibration samples: fixed-length token windows cut from a text data set.

Windows start at seeded random offsets in the tokenized stream (documents joined with blank lines),
so the same data, tokenizer, count, length and seed always give the same samples.
"""

from __future__ import annotations

import torch

from lmslim.core.errors import UserError


def calibration_ids(tokenizer, documents: list[str], n_samples: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """(n_samples, seq_len) token ids.

    Raises:
        UserError: when the text has fewer than ``seq_len + 1`` tokens or the counts are not positive.
    """
    if n_samples < 1 or seq_len < 2:
        raise UserError(f"need --calib-samples >= 1 and --seq-len >= 2 (got {n_samples}, {seq_len})")
    text = "\n\n".join(d.strip() for d in documents if d.strip())
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    if len(ids) <= seq_len:
        raise UserError(f"calibration data too short: {len(ids)} tokens, need more than --seq-len {seq_len}")
    stream = torch.tensor(ids, dtype=torch.long)
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - seq_len, (n_samples,), generator=gen)
    return torch.stack([stream[s:s + seq_len] for s in starts.tolist()])
