"""Evaluation: greedy completions on a task's test split, scored by exact match on <answer> and extractive match.
Wires policy, prompts and rewards, as loop.py does for training (`tinyrl eval`, and `eval_every` during fit)."""

from __future__ import annotations

import json

from tinyrl import policy, prompts, rewards, tasks
from tinyrl import config as config_mod
from tinyrl.config import Config
from tinyrl.types import Example


def system_prompt(task: str) -> str:
    return prompts.TOY_SYSTEM_PROMPT if tasks.reward_kind(task) == "toy" else prompts.SYSTEM_PROMPT


def evaluate(cfg: Config, adapter: str | None, limit: int | None, out_path: str | None) -> dict:
    """`tinyrl eval`: greedy completions on the test split; exact match on <answer> and extractive match."""
    examples = tasks.load_task(cfg.task, cfg.data, "test", cfg.seed, limit)
    model, tokenizer, _ = policy.load_policy(
        cfg.model, quant=cfg.quant, dtype=cfg.dtype, device=cfg.device, lora_rank=cfg.lora_rank,
        lora_alpha=cfg.lora_alpha, grad_checkpointing=False, seed=cfg.seed, adapter=adapter)
    return run_eval(model, tokenizer, examples, cfg, out_path, progress=True)


def run_eval(model, tokenizer, examples: list[Example], cfg: Config, out_path: str | None = None,
             progress: bool = False, batch_size: int | None = None) -> dict:
    """Greedy completions, `batch_size` prompts per generate call (default gen_batch), and both metrics."""
    rows = []
    batch_size = batch_size or cfg.gen_batch
    for s in range(0, len(examples), batch_size):
        batch = examples[s:s + batch_size]
        rendered = prompts.render(batch, tokenizer, cfg.max_prompt_tokens, few_shot=cfg.few_shot, seed=cfg.seed,
                                  system_prompt=system_prompt(cfg.task))
        out = policy.generate(model, tokenizer, rendered, group_size=1, max_new_tokens=cfg.max_new_tokens,
                              gen_batch=batch_size, greedy=True)
        answers = [ex.answer for ex in batch]
        exact = rewards.correctness(list(out.completions), answers)
        extractive = rewards.extractive_match(list(out.completions), answers)
        for ex, text, e, x in zip(batch, out.completions, exact, extractive):
            rows.append({"index": ex.index, "question": ex.question, "answer": ex.answer, "completion": text,
                         "exact_match": e, "extractive_match": x})
        if progress:
            print(f"eval {len(rows)}/{len(examples)} exact {mean(r['exact_match'] for r in rows):.3f} "
                  f"extractive {mean(r['extractive_match'] for r in rows):.3f}", flush=True)
    if out_path:
        config_mod.write_atomic(out_path, "".join(json.dumps(r) + "\n" for r in rows))
    return {"exact_match": mean(r["exact_match"] for r in rows),
            "extractive_match": mean(r["extractive_match"] for r in rows), "n": len(rows)}


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else 0.0
