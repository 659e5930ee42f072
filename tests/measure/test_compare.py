import json

import pytest

from lmslim.core.errors import UserError
from lmslim.measure.compare import compare, to_markdown


def _write(path, obj):
    path.write_text(json.dumps(obj))
    return str(path)


def test_merge_by_weights_and_ratios(tmp_path):
    base = {"spec": "base", "weights_sha256": "aa"}
    small = {"spec": "small", "weights_sha256": "bb"}
    files = [
        _write(tmp_path / "1.json", {"kind": "eval", "model": base, "perplexity": 20.0}),
        _write(tmp_path / "2.json", {"kind": "bench", "model": base, "decode_tokens_per_s": 10.0,
                                      "prefill_ms_p50": 100.0, "size_mb": 500.0}),
        _write(tmp_path / "3.json", {"kind": "eval", "model": small, "perplexity": 22.0}),
        _write(tmp_path / "4.json", {"kind": "bench", "model": small, "decode_tokens_per_s": 25.0,
                                      "prefill_ms_p50": 50.0, "size_mb": 125.0}),
    ]
    rows = compare(files)
    assert [r["model"] for r in rows] == ["base", "small"]
    assert rows[1]["decode_speed_x"] == pytest.approx(2.5)
    assert rows[1]["prefill_speed_x"] == pytest.approx(2.0)
    assert rows[1]["size_x"] == pytest.approx(0.25)
    assert rows[1]["perplexity_delta_pct"] == pytest.approx(10.0)
    md = to_markdown(rows)
    assert "| small | 22 | +10.0% ppl | 25.0 | 2.50× |" in md


def test_rejects_non_results(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        compare([str(tmp_path / "none.json")])
    with pytest.raises(UserError, match="not an lmslim eval or bench result"):
        compare([_write(tmp_path / "x.json", {"hello": 1})])
