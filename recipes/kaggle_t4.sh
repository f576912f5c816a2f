#!/usr/bin/env bash
# Free-tier T4 (16 GB, no bf16): rerun this cell after a timeout and it resumes from the last checkpoint.
set -euo pipefail
DATA=${1:+--data $1}
tinyrl fit gsm8k --vram 15G --model Qwen/Qwen2.5-0.5B-Instruct --method memory-r+ $DATA \
  --out /kaggle/working/runs/memory-r-plus --set save_every=25 --set dtype=fp16
tinyrl report /kaggle/working/runs/memory-r-plus
