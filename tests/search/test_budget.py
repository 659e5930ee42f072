import pytest

from lmslim.core.errors import UserError
from lmslim.search.budget import parse_budget, parse_objective, quality_axis


def test_relative_and_absolute_terms():
    ppl, size = parse_budget("ppl<=+5%, size_mb<=80")
    assert (ppl.metric, ppl.op, ppl.relative) == ("perplexity", "<=", True)
    assert ppl.limit(20.0) == pytest.approx(21.0) and size.limit(999.0) == 80.0
    assert ppl.violation(21.2, 20.0) == pytest.approx(0.2) and ppl.violation(20.9, 20.0) < 0
    (acc,) = parse_budget("accuracy>=-1%")
    assert acc.limit(0.80) == pytest.approx(0.792) and acc.violation(0.79, 0.80) > 0 >= acc.violation(0.795, 0.80)
    assert quality_axis((size,), "clm") == ("perplexity", False) and quality_axis((acc,), "seq-cls") == ("accuracy", True)


@pytest.mark.parametrize("text, message", [
    ("", "empty"), ("ppl<5%", "cannot parse"), ("ppl<=5%", "relative limit has a sign"), ("ppl<=+5", "sign and a %"),
    ("perplexty<=+5%", "did you mean"), ("ppl<=+5%,ppl<=30", "twice"), ("ppl<=-100%", "leaves nothing"),
    ("ppl<=+5%," * 9, "at most"),
])
def test_bad_budgets_are_one_line_errors(text, message):
    with pytest.raises(UserError, match=message):
        parse_budget(text)


def test_objectives():
    assert parse_objective("decode_tok_s").maximize and not parse_objective("size_mb").maximize
    assert parse_objective("prefill_ms").name == "prefill_ms_p50"
    with pytest.raises(UserError, match="unknown objective"):
        parse_objective("perplexity")  # quality is the other axis, not an objective
