#!/usr/bin/env bash
# Issue 12, items 2 and 3: where the missed targets' time goes, from profiler kernel records, in one
# device call. Batch-1 decode at 4k / 16k (the default launch traced against the best SDPA backend,
# graph replays; the split-K merge as a second launch and fused, both timed) and the 16k prefill
# through the cuDNN band path (band phase, sink fold, idle time).
# Usage (repo root, on the GPU machine; carry .whl): tools/issue12_traces.sh
#   TESTS=1 first runs the decode kernels' GPU tests (bf16 property test, fused merge under graph replay,
#   graph-replayed generate against transformers), with TESTS_MERGE (default auto) as the merge setting;
#   ROUNDS=R times every decode launch R times, interleaved (medians); TRACE= (empty) skips the decode traces;
#   PREFILL=0 skips the prefill; BENCH=1 adds `moa-plan bench` decode rows (batch 1 and 8, 4k / 16k).
# Writes under $OUT (default ./gpu-out): decode-b1-trace.{json,log}, prefill-16k-trace.{json,log}, bench/,
# gpu-tests.log, device.txt. (The copy on the GPU machine has no usable git: write commit.txt by hand.)
set -o pipefail
REPO=$(pwd)
OUT=${OUT:-$REPO/gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  timeout 90 python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>&1 | tail -3
fi
. "$REPO/tools/moa_layout.sh" && moa_layout "$REPO"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv > "$OUT/device.txt" 2>&1
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cudnn', torch.backends.cudnn.version())" >> "$OUT/device.txt" 2>&1
cd /tmp || exit 1
if [ "${TESTS:-0}" = 1 ]; then
  echo "=== GPU tests ($(date +%T))"
  MOA_DECODE_MERGE=${TESTS_MERGE:-auto} timeout "${TESTS_TIMEOUT:-200}" python3 -m pytest -q -p no:cacheprovider \
    --rootdir "$REPO" "$REPO/tests/test_kernels_gpu.py" "$REPO/tests/test_graph_gpu.py" \
    -k "decode or fused or graph_generate" 2>&1 | tail -15 | tee "$OUT/gpu-tests.log"
fi
echo "=== decode b1 ($(date +%T))"
timeout "${DECODE_TIMEOUT:-200}" python3 "$REPO/tools/decode_b1_sweep.py" "$OUT/decode-b1-trace.json" \
  --quick --no-prefill --plans synthetic,searched-shaped,grouped --loads gather --pdl 1 --merge kernel,fused \
  --rounds "${ROUNDS:-1}" ${TRACE---trace} \
  2>&1 | grep -v "UserWarning\|scaled_dot_product" | tee "$OUT/decode-b1-trace.log"
echo "exit $? ($(date +%T))"
if [ "${BENCH:-0}" = 1 ]; then
  echo "=== bench decode rows, batch 1 and 8 ($(date +%T))"
  timeout "${BENCH_TIMEOUT:-240}" python3 -m moa_plan.cli bench --shapes llama3-8b --densities 0.5,0.25 \
    --decode-lens 4096,16384 --batches 1,8 --prefill-lens 16384 --no-flex --e2e '' --out "$OUT/bench" --overwrite \
    2>&1 | grep -v "UserWarning\|scaled_dot_product" | tail -40 | tee "$OUT/bench.log"
  echo "exit $? ($(date +%T))"
fi
if [ "${PREFILL:-1}" = 1 ]; then
  echo "=== prefill 16k ($(date +%T))"
  timeout "${PREFILL_TIMEOUT:-240}" python3 "$REPO/tools/prefill_sweep.py" "$OUT/prefill-16k-trace.json" --default-only \
    --lengths "${PREFILL_LENGTHS:-16384}" --streams 4 2>&1 | tee "$OUT/prefill-16k-trace.log"
  echo "exit $? ($(date +%T))"
fi
