"""Output checks that run before any work: never write over an input, never fail late on a bad path.

Every command that writes takes its output through :func:`check_output` first. It refuses, after
resolving symlinks:

- an output that *is* an input (model folder, .gguf file, teacher, data, recipe, config);
- an output inside an input folder (it would write into the user's model);
- an output folder that *contains* an input (``--overwrite`` would delete it);
- an output that overlaps lmslim's own caches (fetched models, converted GGUFs, data);
- an existing output without ``--overwrite`` (or ``--resume`` where a command resumes);
- an output that cannot be written: under a regular file, on a read-only or immutable folder, under
  ``/proc``. This is tried for real (a probe file is created and removed in the nearest existing
  folder), because ``os.access`` says yes to root on read-only mounts and immutable folders.

Example:
    >>> from pathlib import Path
    >>> from lmslim.core.guard import check_output
    >>> check_output(Path("/tmp/lmslim-doc-out"), inputs=["/tmp"], overwrite=False)
    Traceback (most recent call last):
    ...
    lmslim.core.errors.UserError: output /tmp/lmslim-doc-out lies inside input /tmp; choose an --out outside it
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterable

from lmslim.core.errors import UserError, clip


def local_paths(spec: str | os.PathLike | None) -> list[Path]:
    """The local files/folders a model or data spec names (none for builtin: names and hub ids).

    ``config:FILE`` (a model built from a config file) names FILE. Builtin assets live in lmslim's
    cache, which :func:`cache_roots` protects as a whole.
    """
    if spec is None:
        return []
    s = os.fspath(spec)
    if s.startswith("config:"):
        s = s[len("config:"):]
    if not s or s.startswith("builtin:"):
        return []
    candidates = [s]
    if ":" in s and not Path(s).exists():  # data specs take a ":split" suffix
        candidates.append(s.rsplit(":", 1)[0])
    found = []
    for c in candidates:
        with contextlib.suppress(OSError, ValueError):
            p = Path(c).expanduser()
            if p.exists():
                found.append(p)
    return found


def cache_roots() -> list[Path]:
    from lmslim.core import paths

    return [paths.models_dir(), paths.data_dir(), paths.downloads_dir()]


def _real(p: Path) -> Path:
    try:
        return Path(os.path.realpath(p.expanduser()))
    except (OSError, ValueError) as e:
        raise UserError(f"cannot resolve path {clip(p)}: {e}") from e


def _inside(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def check_no_overlap(out: Path, inputs: Iterable[str | os.PathLike | None], flag: str = "--out") -> None:
    """Refuse ``out`` when it equals, lies inside or contains any input (or lmslim's caches)."""
    real_out = _real(Path(out))
    for spec in inputs:
        for p in local_paths(spec):
            real_in = _real(p)
            if real_out == real_in:
                raise UserError(f"output {clip(out)} is the input {clip(spec)}; lmslim never writes over its "
                                f"input, choose another {flag}")
            if _inside(real_out, real_in):
                raise UserError(f"output {clip(out)} lies inside input {clip(p)}; choose an {flag} outside it")
            if _inside(real_in, real_out):
                raise UserError(f"output {clip(out)} contains the input {clip(p)}; choose an {flag} that does not "
                                "hold the inputs")
    for root in cache_roots():
        real_root = _real(root)
        if _inside(real_out, real_root) or _inside(real_root, real_out):
            raise UserError(f"output {clip(out)} overlaps lmslim's cache {clip(root)}; choose another {flag}")


def check_writable(out: Path, flag: str = "--out", inside: bool = False) -> None:
    """Fail now if ``out`` could not be written later (tries a real write in the nearest existing folder).

    Outputs are built next to ``out`` and renamed into place, so its parent must take new entries;
    with ``inside`` (a resumed run) ``out`` itself must.
    """
    out = Path(out)
    probe = out if inside and out.is_dir() else out.parent if out.exists() else out
    while not probe.exists() and not probe.is_symlink():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.is_symlink() and not probe.exists():
        raise UserError(f"cannot create {clip(out)}: {clip(probe)} is a broken symbolic link; choose another {flag}")
    if not probe.is_dir():
        raise UserError(f"cannot create {clip(out)}: {clip(probe)} is a file, not a folder; choose another {flag}")
    try:
        fd, name = tempfile.mkstemp(prefix=".lmslim-probe-", dir=probe)
    except OSError as e:
        raise UserError(f"cannot write {clip(out)}: {clip(probe)} is not writable ({e.strerror or e}); choose "
                        f"another {flag}") from e
    os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(name)


class OutputLock:
    """An exclusive, non-blocking lock on one output folder, held by the process that writes it.

    A second lmslim run given the same output is refused at once instead of interleaving its files
    with the first one's. The lock is a hidden file next to the output (``.NAME.lock``), removed on
    release; the kernel drops the lock itself if the process dies.
    """

    def __init__(self, out: Path):
        self.path = out.parent / f".{out.name}.lock"
        self._file = None
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a")  # noqa: SIM115 - held open for the life of the lock
        except OSError as e:
            raise UserError(f"cannot write {clip(out)}: {e.strerror or e}; choose another location") from e
        import fcntl

        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.close()
            self._file = None
            raise UserError(f"another lmslim run is writing {clip(out)} right now; wait for it to finish or "
                            "choose another output") from None

    def release(self) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):
                self.path.unlink()
            self._file.close()  # closing drops the flock
            self._file = None

    def __del__(self) -> None:
        self.release()

    def __enter__(self) -> "OutputLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _under_launcher() -> bool:
    # torchrun's workers: the launching process (or the user's own torchrun) owns the output.
    return "LOCAL_RANK" in os.environ


def check_output(out: Path, *, inputs: Iterable[str | os.PathLike | None] = (), overwrite: bool = False,
                 resume: bool = False, folder: bool = True, flag: str = "--out") -> OutputLock | None:
    """Every check an output path needs before any work starts (see the module docstring).

    Returns:
        For a folder, the :class:`OutputLock` the caller holds while it writes (dropped when the
        object goes away); None for a file (written atomically; the last writer wins) and in torchrun
        workers.

    Args:
        out: the output folder (``folder=True``) or file.
        inputs: model/data/recipe/config specs or paths the command reads.
        overwrite: an existing ``out`` may be replaced (after the work succeeds).
        resume: an existing ``out`` is the run to continue.
        folder: ``out`` is a folder (an existing file there is refused) or a file (an existing folder is).
    """
    out = Path(out)
    if not str(out).strip():
        raise UserError(f"{flag} is empty; give a path")
    check_no_overlap(out, inputs, flag)
    check_writable(out, flag, inside=resume)
    lock = OutputLock(out) if folder and not _under_launcher() else None
    try:  # checked under the lock, so two runs cannot both see "does not exist"
        if out.exists() or out.is_symlink():
            if folder and not out.is_dir():
                raise UserError(f"output {clip(out)} is a file; {flag} must be a folder")
            if not folder and out.is_dir():
                raise UserError(f"output {clip(out)} is a folder; {flag} must name a file")
            if folder and not (overwrite or resume):
                raise UserError(f"output {clip(out)} already exists; choose a new {flag} or pass --overwrite")
    except UserError:
        if lock is not None:
            lock.release()
        raise
    return lock
