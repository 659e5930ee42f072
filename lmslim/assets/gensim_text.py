"""Small labelled text sets carried in gensim's test data (real text, tiny).

- ``pang_lee_polarity.cor``: 200 movie-review sentences labelled ``__label__pos``/``__label__neg``.
- ``lee.cor`` + ``similarities0-1.txt``: 50 news documents and the mean human similarity ratings of
  every pair (Lee, Pincombe & Welsh 2005), an upper-triangular 50×50 matrix.
"""

from __future__ import annotations

import json
from pathlib import Path

from lmslim.core.io import atomic_write_text


def write_polarity(src: Path, out: Path) -> int:
    rows = []
    for line in src.read_text(encoding="utf-8", errors="replace").splitlines():
        label, _, text = line.strip().partition(" ")
        if label.startswith("__label__") and text:
            rows.append({"text": text.strip(), "label": label.removeprefix("__label__")})
    atomic_write_text(out, "".join(json.dumps(r) + "\n" for r in rows))
    return len(rows)


def write_lee_pairs(docs: Path, sims: Path, out: Path) -> int:
    texts = [t.strip() for t in docs.read_text(encoding="utf-8", errors="replace").splitlines() if t.strip()]
    matrix = [[float(x) for x in line.split()] for line in sims.read_text().splitlines() if line.strip()]
    if len(texts) != len(matrix):
        raise ValueError(f"{len(texts)} documents but a {len(matrix)}-row similarity matrix")
    rows = [{"sentence1": texts[i], "sentence2": texts[j], "score": matrix[i][j]}
            for i in range(len(texts)) for j in range(i + 1, len(texts))]
    atomic_write_text(out, "".join(json.dumps(r) + "\n" for r in rows))
    return len(rows)
