import pytest
import torch

from lmslim.assets.tiny import byte_tokenizer
from lmslim.compress.distill.blockwise import BlockwiseConfig, calibration_rows
from lmslim.core.errors import UserError
from lmslim.data.calib import calibration_ids, document_stream, frame_window
from tests.measure.test_eval_windows import BOS, LONG_DOCS, bos_tokenizer


def test_plain_tokenizer_samples_unchanged():
    """No BOS: the same windows as before (blank-line-joined text, seeded offsets)."""
    tok = byte_tokenizer()
    ids = torch.tensor(tok("\n\n".join(LONG_DOCS), add_special_tokens=False)["input_ids"])
    starts = torch.randint(0, len(ids) - 24, (5,), generator=torch.Generator().manual_seed(3))
    expected = torch.stack([ids[s:s + 24] for s in starts.tolist()])
    assert torch.equal(calibration_ids(tok, LONG_DOCS, 5, 24, seed=3), expected)


def test_bos_tokenizer_every_sample_starts_with_bos():
    tok = bos_tokenizer()
    rows = calibration_ids(tok, LONG_DOCS, 12, 24, seed=1)
    assert rows.shape == (12, 24) and (rows[:, 0] == BOS).all()
    assert torch.equal(rows, calibration_ids(tok, LONG_DOCS, 12, 24, seed=1))
    # Apart from the start token, each row is a piece of the stream (documents framed as BOS + text).
    stream = document_stream(tok, LONG_DOCS).ids
    text = "".join(map(chr, stream))  # ids as characters: a substring search over the stream
    assert all("".join(map(chr, r[1:].tolist())) in text for r in rows)


def test_too_short_or_bad_counts():
    tok = bos_tokenizer()
    with pytest.raises(UserError, match="too short"):
        calibration_ids(tok, ["abc"], 1, 16)
    with pytest.raises(UserError):
        calibration_ids(tok, LONG_DOCS, 0, 16)


def test_frame_window():
    w = torch.tensor([5, 6, 7])
    assert frame_window(w, ()).tolist() == [5, 6, 7]
    assert frame_window(w, (1,)).tolist() == [1, 6, 7]
    assert frame_window(torch.tensor([1, 6, 7]), (1,)).tolist() == [1, 6, 7]


def test_blockwise_rows_start_with_bos():
    examples = [{"input_ids": [BOS] + list(range(10, 50))}, {"input_ids": list(range(60, 100))}]
    rows = calibration_rows(examples, BlockwiseConfig(samples=2, seq_len=32), (BOS,))
    assert (rows[:, 0] == BOS).all() and sorted(r[1] for r in rows.tolist()) == [10, 61]
    plain = calibration_rows(examples, BlockwiseConfig(samples=2, seq_len=32))
    assert sorted(r[0] for r in plain.tolist()) == [BOS, 60]
