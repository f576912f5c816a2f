"""Your own task with tinyrl: your data, your reward function, Memory-R+ on top. Copy this file and edit the three
marked parts. Offline, on the bundled SmolLM2-135M, on a CPU:

    python recipes/custom_task.py                       # 10 steps, a few minutes per step on 2 CPU cores
    python recipes/custom_task.py --steps 30 --out runs/my-task   # rerun the same command to resume

The task here: "What is 7 plus 5?"-style questions, scored by whether the last number in the completion is the
answer. The reward function follows TRL's contract, so the same function works in `trl.GRPOTrainer`: it is called
with `prompts`, `completions`, `completion_ids` and every column of the data (here `question`, `answer`, `level`),
one entry per completion, and returns one float per completion (None: no opinion on that one).
"""

from __future__ import annotations

import argparse
import random
import re


# --- 1. your data: a list of dicts (or a path to a jsonl / json / parquet / csv file, a hub dataset, a Dataset) -----
def make_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(2, 20), rng.randint(2, 20)
        rows.append({"question": f"What is {a} plus {b}? Think step by step, then give the number.",
                     "answer": str(a + b), "level": "easy" if a + b < 20 else "harder"})
    return rows


# --- 2. your reward functions: TRL's contract ------------------------------------------------------------------------
def last_number_is_right(prompts, completions, answer, **columns) -> list[float]:
    """1.0 when the last number written in the completion equals the gold answer, else 0.0."""
    scores = []
    for text, gold in zip(completions, answer):
        numbers = re.findall(r"-?\d+", text)
        scores.append(1.0 if numbers and numbers[-1] == gold else 0.0)
    return scores


def brief(prompts, completions, **columns) -> list[float | None]:
    """A small bonus for answers under 200 characters; no opinion on the others."""
    return [0.2 if len(text) < 200 else None for text in completions]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="hub name, local folder, or smollm2-135m (offline)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--out", default="runs/custom-task")
    parser.add_argument("--method", default="memory-r+", help="r1, cosine, memory-r or memory-r+")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="any tinyrl setting (`tinyrl settings`), e.g. --set max_new_tokens=64")
    args = parser.parse_args()

    import tinyrl
    from tinyrl import config

    # --- 3. your settings: any of `tinyrl settings` ------------------------------------------------------------------
    settings = dict(model=args.model, out=args.out, steps=args.steps, method=args.method,
                    success="last_number_is_right>=1",  # which completions the memory counts as successes
                    reward_weights="brief=0.5", prompts_per_step=4, group_size=8, max_new_tokens=96,
                    gen_batch=32, micro_batch=8, lr=2e-4, max_grad_norm=1.0, save_every=5, threads=0)
    given = config.apply_overrides(config.Config(), args.sets)  # type-checked, one line on a bad pair
    settings.update({pair.partition("=")[0].strip(): getattr(given, pair.partition("=")[0].strip())
                     for pair in args.sets})
    run = tinyrl.fit("custom", train=make_rows(500, seed=0), rewards=[last_number_is_right, brief], **settings)
    print(f"done: {run} (metrics.jsonl: reward/last_number_is_right, reward/brief, correct; `tinyrl report {run}`)")


if __name__ == "__main__":
    import sys

    from tinyrl.errors import UserError

    try:
        main()
    except UserError as err:  # tinyrl's own errors are one line; exit 2 as the CLI does
        print(f"custom_task: error: {err}", file=sys.stderr)
        sys.exit(2)
