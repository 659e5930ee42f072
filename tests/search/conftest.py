import pytest


@pytest.fixture(scope="session")
def block_model(tmp_path_factory):
    """A saved 2-layer Llama whose widths (64, 128) GGUF's 32-blocks divide, also after removing 25-50% of FFN."""
    from lmslim.modelio import save_model
    from tests.modelio.test_export_gguf import tiny_llama

    model, tok = tiny_llama(hidden=64, ff=128, init=0.25, seed=1)
    path = tmp_path_factory.mktemp("search-model") / "tiny"
    save_model(model, tok, path)
    return path


@pytest.fixture(scope="session")
def texts(tmp_path_factory):
    """Separate evaluation and calibration/training text (a few thousand bytes each)."""
    import random

    rng = random.Random(0)
    words = ("the model reads text and predicts the next word while the cat sits on a warm mat near rivers hills and "
             "quiet towns under bright skies").split()
    root = tmp_path_factory.mktemp("search-text")
    out = {}
    for name in ("eval", "train"):
        p = root / f"{name}.txt"
        p.write_text("\n\n".join(" ".join(rng.choice(words) for _ in range(120)) for _ in range(30)))
        out[name] = p
    return out
