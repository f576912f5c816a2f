"""`tinyrl eval`: extractive match on hand-judged GSM8K-style completions, and every checkpoint of a run."""

import dataclasses
import json
import os
import subprocess
import sys
import threading

import pytest
from math_verify import parse, verify

from tinyrl import cli, config, evaluate, loop, rewards
from tinyrl.config import Config

LAYOUT = "<reasoning>\n{}\n</reasoning>\n<answer>\n{}\n</answer>\n"  # the system prompt's layout

# (completion, gold answer, right?), each judged by hand.
JUDGED = [
    # trailing notes after the answer
    ("The answer is 12. (She started with 5 apples.)", "12", 1),
    (LAYOUT.format("5 + 7 = 12", "12") + "(She started with 5 apples.)", "12", 1),
    # commas and dollars
    ("<answer>\n$1,000\n</answer>", "1000", 1),
    ("<answer>\n1000\n</answer>", "1,000", 1),
    ("She saves $1,250 in total.", "1250", 1),
    ("<answer>\n$18.00\n</answer>", "18", 1),
    ("He earns $1,234.50 per week.", "1234.5", 1),
    # GSM8K's own marker
    ("7 apples plus 11 is 18.\n#### 18", "18", 1),
    # \boxed{}
    ("So she has \\boxed{72} cookies.", "72", 1),
    ("\\boxed{18 \\text{ dollars}}", "18", 1),
    # negatives
    ("The answer is -3 degrees", "-3", 1),
    ("The temperature ends at -3.", "3", 0),
    # units
    ("She pays 18 dollars.", "18", 1),
    ("The side is 5 cm", "5", 1),
    (LAYOUT.format("2 hours is 120 minutes", "120 minutes"), "120", 1),
    # decimals against integer golds
    ("18.0", "18", 1),
    ("<answer>18.0</answer>", "18", 1),
    ("Each friend gets 2.5 pies.", "2.5", 1),
    # the <answer> tag first: numbers after it or inside an equation there do not count
    ("<answer>18</answer> Let me also check 7 and 9", "18", 1),
    ("<answer>\n3 + 15 = 18\n</answer>", "18", 1),
    ("<answer>17</answer> Wait, actually it is 18.", "18", 0),
    # a tag without a number, or cut off before it closes: the whole completion
    ("<answer>\neighteen\n</answer> so 18", "18", 1),
    ("<reasoning>\n6 * 3 = 18\n</reasoning>\n<answer>\n18", "18", 1),
    # wrong answers
    ("The answer is 17", "18", 0),
    (LAYOUT.format("9 + 9 = 18", "17"), "18", 0),
    ("The answer is 180", "18", 0),
    # no number at all
    ("I don't know", "18", 0),
    ("", "18", 0),
]

# Where math-verify alone, on the whole completion, is wrong and ours is right (why, by hand):
MATH_VERIFY_ALONE_WRONG = {
    "<answer>18.0</answer>",  # a number touching '<' is not extracted at all
    "<answer>18</answer> Let me also check 7 and 9",  # 'answer' anchors on '</answer> ... 7'
    "<answer>\n3 + 15 = 18\n</answer>",  # 'answer' anchors on the first number: 3
    "<answer>17</answer> Wait, actually it is 18.",  # the tag says 17; the later 18 counts
}


def math_verify_alone(completion: str, gold: str) -> float:
    return 1.0 if verify(parse(gold), parse(completion)) else 0.0


@pytest.mark.parametrize("completion, gold, right", JUDGED)
def test_extractive_match_on_hand_judged_gsm8k_completions(completion, gold, right):
    assert rewards.extractive_match([completion], [gold]) == [float(right)]


@pytest.mark.parametrize("completion, gold, right", JUDGED)
def test_extractive_match_is_right_wherever_math_verify_alone_is(completion, gold, right):
    alone_right = math_verify_alone(completion, gold) == right
    assert alone_right == (completion not in MATH_VERIFY_ALONE_WRONG)  # the list above is exactly the differences
    assert rewards.extractive_match([completion], [gold]) == [float(right)]


def test_extractive_match_batch_and_exact_match_unchanged():
    completions = ["<answer>\n72\n</answer>", "<answer>\n$72\n</answer>", "The answer is 12. (5 apples.)"]
    assert rewards.extractive_match(completions, ["72", "72", "12"]) == [1.0, 1.0, 1.0]
    assert rewards.correctness(completions, ["72", "72", "12"]) == [1.0, 0.0, 0.0]  # exact string match
    with pytest.raises(ValueError):
        rewards.extractive_match(completions, ["72"])


def test_extractive_match_works_off_the_main_thread():
    """math-verify's timeouts use SIGALRM, which only the main thread may set."""
    got = []
    thread = threading.Thread(target=lambda: got.append(rewards.extractive_match(["so \\boxed{7}"], ["7"])))
    thread.start()
    thread.join()
    assert got == [[1.0]]


def test_best_and_last():
    results = {2: {"exact_match": 0.0, "extractive_match": 0.5}, 4: {"exact_match": 0.25, "extractive_match": 0.75},
               6: {"exact_match": 0.5, "extractive_match": 0.75}, 8: {"exact_match": 0.0, "extractive_match": 0.25}}
    assert evaluate.best_and_last(results) == (4, 8)  # 4 and 6 tie on extractive match: the earlier step
    assert evaluate.best_and_last({3: results[2]}) == (3, 3)


def run_cli(monkeypatch, capsys, *args):
    monkeypatch.setattr(sys, "argv", ["tinyrl", *args])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    return exit_info.value.code, capsys.readouterr().err.strip()


def test_checkpoints_all_needs_a_run_folder(monkeypatch, capsys, tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "adapter_config.json").write_text("{}")
    for args in (["--adapter", str(ckpt)], []):
        code, err = run_cli(monkeypatch, capsys, "eval", "arith", *args, "--checkpoints", "all")
        assert code == 2 and err.startswith("tinyrl: error:") and "\n" not in err and "run folder" in err
    code, err = run_cli(monkeypatch, capsys, "eval", "arith", "--adapter", str(ckpt), "--checkpoints", "every")
    assert code == 2 and "latest" in err and "all" in err and "\n" not in err


def test_eval_every_checkpoint_of_a_run(tiny_model, tmp_path):
    """Trained on the toy reward (arith gives the random model no reward, so no update), evaluated on arith."""
    run = loop.fit(Config(task="toy", model=tiny_model, out=str(tmp_path / "run"), steps=4, save_every=2,
                          prompts_per_step=2, group_size=4, max_new_tokens=8, keep_checkpoints=0, lr=1e-2), quiet=True)
    done = subprocess.run([sys.executable, "-m", "tinyrl.cli", "eval", "arith", "--adapter", run, "--checkpoints",
                           "all", "--limit", "4", "--set", "max_new_tokens=8"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stdout.splitlines() if not line.startswith("eval ")]  # progress lines aside
    summary = json.load(open(os.path.join(run, "eval-arith-checkpoints.json")))
    assert list(summary) == ["2", "4"] and all(m["n"] == 4 for m in summary.values())
    results = {int(step): m for step, m in summary.items()}
    assert lines == evaluate.report_checkpoints(results, run, "arith").splitlines()
    best, last = evaluate.best_and_last(results)
    assert lines[-2].startswith(f"best step {best}: ") and lines[-1].startswith("last step 4: ")
    saved = dataclasses.replace(config.load(os.path.join(run, "config.json")), task="arith", max_new_tokens=8)
    assert "eval step 2: 4/4 exact" in done.stdout and "eval step 4: 4/4 exact" in done.stdout
    assert "max_new_tokens 8" in done.stdout
    ckpt = os.path.join(run, "checkpoints", "step-000002")  # a checkpoint folder: the run's model, not the default
    done = subprocess.run([sys.executable, "-m", "tinyrl.cli", "eval", "arith", "--adapter", ckpt, "--limit", "4",
                           "--out", str(tmp_path / "ckpt.jsonl")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "max_new_tokens 8 (the run's" in done.stdout and "n=4" in done.stdout
    completions = {}
    for step in (2, 4):
        alone = str(tmp_path / f"alone-{step}.jsonl")
        result = evaluate.evaluate(saved, os.path.join(run, "checkpoints", f"step-{step:06d}"), 4, alone)
        assert result == results[step]  # swapping the adapter in equals loading that checkpoint on its own
        with open(os.path.join(run, f"eval-arith-step-{step:06d}.jsonl")) as f, open(alone) as g:
            swapped = f.read()
            assert swapped == g.read()
        completions[step] = [json.loads(row)["completion"] for row in swapped.splitlines()]
    assert completions[2] != completions[4]  # the swap is visible: the two adapters answer differently
