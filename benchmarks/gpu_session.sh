#!/usr/bin/env bash
# Stages for a lent GPU (one `device` call each, each well under its 10-minute limit):
#
#   bash benchmarks/gpu_session.sh build        # compile livethinking._C against the GPU image's torch
#   bash benchmarks/gpu_session.sh test         # the whole test suite, CUDA tests included
#   bash benchmarks/gpu_session.sh routing      # C++/CUDA routing ops vs their references
#   bash benchmarks/gpu_session.sh tune         # fused MoE tile tables (--write), one regime at a time
#   bash benchmarks/gpu_session.sh moe          # fused MoE vs grouped_mm / transformers / naive
#   bash benchmarks/gpu_session.sh grpo         # fused log-probs + GRPO loss vs naive / Liger / bare GEMMs
#   bash benchmarks/gpu_session.sh model        # CausalLM vs transformers at Qwen3-30B-A3B shapes
#   bash benchmarks/gpu_session.sh engine       # TTFT / decode tokens/s of the engine, 30B-A3B shapes
#   bash benchmarks/gpu_session.sh train        # RFT SFT tokens/s + MFU; GRPO step vs TRL
#
# Stages after `build` need the build in place: run them in the same held machine, or
# chain them in one call (`build test`). Logs and CSVs go to $OUT (the device tool
# brings them back), the last lines of each to stdout.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-/tmp/livethinking-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

run() {  # run NAME COMMAND...: log to $OUT/NAME.log, show its tail, keep going on failure
  local name=$1
  shift
  echo "== $name: $*"
  "$@" >"$OUT/$name.log" 2>&1
  local status=$?
  tail -n 25 "$OUT/$name.log"
  echo "== $name exited $status"
  return $status
}

for stage in "$@"; do
  case $stage in
    build)
      # The image has torch, triton, pytest, transformers, safetensors and no internet.
      run build python3 -m pip install --no-build-isolation --no-deps -e . &&
        run info python3 -m livethinking info ;;
    test) run test pytest tests -q -p no:cacheprovider -x --durations=15 ;;
    routing)
      run routing pytest benchmarks/bench_moe_routing.py -q -p no:cacheprovider \
        --benchmark-json="$OUT/routing.json" ;;
    tune)
      for regime in decode prefill weight_grad; do
        run "tune-$regime" python3 benchmarks/tune_moe.py --regimes "$regime" --write
      done
      cp kernels/fused_moe.py "$OUT/fused_moe.tuned.py"  # the tuned table comes back in $OUT
      git diff kernels/fused_moe.py | tail -n 30 ;;
    moe) run moe python3 benchmarks/bench_moe.py --out "$OUT/moe.csv" ;;
    grpo)
      run grpo python3 benchmarks/bench_grpo_loss.py --tokens 8192 32768 --out "$OUT/grpo.csv" ;;
    model)
      run model pytest benchmarks/bench_model.py -q -p no:cacheprovider \
        --benchmark-json="$OUT/model.json" ;;
    engine)
      run engine python3 benchmarks/bench_ttft.py --model 30b-a3b --layers "${LAYERS:-48}" \
        --markdown --out-csv "$OUT/ttft.csv" ;;
    train)
      run sft python3 benchmarks/bench_sft.py --model 30b-a3b --layers "${LAYERS:-4}" \
        --markdown --out-csv "$OUT/sft.csv"
      run grpo-step python3 benchmarks/bench_grpo_step.py --device cuda --out-csv "$OUT/grpo_step.csv" ;;
    *) echo "unknown stage '$stage' (build test routing tune moe grpo model engine train)" >&2; exit 2 ;;
  esac
done
