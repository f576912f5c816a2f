"""How much of tinyrl's CPU peak RSS is glibc keeping freed memory, and what giving it back costs in time.

Runs 5 steps of `tinyrl fit` at the vs-TRL geometry (SmolLM2-135M, GSM8K, P=2 G=4, exactly 64 new tokens,
micro-batch 8, checkpointing, fp32) once per glibc setting, each in its own process, and records the median
s/step and the largest per-phase peak RSS (`mem/train`, `mem/generate`). Writes bench/results/cpu_allocator.json.

    OMP_NUM_THREADS=2 python bench/cpu_allocator.py     # ~7 min on 2 cores; needs ../shared/data/gsm8k
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from hardware import cpu_name

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
OUT = os.path.join(HERE, "results", "cpu_allocator.json")
DATA = os.path.join(ROOT, "..", "shared", "data", "gsm8k")
SETTINGS = {  # name -> environment for the child (glibc reads these at start-up)
    "glibc defaults": {},
    "MALLOC_MMAP_THRESHOLD_=4194304 (allocations >= 4 MiB mmap'd)": {"MALLOC_MMAP_THRESHOLD_": "4194304"},
    "MALLOC_MMAP_THRESHOLD_=1048576 (allocations >= 1 MiB mmap'd)": {"MALLOC_MMAP_THRESHOLD_": "1048576"},
    "MALLOC_MMAP_THRESHOLD_=65536 (allocations >= 64 KiB mmap'd)": {"MALLOC_MMAP_THRESHOLD_": "65536"},
}


def child(out: str) -> None:
    from tinyrl import loop
    from tinyrl.config import Config

    cfg = Config(task="gsm8k", data=DATA, model="smollm2-135m", out=out, steps=5, prompts_per_step=2, group_size=4,
                 micro_batch=8, gen_batch=8, logprob_chunk=4, max_new_tokens=64, min_new_tokens=64, dtype="fp32",
                 device="cpu", quant="none", threads=2, save_every=100, sample_every=100)
    loop.fit(cfg, quiet=True)


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        child(sys.argv[2])
        return
    if not os.path.exists(os.path.join(DATA, "train.jsonl")):
        sys.exit(f"needs GSM8K at {DATA}")
    rows = []
    for name, extra in SETTINGS.items():
        with tempfile.TemporaryDirectory() as tmp:
            run = os.path.join(tmp, "run")
            env = {**os.environ, **extra, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2", "PYTHONPATH": ROOT}
            subprocess.run([sys.executable, __file__, "--child", run], env=env, check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            steps = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
        row = {"setting": name, "env": extra,
               "median_step_s": round(statistics.median(s["time/step"] for s in steps[1:]), 2),
               "peak_rss_gib": round(max(max(s["mem/train"], s["mem/generate"]) for s in steps) / 2**30, 2)}
        rows.append(row)
        print(f"{name:<62} {row['median_step_s']:6.1f} s/step   peak RSS {row['peak_rss_gib']:.2f} GiB", flush=True)
    import torch

    result = {"what": "tinyrl fit, 5 steps per setting (median s/step of steps 2-5; largest per-phase peak RSS)",
              "config": "SmolLM2-135M, GSM8K, P=2 G=4, 64 new tokens forced, micro-batch 8, checkpointing, fp32",
              "hardware": {"cpu": cpu_name(), "threads": 2, "torch": torch.__version__},
              "date": time.strftime("%Y-%m-%d"), "rows": rows}
    with open(OUT + ".tmp", "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    os.replace(OUT + ".tmp", OUT)
    print(f"wrote {os.path.relpath(OUT, ROOT)}")


if __name__ == "__main__":
    main()
