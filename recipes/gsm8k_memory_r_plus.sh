#!/usr/bin/env bash
# Memory-R+ on GSM8K, paper settings (memory-r-plus.md §6), QLoRA/LoRA sized for an 8 GB card.
# Pass a local GSM8K folder as $1 when the hub is unreachable.
set -euo pipefail
DATA=${1:+--data $1}
tinyrl plan gsm8k --vram 8G --model Qwen/Qwen2.5-0.5B-Instruct --method memory-r+ $DATA
tinyrl fit gsm8k --vram 8G --model Qwen/Qwen2.5-0.5B-Instruct --method memory-r+ $DATA \
  --out runs/gsm8k-qwen05-memory-r-plus --set save_every=100 --set eval_every=100 --set eval_limit=200
tinyrl eval gsm8k --adapter runs/gsm8k-qwen05-memory-r-plus $DATA
