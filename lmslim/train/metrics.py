"""Where training numbers go: ``metrics.jsonl``, TensorBoard events and progress on stderr.

Only rank 0 writes anything. ``metrics.jsonl`` is appended line by line (one JSON object per logged
step, flushed at once) so it can be tailed during a run; on resume, lines past the checkpoint's step
are dropped so the file reads like one uninterrupted run.

Progress is a rich bar on a terminal. When stderr is not one (CI, a log file, nohup) the bar would
draw nothing for the whole run, so it is a line with step/total, loss, tokens/s, rate and ETA instead,
at the first step, every ``log.progress_every_s`` seconds and at the end
(:class:`lmslim.core.progress.LineProgress`).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from lmslim.core.progress import LineProgress, console

log = logging.getLogger(__name__)


class MetricsLogger:
    """JSONL + TensorBoard + progress (a rich bar on a terminal, else timed lines): loss, lr, tokens/s, ETA."""

    def __init__(self, out_dir: Path | None, enabled: bool, total_steps: int, start_step: int = 0,
                 tensorboard: bool = True, progress: bool = True, progress_every_s: float = 30.0) -> None:
        self.enabled = enabled
        self.file = None
        self.writer = None
        self.progress = None
        self.lines: LineProgress | None = None
        if not enabled:
            return
        if out_dir is not None:
            path = out_dir / "metrics.jsonl"
            _truncate_after(path, start_step)
            self.file = open(path, "a", encoding="utf-8")
            if tensorboard:
                try:
                    from torch.utils.tensorboard import SummaryWriter
                except ImportError:
                    log.warning("TensorBoard events skipped: the tensorboard package is not installed "
                                "(pip install 'lmslim[tensorboard]')")
                else:
                    self.writer = SummaryWriter(str(out_dir / "tensorboard"), purge_step=start_step or None)
        con = console()
        if progress and con.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
                TimeRemainingColumn

            self.progress = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("ETA"),
                                     TimeRemainingColumn(), console=con, transient=True)
            self.progress.start()
            self.task = self.progress.add_task("train", total=total_steps, completed=start_step, info="")
        elif progress:
            self.lines = LineProgress("train", total_steps, start_step, progress_every_s, logger=log)

    def step(self, step: int, record: dict[str, Any] | None, live: dict[str, Any] | None = None) -> None:
        """Advance the progress; write ``record`` (when given) to JSONL and TensorBoard.

        ``live`` is the step's own record (loss, lr, tokens/s): it feeds the progress on the steps
        that write no ``record``.
        """
        if not self.enabled:
            return
        shown = record or live
        info = f"loss {shown['loss']:.4f} lr {shown['lr']:.2e} {shown['tokens_per_s']:.0f} tok/s" if shown else ""
        if self.progress is not None:
            self.progress.update(self.task, completed=step, **({"info": info} if info else {}))
        if self.lines is not None:
            self.lines.update(step, info)
        if not record:
            return
        if self.file is not None:
            self.file.write(json.dumps(record, default=_jsonable) + "\n")
            self.file.flush()
        if self.writer is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                    self.writer.add_scalar(k if k.startswith("eval") else f"train/{k}", v, step)
            self.writer.flush()

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
        if self.lines is not None:
            self.lines.close()
            self.lines = None
        if self.file is not None:
            self.file.close()
            self.file = None
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def _jsonable(v: Any) -> Any:
    return float(v) if hasattr(v, "__float__") else str(v)


def _truncate_after(path: Path, step: int) -> None:
    """Keep only records up to ``step`` (a resumed run rewrites what came after its checkpoint)."""
    if not path.exists():
        return
    if step == 0:
        path.unlink()
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
        except ValueError:
            continue  # a line cut by a crash
    from lmslim.core.io import atomic_write_text

    atomic_write_text(path, "".join(f"{line}\n" for line in kept))


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """All records of a ``metrics.jsonl``."""
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
