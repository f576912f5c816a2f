"""fp16 with dynamic loss scaling on a real geometry on the GPU, the path T4/P100 users take: a 4-step
`dtype=fp16` fit of the random-init Qwen2.5-0.5B geometry (bench/randmodel.py) on the toy reward, 16-bit base and
4-bit base (when bitsandbytes is there). Checks that every loss is finite, that a non-finite gradient norm only ever
comes with a skipped step (GradScaler skips a step whose scaled gradients overflow and halves its scale: normal in
the first steps, not a failure), that some step was taken and that the LoRA weights moved; records the loss scale
and the skipped steps. Writes bench/results/fp16_gpu.json (or --out) after each run, so a time limit keeps the
first.

    python bench/fp16_gpu.py --model /tmp/tinyrl-budget/qwen        # bench/gpu.sh fp16 runs it
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
import tempfile
import time

import torch
import transformers
from safetensors.torch import load_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import hardware  # noqa: E402
from tinyrl import config as config_mod  # noqa: E402
from tinyrl import loop  # noqa: E402
from tinyrl.config import Config  # noqa: E402

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "fp16_gpu.json")
STEPS = 4


def judge(rows: list[dict], weights: dict) -> dict:
    """What a run's metrics and last adapter say about fp16 training.

    >>> judge([{"loss": 0.1, "grad_norm": float("inf"), "amp/skipped": 1.0, "amp/scale": 32768.0},
    ...        {"loss": 0.2, "grad_norm": 0.5, "amp/skipped": 0.0, "amp/scale": 32768.0}], {})["ok"]
    True
    >>> judge([{"loss": 0.1, "grad_norm": float("nan"), "amp/skipped": 0.0, "amp/scale": 65536.0}], {})["ok"]
    False
    """
    skipped = [bool(r["amp/skipped"]) for r in rows]
    checks = {"loss_finite": all(math.isfinite(r["loss"]) for r in rows),
              "nonfinite_grads_only_on_skipped_steps": all(math.isfinite(r["grad_norm"]) or s
                                                           for r, s in zip(rows, skipped)),
              "some_step_taken": not all(skipped),
              "lora_b_all_moved": all(bool(v.abs().sum() > 0) for k, v in weights.items() if "lora_B" in k)}
    return {"ok": all(checks.values()), **checks, "skipped_steps": sum(skipped)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", default=OUT)
    parser.add_argument("--quants", nargs="+", default=None, help="none and/or 4bit (default: both where "
                                                                  "bitsandbytes is installed)")
    parser.add_argument("--smoke", action="store_true", help="2 small steps: checks the script runs (CPU tests)")
    args = parser.parse_args()
    steps, size = (2, dict(prompts_per_step=2, group_size=2, max_new_tokens=8)) if args.smoke else (
        STEPS, dict(prompts_per_step=4, group_size=8, max_new_tokens=64))
    results = {"gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (CPU smoke test)",
               "torch": torch.__version__, "transformers": transformers.__version__, "commit": hardware.commit(),
               "date": time.strftime("%Y-%m-%d"),
               "config": f"toy, P={size['prompts_per_step']} G={size['group_size']}, {size['max_new_tokens']} new "
                         f"tokens, lr 1e-4, {steps} steps, dtype=fp16", "runs": {}}
    quants = args.quants or ["none"] + (["4bit"] if importlib.util.find_spec("bitsandbytes") else [])
    for quant in quants:
        out = tempfile.mkdtemp(prefix=f"tinyrl-fp16-{quant}-")
        cfg = Config(task="toy", model=args.model, out=os.path.join(out, "run"), steps=steps, lr=1e-4, dtype="fp16",
                     quant=quant, save_every=steps, **size)
        run = loop.fit(cfg)
        with open(os.path.join(run, "metrics.jsonl")) as f:
            rows = [json.loads(line) for line in f]
        weights = load_file(os.path.join(run, "checkpoints", f"step-{steps:06d}", "adapter_model.safetensors"))
        results["runs"][quant] = {
            **judge(rows, weights), "lora_dtypes": sorted({str(v.dtype) for v in weights.values()}),
            **{key: [r[key] for r in rows] for key in ("loss", "grad_norm", "amp/scale", "amp/skipped",
                                                       "reward/total", "time/step", "mem/train")}}
        print(quant, results["runs"][quant], flush=True)
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        config_mod.write_atomic(args.out, json.dumps(results, indent=2) + "\n")  # after each run


if __name__ == "__main__":
    main()
