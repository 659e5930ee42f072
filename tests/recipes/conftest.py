import random

import pytest


@pytest.fixture()
def text_file(tmp_path):
    """A few thousand words of plain text (byte-level tiny tokenizer: ~60k tokens)."""
    rng = random.Random(0)
    words = ("the model reads text and predicts the next word while the cat sits on a warm mat near "
             "rivers hills and quiet towns under bright skies").split()
    p = tmp_path / "text.txt"
    p.write_text("\n\n".join(" ".join(rng.choice(words) for _ in range(150)) for _ in range(60)))
    return p
