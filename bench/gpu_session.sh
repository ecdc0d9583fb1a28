#!/usr/bin/env bash
# Everything a GPU session should run, in stages that each fit the device tool's 10-minute call:
#   bash bench/gpu_session.sh tests|lora|logprobs|trainer
# Results go to $OUT (the device tool brings that folder back): logs and bench/results.csv rows.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
pip install -q -e . --no-deps > "$OUT/install.log" 2>&1 || true
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
python -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)" > "$OUT/versions.txt"
case "${1:-tests}" in
  tests)    python -m pytest tests -q -m gpu -x -p no:cacheprovider > "$OUT/gpu_tests.log" 2>&1 ;;
  lora)     python bench/bench_lora.py > "$OUT/bench_lora.log" 2>&1 ;;
  logprobs) python bench/bench_logprobs.py --csv bench/results.csv > "$OUT/bench_logprobs.log" 2>&1
            python bench/bench_policy_loss.py --csv bench/results.csv > "$OUT/bench_policy_loss.log" 2>&1 ;;
  trainer)  python bench/bench_trainer.py > "$OUT/bench_trainer.log" 2>&1 ;;
  *) echo "unknown stage $1: use tests|lora|logprobs|trainer"; exit 2 ;;
esac
rc=$?
cp bench/results.csv "$OUT/results.csv" 2>/dev/null || true
tail -5 "$OUT"/*.log
exit $rc
