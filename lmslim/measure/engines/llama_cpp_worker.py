"""Times prefill and greedy decode of a GGUF file in llama.cpp, in a process of its own.

Run as a script (``python llama_cpp_worker.py`` with the settings as JSON on stdin; the result as
JSON on stdout) so nothing but Python, numpy and llama.cpp lives in the process: its peak resident
memory is what running the file costs, not lmslim's or torch's. Stdlib, numpy and llama_cpp only.
"""

import json
import os
import resource
import sys
import time

# Run as a script, this file's folder leads sys.path, and lmslim's own llama_cpp.py there would
# shadow the llama_cpp package.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]


def _greedy(llama_cpp, llm, n_vocab):
    import numpy as np

    logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,))
    return int(logits.argmax())


def peak_rss_mb() -> float:
    """This process's peak RSS (VmHWM). ``ru_maxrss`` is not used: Linux carries the parent's peak
    into a forked child, so a worker started by a large process would report its parent's memory."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run(args: dict) -> dict:
    import llama_cpp

    prompt, gen, threads = args["prompt"], args["gen_len"], args["threads"]
    t0 = time.perf_counter()
    llm = llama_cpp.Llama(model_path=args["path"], n_ctx=len(prompt) + gen + 1, n_batch=len(prompt),
                          n_ubatch=len(prompt), n_threads=threads, n_threads_batch=threads, verbose=False)
    load_s = time.perf_counter() - t0
    n_vocab = llm.n_vocab()
    prefill_ms = []
    for i in range(args["warmup"] + args["repeats"]):
        llm.reset()  # the next eval starts at position 0 and drops the old KV cache
        t = time.perf_counter()
        llm.eval(prompt)
        if i >= args["warmup"]:
            prefill_ms.append((time.perf_counter() - t) * 1000)
    rates, steps_ms = [], []
    for i in range(args["warmup"] + args["repeats"]):
        llm.reset()
        llm.eval(prompt)
        token = _greedy(llama_cpp, llm, n_vocab)
        t = time.perf_counter()
        for _ in range(gen):  # exactly gen steps, no stop at EOS: every model does the same work
            s = time.perf_counter()
            llm.eval([token])
            token = _greedy(llama_cpp, llm, n_vocab)
            if i >= args["warmup"]:
                steps_ms.append((time.perf_counter() - s) * 1000)
        if i >= args["warmup"]:
            rates.append(gen / (time.perf_counter() - t))
    llm.close()
    return {"prefill_ms": prefill_ms, "decode_rates": rates, "decode_steps_ms": steps_ms, "load_seconds": load_s,
            "peak_rss_mb": peak_rss_mb(), "n_vocab": n_vocab}


if __name__ == "__main__":
    json.dump(run(json.loads(sys.stdin.read())), sys.stdout)
