"""The deployment engines a test module needs: imported, or the module skipped — never skipped in CI.

CI sets ``LMSLIM_REQUIRE_ENGINES=1`` (``.ci/run``), so there a missing engine is an import error, not
a skip dressed as passing.
"""

import importlib
import os

import pytest


def require_engines(*modules: str) -> None:
    """Import each of ``modules`` (e.g. ``llama_cpp``, ``onnxruntime``) or skip the calling test module."""
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            if os.environ.get("LMSLIM_REQUIRE_ENGINES"):
                raise
            pytest.skip(f"{name} is not installed (pip install 'lmslim[engines]'); set LMSLIM_REQUIRE_ENGINES=1 to "
                        "make this a failure", allow_module_level=True)


# A few short documents for engine-vs-PyTorch checks (perplexity windows, tokenizers).
TEXT = ["The quick brown fox jumps over the lazy dog. " * 6, "Numbers 1234 and 56, punctuation: (yes!) ok? " * 5,
        "Another short document about llamas, engines and files. " * 4]


def engine_model():
    """The tiny Llama (and tokenizer) the engine tests export: wide initialisation so attention is far from
    uniform, and a wrong q/k layout shows in the logits."""
    from tests.modelio.test_export_gguf import tiny_llama

    return tiny_llama(init=0.25, seed=1)
