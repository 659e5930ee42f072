"""Paper plans for training a 70B-class Llama on 8 and 64 GPUs (docs/distributed.md, "Plans on paper").

Nothing here runs a model: shapes come from the published Llama-3-70B config, and every number from
lmslim's own formulas — training FLOPs from :mod:`lmslim.measure.cost`, gradient/parameter traffic from
:func:`lmslim.train.distributed.comm_bytes_per_step` (fp32 gradients, as lmslim trains: fp32 weights,
autocast activations), tensor-parallel activation traffic from :func:`lmslim.train.parallel.tp_comm_bytes`
and pipeline traffic from :func:`lmslim.train.pipeline.comm_bytes` (bf16 activations).

Memory per GPU: 16 bytes per parameter held (fp32 weight 4 + fp32 gradient 4 + AdamW moments 8), divided
by tp x pp, and the FSDP-sharded part by dp as well; activations with per-layer activation checkpointing:
one bf16 hidden state per layer per micro-batch in flight (1F1B keeps up to pp in flight), plus one layer's
working set during recomputation (estimated as 16 x tokens x hidden x 2 bytes + the logits on the last stage).

Usage:
    .venv/bin/python benchmarks/parallel_plan.py [--tokens-per-step 1048576] [--seq-len 4096] [--micro 1]
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

# Llama-3-70B (config.json of meta-llama/Meta-Llama-3-70B).
LLAMA3_70B = {"hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80, "num_attention_heads": 64,
              "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": False}

# (GPUs, dp, tp, pp, dp as FSDP2). lmslim's pp x dp replicates the stages (fsdp False): the 64-GPU 3-D plan
# is listed both ways, as lmslim runs it and with FSDP2 over dp.
PLANS = [(8, 1, 8, 1, True), (8, 1, 4, 2, True), (64, 8, 8, 1, True), (64, 2, 8, 4, True), (64, 2, 8, 4, False),
         (64, 1, 8, 8, False)]


def params(d: dict) -> int:
    h, f, layers, v = d["hidden_size"], d["intermediate_size"], d["num_hidden_layers"], d["vocab_size"]
    kv = h * d["num_key_value_heads"] // d["num_attention_heads"]
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * f + 2 * h
    return layers * per_layer + v * h * (1 if d["tie_word_embeddings"] else 2) + h


def estimate(d: dict, gpus: int, dp: int, tp: int, pp: int, fsdp: bool, tokens: int, seq: int, micro: int) -> dict:
    from lmslim.measure.cost import ModelShape, training_flops_per_token
    from lmslim.train.config import DistributedConfig
    from lmslim.train.distributed import comm_bytes_per_step
    from lmslim.train.parallel import tp_comm_bytes
    from lmslim.train.pipeline import comm_bytes

    assert dp * tp * pp == gpus
    n = params(d)
    held = n / (tp * pp)  # parameters one GPU computes with
    static = held * 4 * (1 / dp if fsdp else 1) + held * 12 / (dp if fsdp else 1)  # weights; grads + moments
    h, layers = d["hidden_size"], d["num_hidden_layers"]
    tokens_dp = tokens // dp  # tokens each data-parallel replica processes per step
    micro_tokens = micro * seq
    in_flight = pp if pp > 1 else 1
    act = (layers // pp) * micro_tokens * h * 2 * in_flight + 16 * micro_tokens * h * 2 / tp \
        + micro_tokens * d["vocab_size"] * 4 / tp
    grad_shard = [nn.Parameter(torch.empty(int(held), device="meta"))]
    strategy = "fsdp" if fsdp else "ddp"
    dp_bytes = comm_bytes_per_step(grad_shard, DistributedConfig(strategy=strategy), dp)
    tp_bytes = tp_comm_bytes({**d, "num_hidden_layers": layers // pp}, tokens_dp, tp, bytes_per_value=2)
    pp_bytes = comm_bytes(d, tokens_dp, pp, bytes_per_value=2)
    kv = h * d["num_key_value_heads"] // d["num_attention_heads"]
    shape = ModelShape(layers, d["num_attention_heads"], d["num_key_value_heads"], h // d["num_attention_heads"],
                       n - d["vocab_size"] * h - h * (2 * layers + 1), 0, n, n, 2 * layers * kv * 2)
    flops = training_flops_per_token(shape, seq) * tokens / gpus
    return {"gpus": gpus, "dp": dp, "tp": tp, "pp": pp, "dp_kind": ("FSDP2" if fsdp else "replicated") if dp > 1 else "-",
            "static_gb": static / 1e9, "act_gb": act / 1e9, "dp_gb": dp_bytes / 1e9, "tp_gb": tp_bytes / 1e9,
            "pp_gb": pp_bytes / 1e9, "tflop_per_gpu": flops / 1e12, "params_b": n / 1e9}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens-per-step", type=int, default=1 << 20)
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--micro", type=int, default=1, help="sequences per micro-batch")
    args = ap.parse_args()
    rows = [estimate(LLAMA3_70B, *plan, args.tokens_per_step, args.seq_len, args.micro) for plan in PLANS]
    print(f"Llama-3-70B: {rows[0]['params_b']:.1f} B parameters; {args.tokens_per_step:,} tokens per step "
          f"({args.tokens_per_step // args.seq_len} x {args.seq_len}), micro-batch {args.micro} sequence(s)")
    print("| GPUs | dp x tp x pp | dp as | weights+grads+AdamW GB/GPU | activations GB/GPU (ckpt) | "
          "dp GB sent | tp GB sent | pp GB sent | TFLOP/GPU/step |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['gpus']} | {r['dp']} x {r['tp']} x {r['pp']} | {r['dp_kind']} | {r['static_gb']:.1f} | "
              f"{r['act_gb']:.1f} | {r['dp_gb']:.1f} | {r['tp_gb']:.1f} | {r['pp_gb']:.2f} | "
              f"{r['tflop_per_gpu']:.0f} |")


if __name__ == "__main__":
    main()
