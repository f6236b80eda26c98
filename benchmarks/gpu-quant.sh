#!/usr/bin/env bash
# The quantisation checks on a GPU (the targets of README.md, Quantisation): the CUDA tests of
# tests/test_quant.py (fused kernels against the dequantised product), then LLaMA-7B-shape decoding
# at batch 1, bf16 vs int8 vs int4, eager and compiled, and adapter training at batch 4 x 512 with
# checkpointing on an int8 and an int4 base (peak memory). About 10 minutes on one H100.
# Usage, from the repository root: bash benchmarks/gpu-quant.sh [OUT_DIR]   (default /tmp/lav2-gpu-quant)
source "$(dirname "$0")/gpu-env.sh" gpu-quant /tmp/lav2-gpu-quant "$@"
timeout 120 $PY -m pytest -q -m gpu tests/test_quant.py -p no:cacheprovider 2>&1 | tail -15 | tee "$OUT/quant-tests.log"
for q in none int8 int4; do
    timeout 120 $B decode --shape llama-7b --new-tokens 100 --quantize $q --json 2>&1 | tail -1 | tee -a "$OUT/bench.jsonl"
    timeout 180 $B decode --shape llama-7b --new-tokens 200 --compile --quantize $q --json 2>&1 | tail -1 | tee -a "$OUT/bench.jsonl"
done
for q in int8 int4; do
    timeout 150 $B train --shape llama-7b --batch 4 --seq 512 --steps 4 --grad-ckpt --quantize $q --json 2>&1 | tail -1 | tee -a "$OUT/bench.jsonl"
done
