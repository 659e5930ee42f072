"""Bad input across every command: one line on stderr, exit 2, no traceback, nothing written.

One table, one world: a folder holding a user's model (a copy of the tiny Llama), data, recipes,
configs, broken models, a finished compress run and a training run with checkpoints. Every case
runs a command against it and then checks that the whole world is byte-for-byte what it was
(inputs unchanged, no output created next to them) and that lmslim's cache gained nothing outside
the assets it builds.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lmslim.cli.main import main

TINY = "builtin:tiny-llama"
FAST_TRAIN = ["batch.max_length=16", "batch.batch_size=2", "log.every_steps=1"]
RECIPE = """model: {model}
data: {{calibration: {data}, eval: {data}}}
stages:
  - quantize: {{method: dynamic-int8}}
eval: {{max_tokens: 64, window: 32, stride: 32}}
bench: {{prompt_len: 4, gen_len: 2, repeats: 1, warmup: 0}}
"""
BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{c}: &{c} [{', '.join([f'*{p}'] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi"))


def _tree(root: Path) -> dict[str, str]:
    """Every path under ``root`` (files with a content hash, folders and links marked)."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_symlink():
            out[rel] = "link:" + os.readlink(p)
        elif p.is_file():
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
        else:
            out[rel] = "dir"
    return out


def _save(folder: Path, state: dict) -> None:
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})


@pytest.fixture(scope="module")
def world(tmp_path_factory, unit_home):
    """Build the inputs once (tiny models, a quantized and a pruned folder, a checkpointed run)."""
    from lmslim.assets.tiny import tiny_path

    w = tmp_path_factory.mktemp("world")
    home = unit_home  # the home every unit test sees (tests/conftest.py)
    old_home = os.environ.get("LMSLIM_HOME")
    os.environ["LMSLIM_HOME"] = str(home)
    try:
        model = w / "model"
        shutil.copytree(tiny_path("tiny-llama"), model)
        (w / "data.txt").write_text("The quick brown fox jumps over the lazy dog. " * 40)
        (w / "empty.txt").write_text("")
        (w / "recipe.yaml").write_text(RECIPE.format(model=model, data=w / "data.txt"))
        (w / "alone").mkdir()  # a folder that holds nothing but a recipe
        shutil.copy(w / "recipe.yaml", w / "alone" / "recipe.yaml")
        (w / "afile").write_text("not a folder")
        state = load_file(str(model / "model.safetensors"))
        victim = next(k for k in state if "layers.1.mlp.down_proj" in k)
        for name, change in {
            "missing": lambda s: s.pop(victim),
            "shape": lambda s: s.__setitem__(victim, s[victim][:, :-1]),
            "extra": lambda s: s.__setitem__("model.layers.7.stray.weight", torch.zeros(3)),
            "mixed": lambda s: [s.__setitem__(k.replace("model.", "transformer."), s.pop(k)) for k in list(s)],
        }.items():
            shutil.copytree(model, w / name)
            s = dict(state)
            change(s)
            _save(w / name, s)
        shutil.copytree(model, w / "truncated")
        data = (model / "model.safetensors").read_bytes()
        (w / "truncated" / "model.safetensors").write_bytes(data[: len(data) // 2])
        shutil.copytree(model, w / "badjson")
        (w / "badjson" / "config.json").write_text("{not json")
        (w / "noweights").mkdir()
        shutil.copy(model / "config.json", w / "noweights")
        (w / "fake.gguf").write_bytes(b"GGUF" + os.urandom(64))
        (w / "link").symlink_to(model)
        # lmslim's own formats, each with a tensor taken out
        assert main(["quantize", str(model), "--method", "rtn", "--bits", "4", "--group-size", "32",
                     "--out", str(w / "quantized")]) == 0
        assert main(["prune", str(model), "--method", "magnitude", "--sparsity", "0.6", "--out", str(w / "pruned")]) == 0
        for name in ("quantized", "pruned"):
            s = load_file(str(w / name / "model.safetensors"))
            # a packed/scale tensor of the quantized layout; a plain weight where pruning is saved dense
            key = next((k for k in s if k.endswith((".weight_scale", ".qweight", ".sparse_values"))), None) or \
                next(k for k in s if k.endswith("down_proj.weight"))
            s.pop(key)
            shutil.copytree(w / name, w / f"{name}-damaged")
            _save(w / f"{name}-damaged", s)
        # a training run with checkpoints, and copies whose latest checkpoint is damaged
        assert main(["train", str(model), "--data", str(w / "data.txt"), "--out", str(w / "run"), "--max-steps", "2",
                     "checkpoint.every_steps=1", *FAST_TRAIN]) == 0
        for name, damage in {"run-badstate": "trainer_state.pt", "run-truncated": "model.safetensors"}.items():
            shutil.copytree(w / "run", w / name)
            latest = sorted((w / name / "checkpoints").glob("step-*"))[-1]
            f = latest / damage
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])
        (w / "immutable").mkdir()
        (w / "results.json").write_text(json.dumps({"kind": "eval", "model": {"spec": "x"}}))
        (w / "notrun").mkdir()
        (w / "bomb.yaml").write_text(BOMB)
        (w / "deep.yaml").write_text("a: " + "[" * 100 + "]" * 100 + "\n")
        (w / "loop.yaml").write_text("a: &a [*a]\n")
        (w / "huge.yaml").write_text("a: " + "x" * (2 << 20) + "\n")
        (w / "sparsity-half.yaml").write_text(RECIPE.format(model=model, data=w / "data.txt").replace(
            "quantize: {method: dynamic-int8}", 'prune: {method: wanda, sparsity: "half"}'))
        (w / "lr-text.yaml").write_text("optim: {lr: fast}\n")
        yield w
    finally:
        if old_home is None:
            os.environ.pop("LMSLIM_HOME", None)
        else:
            os.environ["LMSLIM_HOME"] = old_home


def _immutable(path: Path, on: bool) -> bool:
    """chattr +i / -i; False when this machine cannot (not root, or a file system without the flag)."""
    r = subprocess.run(["chattr", "+i" if on else "-i", str(path)], capture_output=True)
    return r.returncode == 0


M, D = "{w}/model", "{w}/data.txt"
CASES = [
    # 1. never write over an input: equal to, inside, or containing one; symlinks resolved
    (["quantize", M, "--method", "rtn", "--out", M, "--overwrite"], "is the input"),
    (["quantize", M, "--method", "rtn", "--out", M + "/q"], "lies inside input"),
    (["quantize", M, "--method", "rtn", "--out", "{w}", "--overwrite"], "contains the input"),
    (["quantize", "{w}/link", "--method", "rtn", "--out", M, "--overwrite"], "is the input"),
    (["quantize", M, "--method", "gptq", "--calib", D, "--out", D, "--overwrite"], "is the input"),
    (["quantize", M, "--method", "rtn", "--out", "{home}/models/mine"], "overlaps lmslim's cache"),
    (["prune", M, "--method", "magnitude", "--out", M, "--overwrite"], "is the input"),
    (["prune", M, "--method", "magnitude", "--out", "{w}/link/p"], "lies inside input"),
    (["share", M, "--group-size", "2", "--out", M, "--overwrite"], "is the input"),
    (["share", M, "--group-size", "2", "--out", M + "/shared"], "lies inside input"),
    (["train", M, "--data", D, "--out", M, "--overwrite", *FAST_TRAIN], "is the input"),
    (["train", M, "--data", D, "--out", M + "/ft", *FAST_TRAIN], "lies inside input"),
    (["train", TINY, "--data", D, "--out", "{w}", "--overwrite", *FAST_TRAIN], "contains the input"),
    (["train", "{w}/link", "--data", D, "--out", "{w}/link", "--overwrite", *FAST_TRAIN], "is the input"),
    (["distill", "--teacher", M, "--student-layers", "2", "--data", D, "--out", M, "--overwrite"], "is the input"),
    (["distill", "--teacher", TINY, "--student", M, "--data", D, "--out", M + "/kd"], "lies inside input"),
    (["distill", "--teacher", M, "--student-layers", "2", "--data", D, "--out", "{w}/kd",
      "--teacher-cache", M + "/cache"], "lies inside input"),
    (["compress", M, "--recipe", "{w}/recipe.yaml", "--out", M, "--overwrite"], "is the input"),
    (["compress", M, "--recipe", "{w}/recipe.yaml", "--out", M + "/run"], "lies inside input"),
    (["compress", TINY, "--recipe", "{w}/recipe.yaml", "--out", "{w}", "--overwrite"], "contains the input"),
    (["compress", TINY, "--recipe", "{w}/alone/recipe.yaml", "--out", "{w}/alone", "--overwrite"],
     "contains the input"),
    (["compress", M, "--recipe", "{w}/recipe.yaml", "--out", "{w}/c", "--measure-cache", M + "/mc"],
     "lies inside input"),
    (["eval", M, "--data", D, "--json", M + "/config.json"], "lies inside input"),
    (["eval", M, "--data", D, "--json", D], "is the input"),
    (["bench", M, "--json", M + "/bench.json"], "lies inside input"),
    (["report", "{w}/run", "--out", "{w}/run", "--overwrite"], "is the input"),
    (["compare", "{w}/results.json", "--json", "{w}/results.json"], "is the input"),
    # 2. weights that do not fit the config are an error, for every loader
    (["eval", "{w}/missing", "--data", D], "1 missing: model.layers.1.mlp.down_proj.weight"),
    (["eval", "{w}/shape", "--data", D], "wrongly shaped"),
    (["eval", "{w}/extra", "--data", D], "1 unexpected: model.layers.7.stray.weight"),
    (["eval", "{w}/mixed", "--data", D], "do not fit its config.json"),
    (["bench", "{w}/shape"], "wrongly shaped"),
    (["quantize", "{w}/mixed", "--method", "rtn", "--out", "{w}/new"], "do not fit its config.json"),
    (["prune", "{w}/missing", "--method", "magnitude", "--out", "{w}/new"], "do not fit its config.json"),
    (["train", "{w}/extra", "--data", D, "--out", "{w}/new", *FAST_TRAIN], "do not fit its config.json"),
    (["distill", "--teacher", "{w}/missing", "--student-layers", "2", "--data", D, "--out", "{w}/new"],
     "do not fit its config.json"),
    (["eval", "{w}/quantized-damaged", "--data", D], "is missing from the stored weights"),
    (["eval", "{w}/pruned-damaged", "--data", D], "do not fit its config.json"),
    (["eval", "{w}/fake.gguf", "--data", D], "could not be read as a GGUF model"),
    (["eval", "{w}/truncated", "--data", D], "is truncated"),
    (["eval", "{w}/badjson", "--data", D], "is not valid JSON"),
    (["eval", "{w}/noweights", "--data", D], "no weights"),
    (["train", M, "--data", D, "--out", "{w}/run-truncated", "--resume", *FAST_TRAIN], "cannot be loaded"),
    (["train", M, "--data", D, "--out", "{w}/run-badstate", "--resume", *FAST_TRAIN], "cannot be loaded"),
    # 3. bounded reading of recipes and configs
    (["compress", M, "--recipe", "{w}/bomb.yaml", "--out", "{w}/new"], "expands to more than"),
    (["train", M, "--data", D, "--config", "{w}/bomb.yaml", "--out", "{w}/new"], "expands to more than"),
    (["compress", M, "--recipe", "{w}/deep.yaml", "--out", "{w}/new"], "nests deeper than"),
    (["compress", M, "--recipe", "{w}/loop.yaml", "--out", "{w}/new"], "refers to itself"),
    (["compress", M, "--recipe", "{w}/huge.yaml", "--out", "{w}/new"], "at most"),
    (["train", M, "--data", D, "--out", "{w}/new", "optim.lr=" + "9" * 5000], "optim"),
    # 4. user faults that used to be internal errors
    (["quantize", M, "--method", "rtn", "--out", "/proc/lmslim-out"], "not writable"),
    (["quantize", M, "--method", "rtn", "--out", "{w}/afile/sub"], "is a file, not a folder"),
    (["quantize", M, "--method", "rtn", "--out", "{w}/immutable/q"], "not writable"),
    (["prune", M, "--method", "magnitude", "--out", "/proc/self/lmslim"], "not writable"),
    (["train", M, "--data", D, "--out", "/proc/lmslim-train", *FAST_TRAIN], "not writable"),
    (["distill", "--teacher", M, "--student-layers", "2", "--data", D, "--out", "{w}/immutable/kd"], "not writable"),
    (["compress", M, "--recipe", "{w}/recipe.yaml", "--out", "{w}/immutable/c"], "not writable"),
    (["eval", M, "--data", D, "--json", "/proc/lmslim.json"], "not writable"),
    (["report", "{w}/notrun", "--out", "{w}/afile/r"], "is a file, not a folder"),
    (["compress", M, "--recipe", "{w}/sparsity-half.yaml", "--out", "{w}/new"], "sparsity"),
    (["train", M, "--data", D, "--config", "{w}/lr-text.yaml", "--out", "{w}/new"], "optim.lr"),
    # numbers, names, data
    (["quantize", M, "--method", "rtn", "--bits", "5", "--out", "{w}/new"], "bits"),
    (["quantize", M, "--method", "nope", "--out", "{w}/new"], "nope"),
    (["prune", M, "--method", "magnitude", "--sparsity", "1.5", "--out", "{w}/new"], "sparsity"),
    (["prune", M, "--method", "magnitude", "--n-m", "5:4", "--out", "{w}/new"], "5:4"),
    (["share", M, "--group-size", "1", "--out", "{w}/new"], "--group-size"),
    (["distill", "--teacher", M, "--student-layers", "2", "--data", D, "--out", "{w}/new", "--temperature", "0"],
     "emperature"),
    (["eval", M, "--data", "{w}/missing.txt"], "does not exist"),
    (["eval", M, "--data", "{w}/empty.txt"], "is empty"),
    (["bench", M, "--gen-len", "0"], "--gen-len"),
    (["train", M, "--data", "{w}/empty.txt", "--out", "{w}/new", *FAST_TRAIN], "is empty"),
    (["compress", M, "--recipe", "{w}/missing.yaml", "--out", "{w}/new"], "does not exist"),
    (["compress", M, "--recipe", "{w}/recipe.yaml", "--out", "{w}/new", "eval.window=1"], "window"),
    (["report", "{w}/notrun", "--out", "{w}/new"], "notrun"),
]


@pytest.mark.parametrize("argv,message", CASES, ids=[f"{i:02d}-{c[0][0]}" for i, c in enumerate(CASES)])
def test_bad_input(world, capsys, monkeypatch, argv, message):
    home = Path(os.environ["LMSLIM_HOME"])
    argv = [a.format(w=world, home=home) for a in argv]
    if any("immutable" in a for a in argv) and not _immutable(world / "immutable", True):
        if os.environ.get("LMSLIM_REQUIRE_ROOT_FS"):  # set by .ci/run: there this case must run
            pytest.fail("chattr +i failed; CI runs as root on a file system with the immutable flag")
        pytest.skip("chattr +i is not available here (needs root on a file system with the immutable flag)")
    before, home_before = _tree(world), _tree(home)
    try:
        code = main(argv)
    finally:
        _immutable(world / "immutable", False)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    assert len(lines[0]) <= 620, lines[0][:200]
    assert message in lines[0], lines[0]
    assert _tree(world) == before  # inputs unchanged, nothing written beside them
    new_in_home = {k for k in _tree(home) if k not in home_before}
    assert not {k for k in new_in_home if not k.startswith(("models/tiny-", "models/.tiny-", "data/"))}, new_in_home


def test_matrix_covers_every_command():
    commands = {c[0][0] for c in CASES}
    assert commands >= {"quantize", "prune", "share", "train", "distill", "compress", "eval", "bench", "report",
                        "compare"}
    assert len(CASES) >= 60
