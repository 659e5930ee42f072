"""Atomic file output and content hashing.

Outputs are written to a temporary sibling, flushed with fsync and renamed into place, so a reader
never sees half a file and an interrupted run never leaves a truncated result behind.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from lmslim.core.errors import UserError
from lmslim.core.faults import failpoint


# Failures of the machine the user can fix: no space, a quota, a read-only or vanished location.
_USER_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}
# Libraries that write through their own I/O layer (safetensors in Rust, torch's zip writer) raise
# their own exception types; these fragments of their messages mean the same conditions.
_DISK_FULL_TEXT = ("No space left", "StorageFull", "os error 28", "Disk quota", "file write failed",
                   "Read-only file system", "os error 30")


def storage_error(e: BaseException, path: str | os.PathLike) -> UserError | None:
    """A :class:`UserError` for a write that failed because of the disk (full, quota, read-only), else None."""
    code = getattr(e, "errno", None)
    text = str(e)
    if code in _USER_ERRNOS or any(s in text for s in _DISK_FULL_TEXT):
        reason = os.strerror(code) if code in _USER_ERRNOS else next(s for s in _DISK_FULL_TEXT if s in text)
        if reason in ("file write failed", "StorageFull", "os error 28", "No space left"):
            reason = "No space left on device"
        return UserError(f"cannot write {path}: {reason}; free space or choose another location (nothing "
                         "partial was kept)")
    return None


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temp file, fsync, rename)."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=parent)
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror or e}; choose a writable location") from e
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it private; results are ordinary files
        failpoint("write")
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if (err := storage_error(e, path)) is not None:
            raise err from e
        raise
    _fsync_dir(parent)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike) -> Iterator[Path]:
    """Build a directory in a temporary sibling and rename it into place on success.

    On failure the temporary directory is removed and ``final`` is left as it was.
    """
    final = Path(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        # Left by a writer that was killed: callers are the only writer of ``final`` (output lock or
        # cache file lock), so any earlier temporary sibling is dead.
        for stale in final.parent.glob(f".{glob.escape(final.name)}.*.partial"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent))
    except OSError as e:
        raise storage_error(e, final) or UserError(f"cannot write {final}: {e.strerror or e}") from e
    try:
        yield tmp
        failpoint("publish")
        publish_dir(tmp, final)
    except BaseException as e:
        if (err := storage_error(e, final)) is not None:
            raise err from e
        raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def publish_dir(tmp: Path, final: Path) -> None:
    """Make the finished folder ``tmp`` appear as ``final`` in one rename, durably.

    Every file is fsynced first, so the rename never exposes data that is not on disk. An existing
    ``final`` is moved aside (``.NAME.old``) and removed only once the new folder is in place, so a
    crash leaves either the old result or the new one, never neither.
    """
    _fsync_tree(tmp)
    os.chmod(tmp, 0o755)  # mkdtemp makes folders private; results are ordinary folders
    if final.exists():
        old = final.parent / f".{final.name}.old"
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_dir(final.parent)


def _fsync_tree(folder: Path) -> None:
    for p in folder.rglob("*"):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    _fsync_dir(folder)


def check_saved_model(folder: str | os.PathLike) -> None:
    """Refuse to publish a ``save_pretrained`` folder that holds no config or weights.

    transformers (5.x) silently skips writing model files on a non-zero rank once ``torch.distributed``
    is initialised; a cached asset built there would be published without its weights. Assets are
    therefore built before the process group starts (the CLIs resolve model specs first); this check
    turns any other such path into an error instead of a broken cache.
    """
    folder = Path(folder)
    weights = list(folder.glob("*.safetensors")) + list(folder.glob("pytorch_model*.bin"))
    if not (folder / "config.json").is_file() or not weights:
        raise RuntimeError(f"save_pretrained wrote no model files into {folder} (transformers skips saving on "
                           "non-zero torch.distributed ranks); build assets before the process group starts")


@contextlib.contextmanager
def file_lock(path: str | os.PathLike) -> Iterator[None]:
    """Exclusive inter-process lock on ``path`` (created if missing): one builder at a time.

    Used where several processes may build the same cached asset at once (the ranks of a torchrun job).
    """
    import fcntl

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22, keep_cache: bool = True) -> str:
    """SHA-256 of a file's bytes.

    ``keep_cache=False`` drops each chunk from the page cache once hashed: clean cached pages are
    charged to the reader's memory cgroup, so hashing a file larger than a memory limit would fill
    the group before any work starts (they are reclaimable, but they crowd out what is not).
    """
    h = hashlib.sha256()
    with open(path, "rb") as f:
        offset = 0
        while block := f.read(chunk):
            h.update(block)
            if not keep_cache and hasattr(os, "posix_fadvise"):
                os.posix_fadvise(f.fileno(), offset, len(block), os.POSIX_FADV_DONTNEED)
            offset += len(block)
    return h.hexdigest()


def sha256_files(paths: list[Path], keep_cache: bool = True) -> str:
    """One hash over several files (names and contents), order-independent in input."""
    h = hashlib.sha256()
    for p in sorted(paths, key=lambda p: p.name):
        h.update(p.name.encode())
        h.update(sha256_file(p, keep_cache=keep_cache).encode())
    return h.hexdigest()
