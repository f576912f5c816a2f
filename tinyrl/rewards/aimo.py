"""The paper's AI-MO rewards (NuminaMath-TIR; docs: memory-r-plus.md §4), with the TRL reward contract
`(completions, answers=None, **kw) -> list[float]`.

The system prompt is DeepSeek-R1's, as open-r1's and TRL's NuminaMath recipes use it (`prompts.AIMO_SYSTEM_PROMPT`): reasoning
in `<think>`, the answer in `<answer>`. Three rewards, no integer reward:

- `think_format`: 1.0 when `re.match(THINK_FORMAT, text, re.DOTALL)`: the §4 format reward, DOTALL so that
  multi-line reasoning matches;
- `reasoning_steps`: `min(1, n / 3)` for n matches of REASONING_STEPS (`re.findall`, no flags, as open-r1: `^\\d+\\.`
  therefore only matches at the very start of the text);
- `accuracy`: 1.0 when math-verify finds the gold's value in the completion (`verify.check` with LaTeX golds: the
  `<answer>` tag first, `\\boxed{}` first within it).

`aimo_rewards` returns every component of a method under its own name, as `gsm8k.task_rewards` does.
"""

from __future__ import annotations

import re

from tinyrl.rewards.gsm8k import cosine_length, require_method
from tinyrl.rewards.verify import check

THINK_FORMAT = r"^<think>.*?</think>\s*<answer>.*?</answer>$"  # re.match with re.DOTALL
REASONING_STEPS = r"(Step \d+:|^\d+\.|\n-|\n\*|First,|Second,|Next,|Finally,)"  # re.findall, no flags


def think_format(completions: list[str], answers: list[str] | None = None, **kw) -> list[float]:
    """1.0 when the completion is `<think>...</think>` then `<answer>...</answer>` and nothing after, else 0.0.

    `re.match(THINK_FORMAT, text, re.DOTALL)`: any text, newlines included, inside the tags; only whitespace
    between them; `$` also matches before one final newline.

    >>> think_format(["<think>\\n2+2\\n</think>\\n<answer>4</answer>", "<think>x</think><answer>4</answer> ok", "4"])
    [1.0, 0.0, 0.0]
    """
    return [1.0 if re.match(THINK_FORMAT, c, re.DOTALL) else 0.0 for c in completions]


def reasoning_steps(completions: list[str], answers: list[str] | None = None, **kw) -> list[float]:
    """`min(1, n / 3)` for the n step markers ("Step 1:", "1." at the start, "\\n-", "\\n*", "First," ...).

    >>> reasoning_steps(["Step 1: a. Step 2: b. Finally, c", "First, a\\n- b", "no steps", "1. a\\n2. b"])
    [1.0, 0.6666666666666666, 0.0, 0.3333333333333333]
    """
    return [min(1.0, len(re.findall(REASONING_STEPS, c)) / 3) for c in completions]


def accuracy(completions: list[str], answers: list[str] | None = None, **kw) -> list[float]:
    """1.0 when math-verify finds the gold's value in the completion, the gold being LaTeX answer content such as
    `\\frac{3}{4}` (`verify.check(..., "latex")`), else 0.0. A gold that does not parse scores 0.0.

    >>> accuracy(["<think>..</think><answer>$\\\\frac{6}{8}$</answer>", "<answer>0.7</answer>"],
    ...          ["\\\\dfrac{3}{4}"] * 2)
    [1.0, 0.0]
    """
    if answers is None or len(answers) != len(completions):
        raise ValueError("accuracy needs one gold answer per completion")
    return [1.0 if ok else 0.0 for ok in check(completions, answers, "latex")]


def aimo_rewards(completions: list[str], answers: list[str], method: str,
                 max_len: int = 200) -> dict[str, list[float]]:
    """Every AI-MO reward component of `method`, by name. Memory rewards are added elsewhere.

    Every method: think_format, reasoning_steps, accuracy (max 3.0); `cosine` adds `cosine` (from accuracy,
    L = max_len characters).

    >>> aimo_rewards(["<think>First, 1+1</think><answer>2</answer>"], ["2"], "r1")
    {'think_format': [1.0], 'reasoning_steps': [0.3333333333333333], 'accuracy': [1.0]}
    """
    require_method(method)
    correct = accuracy(completions, answers)
    components = {
        "think_format": think_format(completions),
        "reasoning_steps": reasoning_steps(completions),
        "accuracy": correct,
    }
    if method == "cosine":
        components["cosine"] = cosine_length(completions, [c == 1.0 for c in correct], max_len=max_len)
    return components
