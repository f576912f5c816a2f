"""Does tinyrl's resident memory on CPU level off over a run, or creep up step after step? Runs the README demo's
config (SmolLM2-135M, toy task, P=4 G=4, 24 new tokens) for --steps steps and records each step's peak RSS per
phase (`mem/generate`, `mem/train`: VmHWM, reset at each phase's start after glibc's freed heap is handed back).
Writes bench/results/rss_steps.json.

    OMP_NUM_THREADS=2 python bench/rss_steps.py              # 60 steps, ~9 min on 2 cores
    OMP_NUM_THREADS=2 python bench/rss_steps.py --steps 150   # ~23 min
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402

from hardware import cpu_name  # noqa: E402
from tinyrl import loop  # noqa: E402
from tinyrl.config import Config  # noqa: E402

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "rss_steps.json")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60)
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    root = tempfile.mkdtemp(prefix="tinyrl-rss-")
    cfg = Config(task="toy", model="smollm2-135m", out=os.path.join(root, "run"), steps=args.steps,
                 prompts_per_step=4, group_size=4, max_new_tokens=24, lr=5e-4, save_every=10**6)
    run = loop.fit(cfg, quiet=True)
    with open(os.path.join(run, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    mib = {phase: [round(r[f"mem/{phase}"] / 2**20, 1) for r in rows] for phase in ("generate", "train")}
    half = len(rows) // 2

    def drift(values: list[float]) -> float:  # MiB per 100 steps over the second half (least squares)
        ys = values[half:]
        xs = range(len(ys))
        mx, my = statistics.mean(xs), statistics.mean(ys)
        return round(100 * sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs), 1)

    result = {"hardware": {"cpu": cpu_name(), "cores": os.cpu_count(), "torch": torch.__version__,
                           "python": platform.python_version()},
              "date": time.strftime("%Y-%m-%d"), "command": f"OMP_NUM_THREADS=2 python bench/rss_steps.py --steps "
                                                            f"{args.steps}",
              "config": "toy, SmolLM2-135M fp32, P=4 G=4, 24 new tokens, LoRA r16, checkpointing",
              "steps": len(rows), "peak_rss_mib": mib,
              "drift_mib_per_100_steps_second_half": {phase: drift(v) for phase, v in mib.items()},
              "max_mib": {phase: max(v) for phase, v in mib.items()}}
    for phase, values in mib.items():
        print(f"{phase}: step 1 {values[0]} MiB, step {half} {values[half - 1]}, last {values[-1]}, max "
              f"{max(values)}; second half drifts {result['drift_mib_per_100_steps_second_half'][phase]:+} MiB "
              "per 100 steps")
    tmp = OUT + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    os.replace(tmp, OUT)
    print(f"wrote {os.path.relpath(OUT)}")


if __name__ == "__main__":
    main()
