"""Shared fixtures.

Unit tests run against a private ``$LMSLIM_HOME`` (tiny models are built there once per session).
Integration tests, marked ``integration``, use the real home so fetched assets are reused.
"""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def unit_home(tmp_path_factory):
    return tmp_path_factory.mktemp("lmslim-home")


@pytest.fixture(autouse=True)
def _isolated_home(request, unit_home, monkeypatch):
    if request.node.get_closest_marker("integration") is None:
        monkeypatch.setenv("LMSLIM_HOME", str(unit_home))
    yield


def pytest_collection_modifyitems(config, items):
    """Tests marked ``full`` (the long reliability sets) run only with LMSLIM_FULL=1 (RELIABILITY.md)."""
    import os

    if os.environ.get("LMSLIM_FULL"):
        return
    skip = pytest.mark.skip(reason="long reliability set: run with LMSLIM_FULL=1 (see RELIABILITY.md)")
    for item in items:
        if item.get_closest_marker("full") is not None:
            item.add_marker(skip)
