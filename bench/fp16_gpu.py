"""fp16 with dynamic loss scaling on a real geometry on the GPU, the path T4/P100 users take: a 3-step
`dtype=fp16` fit of the random-init Qwen2.5-0.5B geometry (bench/randmodel.py) on the toy reward, 16-bit base and
4-bit base (when bitsandbytes is there). Checks every loss and gradient norm is finite and that the LoRA weights
moved, and records the loss scale and skipped steps. Writes bench/results/fp16_gpu.json (or --out).

    python bench/fp16_gpu.py --model /tmp/tinyrl-budget/qwen        # bench/gpu.sh fp16 runs it
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import tempfile
import time

import torch
import transformers
from safetensors.torch import load_file

from tinyrl import loop
from tinyrl.config import Config

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "fp16_gpu.json")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", default=OUT)
    args = parser.parse_args()
    results = {"gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (CPU smoke test)",
               "torch": torch.__version__,
               "transformers": transformers.__version__, "date": time.strftime("%Y-%m-%d"),
               "config": "toy, P=4 G=8, 64 new tokens, lr 1e-4, 3 steps, dtype=fp16", "runs": {}}
    quants = ["none"] + (["4bit"] if importlib.util.find_spec("bitsandbytes") else [])
    for quant in quants:
        out = tempfile.mkdtemp(prefix=f"tinyrl-fp16-{quant}-")
        cfg = Config(task="toy", model=args.model, out=os.path.join(out, "run"), steps=3, prompts_per_step=4,
                     group_size=8, max_new_tokens=64, lr=1e-4, dtype="fp16", quant=quant, save_every=3)
        run = loop.fit(cfg)
        with open(os.path.join(run, "metrics.jsonl")) as f:
            rows = [json.loads(line) for line in f]
        finite = all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in rows)
        weights = load_file(os.path.join(run, "checkpoints", "step-000003", "adapter_model.safetensors"))
        moved = all(v.abs().sum() > 0 for k, v in weights.items() if "lora_B" in k)  # B starts at 0
        results["runs"][quant] = {
            "finite": finite, "lora_b_all_moved": bool(moved),
            "lora_dtypes": sorted({str(v.dtype) for v in weights.values()}), "loss": [r["loss"] for r in rows], "grad_norm": [r["grad_norm"] for r in rows],
            "amp/scale": [r["amp/scale"] for r in rows], "amp/skipped": [r["amp/skipped"] for r in rows],
            "reward/total": [r["reward/total"] for r in rows], "time/step": [r["time/step"] for r in rows],
            "mem/train": [r["mem/train"] for r in rows]}
        print(quant, results["runs"][quant], flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
        f.write("\n")


if __name__ == "__main__":
    main()
