#!/usr/bin/env bash
# The GPU checks in one run (the 7B targets of benchmarks/README.md): the tests marked `gpu`
# (7B-shape benchmarks within memory included), then the LLaMA-7B-shape benchmarks: compiled
# decoding with cudagraph/recompile logs and a profile (device_busy_share: near 1 device-bound,
# low host-bound), compiled training without, with all, and with 8 checkpointed blocks.
# Usage, from the repository root: bash benchmarks/gpu-check.sh [OUT_DIR]   (default /tmp/lav2-gpu)
source "$(dirname "$0")/gpu-env.sh" gpu-check /tmp/lav2-gpu "$@"
timeout 300 $PY -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider 2>&1 | tail -25 | tee "$OUT/gpu-tests.log"
TORCH_LOGS="cudagraphs,recompiles,graph_breaks,perf_hints" timeout 150 $B decode --shape llama-7b --new-tokens 200 \
    --compile --trace "$OUT/decode-trace.json" --json > "$OUT/decode-compiled.log" 2>&1
tail -1 "$OUT/decode-compiled.log" | tee -a "$OUT/bench.jsonl"
grep -i "skipping cudagraphs\|re-record\|recompil" "$OUT/decode-compiled.log" | head -5
gzip -f "$OUT/decode-trace.json" 2>/dev/null
for extra in "" "--grad-ckpt" "--ckpt-blocks 8"; do
    # shellcheck disable=SC2086
    timeout 150 $B train --shape llama-7b --batch 8 --seq 512 --steps 4 --compile $extra --json 2>&1 | tail -1 | tee -a "$OUT/bench.jsonl"
done
for b in 8 32; do
    timeout 150 $B decode --shape llama-7b --batch $b --new-tokens 100 --compile --json 2>&1 | tail -1 | tee -a "$OUT/bench.jsonl"
done
# the real commands at the 7B shape
W=${WORK:-/tmp/lav2-7b}
timeout 300 $PY benchmarks/random_7b.py "$W" | tee "$OUT/random-7b.log"
timeout 600 $PY -m lav2cli train --recipe recipes/llama7b-joint.toml --out "$W/run" --force \
    --set model.ref="$W/base" --set model.encoder=open_clip:ViT-L-14 --set data.image_text="$W/captions.jsonl" \
    --set data.instruction="$W/instructions.jsonl" --set train.max_steps=60 --set train.log_every=5 \
    --set train.checkpoint_every=0 2>&1 | tail -8 | tee "$OUT/train-7b.log"
cp "$W/run/metrics.jsonl" "$OUT/train-7b-metrics.jsonl" 2>/dev/null
$PY -c "import json,sys; t=json.load(open(sys.argv[1]))['training']; print(json.dumps({k: t.get(k) for k in ('tokens_per_s', 'warmup_s', 'compiles', 'peak_memory_mb', 'predicted_peak_mb', 'checkpointed_blocks', 'compiled_blocks', 'pad_multiple')}))" "$W/run/lav2.json" | tee -a "$OUT/bench.jsonl"
timeout 600 $PY -m lav2cli eval vqa --data "$W/questions.jsonl" --model "$W/run" --out "$W/questions-pred.jsonl" \
    --batch-size 32 --json 2>&1 | tail -2 | tee "$OUT/eval-7b.log"
