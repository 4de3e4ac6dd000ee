#!/usr/bin/env bash
# Issue 12, items 2 and 3: where the missed targets' time goes, from profiler kernel records, in one
# device call. Batch-1 decode at 4k / 16k (the default launch and the best SDPA backend, graph
# replays) and the 16k prefill through the cuDNN band path (band phase, sink fold, idle time).
# Usage (repo root, on the GPU machine; carry .whl): tools/issue12_traces.sh
# Writes under $OUT (default ./gpu-out): decode-b1-trace.{json,log}, prefill-16k-trace.{json,log},
# device.txt, commit.txt (when git is there).
set -o pipefail
REPO=$(pwd)
OUT=${OUT:-$REPO/gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  timeout 90 python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>&1 | tail -3
fi
rm -rf /tmp/moa && mkdir -p /tmp/moa/moa_plan
for f in "$REPO"/moa_plan/*; do ln -s "$f" /tmp/moa/moa_plan/; done
for d in runtime search evals; do ln -s "$REPO/$d" "/tmp/moa/moa_plan/$d"; done
export PYTHONPATH=/tmp/moa:/tmp/site${PYTHONPATH:+:$PYTHONPATH}
git -C "$REPO" rev-parse HEAD > "$OUT/commit.txt" 2>/dev/null || true
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv > "$OUT/device.txt" 2>&1
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cudnn', torch.backends.cudnn.version())" >> "$OUT/device.txt" 2>&1
cd /tmp || exit 1
echo "=== decode b1 ($(date +%T))"
timeout "${DECODE_TIMEOUT:-240}" python3 "$REPO/tools/decode_b1_sweep.py" "$OUT/decode-b1-trace.json" --quick --no-prefill \
  --plans synthetic,searched-shaped,grouped --loads gather --pdl 1 --trace 2>&1 | tee "$OUT/decode-b1-trace.log"
echo "exit $? ($(date +%T))"
echo "=== prefill 16k ($(date +%T))"
timeout "${PREFILL_TIMEOUT:-240}" python3 "$REPO/tools/prefill_sweep.py" "$OUT/prefill-16k-trace.json" --default-only \
  --lengths "${PREFILL_LENGTHS:-16384}" --streams 4 2>&1 | tee "$OUT/prefill-16k-trace.log"
echo "exit $? ($(date +%T))"
