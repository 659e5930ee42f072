"""What a search optimizes and what it must respect: the objective and the budget, parsed and checked.

A budget is one or more comma-separated terms ``METRIC<=LIMIT`` or ``METRIC>=LIMIT``. A limit is
absolute (``ppl<=30``, ``size_mb<=80``) or relative to the input model measured the same way
(``ppl<=+5%``: at most 5% above the baseline's perplexity; ``accuracy>=-1%``). The first quality term
(perplexity, accuracy, macro-F1, Spearman) names the quality axis of the search; the objective is
one cost measured by ``lmslim bench`` in the chosen engine.

Example:
    >>> b = parse_budget("ppl<=+5%, size_mb<=80")
    >>> [t.metric for t in b], b[0].limit(20.0), b[1].limit(200.0)
    (['perplexity', 'size_mb'], 21.0, 80.0)
    >>> b[0].violation(21.5, 20.0) > 0, b[0].violation(20.5, 20.0) <= 0
    (True, True)
    >>> parse_objective("decode_tok_s")
    Objective(name='decode_tokens_per_s', maximize=True)
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from lmslim.core.configs import did_you_mean, show
from lmslim.core.errors import UserError

# quality metrics (from eval.json): higher is better?
QUALITY = {"perplexity": False, "accuracy": True, "macro_f1": True, "spearman": True}
# costs (from bench.json): higher is better?
COSTS = {"decode_tokens_per_s": True, "prefill_tokens_per_s": True, "prefill_ms_p50": False,
         "decode_ms_per_token_p50": False, "size_mb": False, "peak_rss_mb": False}
ALIASES = {"ppl": "perplexity", "acc": "accuracy", "f1": "macro_f1", "decode_tok_s": "decode_tokens_per_s",
           "tok_s": "decode_tokens_per_s", "prefill_tok_s": "prefill_tokens_per_s", "prefill_ms": "prefill_ms_p50",
           "ms_per_token": "decode_ms_per_token_p50", "size": "size_mb", "rss_mb": "peak_rss_mb",
           "memory_mb": "peak_rss_mb"}
_TERM = re.compile(r"^\s*([A-Za-z_]+)\s*(<=|>=)\s*([+-]?)(\d+(?:\.\d+)?)\s*(%?)\s*$")
MAX_TERMS = 8


def canonical(name: str, allowed: dict[str, bool], what: str) -> str:
    """The metric's own name for ``name`` or an alias of it; one-line error otherwise."""
    key = ALIASES.get(name.strip().lower(), name.strip().lower())
    if key not in allowed:
        names = sorted(set(allowed) | {a for a, v in ALIASES.items() if v in allowed})
        raise UserError(f"unknown {what} {show(name)}{did_you_mean(key, names)}; choose one of: {', '.join(names)}")
    return key


@dataclass(frozen=True)
class Term:
    """One budget term: ``metric`` (canonical) ``op`` (``<=``/``>=``) an absolute value or a relative change."""

    metric: str
    op: str
    value: float
    relative: bool  # value is a fraction of the baseline (+0.05 = +5%)
    text: str

    def limit(self, baseline: float | None) -> float:
        if not self.relative:
            return self.value
        if baseline is None:
            raise UserError(f"budget {self.text!r} is relative but the baseline has no {self.metric}")
        return baseline * (1.0 + self.value)

    def violation(self, value: float, baseline: float | None) -> float:
        """≤ 0 when the term holds (Optuna's constraint convention); the margin by which it fails otherwise."""
        lim = self.limit(baseline)
        return value - lim if self.op == "<=" else lim - value

    @property
    def is_quality(self) -> bool:
        return self.metric in QUALITY


def parse_budget(text: str) -> tuple[Term, ...]:
    """Terms of a budget string (see the module docstring); a clear one-line error for anything else."""
    if not isinstance(text, str) or not text.strip():
        raise UserError('--budget is empty; give e.g. "ppl<=+5%"')
    parts = [p for p in text.split(",")]
    if len(parts) > MAX_TERMS:
        raise UserError(f"--budget has {len(parts)} terms; at most {MAX_TERMS}")
    terms = []
    for part in parts:
        m = _TERM.match(part)
        if not m:
            raise UserError(f"cannot parse budget term {show(part.strip())}; write METRIC<=LIMIT or METRIC>=LIMIT, "
                            'e.g. "ppl<=+5%", "accuracy>=-1%", "size_mb<=80"')
        name, op, sign, number, pct = m.groups()
        metric = canonical(name, {**QUALITY, **COSTS}, "budget metric")
        if bool(sign) != bool(pct):
            raise UserError(f"budget term {show(part.strip())}: a relative limit has a sign and a %, e.g. +5%; "
                            "an absolute one has neither")
        value = float(number) * (-1 if sign == "-" else 1) / (100 if pct else 1)
        if pct and value <= -1:
            raise UserError(f"budget term {show(part.strip())}: a change of {sign}{number}% leaves nothing")
        terms.append(Term(metric, op, value, bool(pct), part.strip()))
    if len({t.metric for t in terms}) != len(terms):
        raise UserError("--budget names a metric twice")
    return tuple(terms)


@dataclass(frozen=True)
class Objective:
    """The cost a search improves, measured by ``lmslim bench`` in the search's engine."""

    name: str
    maximize: bool


def parse_objective(text: str) -> Objective:
    name = canonical(text, COSTS, "objective")
    return Objective(name, COSTS[name])


def quality_axis(terms: tuple[Term, ...], task: str) -> tuple[str, bool]:
    """(metric, higher_is_better) of the search's quality axis: the budget's quality term, or the task's own."""
    for t in terms:
        if t.is_quality:
            return t.metric, QUALITY[t.metric]
    default = {"clm": "perplexity", "seq-cls": "accuracy", "token-cls": "macro_f1", "embed": "spearman"}[task]
    return default, QUALITY[default]
