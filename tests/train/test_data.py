import pytest

from lmslim.assets.tiny import byte_tokenizer
from lmslim.core.errors import UserError
from lmslim.data.spec import Data
from lmslim.data.synthetic import synthetic_ner, synthetic_sentiment
from lmslim.train.config import BatchConfig
from lmslim.train.data import IGNORE, Batcher, collate, tokenize


def _docs(n=40, seed=0):
    import random

    rng = random.Random(seed)
    return [" ".join("word" for _ in range(rng.randint(1, 60))) for _ in range(n)]


def test_clm_pieces_and_packing():
    tok = byte_tokenizer()
    data = Data("x", "clm", documents=_docs())
    plain = tokenize(data, tok, "clm", max_length=64, pack=False)
    packed = tokenize(data, tok, "clm", max_length=64, pack=True)
    assert max(plain.lengths) <= 64 and max(packed.lengths) <= 64
    assert plain.total_tokens == packed.total_tokens  # packing loses no token
    assert len(packed) < len(plain)
    # every document ends with EOS
    assert sum(e["input_ids"].count(tok.eos_token_id) for e in plain.examples) == 40


def _padding(batcher: Batcher) -> float:
    real = padded = 0
    for ids in batcher.epoch(0):
        b = batcher.collate(ids)
        real += b.tokens
        padded += b["input_ids"].numel()
    return 1 - real / padded


def test_bucketing_and_token_budget_reduce_padding():
    ts = tokenize(Data("x", "clm", documents=_docs(200)), byte_tokenizer(), "clm", max_length=256, pack=False)
    fixed = Batcher(ts, BatchConfig(batch_size=8, max_length=256, bucketing=False), seed=1)
    bucket = Batcher(ts, BatchConfig(batch_size=8, max_length=256, bucketing=True), seed=1)
    assert _padding(bucket) < _padding(fixed) / 2
    budget = Batcher(ts, BatchConfig(token_budget=600, max_length=256), seed=1)
    for ids in budget.epoch(0):
        b = budget.collate(ids)
        assert b["input_ids"].numel() <= 600
    # every example appears exactly once per epoch
    for b in (fixed, bucket, budget):
        assert sorted(i for batch in b.epoch(3) for i in batch) == list(range(len(ts)))
    maxlen = Batcher(ts, BatchConfig(batch_size=8, max_length=256, padding="max_length"), seed=1)
    assert maxlen.collate(maxlen.epoch(0)[0])["input_ids"].shape[1] == 256


def test_plans_are_seeded_and_sharded():
    ts = tokenize(Data("x", "clm", documents=_docs(50)), byte_tokenizer(), "clm", max_length=64, pack=False)
    cfg = BatchConfig(batch_size=4, max_length=64)
    assert Batcher(ts, cfg, seed=3).epoch(2) == Batcher(ts, cfg, seed=3).epoch(2)
    assert Batcher(ts, cfg, seed=3).epoch(1) != Batcher(ts, cfg, seed=3).epoch(2)
    shards = [Batcher(ts, cfg, seed=3, rank=r, world_size=3).epoch(0) for r in range(3)]
    assert len({len(s) for s in shards}) == 1  # same number of steps on every rank
    seen = [i for s in shards for b in s for i in b]
    assert len(seen) == len(set(seen))  # disjoint


def test_collate_units():
    b = collate([{"input_ids": [5, 6, 7]}, {"input_ids": [8, 9]}], "clm", pad_id=0)
    assert b["input_ids"].tolist() == [[5, 6, 7], [8, 9, 0]]
    assert b["labels"].tolist() == [[5, 6, 7], [8, 9, IGNORE]]
    assert b.units == 3 and b.tokens == 5


def test_seq_cls_labels():
    texts, labels = synthetic_sentiment(10)
    ts = tokenize(Data("s", "seq-cls", texts=texts, labels=labels), byte_tokenizer("bert"), "seq-cls", 64)
    assert ts.label_names == ["neg", "pos"]
    b = collate(ts.examples[:4], "seq-cls", ts.pad_id)
    assert b["labels"].shape == (4,) and b.units == 4
    with pytest.raises(UserError, match="not among the model's labels"):
        tokenize(Data("s", "seq-cls", texts=texts, labels=labels), byte_tokenizer("bert"), "seq-cls", 64,
                 label_names=["pos", "other"])
    with pytest.raises(UserError, match="at least 2 classes"):
        tokenize(Data("s", "seq-cls", texts=texts, labels=["pos"] * 10), byte_tokenizer("bert"), "seq-cls", 64)


def test_token_cls_first_subtoken():
    words, tags = synthetic_ner(5)
    tok = byte_tokenizer("bert")
    ts = tokenize(Data("n", "token-cls", tokens=words, tags=tags), tok, "token-cls", 128)
    assert ts.label_names[0] == "O"
    for e, ws, ts_ in zip(ts.examples, words, tags):
        labelled = [x for x in e["labels"] if x != IGNORE]
        assert [ts.label_names[x] for x in labelled] == ts_  # one label per word, in order
    with pytest.raises(UserError, match="not BIO tags"):
        tokenize(Data("n", "token-cls", tokens=[["a"]], tags=[["PER"]]), tok, "token-cls", 16)
