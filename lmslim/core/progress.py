"""Progress display on stderr (rich), so stdout stays clean for results.

Bars and spinners are transient and only drawn on a terminal; in CI and pipes they stay silent,
except where a job reports itself with :class:`LineProgress` (plain lines every so often, with rate
and ETA), so that a long run written to a log file does not look dead.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from typing import Callable, Iterable, Iterator, TypeVar

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn, \
    TimeRemainingColumn

T = TypeVar("T")


def console() -> Console:
    return Console(stderr=True)


@contextlib.contextmanager
def status(message: str) -> Iterator[None]:
    """A spinner for a step of unknown length."""
    con = console()
    if not con.is_terminal:
        yield
        return
    with con.status(message):
        yield


def track(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """Iterate with a progress bar (count, elapsed, ETA)."""
    con = console()
    if not con.is_terminal:
        yield from items
        return
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn())
    with Progress(*columns, console=con, transient=True) as progress:
        task = progress.add_task(description, total=total if total is not None else len(items))  # type: ignore[arg-type]
        for item in items:
            yield item
            progress.advance(task)


def _clock(seconds: float) -> str:
    s = int(max(0.0, seconds) + 0.5)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class LineProgress:
    """Progress as plain lines, for output that is not a terminal (CI, a log file, nohup).

    A line is written at the first update, then at most once every ``interval_s`` seconds, and at
    :meth:`close`: ``train 120/1000 (12%) loss 2.3100 950 tok/s | 0.42 steps/s | elapsed 0:04:45 |
    ETA 0:34:55``. The rate and ETA count only the updates of this process (a resumed job starts at
    ``start``). Lines go to ``logger`` when it shows INFO (``LMSLIM_LOG=INFO``); otherwise straight to
    stderr, because the CLI's default level (WARNING) would hide them: either way they appear once.

    Example:
        >>> import io
        >>> out = io.StringIO()
        >>> p = LineProgress("train", total=4, stream=out, clock=iter([0.0, 2.0, 4.0, 8.0]).__next__)
        >>> p.update(1, "loss 2.0000")
        >>> print(out.getvalue().strip())
        train 1/4 (25%) loss 2.0000 | 0.50 steps/s | elapsed 0:00:02 | ETA 0:00:06
    """

    def __init__(self, description: str, total: int, start: int = 0, interval_s: float = 30.0,
                 logger: logging.Logger | None = None, stream=None, clock: Callable[[], float] = time.monotonic,
                 unit: str = "step"):
        self.description, self.total, self.start, self.interval_s = description, total, start, interval_s
        self.unit = unit
        self.logger = logger or logging.getLogger("lmslim.progress")
        self.stream = stream  # None: sys.stderr at write time (so redirections made later count)
        self.clock = clock
        self.t0 = clock()
        self.last_line: float | None = None
        self.completed = start
        self.info = ""

    def update(self, completed: int, info: str = "", force: bool = False) -> None:
        """Record progress; write a line if it is the first, ``interval_s`` has passed, or ``force``."""
        self.completed = completed
        self.info = info or self.info
        now = self.clock()
        if force or self.last_line is None or now - self.last_line >= self.interval_s:
            self._write(now)

    def close(self, info: str = "") -> None:
        """Write the closing line (unless the last update just wrote one)."""
        if info:
            self.info = info
        now = self.clock()
        if self.last_line is None or now > self.last_line or info:
            self._write(now, closing=True)

    def line(self, now: float, closing: bool = False) -> str:
        done = self.completed - self.start
        elapsed = now - self.t0
        rate = done / elapsed if elapsed > 0 else 0.0
        pct = f" ({100 * self.completed / self.total:.0f}%)" if self.total else ""
        parts = [f"{self.description} {self.completed}/{self.total}{pct}" + (f" {self.info}" if self.info else "")]
        parts.append(f"{rate:.2f} {self.unit}s/s" if rate >= 0.1 or not rate else f"{1 / rate:.1f} s/{self.unit}")
        parts.append(f"elapsed {_clock(elapsed)}")
        if closing:
            parts.append("done" if self.total and self.completed >= self.total else "stopped")
        else:
            left = max(0, self.total - self.completed)
            parts.append(f"ETA {_clock(left / rate) if rate > 0 else '?'}")
        return " | ".join(parts)

    def _write(self, now: float, closing: bool = False) -> None:
        self.last_line = now
        text = self.line(now, closing)
        if self.logger.isEnabledFor(logging.INFO):
            self.logger.info(text)
        else:
            stream = self.stream or sys.stderr
            stream.write(text + "\n")
            stream.flush()
