import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from lmslim.assets.tiny import byte_tokenizer
from lmslim.core.errors import UserError
from lmslim.data.spec import Data
from lmslim.measure.eval import embedding_quality, entity_report, mean_pool, perplexity


class BigramLM(nn.Module):
    """A causal LM whose logits depend only on the previous token: known, context-free outputs."""

    def __init__(self, vocab: int, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.table = nn.Parameter(torch.randn(vocab, vocab, generator=g) * 3)
        self.config = SimpleNamespace(max_position_embeddings=64)

    def forward(self, input_ids):
        return SimpleNamespace(logits=self.table[input_ids])  # (B, T, V)


def hand_perplexity(table: torch.Tensor, ids: list[int]) -> float:
    nll = 0.0
    for prev, nxt in zip(ids[:-1], ids[1:]):
        logits = table[prev].double()
        nll -= logits[nxt].item() - math.log(torch.exp(logits).sum().item())
    return math.exp(nll / (len(ids) - 1))


DOCS = ["The quick brown fox jumps over the lazy dog.", "Pack my box with five dozen liquor jugs!"]


@pytest.mark.parametrize("window,stride", [(8, 8), (8, 3), (16, 1), (64, 32), (200, 100)])
def test_perplexity_matches_hand_computation(window, stride):
    tok = byte_tokenizer()
    model = BigramLM(len(tok))
    ids = tok("\n\n".join(DOCS))["input_ids"]
    r = perplexity(model, tok, DOCS, window=window, stride=stride)
    assert r["tokens_total"] == len(ids)
    assert r["tokens_scored"] == len(ids) - 1  # every token but the first, exactly once
    assert r["perplexity"] == pytest.approx(hand_perplexity(model.table.detach(), ids), rel=1e-6)


def test_perplexity_window_capped_at_model_positions():
    tok = byte_tokenizer()
    r = perplexity(BigramLM(len(tok)), tok, DOCS * 3, window=512, stride=256)
    assert r["window"] == 64 and r["stride"] == 32


def test_max_tokens_truncates():
    tok = byte_tokenizer()
    r = perplexity(BigramLM(len(tok)), tok, DOCS, window=8, stride=4, max_tokens=20)
    assert r["tokens_total"] == 20 and r["tokens_scored"] == 19


def test_perplexity_on_real_tiny_model_is_deterministic():
    from lmslim.modelio import load_model

    lm = load_model("builtin:tiny-llama")
    a = perplexity(lm.model, lm.tokenizer, DOCS, window=16, stride=8)
    b = perplexity(lm.model, lm.tokenizer, DOCS, window=16, stride=8)
    assert a == b
    # A random byte-level model is near-uniform over its ~260 symbols.
    assert 100 < a["perplexity"] < 600


@pytest.mark.parametrize("window,stride", [(1, 1), (8, 9), (8, 0)])
def test_bad_window(window, stride):
    tok = byte_tokenizer()
    with pytest.raises(UserError):
        perplexity(BigramLM(len(tok)), tok, DOCS, window=window, stride=stride)


def test_entity_report_known_values():
    true = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O"]]
    pred = [["B-PER", "I-PER", "O", "B-ORG"], ["B-ORG", "O"]]
    r = entity_report(true, pred)
    # PER: 1/1 correct; LOC: missed; ORG: 1 right + 1 spurious -> P=0.5, R=1.
    assert r["entities"]["PER"]["f1-score"] == 1.0
    assert r["entities"]["LOC"]["recall"] == 0.0
    assert r["entities"]["ORG"]["precision"] == 0.5 and r["entities"]["ORG"]["recall"] == 1.0
    assert r["micro"]["precision"] == pytest.approx(2 / 3) and r["micro"]["recall"] == pytest.approx(2 / 3)
    assert r["macro"]["f1-score"] == pytest.approx((1 + 0 + 2 / 3) / 3)
    assert "PER" in r["report"] and "micro avg" in r["report"]


def test_mean_pool_ignores_padding():
    h = torch.tensor([[[1.0, 1.0], [3.0, 3.0], [100.0, 100.0]]])
    m = torch.tensor([[1, 1, 0]])
    assert torch.equal(mean_pool(h, m), torch.tensor([[2.0, 2.0]]))


def test_embedding_quality_self_reference_and_spearman():
    from lmslim.modelio import load_model

    lm = load_model("builtin:tiny-bert", task="embed")
    data = Data("pairs", "embed", texts=["a cat", "a dog", "stock prices"], texts_b=["a cat!", "the bank", "x"],
                labels=[0.9, 0.2, 0.1])
    r = embedding_quality(lm.model, lm.tokenizer, data, reference=lm)
    assert r["mean_cosine_to_reference"] == pytest.approx(1.0, abs=1e-5)
    assert -1 <= r["spearman"] <= 1 and r["pairs"] == 3
