"""Evaluation: greedy completions on a task's test split, scored by exact match on <answer> and extractive match.
Wires policy, prompts, rewards and checkpoints, as loop.py does for training (`tinyrl eval`, and `eval_every`
during fit)."""

from __future__ import annotations

import json
import os

from tinyrl import budget, checkpoint, policy, prompts, rewards, tasks
from tinyrl import config as config_mod
from tinyrl import task as task_mod
from tinyrl.config import Config
from tinyrl.errors import UserError
from tinyrl.types import Example

STEP_FILE = "eval-{task}-step-{step:06d}.jsonl"  # in the run folder, with --checkpoints all
SUMMARY_FILE = "eval-{task}-checkpoints.json"


def system_prompt(task: str) -> str | None:
    return task_mod.system_prompt(task)


def evaluate(cfg: Config, adapter: str | None, limit: int | None, out_path: str | None) -> dict:
    """`tinyrl eval`: greedy completions on the test split; exact match on <answer> and extractive match."""
    examples = task_mod.held_out(cfg, None, limit)  # read (and refused) before minutes of loading
    judge = task_mod.judge(cfg) if cfg.success else None
    model, tokenizer = load(cfg, adapter)
    return run_eval(model, tokenizer, examples, cfg, out_path, progress=True, judge=judge)


def load(cfg: Config, adapter: str | None):
    """The policy to evaluate: the run's base model with a saved adapter (or none), without checkpointing."""
    model, tokenizer, _ = policy.load_policy(
        cfg.model, quant=cfg.quant, dtype=cfg.dtype, device=cfg.device, lora_rank=cfg.lora_rank,
        lora_alpha=cfg.lora_alpha, grad_checkpointing=False, seed=cfg.seed, adapter=adapter, backend=cfg.backend)
    return model, tokenizer


def evaluate_checkpoints(cfg: Config, run: str, limit: int | None) -> dict[int, dict]:
    """`tinyrl eval --checkpoints all`: every complete checkpoint of `run`, in step order, as the paper reports best
    and last. The base model loads once and each checkpoint's adapter weights are swapped in. Per-example rows go
    to RUN/eval-TASK-step-N.jsonl, the metrics by step to RUN/eval-TASK-checkpoints.json. Returns them by step."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    paths = [os.path.join(checkpoint.folder(run), f"step-{s:06d}") for s in sorted(checkpoint.steps(run))]
    paths = [p for p in paths if os.path.exists(os.path.join(p, "state.json"))]  # written last: complete
    if not paths:
        raise UserError(f"--adapter {run}: the run has no checkpoint yet")
    examples = task_mod.held_out(cfg, None, limit)
    judge = task_mod.judge(cfg) if cfg.success else None
    model, tokenizer = load(cfg, paths[0])
    results = {}
    for path in paths:
        step = int(os.path.basename(path)[5:])
        loaded = set_peft_model_state_dict(model, load_file(os.path.join(path, "adapter_model.safetensors")))
        if getattr(loaded, "unexpected_keys", None):
            raise UserError(f"checkpoint {path} does not match {paths[0]} (unexpected {loaded.unexpected_keys[:2]})")
        out_path = os.path.join(run, STEP_FILE.format(task=cfg.task, step=step))
        results[step] = run_eval(model, tokenizer, examples, cfg, out_path, progress=f"step {step}", judge=judge)
    config_mod.write_atomic(os.path.join(run, SUMMARY_FILE.format(task=cfg.task)),
                            json.dumps({str(step): m for step, m in results.items()}, indent=1) + "\n")
    return results


def best_and_last(results: dict[int, dict]) -> tuple[int, int]:
    """The steps of the best checkpoint (highest extractive match, the earlier one on a tie) and of the last.

    >>> best_and_last({2: {"extractive_match": 0.5}, 4: {"extractive_match": 0.5}, 6: {"extractive_match": 0.25}})
    (2, 6)
    """
    steps = sorted(results)
    return max(steps, key=lambda s: (results[s]["extractive_match"], -s)), steps[-1]


def report_checkpoints(results: dict[int, dict], run: str, task: str) -> str:
    """One line per checkpoint with its per-example file, the summary file, then the best and the last.

    >>> print(report_checkpoints({2: {"exact_match": 0.0, "extractive_match": 0.5, "n": 4},
    ...                           4: {"exact_match": 0.25, "extractive_match": 0.25, "n": 4}}, "run", "arith"))
    step 2: exact_match 0.0000  extractive_match 0.5000  n=4  (per-example: run/eval-arith-step-000002.jsonl)
    step 4: exact_match 0.2500  extractive_match 0.2500  n=4  (per-example: run/eval-arith-step-000004.jsonl)
    by step: run/eval-arith-checkpoints.json
    best step 2: exact_match 0.0000  extractive_match 0.5000
    last step 4: exact_match 0.2500  extractive_match 0.2500
    """
    def metrics(m: dict) -> str:
        return f"exact_match {m['exact_match']:.4f}  extractive_match {m['extractive_match']:.4f}"

    lines = [f"step {s}: {metrics(m)}  n={m['n']}  (per-example: "
             f"{os.path.join(run, STEP_FILE.format(task=task, step=s))})" for s, m in results.items()]
    lines.append(f"by step: {os.path.join(run, SUMMARY_FILE.format(task=task))}")
    best, last = best_and_last(results)
    lines += [f"best step {best}: {metrics(results[best])}", f"last step {last}: {metrics(results[last])}"]
    return "\n".join(lines)


def during_fit(model, tokenizer, examples: list[Example], cfg: Config, judge=None) -> dict:
    """`eval_every`: the held-out metrics under eval/*. One completion per prompt, as many prompts per generate
    call as a training batch prefills, so evaluation stays inside the --vram plan."""
    batch_size = budget.prefill_rows(cfg.gen_batch, cfg.group_size)
    judge = judge if cfg.success else None
    return {f"eval/{k}": v for k, v in run_eval(model, tokenizer, examples, cfg, batch_size=batch_size,
                                                judge=judge).items()}


def run_eval(model, tokenizer, examples: list[Example], cfg: Config, out_path: str | None = None,
             progress: bool | str = False, batch_size: int | None = None, judge=None) -> dict:
    """Greedy completions, `batch_size` prompts per generate call (default gen_batch), and both metrics. With
    `progress`, a line per batch ("eval [PROGRESS: ]n/N ...": a string names what is evaluated, e.g. "step 4").
    With a `judge` (a task_mod.Task whose success names a reward function), `success` too: the share for which
    `success=NAME>=X` holds, the run's own accuracy."""
    rows = []
    batch_size = batch_size or cfg.gen_batch
    gold_format = "latex" if tasks.gold_format(cfg.task, examples) == "latex" else "expr"
    for s in range(0, len(examples), batch_size):
        batch = examples[s:s + batch_size]
        rendered = prompts.render(batch, tokenizer, cfg.max_prompt_tokens, few_shot=cfg.few_shot, seed=cfg.seed,
                                  system_prompt=system_prompt(cfg.task))
        out = policy.generate(model, tokenizer, rendered, group_size=1, max_new_tokens=cfg.max_new_tokens,
                              gen_batch=batch_size, greedy=True, decode_mode=cfg.decode)
        answers = [ex.answer for ex in batch]
        exact = rewards.correctness(list(out.completions), answers)
        extractive = rewards.extractive_match(list(out.completions), answers, gold_format=gold_format)
        won = task_mod.score(judge, cfg, out, 0).correct.tolist() if judge else [None] * len(batch)
        for ex, text, e, x, ok in zip(batch, out.completions, exact, extractive, won):
            rows.append({"index": ex.index, "question": ex.question, "answer": ex.answer, "completion": text,
                         "exact_match": e, "extractive_match": x, **({"success": float(ok)} if judge else {})})
        if progress:
            head = f"{progress}: " if isinstance(progress, str) else ""
            print(f"eval {head}{len(rows)}/{len(examples)} exact {mean(r['exact_match'] for r in rows):.3f} "
                  f"extractive {mean(r['extractive_match'] for r in rows):.3f}", flush=True)
    if out_path:
        config_mod.write_atomic(out_path, "".join(json.dumps(r) + "\n" for r in rows))
    return {"exact_match": mean(r["exact_match"] for r in rows),
            "extractive_match": mean(r["extractive_match"] for r in rows), "n": len(rows),
            **({"success": mean(r["success"] for r in rows)} if judge else {})}


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else 0.0
