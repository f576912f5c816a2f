#!/usr/bin/env bash
# The GPU checks, in the form they run on a lent H100/H200 (the `device` tool, which carries .whl/ and .gpu/):
#   .whl/   wheels the GPU image lacks: usearch + numkong, bitsandbytes, trl, datasets, dill, multiprocess
#   .gpu/   a GSM8K sample (.gpu/gsm8k/{train,test}.jsonl, the first 200/50 lines of ../shared/data/gsm8k)
# Usage: bash bench/gpu.sh all|tests|quick|sweep|trl     Results land in $OUT (default /tmp/tinyrl-gpu-out).
#   all:   tests, then every row of bench/budget.py (headline rows first) until SWEEP_LIMIT, then trl
#   tests: tests/test_gpu.py (a real CUDA OOM back-off, the fp16 encoder)
#   quick: tests + the headline rows of bench/budget.py (each geometry at 8G, Qwen at 4G)
#   sweep: the rows of bench/budget.py not already in .gpu/budget_gpu.json (copy quick's result there first)
#   trl:   bench/vs_trl.py --device cuda (Qwen2.5-0.5B geometry, P=8 G=16, 200 tokens)
# LIMIT / SWEEP_LIMIT / TRL_LIMIT (seconds): start no new row or run after that. Device time on 2026-11-25
# (H200, before prompts shared their prefill): tests 0.5 min, headline rows 3.5 min, 4 more rows 3.5 min,
# trl 2.5 min, plus about 1 min to start the machine. `all` with the defaults fits one 10-minute call.
set -uo pipefail
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_VERBOSITY=error PYTHONUNBUFFERED=1 \
       TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/tinyrl-gpu-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  2>&1 | grep -v "^WARNING" | tail -3
export PYTHONPATH=/tmp/site:$PWD
quiet="Loading weights\|Writing model"

tests() {
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
  timeout 150 python3 -m pytest tests/test_gpu.py -p no:cacheprovider -o addopts="" -q -rs 2>&1 | tee "$OUT/pytest_gpu.txt"
}

sweep() {  # sweep LIMIT [budget.py args...]
  local limit=$1; shift
  timeout $((limit + 120)) python3 bench/budget.py --data .gpu/gsm8k --time-limit "$limit" \
    --out "$OUT/budget_gpu.json" "$@" 2>&1 | grep -v "$quiet" | tee "$OUT/budget_log.txt"
}

trl() {  # trl LIMIT
  local model=/tmp/tinyrl-budget/qwen  # the sweep's random-init Qwen2.5-0.5B geometry (made here if absent)
  [ -f $model/config.json ] || python3 bench/randmodel.py Qwen/Qwen2.5-0.5B-Instruct $model
  timeout $(($1 + 150)) python3 bench/vs_trl.py --device cuda --model $model --data .gpu/gsm8k --prompts 8 \
    --group 16 --new-tokens 200 --steps 3 --rounds 1 --time-limit "$1" --out "$OUT/vs_trl_gpu.json" 2>&1 \
    | grep -v "$quiet" | tee "$OUT/vs_trl_log.txt"
}

case "${1:-}" in
  all) tests; sweep "${SWEEP_LIMIT:-270}"; trl "${TRL_LIMIT:-100}" ;;
  tests) tests ;;
  quick) tests; sweep 1000 --rows qwen:8G,llama:8G,falcon:8G,qwen:4G ;;
  sweep) sweep "${LIMIT:-240}" --prior .gpu/budget_gpu.json ;;
  trl) trl "${LIMIT:-120}" ;;
  *) echo "usage: bash bench/gpu.sh all|tests|quick|sweep|trl" >&2; exit 2 ;;
esac
