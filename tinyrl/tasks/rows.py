"""Rows from anywhere, and rows -> `Example`s.

Where rows come from (`read`): a local `.jsonl`, `.json` (a list of objects, or `{"data": [...]}`-style: the one list
it holds), `.parquet` or `.csv` file; a folder holding `{split}.<one of those>`; a Hugging Face hub dataset name
(`owner/name`, with a config and a split); or, from Python, a `datasets.Dataset` or a list of dicts.

How a row becomes an Example (`to_examples`), in the ecosystem's shapes:
- TRL's `prompt` column: a string (the model's input as is, no chat template) or a list of `{role, content}`
  messages (the conversation, chat-templated, instead of tinyrl's system prompt and few-shot turns). The memory key
  is the last user message (or the string).
- Otherwise a question column (`question_column`; `auto`: `question`, else `problem`) is the user turn of tinyrl's
  template.
- The gold answer (`answer_column`; `auto`: `answer`, else `solution`): GSM8K's `... #### N` (the text after the
  first '####' up to a second one), the content of the last `\\boxed{...}` in a worked solution, or the bare value
  (not in a `solution` column: a worked solution with no boxed answer has none, and its example is skipped).
  A task without a gold column (a custom task scored by its own reward functions) has empty golds.
- Every column but `prompt` travels with its row, as is, to the reward functions (TRL's contract).
"""

from __future__ import annotations

import contextlib
import csv
import json
from pathlib import Path
from typing import Any

from tinyrl import hub
from tinyrl.errors import UserError
from tinyrl.types import Example

SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
QUESTION_COLUMNS = ("question", "problem")  # `auto` takes the first a row has
ANSWER_COLUMNS = ("answer", "solution")


def read(data: Any, split: str, config: str | None = None, what: str = "--data") -> tuple[list[dict], str]:
    """The rows of `data` for `split` and where they came from (for messages); UserError on bad input.
    `data`: a path, a hub name, a datasets.Dataset / DatasetDict, or a list of dicts."""
    if isinstance(data, (list, tuple)):
        return [check_row(r, f"{what} row {i}") for i, r in enumerate(data)], f"{what} ({len(data)} rows)"
    if not isinstance(data, (str, Path)):
        if hasattr(data, "keys") and split in data.keys() and not hasattr(data, "column_names"):
            data = data[split]  # a DatasetDict
        if hasattr(data, "column_names") and hasattr(data, "__iter__"):  # a datasets.Dataset
            return [check_row(r, f"{what} row {i}") for i, r in enumerate(data)], f"{what} ({len(data)} rows)"
        raise UserError(f"{what}: expected a path, a hub dataset name, a datasets.Dataset or a list of dicts, got "
                        f"{type(data).__name__}")
    path = Path(data)
    if path.exists():
        file = local_file(path, split)
        return read_file(file), str(file)
    if looks_like_hub_name(str(data)):
        return read_hub(str(data), config, split), f"{data} {split}"
    raise UserError(f"{data}: no such file or folder (nor a hub dataset name: owner/name)")


def looks_like_hub_name(text: str) -> bool:
    """`owner/name` with no file suffix: what `datasets.load_dataset` takes from the hub.

    >>> looks_like_hub_name("AI-MO/NuminaMath-TIR"), looks_like_hub_name("data/train.jsonl"), looks_like_hub_name("x")
    (True, False, False)
    """
    parts = text.split("/")
    return len(parts) == 2 and all(parts) and not text.endswith(SUFFIXES) and not text.startswith(".")


def local_file(path: Path, split: str) -> Path:
    if path.is_dir():
        for suffix in SUFFIXES:
            if (path / f"{split}{suffix}").is_file():
                return path / f"{split}{suffix}"
        raise UserError(f"{path}: folder has no {split} file ({', '.join(split + s for s in SUFFIXES)})")
    if path.suffix not in SUFFIXES:
        raise UserError(f"{path}: expected a {', '.join(SUFFIXES)} file, or a folder holding {split}.jsonl etc.")
    return path


def read_file(path: Path) -> list[dict]:
    readers = {".jsonl": read_jsonl, ".json": read_json, ".parquet": read_parquet, ".csv": read_csv}
    try:
        rows = readers[path.suffix](path)
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    return rows


def read_jsonl(path: Path) -> list[dict]:
    rows = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
            rows.append(check_row(row, f"{path}:{lineno}"))
    return rows


def read_json(path: Path) -> list[dict]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    if isinstance(data, dict):
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise UserError(f"{path}: expected a list of objects (or an object holding exactly one such list)")
        data = lists[0]
    if not isinstance(data, list):
        raise UserError(f"{path}: expected a list of objects")
    return [check_row(row, f"{path}: item {i}") for i, row in enumerate(data)]


def read_parquet(path: Path) -> list[dict]:
    import pyarrow.parquet

    try:
        table = pyarrow.parquet.read_table(path)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the user's to fix
        raise UserError(f"{path}: not a readable parquet file ({type(e).__name__})") from None
    return [check_row(row, f"{path}: row {i}") for i, row in enumerate(table.to_pylist())]


def read_csv(path: Path) -> list[dict]:
    with path.open(encoding="utf-8", newline="") as f:
        return [dict(row) for row in csv.DictReader(f)]


def read_hub(name: str, config: str | None, split: str) -> list[dict]:
    """A hub dataset's split (offline: the local datasets cache only); one line naming the fix on any failure."""
    offline = hub.offline()
    try:
        import datasets

        with hub.switched_off(datasets) if offline else contextlib.nullcontext():
            rows = list(datasets.load_dataset(name, config, split=split))
    except Exception as e:  # noqa: BLE001 - offline, missing package, bad split: all end the same way
        reason = " ".join(f"{type(e).__name__}: {e}".split())[:160]
        where = (f"the Hugging Face hub is unreachable and {name} is not in the local datasets cache" if offline
                 else f"could not load {name} from the Hugging Face hub ({reason})")
        raise UserError(f"{where}; pass a local file with --data PATH (jsonl, json, parquet or csv)") from None
    return [check_row(row, f"{name} {split} row {i}") for i, row in enumerate(rows)]


def check_row(row: object, where: str) -> dict:
    if not isinstance(row, dict):
        raise UserError(f"{where}: expected an object (a row with named columns), got {type(row).__name__}")
    return row


def pick_column(rows: list[dict], asked: str, auto: tuple[str, ...], source: str, role: str,
                required: bool) -> str | None:
    """The column holding `role` (question / gold answer): `asked`, or with `auto` the first of `auto` the rows
    have. UserError naming the columns there are when a required one is missing."""
    have = list(rows[0]) if rows else []
    if asked != "auto":
        if asked in have:
            return asked
        raise UserError(f"{source}: no column {asked!r} for the {role} (its columns: {', '.join(have)}); "
                        f"set --set {role.split()[-1]}_column=NAME")
    found = next((c for c in auto if c in have), None)
    if found is None and required:
        fix = ("--set question_column=NAME, or give a 'prompt' column" if role == "question" else
               "--set answer_column=NAME (a task without gold answers: custom, with your --reward)")
        raise UserError(f"{source}: no {' or '.join(repr(c) for c in auto)} column for the {role} (its columns: "
                        f"{', '.join(have)}); name it with {fix}")
    return found


def gold_of(field: Any, worked: bool = False) -> str:
    """The gold answer in a gold column: after GSM8K's first '####' (up to a second), else the last `\\boxed{}`'s
    content, else the value itself, stripped; but "" (no answer) for a `worked` solution (a `solution` column) with
    neither.

    >>> gold_of("3 + 4 = 7\\n#### 7"), gold_of("so $x = \\\\boxed{\\\\frac{1}{2}}$."), gold_of(" 12 "), gold_of(5)
    ('7', '\\\\frac{1}{2}', '12', '5')
    >>> gold_of("we are done", worked=True)
    ''
    """
    text = "" if field is None else str(field)
    if "####" in text:
        return text.split("####")[1].strip()
    boxed = last_boxed(text)
    return (boxed if boxed is not None else "" if worked else text).strip()


def last_boxed(text: str) -> str | None:
    """The content of the last `\\boxed{...}` (or `\\fbox{...}`), braces balanced; None when there is none.

    >>> last_boxed("a \\\\boxed{1} b \\\\boxed{\\\\frac{a}{b}} c"), last_boxed("none"), last_boxed("\\\\boxed{open")
    ('\\\\frac{a}{b}', None, None)
    """
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth, begin = 1, i
    while i < len(text):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[begin:i]
        i += 1
    return None


def prompt_of(value: Any, where: str) -> tuple[Any, str]:
    """A TRL `prompt` value checked, and its memory key: (the prompt, the question text)."""
    if isinstance(value, str):
        return value, value
    if isinstance(value, (list, tuple)) and value and all(isinstance(m, dict) and "role" in m and "content" in m
                                                         for m in value):
        turns = tuple({"role": str(m["role"]), "content": str(m["content"])} for m in value)
        users = [m["content"] for m in turns if m["role"] == "user"]
        if not users:
            raise UserError(f"{where}: the 'prompt' conversation has no user message")
        return turns, users[-1]
    raise UserError(f"{where}: 'prompt' must be a string or a list of {{role, content}} messages")


def to_examples(rows: list[dict], source: str, question_column: str = "auto", answer_column: str = "auto",
                needs_gold: bool = True) -> list[Example]:
    """Examples of `rows` (see the module's text); UserError on a missing column, naming those there are."""
    if not rows:
        raise UserError(f"{source}: no examples")
    has_prompt = "prompt" in rows[0] and question_column == "auto"
    question = None if has_prompt else pick_column(rows, question_column, QUESTION_COLUMNS, source, "question", True)
    gold = pick_column(rows, answer_column, ANSWER_COLUMNS, source, "gold answer", needs_gold)
    examples = []
    for i, row in enumerate(rows):
        where = f"{source} row {i}"
        for column in (question or "prompt", gold):
            if column is not None and row.get(column) is None:
                raise UserError(f"{where}: {column!r} is missing or empty")
        prompt, text = prompt_of(row["prompt"], where) if has_prompt else (None, str(row[question]))
        columns = {k: v for k, v in row.items() if k != "prompt"}
        answer = gold_of(row[gold], worked=gold == "solution") if gold else ""
        examples.append(Example(question=text, answer=answer, index=i, prompt=prompt, columns=columns))
    return examples
