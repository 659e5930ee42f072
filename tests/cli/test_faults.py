"""Machine faults: kill/resume trials, a full disk, two runs on one output.

Kill trials: a command runs in a subprocess with ``LMSLIM_FAILPOINT`` set (lmslim/core/faults.py), so
it SIGKILLs itself in a chosen phase: before the first checkpoint, while a checkpoint or a result is
being written, while the output folder is published. The same command is then run again (with
``--resume`` where the command resumes) and must end with exactly the result of an uninterrupted
run: the same weights, bit for bit. Kill points are drawn from a seeded generator.

A fast subset runs in every test run; the rest is marked ``full`` and runs with ``LMSLIM_FULL=1``.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from lmslim.cli.main import main
from lmslim.core.io import sha256_file

SEED = 1234
TRAIN = ["batch.max_length=16", "batch.batch_size=2", "log.every_steps=1", "checkpoint.every_steps=2",
         "--max-steps", "6", "--threads", "1"]
DISTILL = ["batch.max_length=16", "batch.batch_size=2", "log.every_steps=1", "checkpoint.every_steps=2",
           "--max-steps", "4", "--threads", "1"]
RECIPE = """data: {{calibration: {data}, eval: {data}}}
stages:
  - prune: {{method: magnitude, sparsity: 0.5}}
  - quantize: {{method: rtn, bits: 8}}
eval: {{max_tokens: 64, window: 32, stride: 32}}
bench: {{enabled: false}}
measure_each_stage: false
"""


def _lmslim(args: list[str], failpoint: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("LMSLIM_FAILPOINT", None)
    if failpoint:
        env["LMSLIM_FAILPOINT"] = failpoint
    return subprocess.run([sys.executable, "-m", "lmslim", *args], capture_output=True, text=True, env=env,
                          timeout=600)


def _weights(folder: Path) -> str:
    return sha256_file(folder / "model.safetensors")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, unit_home):
    from lmslim.assets.tiny import tiny_path

    os.environ["LMSLIM_HOME"] = str(unit_home)
    d = tmp_path_factory.mktemp("fault-inputs")
    shutil.copytree(tiny_path("tiny-llama"), d / "model")
    rng = random.Random(0)
    words = "the model reads text and predicts the next word while the cat sits on a warm mat".split()
    (d / "data.txt").write_text("\n\n".join(" ".join(rng.choice(words) for _ in range(120)) for _ in range(20)))
    (d / "recipe.yaml").write_text(RECIPE.format(data=d / "data.txt"))
    return d


def _commands(d: Path, out: Path) -> dict[str, list[str]]:
    m, data = str(d / "model"), str(d / "data.txt")
    return {
        "train": ["train", m, "--data", data, "--out", str(out), *TRAIN],
        "distill": ["distill", "--teacher", m, "--student-layers", "2", "--data", data, "--out", str(out), *DISTILL],
        "quantize": ["quantize", m, "--method", "rtn", "--bits", "4", "--out", str(out), "--threads", "1"],
        "prune": ["prune", m, "--method", "magnitude", "--sparsity", "0.5", "--out", str(out), "--threads", "1"],
        "compress": ["compress", m, "--recipe", str(d / "recipe.yaml"), "--out", str(out), "--threads", "1"],
    }


def _final(command: str, out: Path) -> Path:
    return out / "model" if command == "compress" else out


@pytest.fixture(scope="module")
def reference(inputs, tmp_path_factory):
    """Uninterrupted results, one per command (computed on first use)."""
    cache: dict[str, str] = {}

    def get(command: str) -> str:
        if command not in cache:
            out = tmp_path_factory.mktemp("ref") / command
            assert main(_commands(inputs, out)[command]) == 0
            cache[command] = _weights(_final(command, out))
        return cache[command]

    return get


def _trials() -> list[tuple[str, str, bool]]:
    """(command, failpoint, fast) with kill counts drawn from a seeded generator."""
    rng = random.Random(SEED)
    t = [
        ("train", "train-step@1", True),                          # before the first checkpoint
        ("train", f"train-step@{rng.randint(3, 5)}", False),      # between checkpoints
        ("train", f"checkpoint@{rng.randint(1, 2)}", True),       # while a checkpoint is written
        ("train", "checkpoint@3", False),                         # the last checkpoint
        ("train", "publish@1", False),                            # while the final model is published
        ("train", f"write@{rng.randint(1, 3)}", False),           # while a result file is written
        ("distill", "train-step@1", False),
        ("distill", f"train-step@{rng.randint(3, 4)}", False),
        ("distill", "checkpoint@1", True),
        ("distill", "publish@1", False),
        ("quantize", "publish@1", True),
        ("distill", "write@1", False),                            # the run's config, before any step
        ("prune", "publish@1", False),
        ("compress", "write@1", False),                           # recipe.yaml, before any work
        ("compress", f"write@{rng.randint(2, 3)}", False),        # a measurement's JSON
        ("compress", "publish@1", False),                         # stage 1's model
        ("compress", "compress-stage@1", True),
        ("compress", "compress-stage@2", False),
        ("compress", "publish@2", False),                         # stage 2's model
        ("compress", "compress-final@1", True),                   # final model moved, not yet published
    ]
    return t


TRIALS = _trials()


@pytest.mark.parametrize("command,point", [pytest.param(c, p, marks=() if fast else pytest.mark.full, id=f"{c}-{p}")
                                           for c, p, fast in TRIALS])
def test_kill_and_rerun_gives_the_uninterrupted_result(inputs, reference, tmp_path, command, point):
    out = tmp_path / "out"
    args = _commands(inputs, out)[command]
    model_before = _weights(inputs / "model")
    killed = _lmslim(args, failpoint=point)
    assert killed.returncode == -signal.SIGKILL, (point, killed.returncode, killed.stderr[-500:])
    if command in ("quantize", "prune"):
        assert not out.exists()  # published only when complete
    if command == "compress":
        assert not out.exists() or (out / "results.json").is_file()
    resumable = command in ("train", "distill") and (out / "checkpoints").is_dir() and any(
        (out / "checkpoints").glob("step-*"))
    again = main(args + (["--resume"] if resumable else []))
    assert again == 0
    final = _final(command, out)
    assert _weights(final) == reference(command)
    assert _weights(inputs / "model") == model_before
    if command == "compress":
        results = json.loads((out / "results.json").read_text())
        assert not (out / "model" / "model").exists()
        assert ".partial" not in json.dumps(results)
    assert not [p.name for p in out.parent.iterdir() if p.name.startswith(".") and p.name != ".out.lock"]


def test_trial_count():
    assert len(TRIALS) >= 20 and {c for c, _, _ in TRIALS} >= {"train", "distill", "quantize", "compress"}


# ------------------------------------------------------------------------------------- full disk

def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


@pytest.fixture()
def small_disk(tmp_path):
    mnt = tmp_path / "disk"
    if not _mount_tmpfs(mnt, "96k"):
        if os.environ.get("LMSLIM_REQUIRE_ROOT_FS"):
            pytest.fail("cannot mount a tmpfs; CI runs as root and must test a full disk")
        pytest.skip("mounting a small tmpfs needs root")
    (mnt / "keep.txt").write_text("someone else's file")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


@pytest.mark.parametrize("command", ["quantize", "prune", "train", "compress", "eval"])
def test_full_disk_is_a_clean_error(inputs, small_disk, capsys, command):
    out = small_disk / "out"
    if command == "eval":
        filler = subprocess.run(["dd", "if=/dev/zero", f"of={small_disk / 'filler'}", "bs=1k", "count=200"],
                                capture_output=True)
        assert filler.returncode != 0  # the disk is now full
        args = ["eval", str(inputs / "model"), "--data", str(inputs / "data.txt"), "--max-tokens", "64",
                "--json", str(small_disk / "r.json")]
    else:
        args = _commands(inputs, out)[command]
    model_before = _weights(inputs / "model")
    code = main(args)
    err = capsys.readouterr().err.strip().splitlines()
    # progress lines may come first (stderr is not a terminal here); the error is one last line
    assert code == 2 and err[-1].startswith("error: ") and "No space left on device" in err[-1], err
    assert not any("Traceback" in line or "internal error" in line for line in err), err
    leftover = sorted(p.name for p in small_disk.iterdir())
    expected = {"eval": ["filler", "keep.txt"], "compress": [".out.partial", "keep.txt"]}.get(command, ["keep.txt"])
    assert leftover == expected, leftover  # compress keeps its resumable work folder, hidden
    assert (small_disk / "keep.txt").read_text() == "someone else's file"
    assert _weights(inputs / "model") == model_before


def test_full_disk_while_building_the_cache(tmp_path, capsys, monkeypatch):
    home = tmp_path / "home"
    if not _mount_tmpfs(home, "64k"):
        if os.environ.get("LMSLIM_REQUIRE_ROOT_FS"):
            pytest.fail("cannot mount a tmpfs; CI runs as root and must test a full disk")
        pytest.skip("mounting a small tmpfs needs root")
    try:
        monkeypatch.setenv("LMSLIM_HOME", str(home))
        (tmp_path / "t.txt").write_text("some text " * 50)
        code = main(["eval", "builtin:tiny-gpt2", "--data", str(tmp_path / "t.txt")])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and "No space left on device" in err[0], err
        assert not list((home / "models").glob("tiny-gpt2*")), list((home / "models").iterdir())
    finally:
        subprocess.run(["umount", "-l", str(home)], capture_output=True)


# ------------------------------------------------------------------------------ two runs, one output

def test_second_run_on_the_same_output_is_refused(inputs, tmp_path, capsys):
    from lmslim.core.guard import OutputLock

    out = tmp_path / "q"
    with OutputLock(out):  # another lmslim process is writing `out`
        code = main(_commands(inputs, out)["quantize"])
    err = capsys.readouterr().err
    assert code == 2 and "another lmslim run is writing" in err and not out.exists()
    assert main(_commands(inputs, out)["quantize"]) == 0  # released: the next run works


def test_two_compress_runs_at_once(inputs, tmp_path):
    out = tmp_path / "c"
    args = _commands(inputs, out)["compress"]
    env = {k: v for k, v in os.environ.items() if k != "LMSLIM_FAILPOINT"}
    procs = [subprocess.Popen([sys.executable, "-m", "lmslim", *args], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    results = [(p.wait(timeout=600), p.stderr.read()) for p in procs]
    codes = sorted(c for c, _ in results)
    assert codes == [0, 2], results
    refused = next(e for c, e in results if c == 2)
    assert "another lmslim run is writing" in refused or "already exists" in refused
    json.loads((out / "results.json").read_text())
    assert not (out / "model" / "model").exists()
