"""Perplexity windows for tokenizers that add a BOS token: every window starts with BOS, BOS is never
scored, and the NLL of a token does not depend on how long the scored stream is."""

import json
import math

import pytest
import torch
from tokenizers import processors

from lmslim.assets.tiny import build_tiny, byte_tokenizer
from lmslim.core.errors import UserError
from lmslim.data.calib import document_stream, text_framing
from lmslim.measure.eval import perplexity, token_nll, window_step
from tests.measure.test_eval import DOCS, BigramLM

BOS, EOS = 1, 2
LONG_DOCS = [f"Document {i}: " + " ".join(f"word{(7 * i + j) % 23}" for j in range(25 + 9 * i)) for i in range(6)]


def bos_tokenizer(eos: bool = False):
    """The tiny byte tokenizer, framing every text as ``<s> text`` (or ``<s> text </s>``), Llama-style."""
    tok = byte_tokenizer()
    single = "<s> $A </s>" if eos else "<s> $A"
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=single, pair="<s> $A <s> $B", special_tokens=[("<s>", BOS), ("</s>", EOS)])
    return tok


class Spy(torch.nn.Module):
    """Records the input of every forward pass of the wrapped model."""

    def __init__(self, model):
        super().__init__()
        self.model, self.config, self.inputs = model, model.config, []

    def forward(self, input_ids):
        self.inputs.append(input_ids[0].tolist())
        return self.model(input_ids=input_ids)


def test_framing_detected_by_encoding():
    assert text_framing(byte_tokenizer()).prefix == () and not text_framing(byte_tokenizer()).bos
    f = text_framing(bos_tokenizer())
    assert f.prefix == (BOS,) and f.suffix == () and f.bos
    assert text_framing(bos_tokenizer(eos=True)) == type(f)((BOS,), (EOS,))


def test_stream_encodes_each_document_with_bos():
    tok = bos_tokenizer()
    s = document_stream(tok, ["ab", "  ", "c"])
    assert s.ids == [BOS, *tok("ab", add_special_tokens=False)["input_ids"], BOS,
                     *tok("c", add_special_tokens=False)["input_ids"]]
    assert s.text == [False, True, True, False, True] and s.separator == "<s>"
    # Without BOS the stream is the blank-line-joined text, as it always was.
    plain = byte_tokenizer()
    assert document_stream(plain, ["ab", "c"]).ids == plain("ab\n\nc")["input_ids"]


def hand_perplexity_text_only(table: torch.Tensor, ids: list[int], text: list[bool]) -> float:
    """Bigram NLL of every text token after the first position, given the token before it in the stream."""
    nll, n = 0.0, 0
    for t in range(1, len(ids)):
        if text[t]:
            logits = table[ids[t - 1]].double()
            nll -= logits[ids[t]].item() - math.log(torch.exp(logits).sum().item())
            n += 1
    return math.exp(nll / n)


@pytest.mark.parametrize("window,stride", [(8, 8), (8, 3), (3, 1), (16, 5), (64, 32)])
def test_every_window_starts_with_bos_and_bos_is_not_scored(window, stride):
    tok = bos_tokenizer()
    spy = Spy(BigramLM(len(tok)))
    r = perplexity(spy, tok, DOCS, window=window, stride=stride)
    stream = document_stream(tok, DOCS)
    assert len(spy.inputs) > 1 and all(x[0] == BOS for x in spy.inputs)
    assert all(len(x) <= window for x in spy.inputs)
    text_tokens = sum(len(tok(d, add_special_tokens=False)["input_ids"]) for d in DOCS)
    assert r["tokens_total"] == text_tokens + len(DOCS) and r["tokens_scored"] == text_tokens
    # A context-free model: the figure is the bigram NLL of the text tokens only, each given its real
    # predecessor (BOS for a document's first token); BOS targets would change it.
    assert r["perplexity"] == pytest.approx(hand_perplexity_text_only(spy.model.table.detach(), stream.ids,
                                                                      stream.text), rel=1e-6)
    nll, scored = token_nll(spy.model, stream, r["windows"]["window"], r["windows"]["stride"])
    assert all(math.isnan(nll[i]) and not scored[i] for i, t in enumerate(stream.ids) if t == BOS)
    assert not torch.isnan(nll[scored]).any() and int(scored.sum()) == r["tokens_scored"]
    assert r["windows"] == {"window": window, "stride": window_step(window, stride, 1), "bos": True,
                            "bos_token": "<s>", "separator": "<s>", "documents": "encoded one by one",
                            "min_context": window - window_step(window, stride, 1) - 1}


def test_suffix_tokens_are_context_only():
    tok = bos_tokenizer(eos=True)
    r = perplexity(BigramLM(len(tok)), tok, DOCS, window=16, stride=8)
    text_tokens = sum(len(tok(d, add_special_tokens=False)["input_ids"]) for d in DOCS)
    assert r["tokens_scored"] == text_tokens and r["windows"]["separator"] == "</s><s>"


def test_plain_tokenizer_unchanged():
    tok = byte_tokenizer()
    spy = Spy(BigramLM(len(tok)))
    r = perplexity(spy, tok, DOCS, window=8, stride=4)
    ids = tok("\n\n".join(DOCS))["input_ids"]
    assert spy.inputs[0] == ids[:8] and r["tokens_scored"] == len(ids) - 1
    assert r["windows"]["bos"] is False and r["windows"]["separator"] == "\n\n"
    assert r["windows"]["stride"] == 4 and r["windows"]["min_context"] == 4


def test_window_too_short_for_bos():
    tok = bos_tokenizer()
    with pytest.raises(UserError, match="too short"):
        perplexity(BigramLM(len(tok)), tok, DOCS, window=2, stride=1)


@pytest.fixture(scope="module")
def llama_bos():
    model, _ = build_tiny("tiny-llama")
    return model, bos_tokenizer()


@pytest.mark.parametrize("bos", [True, False])
def test_nll_of_first_tokens_does_not_depend_on_max_tokens(llama_bos, bos):
    """A real (context-dependent) model: cutting the stream changes no scored token's NLL."""
    model, tok = llama_bos
    tok = tok if bos else byte_tokenizer()
    full = document_stream(tok, LONG_DOCS)
    assert len(full) > 200
    window, step = 32, window_step(32, 12, 1 if bos else 0)
    ref, _ = token_nll(model, full, window, step)
    for n in (37, 64, 90, 151, len(full)):
        cut, ok = token_nll(model, full.truncated(n), window, step)
        assert torch.equal(torch.isnan(cut), torch.isnan(ref[:n])) and torch.equal(ok, ~torch.isnan(cut))
        assert torch.allclose(cut[ok], ref[:n][ok], atol=1e-4)
        r = perplexity(model, tok, LONG_DOCS, window=32, stride=12, max_tokens=n)
        assert r["mean_nll"] == pytest.approx(float(ref[:n][ok].mean()), abs=1e-5)


def test_real_model_windows_start_with_bos(llama_bos):
    model, tok = llama_bos
    seen = []
    handle = model.register_forward_pre_hook(lambda _m, _a, kw: seen.append(kw["input_ids"][0].tolist()),
                                             with_kwargs=True)
    try:
        r = perplexity(model, tok, LONG_DOCS, window=48, stride=24)
    finally:
        handle.remove()
    assert len(seen) > 5 and all(x[0] == BOS for x in seen)
    assert r["tokens_scored"] == sum(document_stream(tok, LONG_DOCS).text)


def test_eval_cli_records_windows(llama_bos, tmp_path, capsys):
    from lmslim.cli.main import main

    model, tok = llama_bos
    folder = tmp_path / "bos-llama"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    data = tmp_path / "docs"
    data.mkdir()
    for i, d in enumerate(LONG_DOCS[:3]):
        (data / f"{i}.txt").write_text(d)
    out = tmp_path / "eval.json"
    assert main(["eval", str(folder), "--data", str(data), "--window", "32", "--stride", "16",
                 "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["windows"]["bos"] is True and r["windows"]["window"] == 32 and r["windows"]["stride"] == 16
    assert r["data"]["spec"] == str(data) and r["data"]["tokens"] == r["tokens_scored"]
    printed = capsys.readouterr().out
    assert "│ perplexity" in printed and "│ windows" not in printed  # the table lists numbers only


@pytest.mark.integration
def test_smollm2_windows():
    """SmolLM2's tokenizer (from its GGUF: add_bos_token false) adds no BOS, so its windows are plain
    text; whichever way it frames text, windows start as the tokenizer starts a text and are stable."""
    from lmslim.modelio import load_model
    from lmslim.data.spec import load_data

    lm = load_model("builtin:smollm2-135m")
    framing = text_framing(lm.tokenizer)
    docs = load_data("builtin:wiki").documents
    stream = document_stream(lm.tokenizer, docs).truncated(400)
    window, step = 128, window_step(128, 64, len(framing.prefix))
    ref, _ = token_nll(lm.model, stream, window, step)
    cut, ok = token_nll(lm.model, stream.truncated(250), window, step)
    assert torch.allclose(cut[ok], ref[:250][ok], atol=1e-3)
    seen = []
    handle = lm.model.register_forward_pre_hook(lambda _m, _a, kw: seen.append(kw["input_ids"][0, 0].item()),
                                                with_kwargs=True)
    try:
        r = perplexity(lm.model, lm.tokenizer, docs, window=window, stride=64, max_tokens=400)
    finally:
        handle.remove()
    assert r["windows"]["bos"] == framing.bos and 5 < r["perplexity"] < 200
    if framing.bos:
        assert all(t == framing.prefix[0] for t in seen)
    else:
        assert seen[0] == stream.ids[0] and r["tokens_scored"] == 399 and r["windows"]["separator"] == "\n\n"


def test_nan_model_gives_nan_perplexity():
    """A broken model (NaN logits) must not be scored as if its NaN tokens were never there."""
    tok = bos_tokenizer()
    model = BigramLM(len(tok))
    with torch.no_grad():
        model.table.fill_(float("nan"))
    assert math.isnan(perplexity(model, tok, DOCS, window=16, stride=8)["perplexity"])
