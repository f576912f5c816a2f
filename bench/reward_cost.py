"""What scoring costs on this CPU (issue #23: reward scoring, math-verify included, under 5 % of a CPU step on the
offline model). Writes bench/results/reward_cost_cpu.json.

    OMP_NUM_THREADS=2 python bench/reward_cost.py          # ~6 min on 2 cores; nothing else running

Per task, a short fit of SmolLM2-135M-Instruct (P=4, G=8, 96 new tokens, fp32 LoRA): the median over steps 2..N of
time/score (every reward function, math-verify in its child process included) and its share of time/step. Tasks:
`arith` (GSM8K's rewards, exact-string correctness), `ai-mo` (think format, reasoning steps, math-verify accuracy
on LaTeX golds; the NuminaMath-style rows of tests/fixtures/numina.jsonl, repeated), and `custom` with a reward
function in TRL's contract plus a math-verify success check against the gold. Also: the cost at fit start of checking
that every gold parses (GSM8K's 7,473 train answers, when ../shared/data/gsm8k is here), and of math-verify per
completion on a batch of 128.
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

from hardware import commit, cpu_name  # noqa: E402
from tinyrl import loop, rewards, tasks  # noqa: E402
from tinyrl.config import Config, for_task  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURE = os.path.join(HERE, "..", "tests", "fixtures", "numina.jsonl")
GSM8K = os.path.join(HERE, "..", "..", "shared", "data", "gsm8k")
GEOMETRY = dict(model="smollm2-135m", prompts_per_step=4, group_size=8, max_new_tokens=96, gen_batch=32,
                micro_batch=8, lr=1e-4, save_every=100, sample_every=100)


def words_reward(prompts, completions, **columns):
    """A user's reward in TRL's contract: a bonus for answers of 10 to 60 words."""
    return [1.0 if 10 <= len(c.split()) <= 60 else 0.0 for c in completions]


def fit_shares(task: str, steps: int, folder: str) -> dict:
    data, rewards_fns, extra = None, (), {}
    if task == "ai-mo":
        rows = [json.loads(line) for line in open(FIXTURE)]
        data, extra = rows * 8, {"train_limit": 0}
    if task == "custom":
        rows = [json.loads(line) for line in open(FIXTURE)]
        data, rewards_fns = [{"question": r["problem"], "answer": r["solution"]} for r in rows] * 8, (words_reward,)
    cfg = Config(**{**vars(for_task(task)), **GEOMETRY, "task": task, "steps": steps,
                    "out": os.path.join(folder, task), "method": "r1", **extra,
                    **({"arith_ops": "1", "arith_max": 10} if task == "arith" else {}),
                    **({"max_prompt_tokens": 256} if task != "arith" else {})})
    run = loop.fit(cfg, quiet=True, data=data, reward_funcs=rewards_fns)
    metrics = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))][1:]  # step 1: the child starts
    score = statistics.median(m["time/score"] for m in metrics)
    step = statistics.median(m["time/step"] for m in metrics)
    return {"steps_timed": len(metrics), "score_s": round(score, 4), "step_s": round(step, 2),
            "share_of_step": round(score / step, 5), "rewards": sorted(k for k in metrics[0] if k.startswith("reward/")),
            "completions_per_step": cfg.prompts_per_step * cfg.group_size}


def gold_check_cost() -> dict | None:
    if not os.path.isdir(GSM8K):
        return None
    golds = [ex.answer for ex in tasks.load_gsm8k(GSM8K, "train")]
    rewards.gold_parses(golds[:1], "expr")  # the child is up
    began = time.perf_counter()
    ok = rewards.gold_parses(golds, "expr")
    seconds = time.perf_counter() - began
    return {"golds": len(golds), "parsed": sum(ok), "seconds": round(seconds, 2),
            "ms_each": round(1000 * seconds / len(golds), 3)}


def check_cost() -> dict:
    rows = [json.loads(line) for line in open(FIXTURE)][:7]
    golds = [tasks.rows.gold_of(r["solution"]) for r in rows] * 18  # 126
    texts = [f"<think>\nStep 1: work it out.\n</think>\n<answer>\n\\boxed{{{g}}}\n</answer>" for g in golds]
    rewards.check(texts[:1], golds[:1], "latex")
    began = time.perf_counter()
    right = rewards.check(texts, golds, "latex")
    seconds = time.perf_counter() - began
    return {"completions": len(texts), "right": sum(right), "seconds": round(seconds, 3),
            "ms_each": round(1000 * seconds / len(texts), 3)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--tasks", nargs="+", default=["arith", "ai-mo", "custom"])
    parser.add_argument("--out", default=os.path.join(HERE, "results", "reward_cost_cpu.json"))
    args = parser.parse_args()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        shares = {task: fit_shares(task, args.steps, folder) for task in args.tasks}
    result = {"date": time.strftime("%Y-%m-%d"), "commit": commit(), "command": " ".join(["python", *sys.argv]),
              "hardware": {"cpu": cpu_name(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                           "torch": torch.__version__, "transformers": transformers.__version__,
                           "python": platform.python_version()},
              "geometry": GEOMETRY, "fit": shares, "gold_check_at_load": gold_check_cost(),
              "math_verify_check": check_cost(), "target": "time/score under 5 % of time/step",
              "met": all(s["share_of_step"] < 0.05 for s in shares.values()),
              "wall_s": round(time.perf_counter() - started, 1)}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("fit", "gold_check_at_load", "math_verify_check", "met")}, indent=1))


if __name__ == "__main__":
    main()
