"""Streaming compression (issue #18): same codes as in memory, and models larger than the memory limit.

(a) GPTQ w4 g128 on SmolLM2-135M with ``--stream`` and without, each in its own process,
    interleaved and repeated: codes and scales compared bit for bit, peak RSS of each process
    (``wait4``'s ``ru_maxrss``), wall time and the streaming/in-memory time ratio.
(b) A Llama-architecture model with seeded random weights (default: hidden 2048, MLP 5632, 28
    blocks, MHA, SmolLM2's 49152-token vocabulary and tokenizer: 1.54 B parameters, 6.2 GB of fp32
    safetensors in one shard per block, written block by block so generating it stays small) is
    quantized with GPTQ and pruned with SparseGPT, each in a child process inside a cgroup v1
    memory limit (default 2000 MB, ``memory.limit_in_bytes`` + ``memory.memsw.limit_in_bytes``);
    the in-memory path is tried under the same limit for contrast. The outputs are then loaded
    with lmslim (outside the limit) and generate a few tokens. Random weights: memory and time only.

Usage (as root, so the cgroup can be made)::

    nice -n 5 python benchmarks/stream_bench.py --part a --json a.json
    nice -n 5 python benchmarks/stream_bench.py --part b --calib-samples 8 --seq-len 256 --json b.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup/memory")
ROOT = Path(__file__).resolve().parents[1]


def cgroup_writable() -> bool:
    """Whether a child memory cgroup (v1) can be made here (root on a host with the v1 controller)."""
    if not (CGROUP_ROOT / "memory.limit_in_bytes").exists() or not os.access(CGROUP_ROOT, os.W_OK):
        return False
    probe = CGROUP_ROOT / f"lmslim-probe-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    try:
        probe.mkdir()
        probe.rmdir()
        return True
    except OSError:
        return False


def limited_run(cmd: list[str], limit_mb: float | None, env: dict | None = None) -> dict:
    """Run ``cmd`` (in a new memory cgroup capped at ``limit_mb`` when given); rc, output, peak RSS, OOM."""
    group = None
    if limit_mb is not None:
        group = CGROUP_ROOT / f"lmslim-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        group.mkdir()
        limit = str(int(limit_mb * 2**20))
        (group / "memory.limit_in_bytes").write_text(limit)
        if (group / "memory.memsw.limit_in_bytes").exists():  # no escape into swap
            (group / "memory.memsw.limit_in_bytes").write_text(limit)
        # the shell joins the group, then becomes the command (same process: its RSS is the command's)
        cmd = ["sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', str(group), *cmd]
    t0 = time.perf_counter()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env)
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            proc.returncode = 0  # reaped by wait4
        wall = time.perf_counter() - t0
        out.seek(0)
        err.seek(0)
        result = {"rc": os.waitstatus_to_exitcode(status), "wall_s": wall, "peak_rss_mb": usage.ru_maxrss / 1024,
                  "stdout": out.read().decode(errors="replace"), "stderr": err.read().decode(errors="replace")}
    if group is not None:
        oom = (group / "memory.oom_control").read_text()
        result["oom_kills"] = int(next((ln.split()[1] for ln in oom.splitlines() if ln.startswith("oom_kill ")), 0))
        result["cgroup_max_usage_mb"] = int((group / "memory.max_usage_in_bytes").read_text()) / 2**20
        result["limit_mb"] = limit_mb
        group.rmdir()
    return result


def random_llama(folder: Path, *, hidden: int, intermediate: int, layers: int, heads: int, tokenizer_from: Path,
                 seed: int = 0) -> int:
    """Write a seeded random Llama (fp32, one safetensors shard per block) into ``folder``; returns its parameters.

    Only one block's tensors exist at a time, so writing a 6 GB model needs a few hundred MB.
    """
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, LlamaConfig

    from lmslim.modelio.formats.meta_load import empty_model

    folder.mkdir(parents=True)
    vocab = json.loads((tokenizer_from / "config.json").read_text())["vocab_size"]
    config = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=heads, vocab_size=vocab,
                         max_position_embeddings=4096, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    config.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_from / name, folder / name)
    meta = empty_model(AutoModelForCausalLM, config)
    shapes = {k: v.shape for k, v in meta.state_dict().items() if k != "lm_head.weight"}  # tied to the embedding
    groups: dict[str, list[str]] = {}
    for k in shapes:
        parts = k.split(".")
        groups.setdefault(".".join(parts[:3]) if parts[1] == "layers" else "rest", []).append(k)
    weight_map, total, params = {}, 0, 0
    for i, (group, names) in enumerate(groups.items()):
        gen = torch.Generator().manual_seed(seed * 100003 + i)
        state = {}
        for k in names:
            shape = shapes[k]
            state[k] = torch.ones(shape) if "norm" in k else torch.randn(shape, generator=gen) * 0.02
            total += state[k].numel() * 4
            params += state[k].numel()
        fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file(state, str(folder / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in names})
        del state
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    return params


def _lmslim(*args: str) -> list[str]:
    return [str(Path(sys.executable).parent / "lmslim"), *args]


def _report(folder: Path, stage: str) -> dict:
    return json.loads((folder / f"lmslim_{stage}.json").read_text())


def same_codes(a: Path, b: Path) -> dict:
    """Compare every QuantLinear's codes, scales and offsets of two saved folders."""
    import torch

    from lmslim.modelio import load_model
    from lmslim.nn.quant_linear import QuantLinear

    ma, mb = load_model(str(a)).model, load_model(str(b)).model
    n = same = 0
    for name, m in ma.named_modules():
        if isinstance(m, QuantLinear):
            o = mb.get_submodule(name)
            n += 1
            same += int(torch.equal(m.codes(), o.codes()) and torch.equal(m.scale, o.scale)
                        and torch.equal(m.offset, o.offset))
    return {"modules": n, "identical": same}


def part_a(args, work: Path) -> dict:
    """GPTQ w4 g128 (SmolLM2-135M unless --a-model), streaming vs in memory, interleaved ABBA."""
    common = ["quantize", args.a_model, "--method", "gptq", "--bits", "4", "--group-size", "128",
              "--calib", "builtin:wiki:train", "--calib-samples", str(args.calib_samples), "--seq-len",
              str(args.seq_len), "--threads", str(args.threads)]
    runs: dict[str, list] = {"memory": [], "stream": []}
    for rep in range(args.repeats):
        for mode in (("memory", "stream") if rep % 2 == 0 else ("stream", "memory")):
            out = work / f"a-{mode}-{rep}"
            r = limited_run(_lmslim(*common, "--out", str(out), *(["--stream"] if mode == "stream" else [])), None)
            if r["rc"] != 0:
                raise SystemExit(f"{mode} run failed: {r['stderr'][-2000:]}")
            rep_json = _report(out, "quantize")
            runs[mode].append({"wall_s": r["wall_s"], "seconds": rep_json["wall_seconds"],
                               "peak_rss_mb": r["peak_rss_mb"]})
            print(mode, rep, runs[mode][-1], flush=True)
    codes = same_codes(work / "a-memory-0", work / "a-stream-0")
    best = {m: min(x["seconds"] for x in v) for m, v in runs.items()}
    pairs = sorted(s["seconds"] / m["seconds"] for s, m in zip(runs["stream"], runs["memory"]))
    return {"model": args.a_model, "runs": runs, "codes": codes, "time_ratio_best": best["stream"] / best["memory"],
            "time_ratio_pairs": pairs, "time_ratio_median": pairs[len(pairs) // 2],
            "peak_rss_mb": {m: max(x["peak_rss_mb"] for x in v) for m, v in runs.items()}}


def evict(folder: Path) -> None:
    """Drop ``folder``'s safetensors from the page cache (written back first), so a run is charged for its reads.

    Pages this process wrote are charged to its own cgroup and would otherwise be free for the child.
    """
    for f in folder.glob("*.safetensors"):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def part_b(args, work: Path) -> dict:
    """A random Llama larger than the memory limit: GPTQ and SparseGPT streamed inside a cgroup."""
    src = args.source or work / "random-llama"
    t0 = time.perf_counter()
    smol = Path(os.path.expanduser("~/.cache/lmslim/models/smollm2-135m"))
    if (src / "model.safetensors.index.json").is_file():  # kept from an earlier run (--source)
        params = json.loads((src / "model.safetensors.index.json").read_text())["metadata"]["total_size"] // 4  # fp32
    else:
        params = random_llama(src, hidden=args.hidden, intermediate=args.intermediate, layers=args.layers,
                              heads=args.heads, tokenizer_from=smol)
    size = sum(f.stat().st_size for f in src.glob("*.safetensors"))
    result = {"params": params, "size_mb": size / 1e6, "generate_s": time.perf_counter() - t0,
              "limit_mb": args.limit_mb, "calib_samples": args.calib_samples, "seq_len": args.seq_len}
    print("generated", result, flush=True)
    calib = ["--calib", "builtin:wiki:train", "--calib-samples", str(args.calib_samples), "--seq-len",
             str(args.seq_len), "--threads", str(args.threads), "--batch-size", str(args.batch_size)]
    jobs = {"gptq": ["quantize", str(src), "--method", "gptq", "--bits", "4", "--group-size", "128", *calib],
            "sparsegpt": ["prune", str(src), "--method", "sparsegpt", "--sparsity", "0.5", *calib]}
    for name, cmd in jobs.items():
        if name not in args.methods:
            continue
        out = work / f"b-{name}"
        evict(src)
        r = limited_run(_lmslim(*cmd, "--out", str(out), "--stream", "--max-activation-mb",
                                str(args.max_activation_mb)), args.limit_mb)
        entry = {k: r[k] for k in ("rc", "wall_s", "peak_rss_mb", "oom_kills", "cgroup_max_usage_mb")}
        if r["rc"] != 0:
            entry["stderr"] = r["stderr"][-1500:]
        else:
            rep = _report(out, "quantize" if name == "gptq" else "prune")
            entry["streaming"] = rep["streaming"]
            entry["output_mb"] = rep["size_mb_after"]
            entry["generate"] = _generate(out)
            shutil.rmtree(out)
        result[name] = entry
        print(name, entry, flush=True)
    if args.contrast:  # the in-memory path under the same limit
        out = work / "b-memory"
        evict(src)
        r = limited_run(_lmslim(*jobs["gptq"], "--out", str(out)), args.limit_mb)
        result["gptq_in_memory"] = {"rc": r["rc"], "oom_kills": r["oom_kills"], "peak_rss_mb": r["peak_rss_mb"],
                                    "wall_s": r["wall_s"], "stderr_tail": r["stderr"][-300:]}
        print("in-memory", result["gptq_in_memory"], flush=True)
    return result


def _generate(folder: Path) -> dict:
    """Load ``folder`` with lmslim in a child process and generate 5 tokens greedily."""
    code = ("import sys, torch; from lmslim.modelio import load_model; lm = load_model(sys.argv[1]); "
            "ids = lm.tokenizer('The', return_tensors='pt').input_ids; "
            "out = lm.model.generate(ids, max_new_tokens=5, do_sample=False); print(out.shape[1] - ids.shape[1])")
    r = limited_run([sys.executable, "-c", code, str(folder)], None)
    return {"rc": r["rc"], "new_tokens": r["stdout"].strip().splitlines()[-1] if r["rc"] == 0 else None,
            "peak_rss_mb": r["peak_rss_mb"], "stderr": r["stderr"][-500:] if r["rc"] else ""}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=["a", "b", "all"], default="all")
    p.add_argument("--a-model", default="builtin:smollm2-135m", help="(a) the model quantized both ways")
    p.add_argument("--calib-samples", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--intermediate", type=int, default=5632)
    p.add_argument("--layers", type=int, default=28)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--limit-mb", type=float, default=2000)
    p.add_argument("--max-activation-mb", type=float, default=256)
    p.add_argument("--methods", default="gptq,sparsegpt")
    p.add_argument("--contrast", action="store_true", help="(b) also try the in-memory path under the limit")
    p.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one, removed)")
    p.add_argument("--source", type=Path, default=None,
                   help="(b) the random model's folder: generated there if missing, kept, reused when present")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="stream-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    results = {"machine": {"cpus": os.cpu_count(), "threads": args.threads}}
    try:
        if args.part in ("a", "all"):
            results["a"] = part_a(args, work)
        if args.part in ("b", "all"):
            if not cgroup_writable():
                raise SystemExit("part b needs a writable cgroup v1 memory controller (run as root)")
            results["b"] = part_b(args, work)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(results, indent=2, default=str))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
