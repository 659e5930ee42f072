"""Stage outputs shared between runs (``--stage-cache``): a shared prefix is computed once."""

import json
import os

from lmslim.cli.main import main
from lmslim.recipes.stage_cache import StageCache

from tests.recipes.test_run import write_recipe

PRUNE = {"prune": {"method": "magnitude", "sparsity": 0.5}}


def _weights(out):
    return json.loads((out / "results.json").read_text())["variants"][-1]["weights_sha256"]


def test_second_run_reuses_the_shared_prefix_and_matches_a_run_without_cache(tmp_path, text_file, capsys):
    cache = tmp_path / "cache"
    r1 = write_recipe(tmp_path / "r1.yaml", text_file, [PRUNE, {"quantize": {"method": "rtn", "bits": 8}}],
                      measure=True)
    r2 = write_recipe(tmp_path / "r2.yaml", text_file, [PRUNE, {"quantize": {"method": "rtn", "bits": 4,
                                                                            "group_size": 32}}], measure=True)
    assert main(["compress", "builtin:tiny-llama", "--recipe", str(r1), "--out", str(tmp_path / "a"),
                 "--stage-cache", str(cache)]) == 0, capsys.readouterr().err
    first = json.loads((tmp_path / "a" / "results.json").read_text())
    assert first["stage_cache_hits"] == 0 and len(list(cache.iterdir())) == 2
    assert main(["compress", "builtin:tiny-llama", "--recipe", str(r2), "--out", str(tmp_path / "b"),
                 "--stage-cache", str(cache)]) == 0, capsys.readouterr().err
    second = json.loads((tmp_path / "b" / "results.json").read_text())
    assert second["stage_cache_hits"] == 1  # the prune stage; the quantize stage differs
    # The reused stage's files are the cached ones (hard links), and the result is what a run
    # without any cache gives.
    entry = next(d for d in cache.iterdir() if json.loads((d / "stage.json").read_text())["stage"] == "prune")
    assert not (entry / "eval.json").exists()  # measurements are not cached with the stage
    assert main(["compress", "builtin:tiny-llama", "--recipe", str(r2), "--out", str(tmp_path / "c")]) == 0
    assert _weights(tmp_path / "b") == _weights(tmp_path / "c")
    assert second["variants"][-1]["eval"]["perplexity"] == json.loads(
        (tmp_path / "c" / "results.json").read_text())["variants"][-1]["eval"]["perplexity"]


def test_an_incomplete_entry_is_not_used(tmp_path):
    stage = tmp_path / "s"
    (stage / "model").mkdir(parents=True)
    (stage / "done.json").write_text(json.dumps({"fingerprint": "other"}))
    cache = StageCache(tmp_path / "cache")
    cache.store("fp", stage)  # its done.json names another fingerprint
    assert not cache.fetch("fp", tmp_path / "t") and cache.hits == 0
    os.remove(tmp_path / "cache" / "fp" / "done.json")
    assert not cache.fetch("fp", tmp_path / "t")
