"""Tasks: turn a task name (and an optional local file) into a list of `Example`s.

- `gsm8k`: GSM8K from the Hugging Face hub (`openai/gsm8k`, config `main`), or a local `.jsonl` / `.parquet` file
  (or a folder holding `{split}.jsonl` / `{split}.parquet`) with GSM8K's `question` and `answer` fields.
  `Example.answer` is the gold answer: the text after the first '####' up to a second one, stripped (the same
  rule as `rewards.gold_answer`, repeated here because stage modules do not import each other).
- `arith`: offline synthetic multi-step arithmetic word problems, GSM8K-sized (7473 train, 1319 test); the gold
  answer is the integer result (positive). Difficulty: `ops`, the operations per problem (default 2-4), and
  `largest`, the largest number written in a problem (default 90, the generator's full ranges; a smaller one caps
  every number drawn at it, and each range's low end at max(2, largest // 9), so numbers stay varied).
- `toy`: "write some digits" prompts with an empty gold answer, for the `digit_fraction` toy reward.

Generated tasks are a pure function of (split, seed): train uses seed 2*seed, test 2*seed+1, and arith test
problems that also occur in train are dropped (more are drawn until the split is full). Pass the same data seed,
and the same arith difficulty, to compare evaluations across runs.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import random
from pathlib import Path

from tinyrl import hub
from tinyrl.config import arith_difficulty
from tinyrl.errors import UserError
from tinyrl.types import Example

TASKS = {
    "gsm8k": "GSM8K grade-school math (hub openai/gsm8k or --data PATH); XML format + correctness rewards",
    "arith": "offline synthetic multi-step arithmetic word problems in GSM8K format; same rewards as gsm8k",
    "toy": "offline 'write some digits' prompts; reward = fraction of digits in the completion",
}
_REWARD_KIND = {"gsm8k": "gsm8k", "arith": "gsm8k", "toy": "toy"}
_SIZES = {"arith": {"train": 7473, "test": 1319}, "toy": {"train": 1000, "test": 100}}
_MAX_DRAWS = 20  # a test split draws at most this many problems per one it keeps (the rest repeat train's)


def _gold(answer_field: str) -> str:
    return answer_field.split("####")[1].strip()


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    try:
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
                rows.append(_check_row(row, f"{path}:{lineno}"))
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    return rows


def _read_parquet(path: Path) -> list[dict]:
    import pyarrow.parquet

    try:
        table = pyarrow.parquet.read_table(path)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the user's to fix
        raise UserError(f"{path}: not a readable parquet file ({type(e).__name__})") from None
    return [_check_row(row, f"{path}: row {i}") for i, row in enumerate(table.to_pylist())]


def _check_row(row: object, where: str) -> dict:
    if not isinstance(row, dict):
        raise UserError(f"{where}: expected an object with 'question' and 'answer' fields")
    for field in ("question", "answer"):
        if field not in row:
            raise UserError(f"{where}: missing field '{field}'")
        if not isinstance(row[field], str):
            raise UserError(f"{where}: field '{field}' is not a string")
    if "####" not in row["answer"]:
        raise UserError(f"{where}: 'answer' has no '####' (GSM8K answers end with '#### <number>')")
    return row


def _local_file(path: Path, split: str) -> Path:
    if path.is_dir():
        for name in (f"{split}.jsonl", f"{split}.parquet"):
            if (path / name).is_file():
                return path / name
        raise UserError(f"{path}: folder has no {split}.jsonl or {split}.parquet")
    if not path.is_file():
        raise UserError(f"{path}: no such file or folder")
    if path.suffix not in (".jsonl", ".parquet"):
        raise UserError(f"{path}: expected a .jsonl or .parquet file with 'question' and 'answer' fields")
    return path


def load_gsm8k(path: str | None, split: str = "train") -> list[Example]:
    """GSM8K examples from the hub (path None) or a local jsonl/parquet file or folder; UserError on bad input."""
    if path is None:
        offline = hub.offline()
        try:
            import datasets

            with hub.switched_off(datasets) if offline else contextlib.nullcontext():  # offline: the cache only
                rows = list(datasets.load_dataset("openai/gsm8k", "main", split=split))
        except Exception as e:  # noqa: BLE001 - offline, missing package, bad split: all end the same way
            reason = " ".join(f"{type(e).__name__}: {e}".split())[:160]
            where = ("the Hugging Face hub is unreachable and openai/gsm8k is not in the local datasets cache"
                     if offline else f"could not load openai/gsm8k from the Hugging Face hub ({reason})")
            raise UserError(f"{where}; pass a local file with --data PATH (jsonl or parquet with 'question' and "
                            "'answer' fields)") from None
        rows = [_check_row(row, f"openai/gsm8k {split} row {i}") for i, row in enumerate(rows)]
        source = f"openai/gsm8k {split}"
    else:
        file = _local_file(Path(path), split)
        rows = _read_jsonl(file) if file.suffix == ".jsonl" else _read_parquet(file)
        source = str(file)
    if not rows:
        raise UserError(f"{source}: no examples")
    return [Example(question=row["question"], answer=_gold(row["answer"]), index=i) for i, row in enumerate(rows)]


_NAMES = [  # name, subject, object, possessive
    ("Ava", "She", "her", "her"), ("Ben", "He", "him", "his"), ("Mia", "She", "her", "her"),
    ("Leo", "He", "him", "his"), ("Zoe", "She", "her", "her"), ("Omar", "He", "him", "his"),
    ("Lena", "She", "her", "her"), ("Ravi", "He", "him", "his"), ("Nora", "She", "her", "her"),
    ("Sam", "He", "him", "his"), ("Ines", "She", "her", "her"), ("Kenji", "He", "him", "his"),
]
_ITEMS = ["apples", "oranges", "marbles", "stickers", "cookies", "pencils", "seashells", "cards", "eggs", "beads"]
_CONTAINERS = [("bags", "bag"), ("boxes", "box"), ("packs", "pack"), ("baskets", "basket")]
_JOBS = ["mowing a lawn", "walking dogs", "selling lemonade", "washing cars", "tutoring"]
_THINGS = ["a book", "lunch", "a movie ticket", "a toy", "a plant"]
_GOODS = ["notebooks", "pens", "snacks", "stamps", "postcards"]
_HANDMADE = ["drawings", "cupcakes", "bracelets", "birdhouses", "old comics"]


def _number(rng: random.Random, low: int, high: int, largest: int) -> int:
    """A number from [low, high] capped at `largest` (>= 10): high becomes at most largest, and low at most
    max(2, largest // 9). With largest = 90 (or more) every range stays as written, the same draws as before."""
    return rng.randint(min(low, max(2, largest // 9)), min(high, largest))


def _items_problem(rng: random.Random, ops: int, largest: int = 90) -> tuple[str, int]:
    name, he, him, his = rng.choice(_NAMES)
    items = rng.choice(_ITEMS)
    plural, single = rng.choice(_CONTAINERS)
    if rng.random() < 0.5:
        total = _number(rng, 5, 60, largest)
        lines = [rng.choice([f"{name} has {total} {items}.", f"{name} starts with {total} {items}."])]
    else:
        k, m = _number(rng, 2, 6, largest), _number(rng, 2, 12, largest)
        total, ops = k * m, ops - 1
        lines = [f"{name} buys {k} {plural} with {m} {items} in each {single}."]
    while ops > 0:
        steps = ["add"]
        if total >= 2:
            steps.append("sub")
        if total % 2 == 0:
            steps.append("half")
        if total <= 100:
            steps.append("times")
        if ops >= 2:
            steps.append("add_groups")
        step = rng.choice(steps)
        if step == "add":
            n = _number(rng, 2, 30, largest)
            total += n
            lines.append(rng.choice([f"{he} finds {n} more {items}.", f"A friend gives {him} {n} more {items}."]))
        elif step == "sub":
            n = _number(rng, 1, min(total - 1, 30), largest)
            total -= n
            lines.append(rng.choice([
                f"{he} gives {n} {items} to a neighbour.", f"{he} loses {n} {items}.", f"{he} uses {n} {items}.",
            ]))
        elif step == "half":
            total //= 2
            lines.append(f"{he} gives away half of {his} {items}.")
        elif step == "times":
            factor = rng.choice([2, 3])
            total *= factor
            lines.append(f"{he} ends up with {['twice', 'three times'][factor - 2]} as many {items} as before.")
        else:
            k, m = _number(rng, 2, 5, largest), _number(rng, 2, 10, largest)
            total += k * m
            lines.append(f"Then {he.lower()} buys {k} {plural} with {m} {items} in each {single}.")
        ops -= 2 if step == "add_groups" else 1
    lines.append(f"How many {items} does {name} have now?")
    return " ".join(lines), total


def _money_problem(rng: random.Random, ops: int, largest: int = 90) -> tuple[str, int]:
    name, he, _, his = rng.choice(_NAMES)
    if rng.random() < 0.5:
        total = _number(rng, 10, 90, largest)
        lines = [f"{name} has ${total}."]
    else:
        rate, hours = _number(rng, 5, 20, largest), _number(rng, 2, 8, largest)
        total, ops = rate * hours, ops - 1
        lines = [f"{name} earns ${rate} an hour and works {hours} hours."]
    while ops > 0:
        steps = ["earn"]
        if total >= 2:
            steps.append("spend")
        if total % 2 == 0:
            steps.append("half")
        if ops >= 2:
            steps.append("sell")
            if total >= 5:
                steps.append("buy")
        step = rng.choice(steps)
        if step == "earn":
            n = _number(rng, 3, 40, largest)
            total += n
            lines.append(rng.choice([f"{he} earns ${n} {rng.choice(_JOBS)}.", f"{he} gets ${n} as a present."]))
        elif step == "spend":
            n = _number(rng, 1, min(total - 1, 40), largest)
            total -= n
            lines.append(f"{he} spends ${n} on {rng.choice(_THINGS)}.")
        elif step == "half":
            total //= 2
            lines.append(f"{he} puts half of {his} money in a savings account.")
        elif step == "sell":
            k, m = _number(rng, 2, 6, largest), _number(rng, 2, 9, largest)
            total += k * m
            lines.append(f"{he} sells {k} {rng.choice(_HANDMADE)} for ${m} each.")
        else:
            m = _number(rng, 1, min(9, (total - 1) // 2), largest)
            k = _number(rng, 2, max(2, min(6, (total - 1) // m)), largest)
            total -= k * m
            lines.append(f"{he} buys {k} {rng.choice(_GOODS)} for ${m} each.")
        ops -= 2 if step in ("sell", "buy") else 1
    lines.append(rng.choice([
        f"How many dollars does {name} have left?", f"How much money, in dollars, does {name} have now?",
    ]))
    return " ".join(lines), total


def _arith_stream(seed: int, ops: tuple[int, int], largest: int):
    """Endless arithmetic problems under `seed`: any n of them are the first n of synthetic_arithmetic."""
    rng = random.Random(seed)
    for i in itertools.count():
        make = rng.choice([_items_problem, _money_problem])
        question, total = make(rng, rng.randint(*ops), largest)
        yield Example(question=question, answer=str(total), index=i)


def synthetic_arithmetic(n: int, seed: int, ops: tuple[int, int] = (2, 4), largest: int = 90) -> list[Example]:
    """n arithmetic word problems of ops[0]..ops[1] operations on positive integers up to `largest` (10-90);
    same arguments, same list.

    >>> first = synthetic_arithmetic(3, seed=0)
    >>> first == synthetic_arithmetic(3, seed=0) and all(ex.answer.isdigit() for ex in first)
    True
    >>> [(ex.question, ex.answer) for ex in synthetic_arithmetic(1, seed=0, ops=(1, 1), largest=10)]
    [('Ava has $10. She spends $7 on a movie ticket. How much money, in dollars, does Ava have now?', '3')]
    """
    return list(itertools.islice(_arith_stream(seed, ops, largest), n))


_TOY_PROMPTS = [
    "Write some digits.", "Write a long number.", "Reply with digits only.", "Type a few numbers.",
    "Give me a random number.", "Write down a phone number.", "List some numbers.",
    "Write as many digits as you can.",
]


def _toy_stream(seed: int):
    rng = random.Random(seed)
    for i in itertools.count():
        yield Example(question=rng.choice(_TOY_PROMPTS), answer="", index=i)


def toy_digits(n: int, seed: int) -> list[Example]:
    """n 'write some digits' prompts with an empty gold answer; same seed, same list.

    >>> [ex.answer for ex in toy_digits(2, seed=0)]
    ['', '']
    """
    return list(itertools.islice(_toy_stream(seed), n))


def reward_kind(task: str) -> str:
    """Which reward set scores a task: "gsm8k" (XML format + correctness) or "toy" (digit_fraction).

    >>> reward_kind("arith")
    'gsm8k'
    """
    if task not in _REWARD_KIND:
        raise UserError(f"unknown task {task!r}; valid tasks: {', '.join(TASKS)}")
    return _REWARD_KIND[task]


def for_run(cfg, split: str, limit: int | None) -> list[Example]:
    """`load_task` with a run's settings (a Config: task, data, seed, arith_ops, arith_max)."""
    return load_task(cfg.task, cfg.data, split, cfg.seed, limit, cfg.arith_ops, cfg.arith_max)


def load_task(name: str, data: str | None, split: str, seed: int, limit: int | None, arith_ops: str = "2-4",
              arith_max: int = 90) -> list[Example]:
    """The examples of task `name` for `split` ("train"/"test"), first `limit` of them when given.

    `data` (a local file or folder) applies to gsm8k only; `seed` picks the generated data of arith and toy;
    `arith_ops` ("N" or "A-B" operations) and `arith_max` (the largest number written) set arith's difficulty.
    A test split is the first problems under its own seed that are not in the train split of the same settings.

    >>> [ex.index for ex in load_task("toy", None, "train", seed=0, limit=3)]
    [0, 1, 2]
    """
    if name not in TASKS:
        raise UserError(f"unknown task {name!r}; valid tasks: {', '.join(TASKS)}")
    if limit is not None and limit < 1:
        raise UserError(f"limit must be at least 1, got {limit}")
    if name == "gsm8k":
        examples = load_gsm8k(data, split)
    else:
        if data is not None:
            raise UserError(f"--data applies to the gsm8k task only, not to {name!r}")
        if split not in _SIZES[name]:
            raise UserError(f"unknown split {split!r} for task {name!r}; valid splits: train, test")
        if name == "arith":
            ops = arith_difficulty(arith_ops, arith_max)
            stream = functools.partial(_arith_stream, ops=ops, largest=arith_max)
        else:
            stream = _toy_stream
        size = _SIZES[name][split]
        if split == "train":
            examples = list(itertools.islice(stream(2 * seed), size))
        else:
            train = itertools.islice(stream(2 * seed), _SIZES[name]["train"]) if name == "arith" else []
            seen = {ex.question for ex in train}
            drawn = itertools.islice(stream(2 * seed + 1), _MAX_DRAWS * size)  # a bound for tiny problem spaces
            fresh = list(itertools.islice((ex for ex in drawn if ex.question not in seen), size))
            if len(fresh) < size:
                raise UserError(f"arith_ops={arith_ops} arith_max={arith_max}: too few distinct problems for a test "
                                f"split disjoint from train; raise arith_max or arith_ops")
            examples = [Example(question=ex.question, answer=ex.answer, index=i) for i, ex in enumerate(fresh)]
    return examples[:limit] if limit is not None else examples


def examples_for_step(data: list[Example], step: int, per_step: int, seed: int) -> list[Example]:
    """The P examples of a step: a fresh seeded shuffle each epoch, so the data position is just the step."""
    orders: dict[int, list[int]] = {}  # epoch -> its permutation (a step spans at most two epochs)
    out = []
    for i in range(step * per_step, (step + 1) * per_step):
        epoch, pos = divmod(i, len(data))
        if epoch not in orders:
            orders[epoch] = list(range(len(data)))
            random.Random(seed * 1_000_003 + epoch).shuffle(orders[epoch])
        out.append(data[orders[epoch][pos]])
    return out
