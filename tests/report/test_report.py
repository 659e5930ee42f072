import json
import os
import shutil

import pytest

from lmslim.cli.main import main
from lmslim.report.build import build_report, collect, load_runs, verdict


def variant(name, stage, ppl, tok_s, size, params=1000, nonzero=None, sha=None):
    return {"name": name, "stage": stage, "model": name, "weights_sha256": sha or name,
            "eval": {"kind": "eval", "perplexity": ppl, "tokens_scored": 100},
            "bench": {"kind": "bench", "decode_tokens_per_s": tok_s, "prefill_ms_p50": 1000 / tok_s, "size_mb": size,
                      "params": params, "nonzero_params": nonzero if nonzero is not None else params,
                      "flops_per_token": 2e6, "train_flops_per_token": 6e6, "fraction_of_bound": 0.3,
                      "machine": {"cpu": "Test CPU"}}}


def make_run(path, name, variants):
    path.mkdir(parents=True)
    (path / "results.json").write_text(json.dumps({"kind": "compress", "recipe": name, "variants": variants}))
    return path


@pytest.fixture()
def runs(tmp_path):
    base = variant("baseline", None, 20.0, 10.0, 500, sha="B")
    a = make_run(tmp_path / "a", "int8", [base, variant("int8", "quantize", 20.3, 14.5, 200)])
    b = make_run(tmp_path / "b", "sparse", [base, variant("wanda", "prune", 24.0, 10.2, 500, nonzero=500),
                                            variant("bad", "quantize", 30.0, 5.0, 300)])
    return [a, b]


def test_rows_ratios_pareto_and_verdicts(runs):
    rows = collect(load_runs(runs))
    assert [r["name"] for r in rows] == ["baseline", "int8", "wanda", "bad"]  # baseline deduplicated by hash
    by = {r["name"]: r for r in rows}
    assert by["int8"]["decode_x"] == pytest.approx(1.45) and by["int8"]["size_x"] == pytest.approx(0.4)
    assert by["int8"]["quality_delta_pct"] == pytest.approx(1.5)
    assert by["wanda"]["prune_ratio"] == pytest.approx(0.5)
    # int8 is faster with a small loss, baseline is best quality: both on the front; wanda and bad dominated.
    assert {r["name"] for r in rows if r["pareto"]} == {"baseline", "int8"}
    assert by["int8"]["verdict"].startswith("faster: 1.45×")
    assert "no real speedup" in by["wanda"]["verdict"] and "zeros are not skipped" in by["wanda"]["verdict"]
    assert by["bad"]["verdict"].startswith("slower on this device")


def test_engine_is_part_of_each_variant(tmp_path):
    base = variant("baseline", None, 20.0, 10.0, 500, sha="B")
    gguf = variant("q4_0 gguf", "export", 21.0, 40.0, 90)
    gguf["bench"]["engine"] = gguf["eval"]["engine"] = {"name": "llama.cpp", "version": "0.3.36"}
    run = make_run(tmp_path / "a", "gguf", [base, gguf])
    rows = collect(load_runs([run]))
    assert [r["engine"] for r in rows] == ["torch", "llama.cpp"]  # a result without the field is PyTorch's
    assert rows[1]["decode_x"] == pytest.approx(4.0) and rows[1]["pareto"]
    out = tmp_path / "rep"
    assert main(["report", str(run), "--out", str(out)]) == 0
    assert "| q4_0 gguf | llama.cpp |" in (out / "report.md").read_text()


def test_verdict_thresholds():
    assert verdict(1.09, False).startswith("no real speedup")
    assert verdict(1.10, False).startswith("faster")
    assert verdict(0.9, False).startswith("slower")
    assert verdict(None, False) == "no decode measurement"


def test_report_files_and_cli_errors(runs, tmp_path, capsys):
    out = tmp_path / "rep"
    assert main(["report", *map(str, runs), "--out", str(out)]) == 0
    md = (out / "report.md").read_text()
    assert "| int8 |" in md and "faster: 1.45×" in md and "![quality vs decode speed](pareto.png)" in md
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    html = (out / "report.html").read_text()
    assert "data:image/png;base64," in html and "http://" not in html and "https://" not in html
    capsys.readouterr()
    assert main(["report", str(runs[0]), "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    (tmp_path / "not-a-run").mkdir()
    assert main(["report", str(tmp_path / "not-a-run"), "--out", str(tmp_path / "r2")]) == 2
    assert "not an lmslim compress run" in capsys.readouterr().err and not (tmp_path / "r2").exists()


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None and not os.environ.get("LMSLIM_REQUIRE_BROWSER"),
                    reason="no chromium here (CI installs it and sets LMSLIM_REQUIRE_BROWSER=1)")
def test_report_renders_in_headless_chromium(runs, tmp_path):
    """The self-contained page loads with its chart and no console errors; a screenshot is kept."""
    from playwright.sync_api import sync_playwright

    assert CHROMIUM, "LMSLIM_REQUIRE_BROWSER is set but chromium is not installed"
    build_report(runs, tmp_path / "rep")
    errors = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto((tmp_path / "rep" / "report.html").as_uri())
        width = page.evaluate("document.getElementById('pareto').naturalWidth")
        rows = page.evaluate("document.querySelectorAll('#variants tbody tr').length")
        artifacts = os.environ.get("LMSLIM_TEST_ARTIFACTS", str(tmp_path))
        os.makedirs(artifacts, exist_ok=True)
        page.screenshot(path=os.path.join(artifacts, "report.png"), full_page=True)
        browser.close()
    assert width > 100 and rows == 4 and errors == []


def _measured(lm, name, stage):
    """A compress-run variant whose bench numbers come from the real bench of ``lm``."""
    from lmslim.measure.bench import BenchConfig, bench

    b = bench(lm, BenchConfig(prompt_len=8, gen_len=4, repeats=1, warmup=0))
    b["size_mb"] = 1.0  # in-memory models have no files; size does not matter here
    return {"name": name, "stage": stage, "model": name, "weights_sha256": name,
            "eval": {"kind": "eval", "perplexity": 10.0, "tokens_scored": 10}, "bench": b}


def test_quantized_row_not_called_sparse_pruned_row_is(tmp_path):
    """GPTQ 4-bit codes hold many exact zeros (rounding), which are not pruned weights."""
    import torch

    from lmslim.compress.prune import WandaConfig, prune_
    from lmslim.compress.quantize import GPTQConfig, quantize_
    from lmslim.modelio import LoadedModel, ResolvedModel, load_model

    def fresh():
        lm = load_model("builtin:tiny-llama")
        return LoadedModel(lm.model, lm.tokenizer, ResolvedModel("in-memory", "memory", None), "clm")

    calib = torch.randint(10, 200, (4, 32), generator=torch.Generator().manual_seed(0))
    base, gptq, wanda = fresh(), fresh(), fresh()
    quantize_(gptq.model, GPTQConfig(bits=4, symmetric=True), calib)
    prune_(wanda.model, WandaConfig(sparsity=0.5), calib)
    run = make_run(tmp_path / "r", "mixed", [_measured(base, "baseline", None), _measured(gptq, "gptq", "quantize"),
                                            _measured(wanda, "wanda", "prune")])
    by = {r["name"]: r for r in collect(load_runs([run]))}
    assert "zeros are not skipped" not in by["gptq"]["verdict"]
    assert by["gptq"]["prune_ratio"] == pytest.approx(0.0)
    assert "zeros are not skipped" in by["wanda"]["verdict"] and by["wanda"]["prune_ratio"] > 0.3


def test_stale_quantized_result_not_called_sparse(tmp_path):
    """Results measured before the cost fix carry rounding zeros in nonzero_params; the report ignores them."""
    base = variant("baseline", None, 20.0, 10.0, 500)
    q = variant("gptq", "quantize", 21.0, 17.0, 170, nonzero=800)
    q["bench"]["quantization"] = {"method": "gptq", "kernels": ["int8"], "bits": [4]}
    p = variant("wanda+q", "quantize", 25.0, 17.0, 120, nonzero=500)
    p["bench"]["quantization"] = {"method": "rtn", "kernels": ["int8"], "bits": [4]}
    p["bench"]["pruning"] = {"methods": ["wanda"], "n_m": None}
    by = {r["name"]: r for r in collect(load_runs([make_run(tmp_path / "r", "q", [base, q, p])]))}
    assert "zeros are not skipped" not in by["gptq"]["verdict"]
    assert "zeros are not skipped" in by["wanda+q"]["verdict"]


def _with(v, **bench):
    v["bench"].update(bench)
    return v


def test_p_comes_from_pruning_not_from_zeros(tmp_path):
    """A baseline with natural zeros (a dequantized k-quant GGUF) is not pruned, nor is its quantized child;
    a pruned model reports what pruning removed, and its quantized child keeps that p."""
    base = variant("baseline", None, 20.0, 10.0, 500, params=1000, nonzero=980)
    q = _with(variant("q", "quantize", 20.5, 14.0, 150, params=1000, nonzero=850),
              quantization={"method": "rtn", "kernels": ["int8"], "bits": [4]})
    pruned = _with(variant("wanda", "prune", 23.0, 10.0, 300, params=1000, nonzero=480),
                   pruning={"methods": ["wanda"], "n_m": None})
    pq = _with(variant("wanda+q", "quantize", 24.0, 14.0, 100, params=1000, nonzero=300),
               quantization={"method": "rtn", "kernels": ["int8"], "bits": [4]},
               pruning={"methods": ["wanda"], "n_m": None})
    runs = [make_run(tmp_path / "a", "q", [base, q]), make_run(tmp_path / "b", "pq", [base, pruned, pq])]
    by = {r["name"]: r for r in collect(load_runs(runs))}
    assert by["baseline"]["prune_ratio"] == 0 and by["q"]["prune_ratio"] == 0
    assert by["wanda"]["prune_ratio"] == pytest.approx(0.5)  # (980 - 480) / 1000: the natural zeros are not pruning's
    assert by["wanda+q"]["prune_ratio"] == pytest.approx(0.5)  # rounding zeros of its quantizer do not count
    assert "zeros are not skipped" not in by["q"]["verdict"] and "zeros are not skipped" in by["wanda"]["verdict"]
    out = tmp_path / "rep"
    build_report(runs, out)
    md = (out / "report.md").read_text()
    baseline_row = next(line for line in md.splitlines() if line.startswith("| baseline |"))
    assert "| 0.00 |" in baseline_row and "0.02" not in baseline_row


def test_p_unknown_when_pruned_and_quantized_unmeasured_in_between(tmp_path):
    base = variant("baseline", None, 20.0, 10.0, 500)
    pq = _with(variant("prune+q", "quantize", 24.0, 14.0, 100, nonzero=300),
               quantization={"method": "rtn", "kernels": ["int8"], "bits": [4]},
               pruning={"methods": ["magnitude"], "n_m": None})
    rows = collect(load_runs([make_run(tmp_path / "r", "pq", [base, pq])]))
    assert rows[1]["prune_ratio"] is None and rows[1]["pruned"]
    assert "zeros are not skipped" in rows[1]["verdict"]


def test_natural_zeros_real_models(tmp_path):
    """Real tiny models: exact zeros put into the baseline by hand are not pruning; wanda is; its quantized
    child keeps wanda's p although quantization adds rounding zeros."""
    import torch

    from lmslim.compress.prune import WandaConfig, prune_
    from lmslim.compress.quantize import RTNConfig, quantize_
    from lmslim.modelio import LoadedModel, ResolvedModel, load_model

    def fresh():
        lm = load_model("builtin:tiny-llama")
        with torch.no_grad():
            for p in lm.model.parameters():  # ~3% exact zeros by nature
                p.masked_fill_(p.abs() < 0.03 * p.abs().max(), 0.0)
        return LoadedModel(lm.model, lm.tokenizer, ResolvedModel("in-memory", "memory", None), "clm")

    calib = torch.randint(10, 200, (4, 32), generator=torch.Generator().manual_seed(0))
    base, wanda, wq = fresh(), fresh(), fresh()
    prune_(wanda.model, WandaConfig(sparsity=0.5), calib)
    prune_(wq.model, WandaConfig(sparsity=0.5), calib)
    quantize_(wq.model, RTNConfig(bits=4, group_size=32), calib)
    b = _measured(base, "baseline", None)
    assert b["bench"]["nonzero_params"] < b["bench"]["params"]  # the baseline has zeros of its own
    run = make_run(tmp_path / "r", "chain",
                   [b, _measured(wanda, "wanda", "prune"), _measured(wq, "wanda+q", "quantize")])
    by = {r["name"]: r for r in collect(load_runs([run]))}
    assert by["baseline"]["prune_ratio"] == 0
    assert by["wanda"]["prune_ratio"] > 0.3
    assert by["wanda+q"]["prune_ratio"] == by["wanda"]["prune_ratio"]


def test_report_names_model_data_task_and_windows(tmp_path):
    base = variant("baseline", None, 20.0, 10.0, 500, sha="B")
    q = variant("int8", "quantize", 20.3, 14.5, 200)
    windows = {"window": 512, "stride": 256, "bos": True, "bos_token": "<s>", "separator": "<s>",
               "documents": "encoded one by one", "min_context": 255}
    for v in (base, q):
        v["eval"].update({"task": "clm", "data": {"spec": "builtin:wiki:test", "examples": 11, "tokens": 100},
                          "window": 512, "stride": 256, "windows": windows})
    run = make_run(tmp_path / "a", "int8", [base, q])
    obj = json.loads((run / "results.json").read_text())
    obj.update({"input": {"spec": "builtin:smollm2-135m", "weights_sha256": "ab" * 32}, "task": "clm"})
    (run / "results.json").write_text(json.dumps(obj))
    # A run written before eval data and windows were recorded per variant still names what it can.
    old = make_run(tmp_path / "b", "old", [variant("baseline", None, 20.0, 10.0, 500, sha="B")])
    obj = json.loads((old / "results.json").read_text())
    obj.update({"input": {"spec": "some/folder"}, "task": "clm", "data": {"eval": "notes.txt"}})
    obj["variants"][0]["eval"].update({"window": 128, "stride": 64})
    (old / "results.json").write_text(json.dumps(obj))
    res = build_report([run, old], tmp_path / "rep")
    md = (tmp_path / "rep" / "report.md").read_text()
    assert md.splitlines()[2].startswith("Model: builtin:smollm2-135m, some/folder. Task: clm. Evaluation data: "
                                       "builtin:wiki:test")
    setup_rows = [line for line in md.split("## Setup")[1].splitlines() if line.startswith("| ")]
    assert setup_rows[1] == ("| int8 | builtin:smollm2-135m | " + "ab" * 6 + " | clm | builtin:wiki:test (100 tokens "
                             "scored) | 512 tokens, stride 256, each starting with <s>; documents separated by '<s>' |")
    assert setup_rows[2] == ("| old | some/folder | – | clm | notes.txt (100 tokens scored) | 128 tokens, stride 64 "
                             "(BOS handling not recorded) |")
    html = (tmp_path / "rep" / "report.html").read_text()
    assert "builtin:smollm2-135m" in html and "builtin:wiki:test" in html and "each starting with &lt;s&gt;" in html
    assert res["setup"][0]["data"].startswith("builtin:wiki:test")


def test_report_cli_background_runs_are_grey_points_only(runs, tmp_path):
    out = tmp_path / "rep"
    assert main(["report", str(runs[0]), "--background", str(runs[1]), "--out", str(out)]) == 0
    rows = json.loads((out / "rows.json").read_text())
    assert {r["name"] for r in rows if not r["background"]} == {"baseline", "int8"}
    assert {r["name"] for r in rows if r["background"]} >= {"wanda", "bad"}
    assert "wanda" not in (out / "report.md").read_text().split("Grey points")[0]  # not a table row
