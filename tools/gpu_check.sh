#!/usr/bin/env bash
# GPU check + benchmark, one device call: bf16 kernel property tests, then `moa-plan bench`.
# Usage (repo root, on the GPU machine): [TESTS=1] [TEST_TIMEOUT=150] tools/gpu_check.sh [bench args...]
# Needs the wheels the image lacks (pydantic, pydantic_core, annotated_types, typing_inspection) in .whl/;
# with nvidia-cudnn-frontend 1.16 there too, the cuDNN band prefill tests run as well (else they skip).
# Writes logs and results under $OUT (default ./gpu-out).
set -o pipefail
REPO=$(pwd)
OUT=${OUT:-$REPO/gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
fi
. "$REPO/tools/moa_layout.sh" && moa_layout "$REPO"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/device.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/device.txt"
cd /tmp || exit 1
rc=0
if [ "${TESTS:-1}" = 1 ]; then
  timeout "${TEST_TIMEOUT:-150}" python3 -m pytest -q -p no:cacheprovider -x --rootdir "$REPO" \
    "$REPO/tests/test_kernels_gpu.py" 2>&1 | tee "$OUT/gpu_tests.log" || rc=1
fi
if [ $# -gt 0 ]; then
  python3 -m moa_plan.evals.bench.cli bench --out "$OUT" "$@" 2>&1 | tee "$OUT/bench.log" || rc=1
fi
exit $rc
