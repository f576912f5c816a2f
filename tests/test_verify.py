"""tinyrl.rewards.verify: math-verify in a child process. LaTeX golds agree with math-verify run here; a gold that
does not parse never matches; a completion that hangs math-verify costs its timeout, in any thread, and the next call
works. One child is spawned for the whole file (about a second), plus one per hang."""

import threading
import time

import pytest
from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse
from math_verify import verify as math_verify

from tinyrl.rewards import verify

TARGETS = (ExprExtractionConfig(), LatexExtractionConfig(boxed_match_priority=0))

# (completion, gold, right): the gold is the content of a MATH solution's last \boxed{}; `right` judged by hand
MATH_CASES = [
    # fractions, \dfrac, decimals for fractions
    ("<think>..</think><answer>\\frac{3}{4}</answer>", "\\frac{3}{4}", True),
    ("<answer>$\\dfrac{3}{4}$</answer>", "\\frac{3}{4}", True),
    ("The answer is $\\boxed{\\frac{6}{8}}$.", "\\dfrac{3}{4}", True),
    ("<answer>0.75</answer>", "\\frac{3}{4}", True),
    ("<answer>3/4</answer>", "\\frac{3}{4}", True),
    ("<answer>\\frac{1}{2}</answer>", "0.5", True),
    ("<answer>0.3333333</answer>", "\\frac{1}{3}", True),  # equal to 5 decimals
    ("<answer>\\frac{3}{5}</answer>", "\\frac{3}{4}", False),
    ("<answer>0.7</answer>", "\\frac{3}{4}", False),
    # intervals
    ("<answer>$(-\\infty, 3]$</answer>", "(-\\infty, 3]", True),
    ("so $x \\in \\boxed{(-\\infty,3]}$", "(-\\infty, 3]", True),
    ("<answer>$(-\\infty, 3)$</answer>", "(-\\infty, 3]", False),  # open where the gold is closed
    ("<answer>$[2, 5)$</answer>", "[2,5)", True),
    # roots and pi
    ("<answer>$\\sqrt{2}$</answer>", "\\sqrt{2}", True),
    ("<answer>$\\frac{2}{\\sqrt{2}}$</answer>", "\\sqrt{2}", True),
    ("<answer>$2\\sqrt{3}$</answer>", "\\sqrt{12}", True),
    ("<answer>$\\sqrt{3}$</answer>", "\\sqrt{2}", False),
    ("<answer>$\\frac{\\pi}{3}$</answer>", "\\frac{\\pi}{3}", True),
    ("<answer>$\\frac{\\pi}{6}$</answer>", "\\frac{\\pi}{3}", False),
    # negative numbers, thousands
    ("<answer>-4</answer>", "-4", True),
    ("<answer>$\\boxed{-4}$</answer>", "-4", True),
    ("<answer>4</answer>", "-4", False),
    ("<answer>1,000</answer>", "1000", True),
    # polynomials
    ("<answer>$x^2+1$</answer>", "x^2+1", True),
    ("<answer>$1 + x^2$</answer>", "x^2+1", True),
    ("<answer>$x^2-1$</answer>", "x^2+1", False),
    # sets and tuples
    ("<answer>$3, 5, 7$</answer>", "3, 5, 7", True),
    ("<answer>$7, 3, 5$</answer>", "3, 5, 7", True),  # a list of solutions is a set
    ("<answer>$\\{1, 2\\}$</answer>", "\\{1,2\\}", True),
    ("<answer>$3, 5$</answer>", "3, 5, 7", False),
    ("<answer>$(1, 2)$</answer>", "(1,2)", True),
    ("<answer>$(2, 1)$</answer>", "(1,2)", False),
    # text choices
    ("<answer>$\\text{(B)}$</answer>", "\\text{(B)}", True),
    ("The answer is $\\boxed{\\textbf{(B)}}$", "\\text{(B)}", True),
    ("<answer>$\\text{(C)}$</answer>", "\\text{(B)}", False),
    # percent, equations
    ("<answer>10\\%</answer>", "10\\%", True),
    ("<answer>$x=5$</answer>", "x=5", True),
    ("<answer>5</answer>", "x=5", True),
    ("<answer>$x=6$</answer>", "x=5", False),
    # nothing to read
    ("I do not know.", "\\frac{3}{4}", False),
]
# Where math-verify and a reader differ (why, by hand): a bare letter outside $...$ is not extracted at all
MATH_VERIFY_MISSES = [("<answer>B</answer>", "\\text{(B)}", False)]
CASES = MATH_CASES + MATH_VERIFY_MISSES

# math-verify's expression regex backtracks quadratically on a long run of "1+" that ends in a letter: 0.9 s at 8k
# characters on 2 CPU cores, so minutes at 100k. Its own alarm stops it, but only where it may set one (the main thread)
PATHOLOGICAL = "1+" * 50_000 + "x"


def in_process(completion: str, gold: str) -> bool:
    """check's reading, spelled out with math-verify in this process."""
    found = parse(completion.split("<answer>")[-1].split("</answer>")[0].strip(), TARGETS) if (
        "<answer>" in completion) else []
    found = found or parse(completion, TARGETS)
    return math_verify(parse("$\\boxed{" + gold + "}$", (LatexExtractionConfig(), ExprExtractionConfig())), found,
                       float_rounding=5)


@pytest.fixture(scope="module")
def checked():
    return verify.check([c for c, _, _ in CASES], [g for _, g, _ in CASES], "latex")


@pytest.mark.parametrize("index", range(len(CASES)), ids=[f"{c[:30]}|{g}" for c, g, _ in CASES])
def test_latex_golds_agree_with_math_verify_in_process(checked, index):
    completion, gold, right = CASES[index]
    assert checked[index] == in_process(completion, gold) == right


def test_a_gold_that_does_not_parse_is_never_correct():
    unparsed = ["", "\\text{}", "}", "\\boxed{}"]
    assert verify.gold_parses(unparsed, "latex") == [False] * 4
    assert verify.check([f"<answer>{g}</answer>" for g in unparsed], unparsed, "latex") == [False] * 4
    assert verify.gold_parses(["\\frac{3}{4}", "\\text{(B)}", "x^2+1"], "latex") == [True] * 3
    assert verify.gold_parses(["72", "1,000", "hello", ""], "expr") == [True, True, False, False]


def test_the_child_is_reused_and_bad_arguments_are_errors_here():
    verify.check(["1"], ["1"])
    pid = verify._child.process.pid
    assert verify.check(["<answer>18.0</answer>", "18"], ["18", "17"]) == [True, False]
    assert verify._child.process.pid == pid
    with pytest.raises(ValueError):
        verify.check(["1"], ["1"], "mathml")
    with pytest.raises(ValueError):
        verify.check(["1", "2"], ["1"])
    with pytest.raises(TypeError):
        verify.check(["1"], [1])


def test_math_verify_without_its_alarm_really_hangs_and_the_child_is_replaced():
    """As math-verify runs off the main thread (its alarm off): not done in 1 s; the child is killed, a new one
    takes the next item."""
    before = verify.timeouts()
    got = verify._run(parse, [(PATHOLOGICAL, TARGETS, "first_match", "any_match", None), ("7", TARGETS)], 1.0)
    assert got[0] is None and verify.timeouts() == before + 1
    assert [str(x) for x in got[1]] == ["7", "7"]


def hang_then_recover() -> tuple[list[bool], float, int, list[bool]]:
    before = verify.timeouts()
    start = time.monotonic()
    got = verify.check([PATHOLOGICAL], ["2"], timeout=1.0)
    return got, time.monotonic() - start, verify.timeouts() - before, verify.check(["<answer>7</answer>"], ["7"])


def test_a_hang_costs_its_timeout_on_the_main_thread():
    got, seconds, timeouts, after = hang_then_recover()
    assert got == [False] and seconds < 1.0 + 4 and timeouts == 1 and after == [True]


def test_a_hang_costs_its_timeout_off_the_main_thread():
    out = []
    thread = threading.Thread(target=lambda: out.append(hang_then_recover()))
    thread.start()
    thread.join(60)
    got, seconds, timeouts, after = out[0]
    assert got == [False] and seconds < 1.0 + 4 and timeouts == 1 and after == [True]


def test_a_child_that_cannot_start_is_an_error_not_a_fallback(monkeypatch):
    monkeypatch.setattr(verify, "_child", None)  # restored afterwards: the running child stays
    monkeypatch.setattr(verify, "STARTUP_S", 0.001)
    with pytest.raises(RuntimeError, match="did not start"):
        verify.check(["1"], ["1"])
    assert verify._child is None


def test_a_script_without_a_main_guard_can_check_answers(tmp_path):
    """The spawned child must not rerun the user's script (which would call tinyrl again at top level)."""
    import subprocess
    import sys

    script = tmp_path / "train.py"
    script.write_text("from tinyrl import rewards\nprint('ran', flush=True)\n"
                      "print(rewards.check(['so \\\\boxed{\\\\frac{1}{2}}'], ['0.5'], 'latex'))\n")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["ran", "[True]"]  # printed once: the child did not run the script
