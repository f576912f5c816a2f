#!/usr/bin/env bash
# The GPU checks, in the form they run on a lent H100/H200 (the `device` tool, which carries .whl/ and .gpu/):
#   .whl/   wheels the GPU image lacks: usearch, bitsandbytes, trl, datasets, dill, multiprocess
#   .gpu/   a GSM8K sample (.gpu/gsm8k/{train,test}.jsonl, the first 200/50 lines of ../shared/data/gsm8k)
# Usage: bash bench/gpu.sh quick|sweep|trl     Results land in $OUT (default /tmp/tinyrl-gpu-out).
#   quick: tests/test_gpu.py (real CUDA OOM back-off, fp16 encoder) + the headline rows of bench/budget.py
#   sweep: the other rows of bench/budget.py, after the headline rows in .gpu/budget_gpu.json
#   trl:   bench/vs_trl.py --device cuda (Qwen2.5-0.5B geometry, P=8 G=16, 200 tokens), ~3 min
# LIMIT (seconds, default 240): sweep/trl start no new row or run after it. Device time on 2026-11-25 (H200):
# quick ~4 min, sweep ~3.5 min for 4 rows, trl ~2.5 min, plus ~1 min to start the machine.
set -uo pipefail
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_VERBOSITY=error PYTHONUNBUFFERED=1 \
       TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/tinyrl-gpu-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  2>&1 | grep -v "^WARNING" | tail -3
export PYTHONPATH=/tmp/site:$PWD
limit=${LIMIT:-240}
case "${1:-}" in
  quick)
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
    timeout 150 python3 -m pytest tests/test_gpu.py -p no:cacheprovider -o addopts="" -q -rs 2>&1 \
      | tee "$OUT/pytest_gpu.txt"
    timeout 330 python3 bench/budget.py --data .gpu/gsm8k --rows qwen:8G,llama:8G,falcon:8G,qwen:4G \
      --out "$OUT/budget_gpu.json" 2>&1 | grep -v "Loading weights\|Writing model" | tee "$OUT/budget_log.txt" ;;
  sweep)
    timeout $((limit + 90)) python3 bench/budget.py --data .gpu/gsm8k --prior .gpu/budget_gpu.json \
      --time-limit "$limit" --out "$OUT/budget_gpu.json" 2>&1 | grep -v "Loading weights\|Writing model" \
      | tee "$OUT/budget_log.txt" ;;
  trl)
    model=/tmp/tinyrl-budget/qwen  # the sweep's random-init Qwen2.5-0.5B geometry (made here if absent)
    [ -f $model/config.json ] || python3 bench/randmodel.py Qwen/Qwen2.5-0.5B-Instruct $model
    timeout $((limit + 150)) python3 bench/vs_trl.py --device cuda --model $model --data .gpu/gsm8k --prompts 8 \
      --group 16 --new-tokens 200 --steps 3 --rounds 1 --time-limit "$limit" --out "$OUT/vs_trl_gpu.json" 2>&1 \
      | grep -v "Loading weights" | tee "$OUT/vs_trl_log.txt" ;;
  *) echo "usage: bash bench/gpu.sh quick|sweep|trl" >&2; exit 2 ;;
esac
