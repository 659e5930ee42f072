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
