#!/usr/bin/env bash
# Reproduces evals/results/smollm2/ (SmolLM2-135M-Instruct, CPU, offline). Every step resumes from
# the result files already here: delete a *-cells.json / perplexity.json to recompute it.
set -euo pipefail
cd "$(dirname "$0")/../../.."
export HF_HUB_OFFLINE=1
OUT=evals/results/smollm2
P50=spec/examples/smollm2-135m-moa-50.json
P25=spec/examples/smollm2-135m-moa-25.json

# 1. where is the dense model good? (both tasks; lines turns out too hard for a 135M model)
for task in passkey lines; do
  .venv/bin/moa-plan eval retrieval --model smollm2 --plan dense --task $task \
    --lengths 256,512,1024,2048 --positions 0,0.5,1 --samples 2 --out $OUT/$task-cells.json
done

# 2. dense vs StreamingLLM at the plan's density vs MoA, 50% and 25% (passkey, where dense is good)
.venv/bin/moa-plan eval context --model smollm2 --plan $P50 --plan $P25 --task passkey \
  --lengths 256,512,1024,2048 --positions 0,0.5,1 --samples 2 --out-dir $OUT

# 3. perplexity on the CPython reference text, and on a window whose second half repeats the first
.venv/bin/moa-plan eval perplexity --model smollm2 --plan dense --plan uniform=$P50 --plan $P50 \
  --plan uniform=$P25 --plan $P25 --lengths 1024,2048 --windows 1 --out $OUT/perplexity.json
