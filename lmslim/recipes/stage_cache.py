"""Stage outputs shared between runs: a run whose first stages equal an earlier run's reuses them.

``lmslim compress`` fingerprints each stage by its input (the chain of every earlier stage, back to
the input model's weights) and its options and data. The same fingerprint in another run means the
same output, so a search whose trials share a prefix (the same structured prune and distillation,
then different quantization types) computes that prefix once. Entries are immutable folders named by
fingerprint: the stage's ``done.json``, ``stage.json``, its ``model/`` and any exported artifact.
Measurements are not cached here (they depend on the eval/bench settings; ``--measure-cache`` keys
them by weights and settings instead).

Files are hard-linked, not copied, where the file system allows it, so a hit costs no disk space and
no time; entries are never modified in place (a safetensors file is written once), which is what makes
sharing the inodes safe. Several processes may use one cache: an entry appears in one rename, and
two writers of the same entry keep whichever landed first.

Example:
    >>> import tempfile, json, pathlib
    >>> root = pathlib.Path(tempfile.mkdtemp())
    >>> stage = root / "run" / "00-quantize"
    >>> (stage / "model").mkdir(parents=True)
    >>> _ = (stage / "done.json").write_text(json.dumps({"fingerprint": "abc", "weights_sha256": "w"}))
    >>> cache = StageCache(root / "cache")
    >>> cache.store("abc", stage)
    >>> other = root / "run2" / "00-quantize"
    >>> cache.fetch("abc", other), (other / "model").is_dir()
    (True, True)
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import uuid
from pathlib import Path

log = logging.getLogger(__name__)

# Files that describe a measurement under one run's settings, not the stage's output.
_NOT_CACHED = {"eval.json", "bench.json", "scratch"}


def link_or_copy(src: str, dst: str) -> None:
    """Hard-link ``src`` to ``dst``; copy where the file system cannot link."""
    try:
        os.link(src, dst)
    except OSError as e:  # another file system, or one without hard links
        if e.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
            raise
        shutil.copy2(src, dst)


def _clone(src: Path, dst: Path) -> None:
    """``dst`` (must not exist) gets ``src``'s files, hard-linked where possible, minus measurements."""
    shutil.copytree(src, dst, copy_function=link_or_copy, ignore=lambda d, names: [n for n in names if
                                                                                    Path(d) == src and n in _NOT_CACHED])


class StageCache:
    """A folder of finished stage outputs keyed by their fingerprint (see the module docstring)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.hits = 0

    def _entry(self, fingerprint: str) -> Path:
        return self.root / fingerprint

    def fetch(self, fingerprint: str, stage_dir: Path) -> bool:
        """Fill ``stage_dir`` (replaced) from the cache; False when there is no complete entry."""
        entry = self._entry(fingerprint)
        done = entry / "done.json"
        try:
            if json.loads(done.read_text()).get("fingerprint") != fingerprint:
                return False
        except (OSError, ValueError):
            return False
        if stage_dir.exists():
            shutil.rmtree(stage_dir)
        _clone(entry, stage_dir)
        self.hits += 1
        log.info("stage %s reused from %s", stage_dir.name, entry)
        return True

    def store(self, fingerprint: str, stage_dir: Path) -> None:
        """Add a finished stage (its ``done.json`` written) unless an entry is already there."""
        entry = self._entry(fingerprint)
        if entry.exists():
            return
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".{fingerprint}.{uuid.uuid4().hex[:8]}.partial"
        try:
            _clone(stage_dir, tmp)
            os.rename(tmp, entry)  # one rename; a folder already there (another writer) refuses it
        except OSError as e:
            if not entry.exists():
                log.warning("could not cache stage %s: %s", stage_dir.name, e)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
