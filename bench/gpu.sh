#!/usr/bin/env bash
# The GPU checks, in the form they run on a lent H100/H200 (the `device` tool, which carries .whl/ and .gpu/):
#   .whl/   wheels the GPU image lacks: usearch + numkong, bitsandbytes, trl, datasets, dill, multiprocess
#   .gpu/   a GSM8K sample (.gpu/gsm8k/{train,test}.jsonl, the first 200/50 lines of ../shared/data/gsm8k)
# (bench/gpu_prep.sh makes both, and the .gpu/stage1, stage2 and learn folders of the `learn` mode.)
# Usage: bash bench/gpu.sh fast|fast2|first|second|tests|quick|sweep|top_p|frag|trl|fp16|stage|learn   Results land in
# $OUT (default /tmp/tinyrl-gpu-out); the sweep's file is also kept in /tmp/tinyrl-gpu-keep, so a second call on the
# same warm machine (issue it at once: the machine goes back after 30 s idle) can add rows to it (`second`).
#   fast:   (issue #15, ~6 min expected, not yet run; carry [".whl", ".gpu/gsm8k"], 57 MiB) tests, then bench/profile_gpu.py on the Qwen2.5-0.5B geometry
#           (P=8 G=16, 200 tokens, bf16): eager against graph decoding (tokens/s, launches, same tokens), training
#           at micro-batches 8/32/128; then torch.compile's reduce-overhead decoding and compiled decoder layers
#           (stopped after COMPILE_LIMIT, default 150 s) -> profile_gpu.json, profile_gpu_compile.json
#   fast2:  (issue #15, ~7 min expected, on the same warm machine right after `fast`) vs TRL (trl below), then the
#           8G rows of bench/budget.py at the paper's settings (s/step, peaks against the plan, OOM back-offs)
#   first:  tests, the headline rows of bench/budget.py (each geometry at 8G, Qwen at 4G) and the 12G/16G rows
#           until LIMIT (default 270 s)
#   second: trl, frag, then (if `first` ran on this machine) the rows of bench/budget.py it left, until
#           SECOND_LIMIT (default 60 s)
#   tests:  tests/test_gpu.py (a real CUDA OOM back-off, the fp16 encoder, the laid-out cache, the log-prob backward)
#   quick:  tests + the headline rows of bench/budget.py
#   sweep:  the rows of bench/budget.py not already in the kept sweep
#   top_p:  bench/budget.py --rows qwen:8G --top-p 0.9 (the sampling sort's working set on CUDA)
#   frag:   bench/budget.py --rows falcon:16G with PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True (the row whose
#           growing KV cache fragmented the allocator on 2026-11-26; the cache is laid out since, so against the
#           `first` row this shows what expandable segments add on top, not what growing cost)
#   trl:    bench/vs_trl.py --device cuda (Qwen2.5-0.5B geometry, P=8 G=16, 200 tokens), both tools
#   fp16:   bench/fp16_gpu.py: 3-step dtype=fp16 fits (16-bit and 4-bit base) of the Qwen2.5-0.5B geometry, the
#           T4/P100 path: loss and gradients finite, loss scale and skipped steps (not yet run: ~1.5 min expected)
#   stage:  copies the carried .gpu/stage1 or .gpu/stage2 into /tmp/tinyrl-stage (two calls, one per folder,
#           back to back: the warm machine keeps /tmp ~30 s); nothing else
#   learn:  (after both stage calls, carrying .gpu/learn) joins and checks the SmolLM2-135M GGUF, converts it, and
#           runs bench/learn.py --gsm8k: base eval, r1, memory-r+ (each ≤ MINUTES, default 2.5), evals on 500
#           GSM8K test problems; writes $OUT/learn_gpu.json and its plots (not yet run: ~9 min expected)
# LIMIT / SECOND_LIMIT / TRL_LIMIT (seconds): start no new row or run after that; TRL_LIMIT must exceed tinyrl's
# run (~110 s) or TRL never starts. `first` and `second` each fit one 10-minute call, not both together.
# Device time on 2026-11-26 (H200): start ~1 min, `first` 6.3 min (tests 1 min, 10 rows), top_p 0.7 min,
# tinyrl's vs-TRL run 1.8 min, TRL's 1.3 min, one more sweep row 1.1 min.
# Later that day (H100, 15 minutes in all): start 0.5 min; `LIMIT=240 ... first` 5.1 min (tests 0.7 min, 6 rows);
# `TRL_LIMIT=200 SECOND_LIMIT=30 ... second` 5.6 min (tinyrl 1.5 min, TRL 1.6 min, frag 0.8 min, one sweep row 1.1 min).
set -uo pipefail
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_VERBOSITY=error PYTHONUNBUFFERED=1 \
       TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/tinyrl-gpu-out}
mkdir -p "$OUT"
STAGE=/tmp/tinyrl-stage
if [ "${1:-}" = stage ]; then
  mkdir -p $STAGE && cp -v .gpu/stage*/* $STAGE/ && ls -la $STAGE
  exit
fi
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  2>&1 | grep -v "^WARNING" | tail -3
export PYTHONPATH=/tmp/site:$PWD
quiet="Loading weights\|Writing model"

tests() {
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
  timeout 200 python3 -m pytest tests/test_gpu.py -p no:cacheprovider -o addopts="" -q -rs 2>&1 | tee "$OUT/pytest_gpu.txt"
}

KEEP=/tmp/tinyrl-gpu-keep
mkdir -p $KEEP

sweep() {  # sweep LIMIT [budget.py args...]
  local limit=$1; shift
  timeout $((limit + 150)) python3 bench/budget.py --data .gpu/gsm8k --time-limit "$limit" \
    --out "$OUT/budget_gpu.json" "$@" 2>&1 | grep -v "$quiet" | tee -a "$OUT/budget_log.txt"
  cp "$OUT/budget_gpu.json" $KEEP/ 2>/dev/null
}

prior() {  # --prior and the sweep this machine has kept so far, if any
  if [ -f $KEEP/budget_gpu.json ]; then echo --prior $KEEP/budget_gpu.json; fi
}

top_p() {
  timeout 200 python3 bench/budget.py --data .gpu/gsm8k --rows qwen:8G --top-p 0.9 \
    --out "$OUT/budget_gpu_top_p.json" 2>&1 | grep -v "$quiet" | tee "$OUT/budget_top_p_log.txt"
}

QWEN=/tmp/tinyrl-budget/qwen  # the sweep's random-init Qwen2.5-0.5B geometry (made here if absent)

qwen() {
  [ -f $QWEN/config.json ] || python3 bench/randmodel.py Qwen/Qwen2.5-0.5B-Instruct $QWEN
}

fp16() {
  qwen
  timeout 300 python3 bench/fp16_gpu.py --model $QWEN --out "$OUT/fp16_gpu.json" 2>&1 | grep -v "$quiet" \
    | tee "$OUT/fp16_log.txt"
}

trl() {  # trl LIMIT
  local model=$QWEN
  qwen
  timeout $(($1 + 150)) python3 bench/vs_trl.py --device cuda --model $model --data .gpu/gsm8k --prompts 8 \
    --group 16 --new-tokens 200 --steps 3 --rounds 1 --time-limit "$1" --out "$OUT/vs_trl_gpu.json" 2>&1 \
    | grep -v "$quiet" | tee "$OUT/vs_trl_log.txt"
}

frag() {
  PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True timeout 200 python3 bench/budget.py --data .gpu/gsm8k \
    --rows falcon:16G --out "$OUT/budget_gpu_expandable.json" 2>&1 | grep -v "$quiet" | tee "$OUT/budget_frag_log.txt"
}

learn() {
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    $STAGE/*.whl .gpu/learn/whl/*.whl 2>&1 | grep -v "^WARNING" | tail -3
  mkdir -p $STAGE/gguf $STAGE/gsm8k
  cat $STAGE/smollm2.gguf.part00 $STAGE/smollm2.gguf.part01 > $STAGE/gguf/SmolLM2-135M-Instruct.Q4_1.gguf
  echo "$(cat .gpu/learn/smollm2.gguf.sha256)  $STAGE/gguf/SmolLM2-135M-Instruct.Q4_1.gguf" | sha256sum -c \
    || { echo "the staged GGUF is incomplete: run both stage calls first" >&2; exit 2; }
  cp $STAGE/train.jsonl .gpu/learn/test.jsonl $STAGE/gsm8k/
  [ -f $STAGE/smollm2-135m/config.json ] || python3 -c "from tinyrl import policy
policy.convert_gguf('$STAGE/gguf', policy.SMOLLM2_GGUF, '$STAGE/smollm2-135m')"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
  timeout 560 python3 bench/learn.py --gsm8k $STAGE/gsm8k --minutes "${MINUTES:-2.5}" \
    --set model=$STAGE/smollm2-135m --set encoder=$PWD/.gpu/learn/minilm --out "$OUT/learn_gpu.json" 2>&1 \
    | grep -v "$quiet" | tee "$OUT/learn_log.txt"
}

profile() {  # issue #15: where a step's time goes, eager against graph decoding, micro-batch sizes
  qwen
  timeout 240 python3 bench/profile_gpu.py --model $QWEN --out "$OUT/profile_gpu.json" 2>&1 | grep -v "$quiet" \
    | tee "$OUT/profile_log.txt"
  timeout "${COMPILE_LIMIT:-150}" python3 bench/profile_gpu.py --model $QWEN --modes graph,compile --micro-batches 32 \
    --compile-layers --out "$OUT/profile_gpu_compile.json" 2>&1 | grep -v "$quiet" | tee "$OUT/profile_compile_log.txt"
}

first() {
  tests
  sweep "${LIMIT:-270}" --rows qwen:8G,llama:8G,falcon:8G,falcon:16G,qwen:4G,qwen:12G,llama:12G,falcon:12G,qwen:16G,llama:16G
}

second() {
  trl "${TRL_LIMIT:-200}"
  frag
  if [ -f $KEEP/budget_gpu.json ]; then sweep "${SECOND_LIMIT:-60}" $(prior); fi
}

case "${1:-}" in
  fast) tests; profile ;;
  fast2) trl "${TRL_LIMIT:-200}"; sweep "${LIMIT:-150}" --rows qwen:8G,llama:8G,falcon:8G ;;
  first) first ;;
  second) second ;;
  tests) tests ;;
  quick) tests; sweep 1000 --rows qwen:8G,llama:8G,falcon:8G,qwen:4G ;;
  sweep) sweep "${LIMIT:-240}" $(prior) ;;
  top_p) top_p ;;
  frag) frag ;;
  trl) trl "${LIMIT:-120}" ;;
  fp16) fp16 ;;
  learn) learn ;;
  *) echo "usage: bash bench/gpu.sh fast|fast2|first|second|tests|quick|sweep|top_p|frag|trl|fp16|stage|learn" >&2
     exit 2 ;;
esac
