"""GSM8K task rewards: plain functions `(completions, answers=None, **kw) -> list[float]`, the TRL reward contract.

The components are those of the Memory-R reference code (docs: memory-r-plus.md §4), quirks kept for
reproduction (§9 item 12):

- `soft_format` uses `re.match` without DOTALL, so it never fires on the multi-line layout the system prompt
  asks for;
- `strict_format` needs a newline after `</answer>`; without it `xml_count` also loses 0.001 x the whole
  completion length;
- `integer` uses `str.isdigit`, which accepts Unicode digits ('٣', '²', fullwidth '１８');
- `gold_answer` of a field with two '####' is the text between the first and the second marker;
- `correctness` compares strings exactly ("18.0" and "$18" are wrong); `numeric=True` (or
  `correctness_numeric`) compares after `normalize_number` instead. Say which one a result used.

`cosine_length` is the length-aware baseline (§5), `extractive_match` the evaluation metric (§7: LightEval's
extractive match, built on math-verify, reading the `<answer>` tag first; math-verify runs in verify.py's child
process), `digit_fraction` a toy reward for learning tests.
`task_rewards` returns every component of a method under its own name, for logging and summing.
"""

from __future__ import annotations

import math
import re

from tinyrl.errors import UserError
from tinyrl.rewards.verify import check

SOFT_FORMAT = r"<reasoning>.*?</reasoning>\s*<answer>.*?</answer>"  # re.match, no DOTALL (reference quirk)
STRICT_FORMAT = r"^<reasoning>\n.*?\n</reasoning>\n<answer>\n.*?\n</answer>\n$"  # re.match, no DOTALL
METHODS = ("r1", "cosine", "memory-r", "memory-r+")


def extract_answer(text: str) -> str:
    """The text inside the last `<answer>` tag (the whole text when there is none), stripped.

    >>> extract_answer("<reasoning>\\n2+2\\n</reasoning>\\n<answer>\\n4\\n</answer>\\n")
    '4'
    >>> extract_answer("no tags 7")
    'no tags 7'
    """
    return text.split("<answer>")[-1].split("</answer>")[0].strip()


def gold_answer(answer_field: str) -> str:
    """The gold answer of a GSM8K `answer` field: the text after the first '####' up to a second one, stripped.

    >>> gold_answer("3 + 4 = <<3+4=7>>7\\n#### 7")
    '7'
    >>> gold_answer("#### 1,000 #### 5")
    '1,000'
    """
    if "####" not in answer_field:
        raise ValueError("no '####' in the GSM8K answer field")
    return answer_field.split("####")[1].strip()


def normalize_number(text: str) -> str:
    """Strip '$', commas and whitespace, then trailing zeros after a decimal point (and the point itself).

    Text that is not a number after stripping is returned stripped but otherwise as is.

    >>> [normalize_number(s) for s in ["18.0", "$18", "1,000", " 2.50 ", "abc"]]
    ['18', '18', '1000', '2.5', 'abc']
    """
    text = re.sub(r"[\s$,]", "", text)
    if re.fullmatch(r"-?\d+\.\d*", text):
        text = text.rstrip("0").rstrip(".")
    return text


def _match(extracted: str, gold: str, numeric: bool) -> bool:
    if numeric:
        return normalize_number(extracted) == normalize_number(gold)
    return extracted == gold


def correct_flags(completions: list[str], answers: list[str], numeric: bool = False) -> list[bool]:
    """Whether each completion's `<answer>` equals its gold answer (exactly, or after `normalize_number`).

    >>> correct_flags(["<answer>18</answer>", "<answer>18.0</answer>"], ["18", "18"])
    [True, False]
    >>> correct_flags(["<answer>18</answer>", "<answer>18.0</answer>"], ["18", "18"], numeric=True)
    [True, True]
    """
    if answers is None or len(answers) != len(completions):
        raise ValueError("correctness needs one gold answer per completion")
    return [_match(extract_answer(c), a, numeric) for c, a in zip(completions, answers)]


def correctness(
    completions: list[str], answers: list[str] | None = None, numeric: bool = False, **kw
) -> list[float]:
    """1.0 when the extracted answer equals the gold answer as a string (reference), else 0.0.

    >>> correctness(["<answer>\\n72\\n</answer>", "<answer>$72</answer>", "72"], ["72", "72", "72"])
    [1.0, 0.0, 1.0]
    >>> correctness(["<answer>$72</answer>"], ["72"], numeric=True)
    [1.0]
    """
    return [1.0 if ok else 0.0 for ok in correct_flags(completions, answers, numeric)]


def correctness_numeric(completions: list[str], answers: list[str] | None = None, **kw) -> list[float]:
    """`correctness` after `normalize_number` on both sides (not in the reference; §9 item 5).

    >>> correctness_numeric(["<answer>1,000.00</answer>", "<answer>999</answer>"], ["1000", "1000"])
    [1.0, 0.0]
    """
    return correctness(completions, answers, numeric=True)


def integer(completions: list[str], answers: list[str] | None = None, **kw) -> list[float]:
    """0.5 when the extracted answer `.isdigit()` (Unicode digits count, as in the reference), else 0.0.

    >>> integer(["<answer>42</answer>", "<answer>-3</answer>", "<answer>٣</answer>", "<answer>4.5</answer>"])
    [0.5, 0.0, 0.5, 0.0]
    """
    return [0.5 if extract_answer(c).isdigit() else 0.0 for c in completions]


def soft_format(completions: list[str], answers: list[str] | None = None, **kw) -> list[float]:
    """0.5 when the completion starts with `<reasoning>...</reasoning> <answer>...</answer>` on one line.

    No DOTALL (reference quirk): the multi-line layout of the system prompt does not match.

    >>> one_line = "<reasoning>2+2</reasoning> <answer>4</answer>"
    >>> multi_line = "<reasoning>\\n2+2\\n</reasoning>\\n<answer>\\n4\\n</answer>\\n"
    >>> soft_format([one_line, multi_line])
    [0.5, 0.0]
    """
    return [0.5 if re.match(SOFT_FORMAT, c) else 0.0 for c in completions]


def strict_format(completions: list[str], answers: list[str] | None = None, **kw) -> list[float]:
    """0.5 when the completion is exactly the multi-line XML layout, one line per field, newline at the end.

    >>> layout = "<reasoning>\\n2+2\\n</reasoning>\\n<answer>\\n4\\n</answer>"
    >>> strict_format([layout + "\\n", layout])
    [0.5, 0.0]
    """
    return [0.5 if re.match(STRICT_FORMAT, c) else 0.0 for c in completions]


def _count_xml(text: str) -> float:
    count = 0.0
    if text.count("<reasoning>\n") == 1:
        count += 0.125
    if text.count("\n</reasoning>\n") == 1:
        count += 0.125
    if text.count("\n<answer>\n") == 1:
        count += 0.125
        count -= len(text.split("\n</answer>\n")[-1]) * 0.001
    if text.count("\n</answer>") == 1:
        count += 0.125
        count -= (len(text.split("\n</answer>")[-1]) - 1) * 0.001
    return count


def xml_count(completions: list[str], answers: list[str] | None = None, **kw) -> list[float]:
    """Up to 0.5: +0.125 per XML tag (with its newlines) seen exactly once, minus 0.001 per trailing character.

    The `<answer>` tag subtracts 0.001 x len(text after the last "\\n</answer>\\n") -- the whole text when that
    is missing -- and `</answer>` subtracts 0.001 x (len(text after "\\n</answer>") - 1), as in the reference.

    >>> xml_count(["<reasoning>\\nr\\n</reasoning>\\n<answer>\\n4\\n</answer>\\n"])
    [0.5]
    >>> [round(x, 3) for x in xml_count(["<reasoning>\\nr\\n</reasoning>\\n<answer>\\n4\\n</answer>\\nxyz"])]  # 0.5 - 0.003 - 0.003
    [0.494]
    """
    return [_count_xml(c) for c in completions]


def cosine_length(completions: list[str], correct: list[bool], max_len: int = 200, **kw) -> list[float]:
    """Length-aware reward over characters: `r = lo + 0.5 (hi - lo) (1 + cos(pi len / max_len))`.

    At len 0 the reward is `hi`, at len = max_len it is `lo`. Correct: lo = 0.5, hi = 1.0, so short correct
    answers earn most. Wrong: lo = -0.5, hi = -1.0 (the reference swaps min and max for wrong answers), so a
    short wrong answer gets -1.0 and a long one -0.5. Lengths above max_len are not clamped: the cosine wraps
    around (reference quirk with max_len = 200 characters).

    >>> [round(r, 3) for r in cosine_length(["", "x" * 100, "x" * 200], [True, True, True])]
    [1.0, 0.75, 0.5]
    >>> [round(r, 3) for r in cosine_length(["", "x" * 100, "x" * 200], [False, False, False])]
    [-1.0, -0.75, -0.5]
    """
    rewards = []
    for text, ok in zip(completions, correct, strict=True):
        lo, hi = (0.5, 1.0) if ok else (-0.5, -1.0)
        rewards.append(lo + 0.5 * (hi - lo) * (1.0 + math.cos(math.pi * len(text) / max_len)))
    return rewards


def extractive_match(completions: list[str], answers: list[str] | None = None, gold_format: str = "expr",
                     **kw) -> list[float]:
    """1.0 when math-verify finds the gold answer's value in the completion, else 0.0 (`verify.check`).

    LightEval's GSM8K extractive match (`expr_gold_metric`, the paper's Table 1: the gold read as a plain
    expression, a completion as an expression or LaTeX with `\\boxed{}` first, numbers equal to 5 decimals),
    except that the `<answer>` tag's content is read first and the whole completion only when the tag holds nothing
    math-verify extracts: on the whole text its 'answer ...' anchor reads numbers after `</answer>`. Commas, '$',
    units, '####', `\\boxed{}` and '18.0' for 18 all count. `gold_format="latex"` reads golds as the LaTeX content of
    a `\\boxed{}` instead (MATH, AIME). math-verify runs in a child process with a 5 s limit per completion that
    holds in any thread; a completion out of time scores 0.0 (`verify.timeouts()` counts them).

    >>> extractive_match(["The answer is 12. (She started with 5 apples.)", "<answer>$1,000</answer> 7"], ["12", "1000"])
    [1.0, 1.0]
    """
    if answers is None or len(answers) != len(completions):
        raise ValueError("extractive_match needs one gold answer per completion")
    return [1.0 if ok else 0.0 for ok in check(completions, answers, gold_format)]


def digit_fraction(completions: list[str], answers: list[str] | None = None, **kw) -> list[float]:
    """Toy reward: the fraction of non-space characters that are ASCII digits (0.0 when there are none).

    >>> digit_fraction(["12ab", "1 2 3", "", "٣"])
    [0.5, 1.0, 0.0, 0.0]
    """
    scores = []
    for text in completions:
        chars = [ch for ch in text if not ch.isspace()]
        scores.append(sum(ch in "0123456789" for ch in chars) / len(chars) if chars else 0.0)
    return scores


def require_method(method: str) -> None:
    """A UserError, one line, unless `method` is one of METHODS.

    >>> require_method("r1")
    """
    if method not in METHODS:
        raise UserError(f"unknown method {method!r}; valid methods: {', '.join(METHODS)}")


def task_rewards(
    completions: list[str], answers: list[str], method: str, numeric: bool = False, max_len: int = 200
) -> dict[str, list[float]]:
    """Every task-reward component of `method`, by name. Memory rewards are added elsewhere.

    `r1`, `memory-r`, `memory-r+`: xml_count, soft_format, strict_format, integer, correctness (max 3.0);
    `cosine`: those plus `cosine` (from correctness, L = max_len characters; the reference: 200).

    >>> good = "<reasoning>\\n3+4\\n</reasoning>\\n<answer>\\n7\\n</answer>\\n"
    >>> task_rewards([good], ["7"], "r1")
    {'xml_count': [0.5], 'soft_format': [0.0], 'strict_format': [0.5], 'integer': [0.5], 'correctness': [1.0]}
    """
    require_method(method)
    flags = correct_flags(completions, answers, numeric)
    components = {
        "xml_count": xml_count(completions),
        "soft_format": soft_format(completions),
        "strict_format": strict_format(completions),
        "integer": integer(completions),
        "correctness": [1.0 if ok else 0.0 for ok in flags],
    }
    if method == "cosine":
        components["cosine"] = cosine_length(completions, flags, max_len=max_len)
    return components


def score(completions: list[str], answers: list[str], kind: str, method: str, numeric: bool = False,
          max_len: int = 200) -> tuple[dict[str, list[float]], list[bool]]:
    """Every completion's rewards, each component under its own name, and which ones are correct: the toy task's
    digit share (never correct), or the task rewards of `method` (`task_rewards`).

    >>> score(["12", "ab"], ["", ""], "toy", "r1")
    ({'digits': [1.0, 0.0]}, [False, False])
    """
    if kind == "toy":
        return {"digits": digit_fraction(completions)}, [False] * len(completions)
    return (task_rewards(completions, answers, method, numeric=numeric, max_len=max_len),
            correct_flags(completions, answers, numeric=numeric))
