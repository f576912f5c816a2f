"""What `--set deterministic=true` buys and costs on the offline default model (SmolLM2-135M-Instruct) on this CPU.

    OMP_NUM_THREADS=2 python bench/deterministic_cpu.py        # ~3 min on 2 cores

The same `tinyrl fit` command (toy reward, P=2 G=4, 24 new tokens, lr 5e-4, 8 steps) runs twice without and twice
with deterministic=true, each in its own process (MKL reads MKL_CBWR when it loads, and alignment differs between
processes). Records whether the two runs of each mode logged the same metrics and samples, the first step where
they differ, and the median seconds per step (steps 2-8). Writes bench/results/deterministic_cpu.json.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from hardware import cpu_name

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "deterministic_cpu.json")
STEPS = 8
ARGS = ["fit", "toy", "--model", "smollm2-135m", "--steps", str(STEPS), "--quiet", "--set", "prompts_per_step=2",
        "--set", "group_size=4", "--set", "max_new_tokens=24", "--set", "lr=5e-4", "--set", "save_every=100",
        "--set", "sample_every=1"]
ENV = {**{k: v for k, v in os.environ.items() if k not in ("MKL_CBWR", "CUBLAS_WORKSPACE_CONFIG")},
       "OMP_NUM_THREADS": "2", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def read(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def one_run(root: str, name: str, deterministic: bool) -> dict:
    out = os.path.join(root, name)
    extra = ["--set", "deterministic=true"] if deterministic else []
    subprocess.run([sys.executable, "-m", "tinyrl.cli", *ARGS, "--out", out, *extra], check=True, env=ENV)
    metrics = read(os.path.join(out, "metrics.jsonl"))
    return {"metrics": metrics, "samples": read(os.path.join(out, "samples.jsonl")),
            "step_s": statistics.median(m["time/step"] for m in metrics[1:])}


def first_difference(a: list[dict], b: list[dict], keys=None) -> int | None:
    """The first step whose rows differ (in `keys`, or entirely), or None."""
    for x, y in zip(a, b):
        if (x if keys is None else {k: x[k] for k in keys}) != (y if keys is None else {k: y[k] for k in keys}):
            return x["step"]
    return None


def main() -> None:
    root = tempfile.mkdtemp(prefix="tinyrl-det-")
    results = {"hardware": {"cpu": cpu_name(), "cores": os.cpu_count(), "torch": torch.__version__,
                            "mkl": torch.backends.mkl.is_available()},
               "date": time.strftime("%Y-%m-%d"), "command": "OMP_NUM_THREADS=2 python bench/deterministic_cpu.py",
               "config": "tinyrl " + " ".join(ARGS), "modes": {}}
    for deterministic in (False, True):
        runs = [one_run(root, f"{deterministic}-{i}", deterministic) for i in range(2)]
        a, b = runs
        mode = {
            "step_s": [round(r["step_s"], 2) for r in runs],
            "first_step_loss_differs": first_difference(a["metrics"], b["metrics"], ["loss", "grad_norm"]),
            "first_step_samples_differ": first_difference(a["samples"], b["samples"]),
            "metrics_equal": [{k: v for k, v in m.items() if not k.startswith(("time/", "mem/"))} for m in a["metrics"]]
            == [{k: v for k, v in m.items() if not k.startswith(("time/", "mem/"))} for m in b["metrics"]],
            "samples_equal": a["samples"] == b["samples"],
            "params_changed_every_step": all(m["grad_norm"] > 0 for m in a["metrics"]),
        }
        results["modes"]["deterministic" if deterministic else "default"] = mode
        print(("deterministic" if deterministic else "default"), mode, flush=True)
    off, on = (statistics.mean(results["modes"][k]["step_s"]) for k in ("default", "deterministic"))
    results["cost"] = f"{on / off:.2f}x seconds per step ({off:.2f} -> {on:.2f})"
    print(results["cost"])
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w") as f:
        json.dump(results, f, indent=2)
        f.write("\n")


if __name__ == "__main__":
    main()
