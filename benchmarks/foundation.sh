#!/usr/bin/env bash
# Baseline quality and cost of SmolLM2-135M on this machine (BENCHMARKS.md, "foundation").
# Usage: benchmarks/foundation.sh [OUT_DIR]   (default runs/foundation)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/foundation}
LM=.venv/bin/lmslim
mkdir -p "$OUT"
$LM fetch all
$LM eval builtin:smollm2-135m --data builtin:wiki:test --json "$OUT/smollm2-eval.json"
$LM bench builtin:smollm2-135m --batch 1 --prompt-len 128 --gen-len 64 --repeats 5 --json "$OUT/smollm2-bench.json"
$LM eval builtin:minilm-l6 --task embed --data builtin:lee-sim --json "$OUT/minilm-eval.json"
$LM bench builtin:minilm-l6 --prompt-len 128 --repeats 10 --json "$OUT/minilm-bench.json"
$LM compare "$OUT/smollm2-eval.json" "$OUT/smollm2-bench.json" --markdown "$OUT/smollm2.md"
