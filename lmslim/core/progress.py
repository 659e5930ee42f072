"""Progress display on stderr (rich), so stdout stays clean for results.

Bars and spinners are transient and only drawn on a terminal; in CI and pipes they stay silent.
"""

from __future__ import annotations

import contextlib
from typing import Iterable, Iterator, TypeVar

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
