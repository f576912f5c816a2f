"""The offline generated tasks: `arith` (synthetic multi-step arithmetic word problems, GSM8K-sized) and `toy`
("write some digits" prompts). Each is an endless stream under a seed; tinyrl.tasks cuts the splits from them."""

from __future__ import annotations

import itertools
import random

from tinyrl.types import Example

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


def arith_stream(seed: int, ops: tuple[int, int], largest: int):
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
    return list(itertools.islice(arith_stream(seed, ops, largest), n))


_TOY_PROMPTS = [
    "Write some digits.", "Write a long number.", "Reply with digits only.", "Type a few numbers.",
    "Give me a random number.", "Write down a phone number.", "List some numbers.",
    "Write as many digits as you can.",
]


def toy_stream(seed: int):
    rng = random.Random(seed)
    for i in itertools.count():
        yield Example(question=rng.choice(_TOY_PROMPTS), answer="", index=i)


def toy_digits(n: int, seed: int) -> list[Example]:
    """n 'write some digits' prompts with an empty gold answer; same seed, same list.

    >>> [ex.answer for ex in toy_digits(2, seed=0)]
    ['', '']
    """
    return list(itertools.islice(toy_stream(seed), n))
