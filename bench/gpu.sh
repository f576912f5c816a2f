#!/usr/bin/env bash
# The GPU checks, in the form they run on a lent H100/H200 (the `device` tool, which carries .whl/ and .gpu/):
#   .whl/   wheels the GPU image lacks, pinned: usearch + numkong, bitsandbytes, trl, datasets, dill, multiprocess
#   .gpu/   a GSM8K sample (.gpu/gsm8k/{train,test}.jsonl, the first 200/50 lines of ../shared/data/gsm8k)
# (bench/gpu_prep.sh makes both, and the .gpu/stage1, stage2 and learn folders of the `learn` mode.)
# Usage: [TINYRL_COMMIT=<sha>] bash bench/gpu.sh MODE   (the device's copy of the tree has no .git: pass the commit)
# Every mode ends within CALL_LIMIT seconds (default 540, the device's 600-second call less a margin): each stage
# gets what is left (`budget`), a stage with under 30 s left is skipped and listed in $OUT/skipped.txt, and every
# bench writes its results after each of its stages, so a cut keeps what was measured. Results land in $OUT
# (default /tmp/tinyrl-gpu-out). Expected device minutes per call (start ~0.5-1 min more), one call per mode:
#   fast   (~8 min; carry [".whl", ".gpu/gsm8k"], 57 MiB) tests/test_gpu.py (~1 min); bench/profile_gpu.py on the
#          Qwen2.5-0.5B geometry (P=8 G=16, 200 tokens, bf16): eager against graph decoding (tokens/s, launches,
#          same tokens), training at micro-batches 8/32/128 (<= 4 min); then vs TRL (`trl`, <= 3.5 min)
#   fast2  (~8 min; same carry) the 8G rows of bench/budget.py at the paper's settings (s/step, peaks against the
#          plan, OOM back-offs; <= 4 min), torch.compile's decoding and compiled layers (<= 2.5 min), then `fp16`
#   fp16   (~2 min; carry [".whl"]) bench/fp16_gpu.py: 4-step dtype=fp16 fits (16-bit and 4-bit base) of the
#          Qwen2.5-0.5B geometry, the T4/P100 path: finite loss, loss scale, skipped steps
#   stage  (~0.3 min each) copies the carried .gpu/stage1 or .gpu/stage2 into /tmp/tinyrl-stage; what is already
#          there (same name and size) is skipped, so a repeated call costs nothing. Two calls, one per folder, back
#          to back, then `learn` at once: the warm machine keeps /tmp ~30 s between calls
#   learn  (~9 min; carry [".gpu/learn"], after both stage calls) joins and checks the SmolLM2-135M GGUF, converts
#          it, and runs bench/learn.py --gsm8k: base eval, r1, memory-r+ (each trained MINUTES, by default what
#          the call has left shared out), evals on 500 GSM8K test problems -> $OUT/learn_gpu.json and its plots.
#          Without the staged weights: one line saying so, exit 2
#   tests, quick, sweep, first, second, top_p, frag, trl: single parts (see each function below)
# Device time on 2026-11-26 (H200): start ~1 min, tests 1 min, 10 budget.py rows 5.3 min, top_p 0.7 min, tinyrl's
# vs-TRL run 1.8 min, TRL's 1.3 min. Later that day (H100): start 0.5 min; tests 0.7 min, 6 rows 4.4 min; vs TRL
# 3.1 min, frag 0.8 min, one more sweep row 1.1 min.
set -uo pipefail
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_VERBOSITY=error PYTHONUNBUFFERED=1 \
       TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/tinyrl-gpu-out}
mkdir -p "$OUT"
STARTED=$SECONDS
CALL_LIMIT=${CALL_LIMIT:-540}
export TINYRL_COMMIT=${TINYRL_COMMIT:-$(git describe --always --dirty 2>/dev/null || echo unknown)}

left() { echo $((CALL_LIMIT - (SECONDS - STARTED))); }

budget() {  # budget WANTED NAME: the seconds NAME may take (WANTED, or what the call has left less 15 s); 0 and
            # a line in $OUT/skipped.txt when under 30 s are left
  local b=$(( $1 < $(left) - 15 ? $1 : $(left) - 15 ))
  if [ "$b" -lt 30 ]; then echo "$2: skipped, ${b}s left of CALL_LIMIT=$CALL_LIMIT" | tee -a "$OUT/skipped.txt" >&2; b=0; fi
  echo "$b"
}

STAGE=/tmp/tinyrl-stage
if [ "${1:-}" = stage ]; then  # idempotent: a file already staged (same name and size) is not copied again
  mkdir -p $STAGE
  for f in .gpu/stage*/*; do
    t=$STAGE/$(basename "$f")
    if [ -f "$t" ] && [ "$(stat -c %s "$t")" = "$(stat -c %s "$f")" ]; then echo "already staged: $(basename "$f")"
    else cp "$f" "$t.tmp" && mv "$t.tmp" "$t" && echo "staged: $(basename "$f")"; fi
  done
  ls -la $STAGE
  exit
fi
if [ "${1:-}" = learn ]; then
  for part in part00 part01; do
    [ -f $STAGE/smollm2.gguf.$part ] || { echo "learn: the SmolLM2 weights are not staged on this machine" \
      "(no $STAGE/smollm2.gguf.$part): run 'bash bench/gpu.sh stage' carrying .gpu/stage1, then carrying" \
      ".gpu/stage2, on the same warm machine, then learn at once" >&2; exit 2; }
  done
fi
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    2>&1 | grep -v "^WARNING" | tail -3
fi
export PYTHONPATH=/tmp/site:$PWD
python3 - <<'EOF2' 2>&1 | tee "$OUT/imports.txt"  # one line: what imports and at which version, what does not
import importlib
found = []
for name in ("torch", "transformers", "peft", "bitsandbytes", "usearch", "trl", "datasets", "math_verify"):
    try:
        found.append(f"{name} {getattr(importlib.import_module(name), '__version__', '?')}")
    except Exception as err:  # noqa: BLE001 - a report, not a check: the modes that need it fail on their own
        found.append(f"{name} FAILED ({type(err).__name__}: {str(err).splitlines()[0][:80] if str(err) else ''})")
print("imports: " + ", ".join(found))
EOF2
quiet="Loading weights\|Writing model"

tests() {
  local t; t=$(budget 180 tests); [ "$t" -gt 0 ] || return 0
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
  timeout "$t" python3 -m pytest tests/test_gpu.py -p no:cacheprovider -o addopts="" -q -rs 2>&1 \
    | tee "$OUT/pytest_gpu.txt"
}

KEEP=/tmp/tinyrl-gpu-keep
mkdir -p $KEEP

sweep() {  # sweep SECONDS [budget.py args...]: no new row after SECONDS; rows take ~30-70 s
  local t; t=$(budget $(($1 + 90)) sweep); shift; [ "$t" -gt 0 ] || return 0
  timeout "$t" python3 bench/budget.py --data .gpu/gsm8k --time-limit $((t - 90 > 0 ? t - 90 : 0)) \
    --out "$OUT/budget_gpu.json" "$@" 2>&1 | grep -v "$quiet" | tee -a "$OUT/budget_log.txt"
  cp "$OUT/budget_gpu.json" $KEEP/ 2>/dev/null
}

prior() {  # --prior and the sweep this machine has kept so far, if any
  if [ -f $KEEP/budget_gpu.json ]; then echo --prior $KEEP/budget_gpu.json; fi
}

top_p() {
  local t; t=$(budget 200 top_p); [ "$t" -gt 0 ] || return 0
  timeout "$t" python3 bench/budget.py --data .gpu/gsm8k --rows qwen:8G --top-p 0.9 \
    --out "$OUT/budget_gpu_top_p.json" 2>&1 | grep -v "$quiet" | tee "$OUT/budget_top_p_log.txt"
}

QWEN=/tmp/tinyrl-budget/qwen  # the sweep's random-init Qwen2.5-0.5B geometry (made here if absent)

qwen() {
  [ -f $QWEN/config.json ] || python3 bench/randmodel.py Qwen/Qwen2.5-0.5B-Instruct $QWEN
}

fp16() {
  local t; t=$(budget 150 fp16); [ "$t" -gt 0 ] || return 0
  qwen
  timeout "$t" python3 bench/fp16_gpu.py --model $QWEN --out "$OUT/fp16_gpu.json" 2>&1 | grep -v "$quiet" \
    | tee "$OUT/fp16_log.txt"
}

trl() {  # trl SECONDS: both tools' runs (~1.5 min each on an H100); TRL's starts only if 110 s are left for it
  local t; t=$(budget "$1" trl); [ "$t" -gt 0 ] || return 0
  qwen
  timeout "$t" python3 bench/vs_trl.py --device cuda --model $QWEN --data .gpu/gsm8k --prompts 8 \
    --group 16 --new-tokens 200 --steps 3 --rounds 1 --time-limit $((t - 110 > 0 ? t - 110 : 0)) \
    --out "$OUT/vs_trl_gpu.json" 2>&1 | grep -v "$quiet" | tee "$OUT/vs_trl_log.txt"
}

frag() {
  local t; t=$(budget 200 frag); [ "$t" -gt 0 ] || return 0
  PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True timeout "$t" python3 bench/budget.py --data .gpu/gsm8k \
    --rows falcon:16G --out "$OUT/budget_gpu_expandable.json" 2>&1 | grep -v "$quiet" | tee "$OUT/budget_frag_log.txt"
}

learn() {
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    $STAGE/*.whl .gpu/learn/whl/*.whl 2>&1 | grep -v "^WARNING" | tail -3
  mkdir -p $STAGE/gguf $STAGE/gsm8k
  local gguf=$STAGE/gguf/SmolLM2-135M-Instruct.Q4_1.gguf
  if ! [ -f "$gguf" ]; then
    cat $STAGE/smollm2.gguf.part00 $STAGE/smollm2.gguf.part01 > "$gguf.tmp" && mv "$gguf.tmp" "$gguf"
  fi
  echo "$(cat .gpu/learn/smollm2.gguf.sha256)  $gguf" | sha256sum -c --quiet \
    || { rm -f "$gguf"; echo "learn: the staged GGUF does not match its checksum: stage both parts again" >&2; exit 2; }
  cp $STAGE/train.jsonl .gpu/learn/test.jsonl $STAGE/gsm8k/
  [ -f $STAGE/smollm2-135m/config.json ] || python3 -c "from tinyrl import policy
policy.convert_gguf('$STAGE/gguf', policy.SMOLLM2_GGUF, '$STAGE/smollm2-135m')"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
  local t; t=$(budget 600 learn); [ "$t" -gt 0 ] || return 0
  # base eval, then per method its training and its eval: ~60 s per eval of 500 problems is assumed (not measured)
  local minutes=${MINUTES:-$(python3 -c "print(max(0.5, round(($t - 3 * 60 - 30) / 2 / 60, 1)))")}
  echo "learn: ${t}s left, ${minutes} min of training per method"
  timeout "$t" python3 bench/learn.py --gsm8k $STAGE/gsm8k --minutes "$minutes" \
    --set model=$STAGE/smollm2-135m --set encoder=$PWD/.gpu/learn/minilm --out "$OUT/learn_gpu.json" 2>&1 \
    | grep -v "$quiet" | tee "$OUT/learn_log.txt"
}

profile() {  # issue #15: where a step's time goes, eager against graph decoding, micro-batch sizes
  local t; t=$(budget 240 profile); [ "$t" -gt 0 ] || return 0
  qwen
  timeout "$t" python3 bench/profile_gpu.py --model $QWEN --out "$OUT/profile_gpu.json" 2>&1 | grep -v "$quiet" \
    | tee "$OUT/profile_log.txt"
}

compiled() {  # torch.compile's reduce-overhead decoding and compiled decoder layers / log-prob chunk
  local t; t=$(budget "${COMPILE_LIMIT:-150}" compile); [ "$t" -gt 0 ] || return 0
  qwen
  timeout "$t" python3 bench/profile_gpu.py --model $QWEN --modes graph,compile --micro-batches 32 \
    --compile-layers --out "$OUT/profile_gpu_compile.json" 2>&1 | grep -v "$quiet" | tee "$OUT/profile_compile_log.txt"
}

first() {
  tests
  sweep "${LIMIT:-270}" --rows qwen:8G,llama:8G,falcon:8G,falcon:16G,qwen:4G,qwen:12G,llama:12G,falcon:12G,qwen:16G,llama:16G
}

second() {
  trl "${TRL_LIMIT:-330}"
  frag
  if [ -f $KEEP/budget_gpu.json ]; then sweep "${SECOND_LIMIT:-60}" $(prior); fi
}

case "${1:-}" in
  fast) tests; profile; trl "${TRL_LIMIT:-330}" ;;
  fast2) sweep "${LIMIT:-150}" --rows qwen:8G,llama:8G,falcon:8G; compiled; fp16 ;;
  first) first ;;
  second) second ;;
  tests) tests ;;
  quick) tests; sweep 1000 --rows qwen:8G,llama:8G,falcon:8G,qwen:4G ;;
  sweep) sweep "${LIMIT:-240}" $(prior) ;;
  top_p) top_p ;;
  frag) frag ;;
  trl) trl "${LIMIT:-330}" ;;
  fp16) fp16 ;;
  learn) learn ;;
  *) echo "usage: bash bench/gpu.sh fast|fast2|fp16|stage|learn|tests|quick|sweep|first|second|top_p|frag|trl" >&2
     exit 2 ;;
esac
