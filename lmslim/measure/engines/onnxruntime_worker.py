"""Times prefill and greedy decode of an ONNX export in ONNX Runtime, in a process of its own.

Run as a script (``python onnxruntime_worker.py`` with the settings as JSON on stdin; the result as
JSON on stdout) so nothing but Python, numpy and onnxruntime lives in the process: its peak resident
memory is what running the export costs, not lmslim's or torch's. Stdlib, numpy and onnxruntime only.
"""

import json
import os
import sys
import time

# Run as a script, this file's folder leads sys.path, and lmslim's own onnxruntime.py there would
# shadow the onnxruntime package.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]


def peak_rss_mb() -> float:
    """This process's peak RSS (VmHWM; ``ru_maxrss`` would carry a forked parent's peak)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def run(args: dict) -> dict:
    import numpy as np
    import onnxruntime as ort

    prompt = np.asarray(args["prompt"], dtype=np.int64)  # (B, S)
    batch, gen, d = prompt.shape[0], args["gen_len"], args["head_dim"]
    empty = {f"past_key_values.{i}.{k}": np.zeros((batch, kv, 0, d), np.float32)
             for i, kv in enumerate(args["kv_heads"]) for k in ("key", "value")}
    t0 = time.perf_counter()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = args["threads"]
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(os.path.join(args["folder"], "model.onnx"), opts, providers=["CPUExecutionProvider"])
    load_s = time.perf_counter() - t0
    names = [o.name for o in sess.get_outputs()]  # logits, present.0.key, present.0.value, ...
    past_names = [n.replace("present.", "past_key_values.", 1) for n in names[1:]]

    def step(ids, past):
        out = sess.run(names, {"input_ids": ids, **past})
        return out[0][:, -1].argmax(-1)[:, None].astype(np.int64), dict(zip(past_names, out[1:]))  # (B, 1)

    prefill_ms = []
    for i in range(args["warmup"] + args["repeats"]):
        t = time.perf_counter()
        step(prompt, empty)
        if i >= args["warmup"]:
            prefill_ms.append((time.perf_counter() - t) * 1000)
    rates, steps_ms = [], []
    for i in range(args["warmup"] + args["repeats"]):
        token, past = step(prompt, empty)
        t = time.perf_counter()
        for _ in range(gen):  # exactly gen steps, no stop at EOS: every model does the same work
            s = time.perf_counter()
            token, past = step(token, past)
            if i >= args["warmup"]:
                steps_ms.append((time.perf_counter() - s) * 1000)
        if i >= args["warmup"]:
            rates.append(batch * gen / (time.perf_counter() - t))
    return {"prefill_ms": prefill_ms, "decode_rates": rates, "decode_steps_ms": steps_ms, "load_seconds": load_s,
            "peak_rss_mb": peak_rss_mb()}


if __name__ == "__main__":
    json.dump(run(json.loads(sys.stdin.read())), sys.stdout)
