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
StreamOpt = typer.Option(False, "--stream", help="Never load the whole model: read, compress, write and free one "
                         "block at a time (a local safetensors folder; gptq/rtn/awq/smoothquant/dynamic-int8, "
                         "sparsegpt/wanda; same result).")
MaxActivationOpt = typer.Option(None, "--max-activation-mb", help="--stream: calibration activations kept in "
                                "memory (default 1024); beyond it they go to a temporary folder on disk.")
# Streaming changes where the work happens, not its result (bit-identical codes): a run control, not a stage key.
STREAM_OUTSIDE = {"stream": "(run control: lmslim quantize/prune/compress --stream)",
                  "max_activation_mb": "(run control: lmslim quantize/prune/compress --stream)"}


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


def stage_options(flags: dict, outside: dict) -> dict:
    """The stage options a technique command's flags spell: every flag not in ``outside`` is a recipe key.

    Call it first thing with ``locals()``; flags left at ``None`` (or an empty repeatable) are omitted, so
    the technique config's own default applies, as in a recipe that does not set the key.
    """
    from lmslim.recipes.single import cli_options

    return cli_options({k: v for k, v in flags.items() if k not in outside})


def run_stage_command(stage: str, options: dict, model: str, out_dir: Path, *, data: Optional[dict] = None,
                      task: str = "clm", overwrite: bool = False, threads: Optional[int] = None, device: str = "cpu",
                      trust_remote_code: bool = False, dense: bool = False, stream: bool = False,
                      max_activation_mb: Optional[float] = None) -> dict:
    """A technique command's whole body: its flags as a one-stage recipe, run as ``lmslim compress`` runs a stage.

    ``options`` are the stage's recipe keys (build them with ``lmslim.recipes.single.cli_options``),
    ``data`` the recipe's data roles (``{"calibration": spec}``). The options are validated before the
    output is checked and locked; the input model and every data spec are protected inputs.
    Returns the stage report (also saved as ``OUT/lmslim_<stage>.json``).
    """
    from lmslim.core.runtime import Runtime
    from lmslim.recipes.run import recipe_inputs
    from lmslim.recipes.single import check_stream_options, run_single_stage, single_stage_recipe

    check_stream_options(stream, max_activation_mb)
    recipe, obj = single_stage_recipe(stage, options, model, data, task)
    guard_out(out_dir, inputs=[model, *recipe_inputs(recipe)], overwrite=overwrite)
    runtime = Runtime.create(device=device, threads=threads)
    if stream:
        from lmslim.recipes.single import run_streaming_stage

        return run_streaming_stage(recipe, obj, out_dir, runtime, max_activation_mb=max_activation_mb)
    return run_single_stage(recipe, obj, out_dir, runtime, trust_remote_code=trust_remote_code, dense=dense)
