"""The task a run trains on, as one record the loop receives: its examples, its prompt, its reward functions and
its success signal; and the scoring of a step's completions with it. Wires tasks (the data), prompts and rewards.

Reward functions follow TRL's contract, in both directions: `f(prompts, completions, completion_ids, **columns)`
with one entry per completion (a prompt repeated for each of its G completions), every dataset column but
`prompt` as a keyword argument; it returns one float per completion, or None for "no opinion" on one. A
completion is a string, or `[{"role": "assistant", "content": text}]` when its prompt is a conversation. The total
reward is the weighted sum of every function's value, None counting as 0 (TRL's nansum); each function's mean is
logged under its name. The built-in reward set of the task (tasks.reward_kind) comes first, yours after it.

Success (the memory's success/failure split, and eval's accuracy): `success=NAME>=X` on a function's value, else the
task's accuracy, math-verify against the gold answer. Examples whose gold math-verify cannot parse are skipped at
load, counted (`data/skipped_gold`) and never scored as correct.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import math
import os
import sys
from collections.abc import Callable
from typing import Any

import torch

from tinyrl import prompts, rewards, tasks
from tinyrl import config as config_mod
from tinyrl.config import Config
from tinyrl.errors import UserError
from tinyrl.types import Example, Rollouts, Scored

BUILTIN = {"gsm8k": ("xml_count", "soft_format", "strict_format", "integer", "correctness", "cosine"),
           "ai-mo": ("think_format", "reasoning_steps", "accuracy", "cosine"), "toy": ("digits",), "none": ()}
ACCURACY = {"gsm8k": ("correctness", ">=", 1.0), "ai-mo": ("accuracy", ">=", 1.0)}  # their built-in success


@dataclasses.dataclass(frozen=True)
class Reward:
    """One of your reward functions: TRL logs it, and tinyrl too, under its `__name__`."""

    name: str
    fn: Callable
    where: str  # how it was named: "file.py:f", "package.module:f", or "python"


@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    train: list[Example]
    system_prompt: str | None
    builtin: str  # the built-in reward set (BUILTIN's keys)
    custom: tuple[Reward, ...]
    weights: dict[str, float]
    success: tuple[str, str, float] | None  # (reward, ">=" / ">", threshold); None: the gold answer matched
    gold_format: str  # expr, latex or none (how math-verify reads the golds)
    skipped: int  # training examples dropped at load: math-verify could not parse their gold


def system_prompt(task: str) -> str | None:
    """The system prompt of a task's template (custom: none; the user turn is the question alone)."""
    kind = tasks.reward_kind(task)
    return {"toy": prompts.TOY_SYSTEM_PROMPT, "ai-mo": prompts.AIMO_SYSTEM_PROMPT, "none": None}.get(
        kind, prompts.SYSTEM_PROMPT)


def build(cfg: Config, data: Any = None, reward_funcs: tuple = (), split: str = "train", limit: int | None = None,
          warn: Callable[[str], None] | None = None) -> Task:
    """The task of a run: its `split` examples (Python `data` instead of cfg.data), your reward functions
    (cfg.reward_funcs, then the callables in `reward_funcs`), weights and success, all checked before any weight
    loads; UserError with one line otherwise."""
    if split == "train" and not tasks.spec(cfg.task).trainable:
        raise UserError(f"{cfg.task} is an evaluation set: `tinyrl eval {cfg.task}`; train on gsm8k, ai-mo, arith, "
                        "or your data (custom)")
    examples = tasks.for_run(cfg, split, limit, data=data)
    fmt = tasks.gold_format(cfg.task, examples)
    examples, skipped = parseable(examples, fmt)
    if skipped and warn:
        warn(f"skipped {skipped} of {skipped + len(examples)} {split} examples whose gold answer math-verify cannot "
             "parse (never scored as correct; data/skipped_gold in metrics.jsonl)")
    return dataclasses.replace(judge(cfg, reward_funcs, fmt, training=split == "train"), train=examples,
                               skipped=skipped)


def judge(cfg: Config, reward_funcs: tuple = (), gold_format: str = "none", training: bool = False) -> Task:
    """The scoring half of a task, without its data: the reward functions, weights and success, checked."""
    custom = tuple(load_reward(spec) for spec in filter(None, (s.strip() for s in cfg.reward_funcs.split(","))))
    custom += tuple(Reward(getattr(fn, "__name__", f"reward_{i}"), fn, "python") for i, fn in enumerate(reward_funcs))
    kind = tasks.reward_kind(cfg.task)
    names = [*BUILTIN[kind], *(r.name for r in custom)]
    clash = sorted({n for n in names if names.count(n) > 1} | {r.name for r in custom if r.name in
                                                                ("exploit", "explore", "total")})
    if clash:
        raise UserError(f"two reward functions are named {clash[0]!r}; rename yours (tinyrl logs each by name)")
    weights = config_mod.parse_weights(cfg.reward_weights)
    for name in weights:
        if name not in names:
            raise UserError(f"reward_weights: no reward function named {name!r}; this run's are {', '.join(names)}")
    success = config_mod.parse_success(cfg.success) or ACCURACY.get(kind)
    if success and success[0] not in names:
        raise UserError(f"success={cfg.success}: no reward function named {success[0]!r}; this run's are "
                        f"{', '.join(names) or 'none (add one with --reward FILE.py:FUNCTION)'}")
    if kind == "none" and not custom and training:
        raise UserError("the custom task needs reward functions: --reward path/to/file.py:function (repeatable)")
    if cfg.method.startswith("memory") and success is None and gold_format == "none" and kind == "none" and training:
        raise UserError(f"{cfg.method} needs to know which completions succeeded, and this data has no gold answer: "
                        "--set success=NAME>=X on one of your reward functions")
    return Task(cfg.task, [], system_prompt(cfg.task), kind, custom, weights, success, gold_format, 0)


def held_out(cfg: Config, data: Any, limit: int | None) -> list[Example]:
    """The first `limit` test examples whose gold math-verify can parse (`data`: Python rows instead of cfg.data)."""
    examples = tasks.for_run(cfg, "test", None, data=data)
    fmt = tasks.gold_format(cfg.task, examples)
    if fmt == "none" and tasks.reward_kind(cfg.task) != "toy":
        raise UserError(f"{cfg.task} test data has no gold answer column to evaluate against (answer or solution; "
                        "--set answer_column=NAME)")
    return parseable(examples, fmt)[0][:limit]


def parseable(examples: list[Example], fmt: str) -> tuple[list[Example], int]:
    """The examples whose gold math-verify can parse, and how many were not (generated tasks: all are)."""
    if fmt == "none" or not examples or not examples[0].columns:
        return examples, 0  # generated tasks (no columns): their golds are integers
    ok = rewards.gold_parses([ex.answer for ex in examples], fmt)
    kept = [ex for ex, good in zip(examples, ok) if good]
    if not kept:
        raise UserError(f"no example left: math-verify cannot parse any gold answer (first: {examples[0].answer!r}); "
                        "check --set answer_column")
    return kept, len(examples) - len(kept)


def load_reward(spec: str) -> Reward:
    """`path/to/file.py:function` or `package.module:function` -> the function; UserError naming what is wrong."""
    module_name, _, name = spec.rpartition(":")
    if not module_name or not name:
        raise UserError(f"--reward {spec}: expected path/to/file.py:function or package.module:function")
    if module_name.endswith(".py"):
        if not os.path.isfile(module_name):
            raise UserError(f"--reward {spec}: no such file {module_name}")
        here = os.path.dirname(os.path.abspath(module_name))
        if here not in sys.path:  # the file may import its neighbours, as when run as a script
            sys.path.insert(0, here)
        found = importlib.util.spec_from_file_location(f"tinyrl_reward_{abs(hash(module_name))}", module_name)
        module = importlib.util.module_from_spec(found)
        sys.modules[found.name] = module  # pickling, dataclasses and relative lookups need it registered
        run = lambda: found.loader.exec_module(module)  # noqa: E731
    else:
        run = lambda: importlib.import_module(module_name)  # noqa: E731
    try:
        module = run() or module
    except ModuleNotFoundError as e:
        raise UserError(f"--reward {spec}: cannot import {module_name} ({e})") from None
    except Exception as e:  # noqa: BLE001 - the user's module failed: one line naming it
        raise UserError(f"--reward {spec}: importing {module_name} raised {type(e).__name__}: {e}") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        defined = sorted(k for k, v in vars(module).items() if callable(v) and not k.startswith("_")
                         and getattr(v, "__module__", None) == module.__name__)
        raise UserError(f"--reward {spec}: {module_name} has no function {name!r}"
                        + (f" (it defines {', '.join(defined)})" if defined else ""))
    return Reward(getattr(fn, "__name__", name), fn, spec)


def score(task: Task, cfg: Config, rollouts: Rollouts, step: int) -> Scored:
    """Every completion's rewards, built-in then yours, each under its name; the weights; and who succeeded."""
    g = rollouts.group_size
    rows = [ex for ex in rollouts.prompts.examples for _ in range(g)]  # [P*G]
    texts, golds = list(rollouts.completions), [ex.answer for ex in rows]
    if task.builtin == "ai-mo":
        components = rewards.aimo_rewards(texts, golds, cfg.method, max_len=cfg.cosine_max_len)
        correct = [a >= 1 for a in components["accuracy"]]
    elif task.builtin in ("gsm8k", "toy"):
        components, correct = rewards.score(texts, golds, task.builtin, cfg.method, numeric=cfg.numeric_match,
                                            max_len=cfg.cosine_max_len)
    else:
        components = {}
        correct = rewards.check(texts, golds, task.gold_format) if task.gold_format != "none" else [False] * len(texts)
    if task.custom:
        kwargs = contract_arguments(rows, rollouts)
        for reward in task.custom:
            components[reward.name] = call(reward, kwargs, step)
    if task.success and task.success[0] in components:
        name, op, x = task.success
        correct = [v >= x if op == ">=" else v > x for v in components[name]]  # NaN (no opinion): not a success
    return Scored(components={k: torch.tensor(v, dtype=torch.float32) for k, v in components.items()},  # [P*G]
                  correct=torch.tensor(correct, dtype=torch.bool), weights=task.weights)


def contract_arguments(rows: list[Example], rollouts: Rollouts) -> dict[str, list]:
    """TRL's keyword arguments for P*G completions: prompts, completions, completion_ids and every column."""
    conversational = [isinstance(ex.prompt, tuple) for ex in rows]
    lengths = rollouts.completion_mask.sum(-1).long().tolist()  # [P*G] tokens up to and including the EOS
    kwargs = {"prompts": [list(ex.prompt) if conv else (ex.prompt or ex.question)
                          for ex, conv in zip(rows, conversational)],
              "completions": [[{"role": "assistant", "content": text}] if conv else text
                              for text, conv in zip(rollouts.completions, conversational)],
              "completion_ids": [ids[:n] for ids, n in zip(rollouts.completion_ids.tolist(), lengths)]}
    columns = dict.fromkeys(k for ex in rows for k in ex.columns)
    for column in columns:
        if column not in kwargs:
            kwargs[column] = [ex.columns.get(column) for ex in rows]
    return kwargs


def call(reward: Reward, kwargs: dict[str, list], step: int) -> list[float]:
    """One reward function on a step's completions, its answer checked: a float (or None) per completion."""
    n = len(kwargs["completions"])
    where = f"reward function {reward.name} ({reward.where}) at step {step + 1}"
    try:
        values = reward.fn(**kwargs)
    except Exception as e:  # noqa: BLE001 - the user's function: name it, the step and the first failing row
        row = first_failing_row(reward, kwargs)
        text = kwargs["completions"][row] if row is not None else None
        on = f" on row {row} (completion {str(text)[:60]!r})" if row is not None else ""
        raise UserError(f"{where} raised {type(e).__name__}: {e}{on}; fix it and rerun the same command to resume "
                        "from the last checkpoint") from None
    if not isinstance(values, (list, tuple)) or len(values) != n:
        got = f"{len(values)} values" if hasattr(values, "__len__") else type(values).__name__
        raise UserError(f"{where} returned {got} for {n} completions; return one float (or None) per completion")
    out = []
    for i, v in enumerate(values):
        if v is None:
            out.append(math.nan)
            continue
        if isinstance(v, str) or not hasattr(v, "__float__"):
            raise UserError(f"{where} returned {v!r} (a {type(v).__name__}) for row {i}; return floats or None")
        if not math.isfinite(float(v)):
            raise UserError(f"{where} returned {float(v)} for row {i}; return finite floats (None: no opinion)")
        out.append(float(v))
    return out


def first_failing_row(reward: Reward, kwargs: dict[str, list]) -> int | None:
    """The first row on which the function raises when called on that row alone (None if none does)."""
    for i in range(len(kwargs["completions"])):
        try:
            reward.fn(**{k: v[i:i + 1] for k, v in kwargs.items()})
        except Exception:  # noqa: BLE001
            return i
    return None
