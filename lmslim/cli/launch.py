"""``--nproc N``: run a training command as N processes through torchrun's own launcher.

``lmslim train … --nproc 2`` re-runs the same command line (without the launcher options) as
``python -m lmslim.cli.main …`` in N worker processes started by ``torch.distributed.run`` — the code
behind ``torchrun`` — so rendezvous, environment (RANK, WORLD_SIZE, MASTER_ADDR, …), failure
detection and shutdown are PyTorch's. One node uses a private rendezvous on a free port
(``--standalone``); several nodes use the static rendezvous at ``--master-addr:--master-port``
(run the same command on every node with its ``--node-rank``). When one worker dies, the launcher
stops the others and the command exits non-zero.

Starting the workers with ``torchrun`` directly works too (see docs/distributed.md).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
from typing import Any, Optional

import typer

from lmslim.core.errors import UserError

NprocOpt = typer.Option(None, "--nproc", help="Train with N processes on this node (torchrun; gloo on CPU, nccl "
                        "on GPU). See docs/distributed.md.")
NnodesOpt = typer.Option(1, "--nnodes", help="With --nproc: number of nodes (run the command on each).")
NodeRankOpt = typer.Option(0, "--node-rank", help="With --nnodes > 1: this node's rank (0 hosts the rendezvous).")
MasterAddrOpt = typer.Option("127.0.0.1", "--master-addr", help="With --nnodes > 1: address of node 0.")
MasterPortOpt = typer.Option(None, "--master-port", help="Rendezvous port on node 0 (default: a free port on one "
                             "node, 29500 on several).")

# Options that configure the launch and are not passed on to the workers (all take a value).
_LAUNCH_FLAGS = ("--nproc", "--nnodes", "--node-rank", "--master-addr", "--master-port")


class WorkersFailed(UserError):
    """A worker exited non-zero; its own message was printed by that worker."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def under_torchrun() -> bool:
    """True inside a worker started by torchrun (it sets TORCHELASTIC_RUN_ID and LOCAL_RANK)."""
    return "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_RANK" in os.environ


def worker_argv(argv: list[str]) -> list[str]:
    """``argv`` without the launcher options (``--nproc 2`` and ``--nproc=2`` forms)."""
    out: list[str] = []
    skip = False
    for a in argv:
        if skip:
            skip = False
            continue
        name = a.split("=", 1)[0]
        if name in _LAUNCH_FLAGS:
            skip = "=" not in a
            continue
        out.append(a)
    return out


def check_port_free(addr: str, port: int) -> None:
    """Refuse a rendezvous port that another program already listens on."""
    if not 1 <= port <= 65535:
        raise UserError(f"--master-port must be in 1..65535, got {port}")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("" if addr in ("127.0.0.1", "localhost", "0.0.0.0") else addr, port))
        except OSError as e:
            raise UserError(f"rendezvous port {port} on {addr} is busy ({e.strerror}); choose another "
                            "--master-port") from e


def torchrun_args(argv: list[str], nproc: int, nnodes: int = 1, node_rank: int = 0, master_addr: str = "127.0.0.1",
                  master_port: Optional[int] = None) -> list[str]:
    """The ``torchrun`` command line (without the program name) for this launch; validates the options."""
    if nproc < 1:
        raise UserError(f"--nproc must be >= 1, got {nproc}")
    if nnodes < 1:
        raise UserError(f"--nnodes must be >= 1, got {nnodes}")
    if not 0 <= node_rank < nnodes:
        raise UserError(f"--node-rank must be in 0..{nnodes - 1}, got {node_rank}")
    if under_torchrun():
        raise UserError("this command already runs under torchrun (LOCAL_RANK is set); drop --nproc")
    if nnodes == 1 and master_port is None:
        rdzv = ["--standalone"]  # a private rendezvous on a free local port
    else:
        port = 29500 if master_port is None else master_port
        if node_rank == 0:
            check_port_free(master_addr, port)
        rdzv = ["--nnodes", str(nnodes), "--node-rank", str(node_rank), "--master-addr", master_addr,
                "--master-port", str(port)]
    return ["--nproc-per-node", str(nproc), *rdzv, "--max-restarts", "0", "--monitor-interval", "0.5",
            "-m", "lmslim.cli.main", *worker_argv(argv)]


def launch(argv: list[str], nproc: int, nnodes: int = 1, node_rank: int = 0, master_addr: str = "127.0.0.1",
           master_port: Optional[int] = None, threads: Optional[int] = None, distributed: Any = None,
           model: Optional[str] = None, **plan: Any) -> None:
    """Run ``lmslim <argv>`` as ``nproc`` workers on this node; returns when all of them finished.

    Args:
        distributed: the run's :class:`~lmslim.train.config.DistributedConfig`; its parallel plan (tp, pp)
            is checked against the world size and ``model``'s shape before any worker starts.
        plan: more for that check (:func:`lmslim.train.parallel.check_plan`): ``train`` (the TrainConfig),
            ``dims`` (the model's shape when ``model`` does not give it), ``objective``, ``evaluates``.

    Raises:
        UserError: bad launcher options, a busy port or a plan that cannot work (before anything starts).
        WorkersFailed: a worker failed (the others were stopped); carries the exit code to return.
    """
    args = torchrun_args(argv, nproc, nnodes, node_rank, master_addr, master_port)
    if distributed is not None:
        from lmslim.train.parallel import check_plan

        check_plan(distributed, model, nproc * nnodes, **plan)
    if threads is None and "OMP_NUM_THREADS" not in os.environ:
        # Split the cores between the workers instead of oversubscribing them (torchrun would pick 1).
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    # The launcher logs each failure at ERROR with its own formatting; one line from us says it instead.
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    try:
        run(parse_args(args))
    except ChildFailedError as e:
        # Workers that died of the launcher's own SIGTERM were stopped because another one failed first.
        first = {r: f for r, f in e.failures.items() if f.exitcode != -signal.SIGTERM} or e.failures
        codes = sorted({f.exitcode for f in first.values()})
        ranks = ", ".join(str(r) for r in sorted(first))
        how = ", ".join(f"killed by {signal.Signals(-c).name}" if c < 0 else f"exit code {c}" for c in codes)
        # Exit 2 when the workers refused bad input (their messages are above); 1 when one crashed or was killed.
        code = 2 if codes == [2] else 1
        if code == 2:
            raise WorkersFailed(f"worker rank {ranks} refused the input (exit code 2; its message is above)", 2) \
                from None
        raise WorkersFailed(f"worker rank {ranks} failed ({how}); the other workers were stopped; continue "
                            "from the last checkpoint with --resume", code) from None
