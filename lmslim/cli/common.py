"""Pieces every ``lmslim`` sub-command shares: the app, the console and common options.

Command modules (``lmslim/cli/*_cmd.py``) import from here and register their commands on ``app``;
``lmslim.cli.main`` imports them all and owns the entry point.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True,
                  help="Make transformer LMs cheaper to train and run, and prove it with measurements.")
out = Console()
log = logging.getLogger("lmslim")

ThreadsOpt = typer.Option(None, "--threads", help="CPU threads (default: all cores torch sees).")
DeviceOpt = typer.Option("auto", "--device", help="cpu, cuda or auto.")
JsonOpt = typer.Option(None, "--json", help="Write the full result as JSON here (atomically).")
TrustOpt = typer.Option(False, "--trust-remote-code", help="Allow model code from the model folder/hub (off by default).")


def quiet_libraries() -> None:
    # transformers' own progress bars and advisory warnings would bury our one-line output.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TQDM_DISABLE", "1")  # the GGUF loader draws its own tqdm bar
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        import huggingface_hub.utils as hub_utils

        hub_utils.disable_progress_bars()
    except Exception:  # noqa: BLE001 - cosmetic only
        pass


def write_json(path: Optional[Path], obj: dict) -> None:
    if path is not None:
        from lmslim.core.io import atomic_write_json

        atomic_write_json(path, obj)
        out.print(f"wrote {path}")


def guard_out(path: Path, inputs=(), overwrite: bool = False, resume: bool = False, flag: str = "--out") -> None:
    """Check an output folder (lmslim.core.guard.check_output) and hold its lock until the command ends."""
    from lmslim.core.guard import check_output

    hold(check_output(path, inputs=inputs, overwrite=overwrite, resume=resume, flag=flag))


def hold(lock) -> None:
    """Keep ``lock`` (an OutputLock or None) until the running command returns or fails."""
    if lock is not None:
        try:  # typer >= 0.20 runs commands in its own copy of click
            from typer._click.globals import get_current_context
        except ImportError:
            from click import get_current_context
        get_current_context().with_resource(lock)


def check_out(path: Optional[Path], inputs=(), flag: str = "--json") -> None:
    """A result file: writable, not a folder, not one of ``inputs`` (specs or paths) nor inside them."""
    if path is not None:
        from lmslim.core.guard import check_output

        check_output(path, inputs=inputs, folder=False, flag=flag)
