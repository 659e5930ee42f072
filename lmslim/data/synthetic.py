"""Small synthetic labelled sets, for tests and examples only.

Real labelled data is scarce offline, so these generators make clearly synthetic examples from
templates. Numbers measured on them say that code works, not how good a model is.
"""

from __future__ import annotations

import random

_PER = [["Anna", "Berg"], ["Luis"], ["Mei", "Chen"], ["Omar", "Haddad"], ["Ingrid"], ["Kofi", "Mensah"]]
_LOC = [["Paris"], ["New", "York"], ["Nairobi"], ["Lake", "Como"], ["Oslo"], ["Buenos", "Aires"]]
_ORG = [["Acme", "Corp"], ["the", "Red", "Cross"], ["Nokia"], ["Oxfam"], ["Globex", "Labs"]]
_TEMPLATES = [
    "{PER} works for {ORG} in {LOC} .",
    "{PER} moved to {LOC} last year .",
    "{ORG} opened an office in {LOC} .",
    "Yesterday {PER} met {PER} at {ORG} .",
    "The weather in {LOC} was mild .",
    "{ORG} hired {PER} .",
]
_POS = ["a warm , funny and moving film", "sharp writing and a great cast", "I loved every minute of it",
        "beautifully shot and well acted", "a delight from start to finish"]
_NEG = ["a dull and tedious mess", "the plot makes no sense at all", "I wanted my money back",
        "badly acted and far too long", "a boring , lifeless film"]


def synthetic_ner(n: int, seed: int = 0) -> tuple[list[list[str]], list[list[str]]]:
    """``n`` template sentences with BIO tags for PER, LOC and ORG."""
    rng = random.Random(seed)
    pools = {"PER": _PER, "LOC": _LOC, "ORG": _ORG}
    tokens, tags = [], []
    for _ in range(n):
        toks: list[str] = []
        tg: list[str] = []
        for word in rng.choice(_TEMPLATES).split():
            if word.startswith("{") and word.endswith("}"):
                kind = word[1:-1]
                entity = rng.choice(pools[kind])
                toks.extend(entity)
                tg.extend([f"B-{kind}"] + [f"I-{kind}"] * (len(entity) - 1))
            else:
                toks.append(word)
                tg.append("O")
        tokens.append(toks)
        tags.append(tg)
    return tokens, tags


def synthetic_sentiment(n: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """``n`` short review sentences labelled ``pos`` / ``neg`` (balanced)."""
    rng = random.Random(seed)
    texts, labels = [], []
    for i in range(n):
        label = "pos" if i % 2 == 0 else "neg"
        texts.append(rng.choice(_POS if label == "pos" else _NEG))
        labels.append(label)
    return texts, labels


def to_conll(tokens: list[list[str]], tags: list[list[str]]) -> str:
    """CoNLL text: ``token TAG`` per line, blank line between sentences."""
    return "\n\n".join("\n".join(f"{t} {g}" for t, g in zip(ts, gs)) for ts, gs in zip(tokens, tags)) + "\n"
