"""Task loading: GSM8K files (good and malformed), the hub error, and the generated tasks."""

import inspect
import json
import re
import sys
import types
from pathlib import Path

import pytest

from tinyrl import config, rewards, tasks
from tinyrl.config import Config
from tinyrl.errors import UserError
from tinyrl.types import Example

GSM8K = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "gsm8k"  # ../shared/data/gsm8k

needs_gsm8k = pytest.mark.skipif(not (GSM8K / "train.jsonl").is_file(), reason="no GSM8K copy at ../shared/data")


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def good(question: str = "What is 1 + 1?", answer: str = "1 + 1 = 2\n#### 2") -> str:
    return json.dumps({"question": question, "answer": answer})


@needs_gsm8k
def test_local_gsm8k_folder_and_file():
    train = tasks.load_gsm8k(str(GSM8K), "train")
    test = tasks.load_gsm8k(str(GSM8K / "test.jsonl"))  # a file: its split argument is irrelevant
    assert len(train) == 7473 and len(test) == 1319
    assert train[0].answer == "72" and train[0].question.startswith("Natalia sold clips")
    assert [ex.index for ex in test[:3]] == [0, 1, 2]
    # the gold rule here agrees with rewards.gold_answer on every row
    rows = [json.loads(line) for line in (GSM8K / "train.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [ex.answer for ex in train] == [rewards.gold_answer(row["answer"]) for row in rows]
    assert tasks.load_task("gsm8k", str(GSM8K), "test", seed=0, limit=5) == test[:5]


def test_jsonl_good_file_skips_blank_lines_and_keeps_second_marker_rule(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [good(), "", good("Q2", "x #### 18 #### 20")])
    assert tasks.load_gsm8k(str(path)) == [
        Example(question="What is 1 + 1?", answer="2", index=0),
        Example(question="Q2", answer="18", index=1),
    ]


@pytest.mark.parametrize(
    "bad_line, where, words",
    [
        ('{"question": "Q", "answer": ', ":3: ", "not valid JSON"),
        ('["Q", "#### 1"]', ":3: ", "expected an object"),
        ('{"question": "Q"}', " row 2: ", "'answer' is missing or empty"),
        ('{"answer": "#### 1"}', " row 2: ", "'question' is missing or empty"),
    ],
)
def test_jsonl_malformed_line_names_the_line(tmp_path, bad_line, where, words):
    path = write_lines(tmp_path / "d.jsonl", [good(), good(), bad_line, good()])
    with pytest.raises(UserError) as err:
        tasks.load_gsm8k(str(path))
    message = str(err.value)
    assert message.startswith(f"{path}{where}")
    assert words in message and "\n" not in message


def test_a_gold_without_a_marker_is_the_bare_value(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [good("Q", "18"), good("R", 5)])
    assert [ex.answer for ex in tasks.load_gsm8k(str(path))] == ["18", "5"]


def test_bad_paths_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        tasks.load_gsm8k(str(tmp_path / "missing.jsonl"))
    with pytest.raises(UserError, match="no examples"):
        tasks.load_gsm8k(str(write_lines(tmp_path / "empty.jsonl", [])))
    with pytest.raises(UserError, match="no examples"):
        tasks.load_gsm8k(str(write_lines(tmp_path / "blank.jsonl", ["", "  "])))
    with pytest.raises(UserError, match=r"expected a \.jsonl, \.json, \.parquet, \.csv file"):
        tasks.load_gsm8k(str(write_lines(tmp_path / "d.txt", ["question,answer"])))
    with pytest.raises(UserError, match="no test file"):
        tasks.load_gsm8k(str(tmp_path), "test")
    (tmp_path / "latin1.jsonl").write_bytes(b'{"question": "caf\xe9", "answer": "#### 1"}\n')
    with pytest.raises(UserError, match="UTF-8"):
        tasks.load_gsm8k(str(tmp_path / "latin1.jsonl"))


def test_folder_with_split_file(tmp_path):
    write_lines(tmp_path / "test.jsonl", [good("T", "#### 3")])
    assert tasks.load_gsm8k(str(tmp_path), "test") == [Example(question="T", answer="3", index=0)]


def test_parquet(tmp_path):
    import pyarrow
    import pyarrow.parquet

    path = tmp_path / "train.parquet"
    table = pyarrow.table({"question": ["A", "B"], "answer": ["#### 1", "so #### 2,000"]})
    pyarrow.parquet.write_table(table, path)
    assert [(ex.question, ex.answer) for ex in tasks.load_gsm8k(str(tmp_path))] == [("A", "1"), ("B", "2,000")]
    pyarrow.parquet.write_table(pyarrow.table({"question": ["A"]}), tmp_path / "test.parquet")
    with pytest.raises(UserError, match=r"test.parquet: no 'answer' or 'solution' column for the gold answer \(its columns: question\)"):
        tasks.load_gsm8k(str(tmp_path), "test")


def test_hub_failure_is_one_line_with_the_fix(monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'openai/gsm8k'\non the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(tasks.rows.hub, "offline", lambda: False)  # the hub answers, then the download fails
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=offline))
    with pytest.raises(UserError) as err:
        tasks.load_gsm8k(None, "train")
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("could not load openai/gsm8k from the Hugging Face hub (ConnectionError: ")
    fix = "pass a local file with --data PATH (jsonl, json, parquet or csv)"
    assert message.endswith(fix)


def test_hub_rows_become_examples(monkeypatch):
    rows = [{"question": "Q", "answer": "w #### 4"}]
    monkeypatch.setattr(tasks.rows.hub, "offline", lambda: False)
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=lambda *a, **k: rows))
    assert tasks.load_gsm8k(None, "test") == [Example(question="Q", answer="4", index=0)]


# An independent reading of the synthetic problems: each sentence -> (operation, number of operations).
STEPS = [
    (r"^\w+ (?:has|starts with) \$?(\d+)(?: \w+)?\.$", lambda t, a: a, 0),
    (r"^\w+ buys (\d+) \w+ with (\d+) \w+ in each \w+\.$", lambda t, k, m: k * m, 1),
    (r"^\w+ earns \$(\d+) an hour and works (\d+) hours\.$", lambda t, k, m: k * m, 1),
    (r"^(?:He|She) finds (\d+) more \w+\.$", lambda t, n: t + n, 1),
    (r"^A friend gives (?:her|him) (\d+) more \w+\.$", lambda t, n: t + n, 1),
    (r"^(?:He|She) (?:gives|loses|uses) (\d+) \w+(?: to a neighbour)?\.$", lambda t, n: t - n, 1),
    (r"^(?:He|She) (?:gives away half of|puts half of) (?:his|her) \w+", lambda t: t / 2, 1),
    (r"^(?:He|She) ends up with twice as many", lambda t: t * 2, 1),
    (r"^(?:He|She) ends up with three times as many", lambda t: t * 3, 1),
    (r"^Then (?:he|she) buys (\d+) \w+ with (\d+) \w+ in each \w+\.$", lambda t, k, m: t + k * m, 2),
    (r"^(?:He|She) (?:earns \$(\d+) [a-z ]+|gets \$(\d+) as a present)\.$", lambda t, a, b: t + int(a or b), 1),
    (r"^(?:He|She) spends \$(\d+) on [a-z ]+\.$", lambda t, n: t - n, 1),
    (r"^(?:He|She) sells (\d+) [a-z ]+ for \$(\d+) each\.$", lambda t, k, m: t + k * m, 2),
    (r"^(?:He|She) buys (\d+) \w+ for \$(\d+) each\.$", lambda t, k, m: t - k * m, 2),
]


def solve(question: str) -> tuple[int, int]:
    *sentences, ask = re.split(r"(?<=[.?]) ", question)
    assert ask.startswith("How ") and ask.endswith("?")
    total, ops = None, 0
    for i, sentence in enumerate(sentences):
        matches = [(rx, fn, n) for rx, fn, n in STEPS if re.match(rx, sentence)]
        assert len(matches) == 1, sentence
        rx, fn, n = matches[0]
        assert (i == 0) == (STEPS.index(matches[0]) < 3), sentence  # starts only first
        groups = [g if g is None else int(g) for g in re.match(rx, sentence).groups()]
        total, ops = fn(total, *groups), ops + n
        assert total == int(total) and total > 0, (sentence, total)
    return int(total), ops


def test_synthetic_arithmetic_is_deterministic_and_correct():
    first = tasks.synthetic_arithmetic(300, seed=7)
    assert first == tasks.synthetic_arithmetic(300, seed=7)
    assert first != tasks.synthetic_arithmetic(300, seed=8)
    assert [ex.index for ex in first] == list(range(300))
    seen_ops = set()
    for ex in first:
        total, ops = solve(ex.question)
        assert ex.answer == str(total), ex.question
        assert 2 <= ops <= 4, ex.question
        seen_ops.add(ops)
    assert seen_ops == {2, 3, 4}
    assert len({ex.question.split(" ")[1] for ex in first}) > 3  # varied templates


def test_toy_digits():
    toy = tasks.toy_digits(20, seed=1)
    assert toy == tasks.toy_digits(20, seed=1)
    assert all(ex.answer == "" and ex.question for ex in toy)
    assert len({ex.question for ex in toy}) > 1


def test_load_task_dispatch_and_splits():
    train = tasks.load_task("arith", None, "train", seed=0, limit=None)
    test = tasks.load_task("arith", None, "test", seed=0, limit=None)
    assert (len(train), len(test)) == (7473, 1319)
    assert not {ex.question for ex in train} & {ex.question for ex in test}
    assert [ex.index for ex in test] == list(range(len(test)))
    assert tasks.load_task("arith", None, "train", seed=0, limit=10) == train[:10]
    assert tasks.load_task("arith", None, "train", seed=1, limit=10) != train[:10]
    assert len(tasks.load_task("toy", None, "test", seed=0, limit=None)) == 100
    assert tasks.reward_kind("gsm8k") == "gsm8k" and tasks.reward_kind("arith") == "gsm8k"
    assert tasks.reward_kind("toy") == "toy"


def test_load_task_user_errors():
    with pytest.raises(UserError) as err:
        tasks.load_task("math500", None, "train", seed=0, limit=None)
    assert all(name in str(err.value) for name in ["gsm8k", "arith", "toy"])
    with pytest.raises(UserError, match="valid tasks"):
        tasks.reward_kind("math500")
    with pytest.raises(UserError, match="does not apply to .arith., whose problems are generated"):
        tasks.load_task("arith", "some.jsonl", "train", seed=0, limit=None)
    with pytest.raises(UserError, match="unknown split"):
        tasks.load_task("toy", None, "validation", seed=0, limit=None)
    with pytest.raises(UserError, match="limit"):
        tasks.load_task("toy", None, "train", seed=0, limit=0)


# --- arith difficulty: arith_ops (operations per problem) and arith_max (largest number written) ---------------


def numbers(question: str) -> list[int]:
    return [int(n) for n in re.findall(r"\d+", question)]


def test_arith_default_difficulty_is_unchanged():
    # the default draws are those from before the settings existed: the first train problem under seed 0, pinned
    first = tasks.load_task("arith", None, "train", seed=0, limit=1)[0]
    assert solve(first.question) == (int(first.answer), 3)
    assert (first.question, first.answer) == (FIRST_DEFAULT, "9")  # 75 - 4 * 7 - 38
    assert tasks.synthetic_arithmetic(50, seed=4) == tasks.synthetic_arithmetic(50, seed=4, ops=(2, 4), largest=90)
    assert tasks.load_task("arith", None, "test", seed=0, limit=50) == tasks.load_task(
        "arith", None, "test", seed=0, limit=50, arith_ops="2-4", arith_max=90)
    # load_task's defaults are Config's
    defaults = inspect.signature(tasks.load_task).parameters
    assert (defaults["arith_ops"].default, defaults["arith_max"].default) == (Config().arith_ops, Config().arith_max)


FIRST_DEFAULT = ("Ava has $75. She buys 4 stamps for $7 each. She spends $38 on lunch. "
                 "How many dollars does Ava have left?")


def test_one_operation_problems_by_hand():
    # seed 0, one operation, numbers up to 10: $10 - $7 = $3
    ex = tasks.synthetic_arithmetic(1, seed=0, ops=(1, 1), largest=10)[0]
    assert ex.question == "Ava has $10. She spends $7 on a movie ticket. How much money, in dollars, does Ava have now?"
    assert ex.answer == "3"


@pytest.mark.parametrize("largest", [10, 20, 50, 90])
def test_one_operation_problems_have_one_operation_small_numbers_and_right_answers(largest):
    examples = tasks.load_task("arith", None, "train", seed=3, limit=400, arith_ops="1", arith_max=largest)
    kinds = set()
    for ex in examples:
        total, ops = solve(ex.question)  # the independent reading above: every sentence one known operation
        assert ops == 1, ex.question
        assert ex.answer == str(total) and ex.answer.isdigit() and int(ex.answer) > 0, ex.question
        assert rewards.gold_answer(f"so the answer is\n#### {ex.answer}") == ex.answer  # GSM8K's '#### N'
        assert max(numbers(ex.question)) <= largest, ex.question
        kinds.add(re.split(r"(?<=[.?]) ", ex.question)[-2].split()[1])  # the verb of the one operation
    assert len(kinds) >= 5  # add, subtract, multiply, halve, double ... all occur
    if largest < 90:  # a cap below the full ranges binds many of them: it is reached, not just respected
        assert max(max(numbers(ex.question)) for ex in examples) == largest


def test_arith_ops_range_and_count():
    for spec, allowed in [("2-3", {2, 3}), ("5", {5}), ("1-2", {1, 2})]:
        examples = tasks.load_task("arith", None, "train", seed=1, limit=200, arith_ops=spec, arith_max=30)
        seen = {solve(ex.question)[1] for ex in examples}
        assert seen == allowed, spec
        assert all(max(numbers(ex.question)) <= 30 for ex in examples)


@pytest.mark.parametrize("ops, largest", [("1", 10), ("2", 20)])
def test_arith_difficulty_splits_are_disjoint_full_and_deterministic(ops, largest):
    train = tasks.load_task("arith", None, "train", seed=0, limit=None, arith_ops=ops, arith_max=largest)
    test = tasks.load_task("arith", None, "test", seed=0, limit=None, arith_ops=ops, arith_max=largest)
    assert (len(train), len(test)) == (7473, 1319)
    assert not {ex.question for ex in train} & {ex.question for ex in test}
    assert [ex.index for ex in test] == list(range(len(test)))
    assert test == tasks.load_task("arith", None, "test", seed=0, limit=None, arith_ops=ops, arith_max=largest)
    assert test[:20] != tasks.load_task("arith", None, "test", seed=1, limit=20, arith_ops=ops, arith_max=largest)
    assert test[:20] != tasks.load_task("arith", None, "test", seed=0, limit=20)  # the difficulty changes the data


@pytest.mark.parametrize("ops, largest, words", [
    ("0", 90, "arith_ops='0'"), ("9", 90, "1 <= A <= B <= 8"), ("3-2", 90, "range A-B"), ("two", 90, "count N"),
    ("1", 9, "arith_max must be from 10 to 90"), ("1", 91, "(got 91)"),
])
def test_bad_arith_difficulty_is_one_line_user_error(ops, largest, words):
    with pytest.raises(UserError) as err:
        tasks.load_task("arith", None, "train", seed=0, limit=5, arith_ops=ops, arith_max=largest)
    assert words in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(UserError) as err:  # the same check when the settings are given: fit and eval refuse at once
        config.apply_overrides(Config(), [f"arith_ops={ops}", f"arith_max={largest}"])
    assert words in str(err.value) and "\n" not in str(err.value)


def test_too_few_distinct_problems_for_a_disjoint_test_split(monkeypatch):
    monkeypatch.setattr(tasks, "_MAX_DRAWS", 1)  # a draw budget a repeat-prone space cannot fill
    with pytest.raises(UserError, match="too few distinct problems") as err:
        tasks.load_task("arith", None, "test", seed=0, limit=5, arith_ops="1", arith_max=10)
    assert "\n" not in str(err.value)
