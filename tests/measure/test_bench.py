import pytest

from lmslim.core.errors import UserError
from lmslim.modelio import load_model
from lmslim.measure.bench import BenchConfig, bench, percentile

REQUIRED = {"prefill_ms_p50": float, "prefill_ms_p95": float, "decode_tokens_per_s": float, "peak_rss_mb": float,
            "size_mb": float, "params": int, "nonzero_params": int, "flops_per_token": int,
            "bytes_read_per_token": int, "bandwidth_gbs": float, "decode_bound_tokens_per_s": float,
            "fraction_of_bound": float}


def test_bench_schema_and_consistency():
    lm = load_model("builtin:tiny-gpt2")
    r = bench(lm, BenchConfig(prompt_len=8, gen_len=4, repeats=3, warmup=1))
    for key, typ in REQUIRED.items():
        assert isinstance(r[key], typ), key
    assert r["prefill_ms_p95"] >= r["prefill_ms_p50"] > 0
    assert r["fraction_of_bound"] == pytest.approx(r["decode_tokens_per_s"] / r["decode_bound_tokens_per_s"])
    assert r["decode_bound_tokens_per_s"] == pytest.approx(r["bandwidth_gbs"] * 1e9 / r["bytes_read_per_token"])
    assert r["nonzero_params"] <= r["params"]
    assert r["notes"]


def test_bench_encoder_has_no_decode():
    lm = load_model("builtin:tiny-bert", task="embed")
    r = bench(lm, BenchConfig(prompt_len=8, gen_len=4, repeats=2, warmup=0))
    assert r["decode_tokens_per_s"] is None and r["prefill_ms_p50"] > 0


def test_bench_rejects_too_long():
    lm = load_model("builtin:tiny-llama")
    with pytest.raises(UserError, match="exceeds the model's 1024 positions"):
        bench(lm, BenchConfig(prompt_len=1000, gen_len=100, repeats=1))


@pytest.mark.parametrize("field", ["batch", "prompt_len", "gen_len", "repeats"])
def test_bench_config_rejects_non_positive(field):
    with pytest.raises(UserError, match=field.replace("_", "-")):
        BenchConfig(**{field: 0})


def test_percentile():
    xs = [float(x) for x in range(1, 101)]
    assert percentile(xs, 50) == pytest.approx(50.5)
    assert percentile(xs, 95) == pytest.approx(95.05)
    assert percentile([3.0], 95) == 3.0
