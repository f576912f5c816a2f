"""Any task (issue #23): data in the ecosystem's shapes, reward functions with TRL's contract, the success signal,
and every bad input as one line. End to end on the tiny model: a custom task from the CLI and from Python."""

import csv
import json
import math
import os
import subprocess
import sys
import types

import pytest
import torch

import tinyrl
from tinyrl import config
from tinyrl import task as task_mod
from tinyrl import tasks
from tinyrl.config import Config, for_task
from tinyrl.errors import UserError
from tinyrl.tasks import rows as rows_mod
from tinyrl.types import Example, PromptBatch, Rollouts

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


# --- data in every shape ------------------------------------------------------------------------------------------


def test_every_file_format_reads_the_same_rows(tmp_path):
    rows = [{"question": "1+1?", "answer": "#### 2", "tag": "a"}, {"question": "2+2?", "answer": "4", "tag": "b"}]
    write_jsonl(tmp_path / "d.jsonl", rows)
    (tmp_path / "d.json").write_text(json.dumps(rows))
    (tmp_path / "w.json").write_text(json.dumps({"data": rows}))
    with open(tmp_path / "d.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["question", "answer", "tag"])
        writer.writeheader()
        writer.writerows(rows)
    import pyarrow
    import pyarrow.parquet

    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows), tmp_path / "d.parquet")
    for name in ("d.jsonl", "d.json", "w.json", "d.csv", "d.parquet"):
        examples = tasks.load_task("custom", str(tmp_path / name), "train", 0, None)
        assert [(ex.question, ex.answer, ex.columns["tag"]) for ex in examples] == [("1+1?", "2", "a"),
                                                                                  ("2+2?", "4", "b")], name


def test_python_rows_and_a_datasets_dataset():
    rows = [{"problem": "p", "solution": "so $\\boxed{\\frac{1}{2}}$"}]
    assert tasks.load_task("ai-mo", rows, "train", 0, None)[0].answer == "\\frac{1}{2}"
    datasets = pytest.importorskip("datasets")
    got = tasks.load_task("ai-mo", datasets.Dataset.from_list(rows), "train", 0, None)
    assert (got[0].question, got[0].answer) == ("p", "\\frac{1}{2}")


def test_numina_fixture_columns_and_boxed_golds():
    examples = tasks.load_task("ai-mo", os.path.join(FIXTURES, "numina.jsonl"), "train", 0, None)
    assert [ex.answer for ex in examples[:7]] == ["\\frac{3}{4}", "\\sqrt{2}", "(-\\infty, 3]", "50",
                                                  "-\\frac{5}{2}", "2", "\\dfrac{1}{4}"]
    assert examples[0].question.startswith("What is $\\frac{1}{2}") and examples[0].prompt is None
    assert set(examples[0].columns) == {"problem", "solution", "messages"}  # every column travels


def test_trl_prompt_column_string_or_conversation():
    conv = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Capital of France?"}]
    examples = tasks.load_task("custom", [{"prompt": conv}, {"prompt": "Once upon a time"}], "train", 0, None)
    assert examples[0].prompt == tuple(conv) and examples[0].question == "Capital of France?"
    assert examples[1].prompt == "Once upon a time" and examples[1].answer == ""


def test_render_uses_the_prompt_column_as_is():
    from tinyrl import prompts

    class Tok:
        pad_token_id, eos_token_id, chat_template = 0, 0, "x"

        def apply_chat_template(self, turns, tokenize, add_generation_prompt):
            return "|".join(f"{t['role']}:{t['content']}" for t in turns) + "|assistant:"

        def __call__(self, texts, add_special_tokens):
            return {"input_ids": [[1] * len(t) for t in texts]}

    conv = ({"role": "user", "content": "hi"},)
    batch = prompts.render([Example("hi", "", 0, prompt=conv), Example("raw text", "", 1, prompt="raw text"),
                            Example("q?", "1", 2)], Tok(), 512)
    assert batch.texts[0] == "user:hi|assistant:"  # no system prompt added
    assert batch.texts[1] == "raw text"  # a string prompt: no template at all
    assert batch.texts[2].startswith("system:") and batch.texts[2].endswith("user:q?|assistant:")


def test_gold_of_each_shape():
    assert rows_mod.gold_of("work\n#### 1,000") == "1,000"
    assert rows_mod.gold_of("$x = \\boxed{\\frac{\\sqrt{3}}{2}}$ and more") == "\\frac{\\sqrt{3}}{2}"
    assert rows_mod.gold_of("first \\boxed{1} then \\boxed{(2, 3)}") == "(2, 3)"
    assert rows_mod.gold_of(" 42 ") == "42" and rows_mod.gold_of(7) == "7"


@pytest.mark.parametrize("rows,settings,words", [
    ([{"q": "x", "a": "1"}], {}, r"no 'question' or 'problem' column for the question \(its columns: q, a\)"),
    ([{"question": "x", "a": "1"}], {"task": "gsm8k"}, r"no 'answer' or 'solution' column .*its columns: question, a"),
    ([{"question": "x", "a": "1"}], {"task": "gsm8k", "answer_column": "gold"}, r"no column 'gold' .*question, a"),
    ([{"question": None, "answer": "1"}], {"task": "gsm8k"}, r"row 0: 'question' is missing or empty"),
    ([{"prompt": 3}], {}, r"'prompt' must be a string or a list of \{role, content\} messages"),
    ([], {}, r"no examples"),
])
def test_bad_data_is_one_line(rows, settings, words):
    cfg = Config(**{"task": "custom", **settings})
    with pytest.raises(UserError, match=words):
        tasks.for_run(cfg, "train", None, data=rows)


def test_bad_paths_are_one_line(tmp_path):
    with pytest.raises(UserError, match="no such file or folder"):
        tasks.load_task("custom", str(tmp_path / "nope.jsonl"), "train", 0, None)
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(UserError, match=r"expected a \.jsonl, \.json, \.parquet, \.csv file"):
        tasks.load_task("custom", str(tmp_path / "x.txt"), "train", 0, None)
    with pytest.raises(UserError, match="folder has no test file"):
        tasks.load_task("custom", str(tmp_path), "test", 0, None)
    with pytest.raises(UserError, match="does not apply to 'arith'"):
        tasks.load_task("arith", str(tmp_path), "train", 0, None)
    with pytest.raises(UserError, match="math-500 has no train split"):
        tasks.load_task("math-500", None, "train", 0, None)
    with pytest.raises(UserError, match="the custom task needs --data"):
        tasks.load_task("custom", None, "train", 0, None)


def test_train_limit_draws_under_the_seed_and_epochs_set_the_length():
    cfg = Config(task="arith", train_limit=50, seed=3)
    picked = tasks.for_run(cfg, "train", None)
    assert len(picked) == 50 and picked == tasks.for_run(cfg, "train", None)
    assert [ex.index for ex in picked] != list(range(50))  # drawn, not the first 50
    assert for_task("ai-mo").epochs == 4 and for_task("ai-mo").train_limit == 2000


# --- reward functions: TRL's contract ----------------------------------------------------------------------------


def rollouts_of(examples, completions, group_size):
    n = len(completions)
    ids = torch.arange(n * 3).view(n, 3)
    mask = torch.ones(n, 3)
    mask[0, 2] = 0  # the first completion ended after 2 tokens
    batch = PromptBatch(tuple(examples), tuple(ex.question for ex in examples), torch.zeros(len(examples), 1),
                        torch.ones(len(examples), 1))
    return Rollouts(batch, group_size, ids, mask, tuple(completions), torch.zeros(n, dtype=torch.bool))


def test_reward_functions_get_trl_arguments_and_none_means_no_opinion():
    seen = {}

    def lengthy(prompts, completions, completion_ids, **kwargs):
        seen.update(prompts=prompts, completions=completions, completion_ids=completion_ids, **kwargs)
        return [float(len(c)) for c in completions]

    def picky(completions, **kwargs):
        return [None, 1.0, None, 0.0]

    examples = [Example("q1", "", 0, columns={"question": "q1", "level": 1}),
                Example("q2", "", 1, columns={"question": "q2", "level": 2})]
    cfg = Config(task="custom", success="picky>=1", reward_weights="lengthy=0.5")
    task = task_mod.Task("custom", examples, None, "none", (task_mod.Reward("lengthy", lengthy, "python"),
                                                           task_mod.Reward("picky", picky, "python")),
                         {"lengthy": 0.5}, ("picky", ">=", 1.0), "none", 0)
    scored = task_mod.score(task, cfg, rollouts_of(examples, ["a", "bb", "ccc", "dddd"], 2), step=0)
    assert seen["prompts"] == ["q1", "q1", "q2", "q2"] and seen["level"] == [1, 1, 2, 2]
    assert seen["question"] == ["q1", "q1", "q2", "q2"] and seen["completions"] == ["a", "bb", "ccc", "dddd"]
    assert seen["completion_ids"] == [[0, 1], [3, 4, 5], [6, 7, 8], [9, 10, 11]]  # up to the completion's end
    assert torch.isnan(scored.components["picky"][0]) and scored.components["picky"][1] == 1.0
    assert scored.total.tolist() == [0.5, 1.0 + 1.0, 1.5, 2.0]  # 0.5 x length + picky, None counting 0
    assert scored.correct.tolist() == [False, True, False, False]  # None is not a success


def test_conversational_prompts_get_conversational_completions():
    got = {}

    def f(prompts, completions, **kw):
        got.update(prompts=prompts, completions=completions)
        return [1.0] * len(completions)

    conv = ({"role": "user", "content": "hi"},)
    examples = [Example("hi", "", 0, prompt=conv, columns={})]
    task = task_mod.Task("custom", examples, None, "none", (task_mod.Reward("f", f, "python"),), {}, None, "none", 0)
    task_mod.score(task, Config(task="custom"), rollouts_of(examples, ["yo", "hey"], 2), step=0)
    assert got["prompts"] == [list(conv)] * 2
    assert got["completions"] == [[{"role": "assistant", "content": "yo"}], [{"role": "assistant", "content": "hey"}]]


@pytest.mark.parametrize("fn,words", [
    (lambda completions, **kw: [1 / (len(c) - 2) for c in completions],
     r"reward function f \(python\) at step 4 raised ZeroDivisionError: .* on row 1 \(completion 'bb'\); fix it and "
     r"rerun the same command to resume"),
    (lambda completions, **kw: [1.0], r"returned 1 values for 2 completions"),
    (lambda completions, **kw: 1.0, r"returned float for 2 completions"),
    (lambda completions, **kw: ["1", 2.0], r"returned '1' \(a str\) for row 0; return floats or None"),
    (lambda completions, **kw: [math.nan, 1.0], r"returned nan for row 0; return finite floats \(None: no opinion\)"),
])
def test_a_broken_reward_function_is_one_line_naming_it(fn, words):
    fn.__name__ = "f"
    examples = [Example("q", "", 0, columns={})]
    task = task_mod.Task("custom", examples, None, "none", (task_mod.Reward("f", fn, "python"),), {}, None, "none", 0)
    with pytest.raises(UserError, match=words):
        task_mod.score(task, Config(task="custom"), rollouts_of(examples, ["a", "bb"], 2), step=3)


REWARD_FILE = """
from helpers import share


def digits(prompts, completions, completion_ids=None, **kwargs):
    return [share(c) for c in completions]

def helper_that_is_not_asked():
    return 0
"""


HELPERS = "def share(text):\n    return sum(ch.isdigit() for ch in text) / max(1, len(text))\n"


def test_reward_specs_and_settings_are_checked_before_anything_loads(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "Write digits."}])
    (tmp_path / "r.py").write_text(REWARD_FILE)
    (tmp_path / "helpers.py").write_text(HELPERS)
    (tmp_path / "boom.py").write_text("raise RuntimeError('no GPU here')\n")
    good = f"{tmp_path / 'r.py'}:digits"
    cases = [
        ({"reward_funcs": ""}, "the custom task needs reward functions: --reward"),
        ({"reward_funcs": "r.py"}, "expected path/to/file.py:function or package.module:function"),
        ({"reward_funcs": f"{tmp_path / 'x.py'}:f"}, r"no such file .*x\.py"),
        ({"reward_funcs": f"{tmp_path / 'r.py'}:nope"}, r"has no function 'nope' \(it defines digits, helper_that"),
        ({"reward_funcs": f"{tmp_path / 'boom.py'}:f"}, r"importing .*boom\.py raised RuntimeError: no GPU here"),
        ({"reward_funcs": "no_such_pkg.mod:f"}, r"cannot import no_such_pkg\.mod"),
        ({"reward_funcs": good, "success": "other>=1"}, r"success=other>=1: no reward function named 'other'; this "
                                                         r"run's are digits"),
        ({"reward_funcs": good, "reward_weights": "x=2"}, r"reward_weights: no reward function named 'x'"),
        ({"reward_funcs": f"{good},{good}"}, "two reward functions are named 'digits'"),
        ({"reward_funcs": good, "method": "memory-r+"}, r"memory-r\+ needs to know which completions succeeded.*"
                                                        r"--set success=NAME>=X"),
    ]
    for settings, words in cases:
        with pytest.raises(UserError, match=words):
            task_mod.build(Config(task="custom", data=data, **settings))
    built = task_mod.build(Config(task="custom", data=data, reward_funcs=good, method="memory-r+",
                                  success="digits>=0.5"))
    assert [r.name for r in built.custom] == ["digits"] and built.success == ("digits", ">=", 0.5)
    assert task_mod.build(Config(task="arith")).success == ("correctness", ">=", 1.0)
    with pytest.raises(UserError, match="math-500 is an evaluation set"):
        task_mod.build(Config(task="math-500"))
    with pytest.raises(UserError, match="success='oops': expected NAME>=X"):
        config.validate(Config(success="oops"))


def test_unparseable_golds_are_skipped_counted_and_an_empty_set_refused():
    cfg = Config(task="ai-mo", data=os.path.join(FIXTURES, "numina.jsonl"))
    warned = []
    built = task_mod.build(cfg, warn=warned.append)
    assert built.skipped == 1 and len(built.train) == 7 and built.gold_format == "latex"
    assert "the broken row" not in [ex.question for ex in built.train] and warned and "skipped 1 of 8" in warned[0]
    with pytest.raises(UserError, match="no example left: math-verify cannot parse any gold answer"):
        task_mod.build(Config(task="ai-mo"), data=[{"problem": "p", "solution": "no answer in here at all, only words"}])


# --- end to end on the tiny model ---------------------------------------------------------------------------------


def digit_rows(n=32):
    return [{"prompt": p, "topic": "digits"} for p in ["Write some digits.", "Type a number.", "List numbers.",
                                                       "Give digits."] * (n // 4)]


def test_custom_task_from_the_cli_and_a_raising_reward_leaves_a_resumable_run(tiny_model, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", digit_rows())
    (tmp_path / "r.py").write_text(REWARD_FILE)
    (tmp_path / "helpers.py").write_text(HELPERS)  # the reward file imports its neighbour, as a script would
    run = str(tmp_path / "run")
    cmd = [sys.executable, "-m", "tinyrl", "fit", "custom", "--data", data, "--reward", f"{tmp_path / 'r.py'}:digits",
           "--method", "memory-r+", "--model", tiny_model, "--out", run, "--steps", "2",
           "--set", "success=digits>=0.5", "--set", "encoder=hashing", "--set", "prompts_per_step=2",
           "--set", "group_size=4", "--set", "max_new_tokens=8", "--set", "lr=1e-2", "--set", "save_every=1", "--quiet"]
    done = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    metrics = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
    assert len(metrics) == 2 and {"reward/digits", "reward/exploit", "correct"} <= set(metrics[0])
    # the reward file breaks: one line naming it and the step, exit 2, the checkpoints intact, resumable after a fix
    (tmp_path / "r.py").write_text(REWARD_FILE.replace("return [share", "raise KeyError('answer')\n    return [share"))
    more = [*cmd[:cmd.index("--steps") + 1], "3", *cmd[cmd.index("--steps") + 2:], "--resume"]
    broken = subprocess.run(more, env=ENV, capture_output=True, text=True, timeout=600)
    last = broken.stderr.strip().splitlines()[-1]
    assert broken.returncode == 2 and "Traceback" not in broken.stderr, broken.stderr[-2000:]
    assert last.startswith("tinyrl: error: reward function digits (") and "at step 3 raised KeyError: 'answer' on " \
        "row 0" in last and last.endswith("rerun the same command to resume from the last checkpoint")
    assert sorted(os.listdir(os.path.join(run, "checkpoints")))[-1] == "step-000002"
    (tmp_path / "r.py").write_text(REWARD_FILE)
    fixed = subprocess.run(more, env=ENV, capture_output=True, text=True, timeout=600)
    assert fixed.returncode == 0, fixed.stderr[-2000:]
    assert len([json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]) == 3


def test_custom_task_from_python_with_memory_learns(tiny_model, tmp_path):
    calls = []

    def digits(prompts, completions, topic, **kwargs):
        calls.append(topic[0])
        return [sum(ch.isdigit() for ch in c) / max(1, len(c)) for c in completions]

    run = tinyrl.fit("custom", train=digit_rows(), rewards=[digits], method="memory-r+", success="digits>=0.5",
                     encoder="hashing", model=tiny_model, out=str(tmp_path / "py"), steps=20, prompts_per_step=4,
                     group_size=8, max_new_tokens=12, lr=1e-2, max_grad_norm=1.0, save_every=10, quiet=True)
    assert run == str(tmp_path / "py") and calls[:2] == ["digits", "digits"]
    metrics = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
    assert len(metrics) == 20 and {"reward/digits", "reward/exploit"} <= set(metrics[0])
    first = sum(m["reward/digits"] for m in metrics[:5]) / 5
    last = sum(m["reward/digits"] for m in metrics[-5:]) / 5
    assert last > first + 0.15, (first, last)
    assert json.load(open(os.path.join(run, "config.json")))["success"] == "digits>=0.5"
    with pytest.raises(UserError, match="no setting 'stepz'"):
        tinyrl.fit("custom", train=digit_rows(8), rewards=[digits], stepz=3)


def test_a_custom_file_via_the_cli_help_and_settings_show_the_task_defaults():
    done = subprocess.run([sys.executable, "-m", "tinyrl", "settings"], env=ENV, capture_output=True, text=True)
    assert "memory_k = 1  (ai-mo: 20)" in done.stdout and "prompts_per_step = 16  (ai-mo: 64)" in done.stdout
    help_text = subprocess.run([sys.executable, "-m", "tinyrl", "fit", "--help"], env=ENV, capture_output=True,
                               text=True).stdout
    assert "--reward" in help_text and "ai-mo" in help_text


def test_the_custom_task_recipe_runs_on_the_tiny_model(tiny_model, tmp_path):
    recipe = os.path.join(os.path.dirname(FIXTURES), "..", "recipes", "custom_task.py")
    out = str(tmp_path / "recipe")
    args = [sys.executable, recipe, "--model", tiny_model, "--steps", "2", "--out", out, "--set", "prompts_per_step=2",
            "--set", "group_size=4", "--set", "max_new_tokens=8", "--set", "encoder=hashing"]
    done = subprocess.run(args, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    metrics = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert len(metrics) == 2 and {"reward/last_number_is_right", "reward/brief", "reward/exploit"} <= set(metrics[0])
    bad = subprocess.run([*args, "--set", "group_size=1"], env=ENV, capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2 and bad.stderr.strip().startswith("custom_task: error: group_size must be at least 2")


# --- the paper's AI-MO task and the MATH-500 / AIME evaluation ------------------------------------------------------


def test_ai_mo_fits_on_a_fixture_and_plans(tiny_model, tmp_path):
    folder = tmp_path / "numina"
    folder.mkdir()
    (folder / "train.jsonl").write_text(open(os.path.join(FIXTURES, "numina.jsonl")).read())
    run = str(tmp_path / "aimo")
    done = subprocess.run([sys.executable, "-m", "tinyrl", "fit", "ai-mo", "--data", str(folder), "--model", tiny_model,
                           "--out", run, "--steps", "2", "--method", "memory-r+", "--set", "encoder=hashing",
                           "--set", "prompts_per_step=2", "--set", "group_size=4", "--set", "max_new_tokens=8"],
                          env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "skipped 1 of 8 train examples whose gold answer math-verify cannot parse" in done.stderr
    metrics = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
    assert {"reward/think_format", "reward/reasoning_steps", "reward/accuracy", "reward/exploit"} <= set(metrics[0])
    assert metrics[0]["data/skipped_gold"] == 1 and "reward/integer" not in metrics[0]
    saved = json.load(open(os.path.join(run, "config.json")))
    assert (saved["memory_k"], saved["max_prompt_tokens"], saved["epochs"], saved["train_limit"]) == (20, 512, 4, 2000)
    plan = subprocess.run([sys.executable, "-m", "tinyrl", "plan", "ai-mo", "--vram", "8G", "--model", tiny_model,
                           "--data", str(folder)], env=ENV, capture_output=True, text=True, timeout=300)
    assert plan.returncode == 0, plan.stderr[-2000:]
    assert "P=64" in plan.stdout or "prompts_per_step" in plan.stdout


def test_eval_on_math_style_latex_answers(tiny_model, tmp_path, monkeypatch):
    from tinyrl import evaluate, policy

    answers = ["$\\left( 3, \\frac{\\pi}{2} \\right)$", "<answer>5\\sqrt{2}</answer>", "x > 2, so $(2, \\infty)$",
               "\\boxed{0.75}", "\\boxed{7}", "(B)"]

    def fake_generate(model, tokenizer, rendered, **kw):
        texts = tuple(answers[ex.index] for ex in rendered.examples)
        return types.SimpleNamespace(completions=texts)

    monkeypatch.setattr(evaluate.policy, "generate", fake_generate)
    cfg = Config(task="math-500", data=os.path.join(FIXTURES, "math500.jsonl"), model=tiny_model, gen_batch=8)
    examples = task_mod.held_out(cfg, None, None)
    assert [ex.answer for ex in examples][:2] == ["\\left( 3, \\frac{\\pi}{2} \\right)", "5\\sqrt{2}"]
    out = str(tmp_path / "eval.jsonl")
    result = evaluate.run_eval(None, policy.load_tokenizer(tiny_model), examples, cfg, out)
    rows = [json.loads(line) for line in open(out)]
    # math-verify's verdicts: polar point, 5 sqrt 2, the interval, 0.75 = 3/4 right; 7 != 6; a bare (B) is not read
    assert [r["extractive_match"] for r in rows] == [1.0, 1.0, 1.0, 1.0, 0.0, 0.0]
    assert result["extractive_match"] == pytest.approx(4 / 6) and result["n"] == 6


def test_eval_reports_the_success_signal_of_your_reward(tiny_model, tmp_path, monkeypatch):
    from tinyrl import evaluate

    def fake_generate(model, tokenizer, rendered, **kw):
        n = len(rendered.examples)
        texts = tuple(["the answer is 4", "no idea"][ex.index % 2] for ex in rendered.examples)
        return Rollouts(rendered, 1, torch.ones(n, 2, dtype=torch.long), torch.ones(n, 2), texts,
                        torch.zeros(n, dtype=torch.bool))

    (tmp_path / "r.py").write_text("def says_four(completions, **kw):\n    return [float('4' in c) for c in completions]\n")
    data = write_jsonl(tmp_path / "test.jsonl", [{"question": f"q{i}", "answer": "4"} for i in range(4)])
    monkeypatch.setattr(evaluate.policy, "generate", fake_generate)
    cfg = Config(task="custom", data=data, model=tiny_model, reward_funcs=f"{tmp_path / 'r.py'}:says_four",
                 success="says_four>=1")
    monkeypatch.setattr(evaluate, "load", lambda cfg, adapter: (None, __import__("tinyrl").policy.load_tokenizer(
        tiny_model)))
    result = evaluate.evaluate(cfg, None, None, str(tmp_path / "eval.jsonl"))
    assert result["success"] == 0.5 and result["extractive_match"] == 0.5 and result["n"] == 4
    rows = [json.loads(line) for line in open(tmp_path / "eval.jsonl")]
    assert [r["success"] for r in rows] == [1.0, 0.0, 1.0, 0.0]


def test_your_data_names_its_splits(tmp_path):
    write_jsonl(tmp_path / "training.jsonl", [{"question": "a", "answer": "1"}, {"question": "b", "answer": "2"}])
    write_jsonl(tmp_path / "validation.jsonl", [{"question": "v", "answer": "3"}])
    cfg = Config(task="gsm8k", data=str(tmp_path), train_split="training", test_split="validation", train_limit=1)
    assert len(tasks.for_run(cfg, "train", None)) == 1  # train_limit still applies to the renamed train split
    assert [ex.question for ex in tasks.for_run(cfg, "test", None)] == ["v"]
    with pytest.raises(UserError, match="folder has no test file"):
        tasks.for_run(Config(task="gsm8k", data=str(tmp_path)), "test", None)
