"""Failpoints: named places where a test can make the process die, to prove what survives a crash.

``LMSLIM_FAILPOINT=NAME[@K]`` makes the process SIGKILL itself the K-th time (default 1st) it passes
the failpoint ``NAME``. Nothing else reads the variable, and an unset variable costs one dictionary
lookup. The kill/resume trials (tests/cli/test_faults.py, RELIABILITY.md) use it to land a kill in
a chosen phase: before the first checkpoint, while a checkpoint is written, while a result is
published.

Named failpoints:

- ``write``: a file written atomically, before its rename into place;
- ``publish``: an output folder built in its temporary sibling, before the rename;
- ``train-step``: after an optimizer step (before any checkpoint of that step);
- ``checkpoint``: a checkpoint's files written, before its rename into place;
- ``compress-stage``: a compress stage's model saved, before its measurements;
- ``compress-final``: the final model moved out of its stage, before results.json and the rename.

Example:
    >>> from lmslim.core.faults import failpoint
    >>> failpoint("publish")  # no LMSLIM_FAILPOINT set: returns at once
"""

from __future__ import annotations

import os
import signal

_hits: dict[str, int] = {}  # per-process pass counts; only touched when a failpoint is armed


def failpoint(name: str) -> None:
    """SIGKILL this process if ``LMSLIM_FAILPOINT`` names ``name`` and its count is reached."""
    armed = os.environ.get("LMSLIM_FAILPOINT")
    if not armed:
        return
    target, _, count = armed.partition("@")
    if target != name:
        return
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] >= int(count or 1):
        os.kill(os.getpid(), signal.SIGKILL)
