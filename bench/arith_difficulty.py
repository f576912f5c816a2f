"""How hard should `arith` be for the offline model? Greedy base accuracy of SmolLM2-135M-Instruct (no adapter) on
held-out arith problems at several difficulties (`arith_ops`, `arith_max`), zero-shot and one-shot, with the XML
system prompt: exact match on <answer> and extractive match (math-verify), as `tinyrl eval` scores them.
Writes bench/results/arith_difficulty.json.

    OMP_NUM_THREADS=2 python bench/arith_difficulty.py        # the sweep: 10 settings x 60 problems, ~16 min on 2 cores
    OMP_NUM_THREADS=2 python bench/arith_difficulty.py --only 1:10,1:20 --few-shot 1 --skip 60 --limit 150 --key confirm
        # the two best one-shot settings again on 150 further problems (~9 min), kept beside the sweep

The aim (the "it learns, visibly" issue): a setting where the base model solves 10-40 % before training, so GRPO
has both right and wrong completions in a group to learn from. Each run is kept under its --key; `pooled` adds up
every run's problems per setting, and `recommended` is the pooled setting whose extractive match lies in that band
(its exact match too, if any does), one-shot first (zero-shot the base model never uses the XML tags, so exact
match, the training reward, is 0), and among those the most problems solved by the two metrics together.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402

from hardware import cpu_name  # noqa: E402
from tinyrl import evaluate, policy, tasks  # noqa: E402
from tinyrl.config import Config, validate  # noqa: E402

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "arith_difficulty.json")
SETTINGS = [("1", 10), ("1", 20), ("1", 50), ("2", 10), ("2", 20)]  # (arith_ops, arith_max)
BAND = (0.10, 0.40)


def one(model, tokenizer, cfg: Config, skip: int, limit: int, rows_dir: str | None) -> dict:
    examples = tasks.for_run(cfg, "test", skip + limit)[skip:]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        name = f"ops{cfg.arith_ops}-max{cfg.arith_max}-shot{cfg.few_shot}.jsonl"
        path = os.path.join(rows_dir or tmp, name)
        metrics = evaluate.run_eval(model, tokenizer, examples, cfg, path)
        with open(path) as f:
            rows = [json.loads(line) for line in f]
    tagged = sum("<answer>" in r["completion"] and "</answer>" in r["completion"] for r in rows) / len(rows)
    right = next((r for r in rows if r["extractive_match"]), rows[0])
    return {"arith_ops": cfg.arith_ops, "arith_max": cfg.arith_max, "few_shot": cfg.few_shot,
            "exact_match": round(metrics["exact_match"], 4), "extractive_match": round(metrics["extractive_match"], 4),
            "answer_tags": round(tagged, 4), "n": metrics["n"], "seconds": round(time.perf_counter() - started, 1),
            "sample": {k: right[k] for k in ("question", "answer", "completion", "exact_match", "extractive_match")}}


KEY = ("arith_ops", "arith_max", "few_shot")


def pooled(runs: list[dict]) -> list[dict]:
    """Every setting's metrics over all the runs' problems (weighted by n)."""
    sums: dict[tuple, dict] = {}
    for run in runs:
        for r in run["rows"]:
            s = sums.setdefault(tuple(r[k] for k in KEY), {"n": 0, "exact": 0.0, "extractive": 0.0})
            s["n"] += r["n"]
            s["exact"] += r["exact_match"] * r["n"]
            s["extractive"] += r["extractive_match"] * r["n"]
    return [{**dict(zip(KEY, key)), "exact_match": round(s["exact"] / s["n"], 4),
             "extractive_match": round(s["extractive"] / s["n"], 4), "n": s["n"]} for key, s in sums.items()]


def recommend(rows: list[dict]) -> dict | None:
    inside = [r for r in rows if BAND[0] <= r["extractive_match"] <= BAND[1]]
    both = [r for r in inside if BAND[0] <= r["exact_match"] <= BAND[1]]
    pool = both or inside
    if not pool:
        return None
    return max(pool, key=lambda r: (r["few_shot"], r["exact_match"] + r["extractive_match"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=60, help="held-out problems per setting")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--only", default=None, help="OPS:MAX[,OPS:MAX...] instead of the default settings")
    parser.add_argument("--few-shot", default="0,1", help="few_shot values to run, comma-separated")
    parser.add_argument("--skip", type=int, default=0, help="start after this many held-out problems")
    parser.add_argument("--key", default="sweep", help="the run's name in the results file (other runs are kept)")
    parser.add_argument("--out", default=OUT)
    parser.add_argument("--rows", default=None, help="a folder for the per-problem completions (one jsonl a setting)")
    args = parser.parse_args()
    if args.rows:
        os.makedirs(args.rows, exist_ok=True)
    settings = SETTINGS if not args.only else [(s.split(":")[0], int(s.split(":")[1])) for s in args.only.split(",")]
    shots = [int(s) for s in args.few_shot.split(",")]
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    base = Config(task="arith", model="smollm2-135m", max_new_tokens=args.max_new_tokens, gen_batch=20)
    started = time.perf_counter()
    model, tokenizer, _ = policy.load_policy(
        base.model, quant=base.quant, dtype=base.dtype, device=base.device, lora_rank=base.lora_rank,
        lora_alpha=base.lora_alpha, grad_checkpointing=False, seed=base.seed, adapter=None)
    rows = []
    for ops, largest in settings:
        for shot in shots:
            cfg = validate(dataclasses.replace(base, arith_ops=ops, arith_max=largest, few_shot=shot))
            rows.append(one(model, tokenizer, cfg, args.skip, args.limit, args.rows))
            r = rows[-1]
            print(f"arith_ops={ops} arith_max={largest} few_shot={shot}: exact {r['exact_match']:.3f} extractive "
                  f"{r['extractive_match']:.3f} tags {r['answer_tags']:.2f} n={r['n']} {r['seconds']} s", flush=True)
    run = {
        "hardware": {"cpu": cpu_name(), "cores": os.cpu_count(), "threads": torch.get_num_threads(),
                     "torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version()},
        "date": time.strftime("%Y-%m-%d"), "command": " ".join(["OMP_NUM_THREADS=2 python bench/arith_difficulty.py",
                                                                *sys.argv[1:]]),
        "model": "smollm2-135m (SmolLM2-135M-Instruct, fp32, no adapter)",
        "eval": f"greedy, {args.max_new_tokens} new tokens, XML system prompt, gen_batch {base.gen_batch}, "
                f"seed {base.seed}, held-out (test split) problems {args.skip}..{args.skip + args.limit - 1}",
        "rows": rows, "wall_s": round(time.perf_counter() - started, 1),
    }
    results = {}
    if os.path.exists(args.out):
        with open(args.out) as f:
            results = json.load(f)
    results.pop("pooled", None), results.pop("recommended", None), results.pop("band", None)
    results[args.key] = run
    runs = {k: v for k, v in results.items() if isinstance(v, dict) and "rows" in v}
    results["pooled"] = pooled(list(runs.values()))
    results["band"] = list(BAND)
    results["recommended"] = recommend(results["pooled"])
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
        f.write("\n")
    print(f"recommended (pooled over {', '.join(runs)}): "
          f"{results['recommended']}\nwrote {args.out} ({args.key})")


if __name__ == "__main__":
    main()
