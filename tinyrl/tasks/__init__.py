"""Tasks: turn a task name (and optional data) into a list of `Example`s. A task names its data, its prompt and its
reward set (`Spec`); `--data` replaces the data of any task but the generated ones (tinyrl.tasks.rows reads it).

- `gsm8k`: GSM8K from the Hugging Face hub (`openai/gsm8k`, config `main`) or `--data`; gold after '####'.
- `arith`: offline synthetic multi-step arithmetic word problems, GSM8K-sized (7473 train, 1319 test); the gold
  answer is the integer result (positive). Difficulty: `ops`, the operations per problem (default 2-4), and
  `largest`, the largest number written in a problem (default 90, the generator's full ranges; a smaller one caps
  every number drawn at it, and each range's low end at max(2, largest // 9), so numbers stay varied).
- `toy`: "write some digits" prompts with an empty gold answer, for the `digit_fraction` toy reward.
- `ai-mo`: the paper's second task, NuminaMath-TIR (`AI-MO/NuminaMath-TIR`: `problem`, `solution` ending in
  `\\boxed{...}`), R1's <think>/<answer> prompt and rewards.
- `math-500`, `aime24`: evaluation sets (`HuggingFaceH4/MATH-500` test, `HuggingFaceH4/aime_2024` train as test),
  LaTeX golds, the XML prompt the paper evaluated with.
- `custom`: your `--data` and your `--reward` functions; no built-in reward.

Generated tasks are a pure function of (split, seed): train uses seed 2*seed, test 2*seed+1, and arith test
problems that also occur in train are dropped (more are drawn until the split is full). Pass the same data seed,
and the same arith difficulty, to compare evaluations across runs.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import random
import re
from typing import Any

from tinyrl.config import arith_difficulty
from tinyrl.errors import UserError
from tinyrl.tasks.rows import read, to_examples
from tinyrl.tasks.generated import arith_stream, synthetic_arithmetic, toy_digits, toy_stream  # noqa: F401
from tinyrl.types import Example


@dataclasses.dataclass(frozen=True)
class Spec:
    """What a task name stands for."""

    about: str
    rewards: str  # the built-in reward set: gsm8k (XML format + correctness), ai-mo, toy, or none (custom)
    gold_format: str  # how golds are read by math-verify: expr (plain numbers), latex, auto (by the golds), none
    hub: str | None = None  # the dataset without --data
    hub_config: str | None = None
    splits: tuple[tuple[str, str], ...] = (("train", "train"), ("test", "test"))  # tinyrl split -> hub split
    generated: bool = False
    trainable: bool = True


TASKS = {
    "gsm8k": Spec("GSM8K grade-school math (hub openai/gsm8k or --data); XML format + correctness rewards", "gsm8k",
                  "expr", hub="openai/gsm8k", hub_config="main"),
    "arith": Spec("offline synthetic multi-step arithmetic word problems in GSM8K format; same rewards as gsm8k",
                  "gsm8k", "expr", generated=True),
    "toy": Spec("offline 'write some digits' prompts; reward = fraction of digits in the completion", "toy", "none",
                generated=True),
    "ai-mo": Spec("NuminaMath-TIR (hub AI-MO/NuminaMath-TIR or --data); R1 <think>/<answer> prompt, math-verify "
                  "accuracy, format and reasoning-steps rewards", "ai-mo", "latex", hub="AI-MO/NuminaMath-TIR"),
    "math-500": Spec("MATH-500 (hub HuggingFaceH4/MATH-500 or --data), for eval: LaTeX answers, math-verify", "gsm8k",
                     "latex", hub="HuggingFaceH4/MATH-500", splits=(("test", "test"),), trainable=False),
    "aime24": Spec("AIME 2024 (hub HuggingFaceH4/aime_2024 or --data), for eval: 30 problems, math-verify", "gsm8k",
                   "latex", hub="HuggingFaceH4/aime_2024", splits=(("test", "train"),), trainable=False),
    "custom": Spec("your --data (prompt, or question [+ gold answer] columns) and your --reward functions", "none",
                   "auto"),
}
_SIZES = {"arith": {"train": 7473, "test": 1319}, "toy": {"train": 1000, "test": 100}}
_MAX_DRAWS = 20  # a test split draws at most this many problems per one it keeps (the rest repeat train's)


def spec(task: str) -> Spec:
    if task not in TASKS:
        raise UserError(f"unknown task {task!r}; valid tasks: {', '.join(TASKS)}")
    return TASKS[task]


def reward_kind(task: str) -> str:
    """Which built-in reward set scores a task: gsm8k (XML format + correctness), ai-mo, toy, or none.

    >>> reward_kind("arith"), reward_kind("ai-mo"), reward_kind("custom")
    ('gsm8k', 'ai-mo', 'none')
    """
    return spec(task).rewards


NUMBER = re.compile(r"-?[\d,]*\.?\d+")


def gold_format(task: str, examples: list[Example]) -> str:
    """How math-verify reads the golds of `examples`: the task's, or for `custom` expr when every gold is a plain
    number and latex otherwise (none without golds).

    >>> gold_format("custom", [Example("q", "1,000", 0)]), gold_format("custom", [Example("q", "\\frac12", 0)])
    ('expr', 'latex')
    """
    kind = spec(task).gold_format
    if kind != "auto":
        return kind
    golds = [ex.answer for ex in examples]
    if not any(golds):
        return "none"
    return "expr" if all(NUMBER.fullmatch(g) for g in golds) else "latex"


def load_gsm8k(path: Any, split: str = "train") -> list[Example]:
    """GSM8K examples from the hub (path None) or any --data; UserError on bad input."""
    return load_task("gsm8k", path, split, seed=0, limit=None)


def for_run(cfg, split: str, limit: int | None, data: Any = None) -> list[Example]:
    """`load_task` with a run's settings (a Config); `data` (Python rows or a Dataset) replaces cfg.data. The train
    split keeps `train_limit` examples drawn under the seed when that is set."""
    given, named = cfg.data if data is None else data, split
    if given is not None and not spec(cfg.task).generated:  # your data's own split names
        named = {"train": cfg.train_split, "test": cfg.test_split}.get(split, split)
    examples = load_task(cfg.task, given, named, cfg.seed, None, cfg.arith_ops,
                         cfg.arith_max, data_config=cfg.data_config, question_column=cfg.question_column,
                         answer_column=cfg.answer_column)
    if split == "train" and cfg.train_limit and cfg.train_limit < len(examples):
        picked = sorted(random.Random(cfg.seed).sample(range(len(examples)), cfg.train_limit))
        examples = [examples[i] for i in picked]
    return examples[:limit] if limit is not None else examples


def load_task(name: str, data: Any, split: str, seed: int, limit: int | None, arith_ops: str = "2-4",
              arith_max: int = 90, data_config: str | None = None, question_column: str = "auto",
              answer_column: str = "auto") -> list[Example]:
    """The examples of task `name` for `split` ("train"/"test"), first `limit` of them when given.

    `data` (a path, hub name, or Python rows) replaces the task's hub dataset; `seed` picks the generated data of
    arith and toy; `arith_ops` ("N" or "A-B" operations) and `arith_max` (the largest number written) set arith's
    difficulty. A generated test split is the first problems under its own seed that are not in the train split.

    >>> [ex.index for ex in load_task("toy", None, "train", seed=0, limit=3)]
    [0, 1, 2]
    """
    task = spec(name)
    if limit is not None and limit < 1:
        raise UserError(f"limit must be at least 1, got {limit}")
    if task.generated:
        if data is not None:
            raise UserError(f"--data does not apply to {name!r}, whose problems are generated; use `custom`, "
                            "`gsm8k` or `ai-mo` with your data")
        examples = generated(name, split, seed, arith_ops, arith_max)
    else:
        splits = dict(task.splits)
        if data is None and split not in splits:
            raise UserError(f"{name} has no {split} split (it is an evaluation set); train on gsm8k, ai-mo, or "
                            "your --data")
        if data is None and task.hub is None:
            raise UserError(f"the {name} task needs --data (a jsonl, json, parquet or csv file, a folder, or a hub "
                            "dataset name)")
        source = data if data is not None else task.hub
        config = data_config if data is not None else task.hub_config
        rows, where = read(source, splits.get(split, split) if data is None else split, config)
        examples = to_examples(rows, where, question_column, answer_column, needs_gold=task.rewards != "none")
    return examples[:limit] if limit is not None else examples


def generated(name: str, split: str, seed: int, arith_ops: str, arith_max: int) -> list[Example]:
    """A split of a generated task (see the module's text)."""
    if split not in _SIZES[name]:
        raise UserError(f"unknown split {split!r} for task {name!r}; valid splits: train, test")
    if name == "arith":
        ops = arith_difficulty(arith_ops, arith_max)
        stream = functools.partial(arith_stream, ops=ops, largest=arith_max)
    else:
        stream = toy_stream
    size = _SIZES[name][split]
    if split == "train":
        return list(itertools.islice(stream(2 * seed), size))
    train = itertools.islice(stream(2 * seed), _SIZES[name]["train"]) if name == "arith" else []
    seen = {ex.question for ex in train}
    drawn = itertools.islice(stream(2 * seed + 1), _MAX_DRAWS * size)  # a bound for tiny problem spaces
    fresh = list(itertools.islice((ex for ex in drawn if ex.question not in seen), size))
    if len(fresh) < size:
        raise UserError(f"arith_ops={arith_ops} arith_max={arith_max}: too few distinct problems for a test "
                        f"split disjoint from train; raise arith_max or arith_ops")
    return [Example(question=ex.question, answer=ex.answer, index=i) for i, ex in enumerate(fresh)]


def examples_for_step(data: list[Example], step: int, per_step: int, seed: int) -> list[Example]:
    """The P examples of a step: a fresh seeded shuffle each epoch, so the data position is just the step (without
    dynamic sampling, which draws more)."""
    return examples_at(data, step * per_step, per_step, seed)


def examples_at(data: list[Example], start: int, count: int, seed: int) -> list[Example]:
    """`count` examples from data position `start` (prompts drawn so far): a fresh seeded shuffle each epoch."""
    orders: dict[int, list[int]] = {}  # epoch -> its permutation
    out = []
    for i in range(start, start + count):
        epoch, pos = divmod(i, len(data))
        if epoch not in orders:
            orders[epoch] = list(range(len(data)))
            random.Random(seed * 1_000_003 + epoch).shuffle(orders[epoch])
        out.append(data[orders[epoch][pos]])
    return out
