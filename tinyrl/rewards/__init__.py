"""Task rewards: plain functions `(completions, answers=None, **kw) -> list[float]`, the TRL reward contract.

The parts:
  verify.py  math-verify in a persistent child process, so that its time limit holds in any thread and over C
             code: `check` (is each completion's answer its gold's value; golds as expressions or LaTeX),
             `gold_parses`, `timeouts`
  gsm8k.py   the GSM8K components of the Memory-R reference code, quirks kept (docs: memory-r-plus.md §4, §9),
             the cosine baseline, `extractive_match` (the evaluation metric, §7), `task_rewards`, `score`
  aimo.py    the paper's AI-MO rewards: R1 system prompt, DOTALL format, reasoning steps, accuracy on LaTeX golds;
             `aimo_rewards`
gsm8k.py and aimo.py import verify.py (verify.py reads the `<answer>` tag with gsm8k's `extract_answer`, imported
where it runs). This file only re-exports them: `rewards.xml_count`, `rewards.check`, ... as before the split.
"""

from tinyrl.rewards.aimo import (
    REASONING_STEPS,
    THINK_FORMAT,
    accuracy,
    aimo_rewards,
    reasoning_steps,
    think_format,
)
from tinyrl.rewards.gsm8k import (
    METHODS,
    SOFT_FORMAT,
    STRICT_FORMAT,
    correct_flags,
    correctness,
    correctness_numeric,
    cosine_length,
    digit_fraction,
    extract_answer,
    extractive_match,
    gold_answer,
    integer,
    normalize_number,
    require_method,
    score,
    soft_format,
    strict_format,
    task_rewards,
    xml_count,
)
from tinyrl.rewards.verify import GOLD_FORMATS, check, gold_parses, timeouts

__all__ = [
    "GOLD_FORMATS", "METHODS", "REASONING_STEPS", "SOFT_FORMAT", "STRICT_FORMAT", "THINK_FORMAT",
    "accuracy", "aimo_rewards", "check", "correct_flags", "correctness", "correctness_numeric", "cosine_length",
    "digit_fraction", "extract_answer", "extractive_match", "gold_answer", "gold_parses", "integer",
    "normalize_number", "reasoning_steps", "require_method", "score", "soft_format", "strict_format", "task_rewards",
    "think_format", "timeouts", "xml_count",
]
