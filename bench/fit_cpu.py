"""tinyrl fit on the offline default model (SmolLM2-135M-Instruct) on this CPU: step time split by phase, peak
RSS, and what the demo learns. Writes bench/results/fit_cpu.json.

    OMP_NUM_THREADS=2 python bench/fit_cpu.py          # ~8 min on 2 cores

Runs: (1) the README demo (toy digit reward, P=4 G=4, 24 new tokens, 20 steps): reward first 5 vs last 5
steps; (2) GSM8K-format arith prompts at the TRL peer geometry of docs measured.md (P=2 G=4, exactly 64 new
tokens via min_new_tokens, LoRA r=16, checkpointing, fp32): median seconds per step over steps 2-4. The
side-by-side comparison with TRL is bench/vs_trl.py.
"""

from __future__ import annotations

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

from hardware import cpu_name  # noqa: E402
from tinyrl import loop  # noqa: E402
from tinyrl.config import Config  # noqa: E402

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "fit_cpu.json")


def metrics(run: str) -> list[dict]:
    with open(os.path.join(run, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def main() -> None:
    torch.set_num_threads(2)
    root = tempfile.mkdtemp(prefix="tinyrl-bench-")
    demo = Config(task="toy", model="smollm2-135m", out=os.path.join(root, "demo"), steps=20, prompts_per_step=4,
                  group_size=4, max_new_tokens=24, lr=5e-4, save_every=100)
    peer = Config(task="arith", model="smollm2-135m", out=os.path.join(root, "peer"), steps=4, prompts_per_step=2,
                  group_size=4, max_new_tokens=64, min_new_tokens=64, save_every=100, gen_batch=8, micro_batch=8)
    results = {"hardware": {"cpu": cpu_name(), "cores": os.cpu_count(), "torch": torch.__version__,
                            "transformers": transformers.__version__, "python": platform.python_version(),
                            "load_avg_1m": os.getloadavg()[0]},
               "date": time.strftime("%Y-%m-%d"), "command": "OMP_NUM_THREADS=2 python bench/fit_cpu.py"}
    started = time.perf_counter()
    rows = metrics(loop.fit(demo, quiet=True))
    first = statistics.mean(r["reward/total"] for r in rows[:5])
    last = statistics.mean(r["reward/total"] for r in rows[-5:])
    results["demo"] = {"config": "toy, P=4 G=4, 24 new tokens, lr 5e-4, 20 steps", "reward_first5": round(first, 3),
                       "reward_last5": round(last, 3), "wall_s": round(time.perf_counter() - started, 1),
                       "median_step_s": round(statistics.median(r["time/step"] for r in rows), 2)}
    print(f"demo: reward {first:.3f} -> {last:.3f} in {results['demo']['wall_s']} s", flush=True)
    rows = metrics(loop.fit(peer, quiet=True))[1:]
    results["peer_geometry"] = {
        "config": "arith (GSM8K format), P=2 G=4, 64 new tokens forced, LoRA r=16, checkpointing, fp32",
        **{f"median_{k}_s": round(statistics.median(r[f"time/{k}"] for r in rows), 2)
           for k in ("step", "generate", "score", "train")},
        "peak_rss_gib": round(max(max(r["mem/generate"], r["mem/train"]) for r in rows) / 2**30, 2),
    }
    print(json.dumps(results["peer_geometry"]), flush=True)
    gsm8k = os.path.join(os.path.dirname(OUT), "..", "..", "..", "shared", "data", "gsm8k")
    if os.path.exists(os.path.join(gsm8k, "train.jsonl")):  # Memory-R+ share of a step, real MiniLM encoder
        memory_run = Config(task="gsm8k", data=gsm8k, model="smollm2-135m", method="memory-r+", steps=4,
                            prompts_per_step=2, group_size=4, max_new_tokens=64, min_new_tokens=64,
                            out=os.path.join(root, "memory"), save_every=100, gen_batch=8, micro_batch=8)
        rows = metrics(loop.fit(memory_run, quiet=True))[1:]
        results["memory_share"] = {
            "config": "gsm8k train, memory-r+, MiniLM fp32 on CPU, P=2 G=4, 64 new tokens, SmolLM2-135M",
            "median_memory_s": round(statistics.median(r["time/memory"] for r in rows), 3),
            "median_encode_ms": round(statistics.median(r["time/memory_encode_ms"] for r in rows), 1),
            "median_step_s": round(statistics.median(r["time/step"] for r in rows), 2),
            "median_share": round(statistics.median(r["time/memory_share"] for r in rows), 4)}
        print(json.dumps(results["memory_share"]), flush=True)
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    tmp = OUT + ".tmp"
    with open(tmp, "w") as f:
        json.dump(results, f, indent=2)
    os.replace(tmp, OUT)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    sys.exit(main())
