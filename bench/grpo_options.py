"""What the GRPO options cost per step on this CPU (issue #24): beta 0.04 (the paper's: a reference pass with the
adapter off per micro-batch) against beta 0 (no reference pass), side by side in one process, rounds alternating.
Writes bench/results/grpo_options_cpu.json.

    OMP_NUM_THREADS=2 python bench/grpo_options.py          # ~12 min on 2 cores; nothing else running
    OMP_NUM_THREADS=2 python bench/grpo_options.py --rounds 1 --variants "iterations 2" "dynamic sampling" \
        --out bench/results/grpo_options_mu_ds_cpu.json

Each round runs every variant as a fresh fit of `--steps` steps at bench/learn.py's settings (SmolLM2-135M, arith
1 operation <= 10, P=4, G=8, 128 new tokens, LoRA r16, fp32, r1) with min_new_tokens = max_new_tokens so every
variant generates and trains on the same number of tokens; the first step of each fit is left out (warm-up). Per
variant: the median over rounds and counted steps of time/train, time/step and the training phase's peak
(mem/train), and the ratio to the paper's variant.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402

import learn  # noqa: E402
from hardware import commit, cpu_name  # noqa: E402
from tinyrl import loop  # noqa: E402
from tinyrl.config import Config  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
VARIANTS = {"paper (beta 0.04)": {"kl_beta": 0.04}, "beta 0": {"kl_beta": 0.0},
            "iterations 2": {"iterations": 2, "epsilon_high": 0.28}, "dynamic sampling": {"dynamic_sampling": True}}


def one_fit(settings: dict, steps: int, folder: str) -> list[dict]:
    cfg = Config(**{**learn.BASE, "encoder": "hashing", "steps": steps, "out": folder, "save_every": 1000,
                    "sample_every": 1000, "min_new_tokens": learn.BASE["max_new_tokens"], **settings})
    run = loop.fit(cfg, quiet=True)
    return [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))][1:]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--variants", nargs="+", default=["paper (beta 0.04)", "beta 0"], choices=list(VARIANTS))
    parser.add_argument("--out", default=os.path.join(HERE, "results", "grpo_options_cpu.json"))
    args = parser.parse_args()
    variants = {name: VARIANTS[name] for name in ["paper (beta 0.04)", *args.variants]}  # the paper's: the baseline
    started = time.perf_counter()
    rows: dict[str, list[dict]] = {name: [] for name in variants}
    with tempfile.TemporaryDirectory() as folder:
        for r in range(args.rounds):
            for name, settings in variants.items():
                rows[name] += one_fit(settings, args.steps, os.path.join(folder, f"{r}-{len(rows[name])}-{name[:4]}"))
                print(f"round {r + 1}/{args.rounds} {name}: done", flush=True)
    summary = {}
    for name, got in rows.items():
        summary[name] = {k: round(statistics.median(m[k] for m in got), 3) for k in ("time/train", "time/step",
                                                                                     "time/generate")}
        summary[name]["mem/train_bytes"] = int(statistics.median(m["mem/train"] for m in got))
        summary[name]["train_spread_s"] = [round(min(m["time/train"] for m in got), 2),
                                           round(max(m["time/train"] for m in got), 2)]
        summary[name]["steps_counted"] = len(got)
        if "sampling/draws" in got[0]:
            summary[name]["draws_per_step"] = round(statistics.mean(m["sampling/draws"] for m in got), 2)
            summary[name]["dropped_share"] = round(statistics.mean(m["sampling/dropped"] for m in got), 3)
        summary[name]["correct"] = round(statistics.mean(m["correct"] for m in got), 3)
    paper = summary["paper (beta 0.04)"]
    for name, s in summary.items():
        s["train_ratio"] = round(s["time/train"] / paper["time/train"], 3)
        s["step_ratio"] = round(s["time/step"] / paper["time/step"], 3)
    result = {"date": time.strftime("%Y-%m-%d"), "commit": commit(), "command": " ".join(["python", *sys.argv]),
              "hardware": {"cpu": cpu_name(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                           "torch": torch.__version__, "transformers": transformers.__version__,
                           "python": platform.python_version()},
              "settings": {**learn.BASE, "encoder": "hashing", "min_new_tokens": learn.BASE["max_new_tokens"]},
              "rounds": args.rounds, "steps_per_fit": args.steps, "variants": variants, "summary": summary,
              "wall_s": round(time.perf_counter() - started, 1)}
    with open(args.out, "w") as f:
        f.write(json.dumps(result, indent=1) + "\n")
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
