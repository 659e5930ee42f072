"""Where lmslim keeps fetched assets and converted models.

Everything lives under ``$LMSLIM_HOME`` (default ``~/.cache/lmslim``). The home is read from the
environment each time it is asked for, so tests and users can point it elsewhere per process.
"""

from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    """The cache root: ``$LMSLIM_HOME`` or ``~/.cache/lmslim``."""
    return Path(os.environ.get("LMSLIM_HOME") or Path.home() / ".cache" / "lmslim").expanduser()


def models_dir() -> Path:
    return home() / "models"


def data_dir() -> Path:
    return home() / "data"


def downloads_dir() -> Path:
    return home() / "downloads"
