#!/usr/bin/env bash
# One GPU session in one call, <= 8 minutes on an H200 (the device budget is 15 minutes per
# issue, machine start and any rerun included):
#
#   bash bench/gpu_session.sh OUT_DIR          # the real shapes (GPU)
#   bash bench/gpu_session.sh --toy OUT_DIR    # toy shapes; on a CPU the kernels run in the
#                                              # Triton interpreter (tests/test_gpu_session.py)
#
# Stages, in order, each under its own time limit (and the session's deadline), each logged to
# OUT_DIR/<stage>.log; a failing or timed-out stage is recorded and the next one still runs:
#   1. tests_bf16   pytest -m gpu -k bf16 (compiled kernels in bf16: the check no CPU can do)
#   2. tests_other  the other gpu tests (fp16, fp32, memory)
#   3. lora         bench_lora.py: Qwen3-8B projections, T=16384, 16 adapters ranks 1..256,
#                   providers base (the frozen layer alone), naive (a loop over adapters), triton,
#                   grouped_mm (padded to the largest rank); fwd, fwd_dx, fwd_bwd
#   4. logprobs     bench_logprobs.py: T=16384, d=4096, V=151936 bf16, triton against the 3-GEMM
#                   floor, and Liger if it imports
#   5. grpo         GRPO STEP AT THE 0.6B SHAPE with 1, 64, 256 adapters: bench_trainer.py as it
#                   is today, one call per adapter count (a scaling bench may replace this stage)
# Results: OUT_DIR/results.csv (rows of every bench), OUT_DIR/session.log (versions, stage
# status and seconds), OUT_DIR/env.txt (nvidia-smi, git sha). Exit status 1 if any stage failed.
set -uo pipefail

TOY=0
if [ "${1:-}" = "--toy" ]; then TOY=1; shift; fi
[ "${LORA_ENGINE_TOY:-0}" = "1" ] && TOY=1
OUT=${1:?usage: bash bench/gpu_session.sh [--toy] OUT_DIR}
PY=${PYTHON:-python}
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
CSV="$OUT/results.csv"
LOG="$OUT/session.log"
: > "$LOG"
START=$SECONDS
BUDGET=${LORA_ENGINE_SESSION_S:-480}
# Stage limits are sized for the H200; the toy run on a CPU gets 3x (a shared 2-core machine ran
# the 1-adapter GRPO stage in 35-50 s where a quiet one takes ~15 s).
LIMIT_SCALE=${LORA_ENGINE_STAGE_SCALE:-1}
[ $TOY -eq 1 ] && LIMIT_SCALE=${LORA_ENGINE_STAGE_SCALE:-3}
FAILED=0

say() { echo "[$(date +%H:%M:%S) +$((SECONDS - START))s] $*" | tee -a "$LOG"; }

# stage NAME LIMIT_S CMD...: run CMD with its output in $OUT/NAME.log, under min(LIMIT_S, time left).
stage() {
  local name=$1 limit=$(($2 * LIMIT_SCALE)); shift 2
  local left=$((BUDGET - (SECONDS - START)))
  if [ "$left" -lt 10 ]; then say "SKIP  $name: session budget of ${BUDGET}s spent"; FAILED=1; return; fi
  [ "$limit" -gt "$left" ] && limit=$left
  local t0=$SECONDS
  timeout -k 10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  if [ $rc -eq 0 ]; then
    say "ok    $name ($((SECONDS - t0))s)"
  else
    [ $rc -eq 124 ] && say "TIME  $name: over ${limit}s (partial log kept)" || say "FAIL  $name: exit $rc"
    tail -5 "$OUT/$name.log" | sed 's/^/      /' | tee -a "$LOG"
    FAILED=1
  fi
}

HAS_CUDA=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)
if [ "$HAS_CUDA" != "1" ]; then
  [ $TOY -eq 1 ] || { echo "no CUDA GPU here: run with --toy for the CPU smoke run"; exit 2; }
  export TRITON_INTERPRET=1  # before anything imports triton
fi
export OMP_WAIT_POLICY=PASSIVE
# 20 ms of do_bench per measurement instead of 100 (medians of ~5-50 runs at these shapes).
export LORA_ENGINE_BENCH_REP_MS=${LORA_ENGINE_BENCH_REP_MS:-20}
[ $TOY -eq 1 ] && export LORA_ENGINE_BENCH_QUICK=1

# The kernels under test must be this checkout's: install it (no deps) unless it already imports from here.
HERE=$("$PY" -c "import lora_engine, os; print(os.path.dirname(os.path.dirname(os.path.abspath(lora_engine.__file__))))" 2>/dev/null)
if [ "$HERE" != "$PWD" ]; then
  "$PY" -m pip install -q -e . --no-deps > "$OUT/install.log" 2>&1 || say "FAIL  pip install -e . (see install.log)"
fi
{ nvidia-smi 2>&1 || echo "no nvidia-smi"; echo "git $(git rev-parse --short HEAD 2>/dev/null)"; } > "$OUT/env.txt"
say "versions: $("$PY" -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" 2>&1)"
say "mode: $([ $TOY -eq 1 ] && echo toy || echo full), cuda=$HAS_CUDA, budget ${BUDGET}s, out $OUT"

if [ $TOY -eq 1 ]; then
  TESTS="tests/test_lora_kernel.py tests/test_logprobs.py"
  LORA_ARGS=(--shapes 96x64x48)
  LOGP_ARGS=(--T 40 --d 32 --V 300 --dtype fp32)
  GRPO_ARGS=(--model tiny --steps 1 --prompts 1 --samples 2 --prompt-len 4 --new-tokens 3 --rank 2)
  ADAPTERS="1 3"
else
  TESTS="tests"
  LORA_ARGS=()
  LOGP_ARGS=()
  GRPO_ARGS=(--model 0.6b --steps 1 --prompts 1 --samples 4 --prompt-len 64 --new-tokens 64 --rank 16)
  ADAPTERS="1 64 256"
fi

# shellcheck disable=SC2086  # $TESTS is a list of paths
stage tests_bf16 120 "$PY" -m pytest $TESTS -q -m gpu -k bf16 -p no:cacheprovider
# shellcheck disable=SC2086
stage tests_other 50 "$PY" -m pytest $TESTS -q -m gpu -k "not bf16" -p no:cacheprovider
stage lora 100 "$PY" bench/bench_lora.py --providers base,naive,triton,grouped_mm --modes fwd,fwd_dx,fwd_bwd \
  "${LORA_ARGS[@]}" --csv "$CSV"
stage logprobs 60 "$PY" bench/bench_logprobs.py --providers triton,liger "${LOGP_ARGS[@]}" --csv "$CSV"

# ===== GRPO STEP AT THE 0.6B SHAPE, 1 / 64 / 256 ADAPTERS (bench_trainer.py as it is today) =====
declare -A GRPO_LIMIT=([1]=35 [64]=45 [256]=70 [3]=60)
for n in $ADAPTERS; do
  stage "grpo_${n}_adapters" "${GRPO_LIMIT[$n]}" "$PY" bench/bench_trainer.py --adapters "$n" "${GRPO_ARGS[@]}" \
    --output-dir "$OUT/trainer_$n" --csv "$CSV"
done

say "done in $((SECONDS - START))s; $(($(wc -l < "$CSV" 2>/dev/null || echo 1) - 1)) CSV rows in $CSV"
exit $FAILED
