"""Task rewards against values computed by hand (docs/memory-r-plus.md §4, §5, §9 item 12)."""

import math

import pytest

from tinyrl import rewards
from tinyrl.errors import UserError

LAYOUT = "<reasoning>\nstep\n</reasoning>\n<answer>\n{}\n</answer>"  # the system prompt's layout, no final newline


def test_extract_answer_is_the_reference_split():
    assert rewards.extract_answer("<answer> 5 </answer>") == "5"
    assert rewards.extract_answer("<answer>1</answer> <answer>2</answer>") == "2"  # last opening tag
    assert rewards.extract_answer("<answer>\n7") == "7"  # unclosed: everything after it
    assert rewards.extract_answer("  plain 9 ") == "plain 9"  # no tag: the whole text


def test_gold_answer_takes_first_marker_up_to_second():
    assert rewards.gold_answer("48/2 = <<48/2=24>>24\n#### 72") == "72"
    assert rewards.gold_answer("x\n#### 1,000") == "1,000"  # commas kept
    assert rewards.gold_answer("a #### 18 #### 20") == "18"  # two markers: text between them
    with pytest.raises(ValueError):
        rewards.gold_answer("no marker")


def test_correctness_exact_string_and_numeric():
    completions = [LAYOUT.format("18"), LAYOUT.format("18.0"), LAYOUT.format("$18"), LAYOUT.format("1,000")]
    answers = ["18", "18", "18", "1000"]
    assert rewards.correctness(completions, answers) == [1.0, 0.0, 0.0, 0.0]  # exact string (reference)
    assert rewards.correctness(completions, answers, numeric=True) == [1.0, 1.0, 1.0, 1.0]
    assert rewards.correctness_numeric(completions, answers) == [1.0, 1.0, 1.0, 1.0]
    assert rewards.correct_flags(completions, answers) == [True, False, False, False]
    with pytest.raises(ValueError):
        rewards.correctness(completions)


def test_normalize_number():
    assert rewards.normalize_number("18.0") == "18"
    assert rewards.normalize_number("18.00") == "18"
    assert rewards.normalize_number("$18") == "18"
    assert rewards.normalize_number("1,000") == "1000"
    assert rewards.normalize_number(" $1,234.50 ") == "1234.5"
    assert rewards.normalize_number("-3") == "-3"
    assert rewards.normalize_number("100") == "100"  # zeros before the point stay
    assert rewards.normalize_number("eighteen") == "eighteen"


def test_integer_keeps_unicode_isdigit_quirk():
    got = rewards.integer([LAYOUT.format(s) for s in ["42", "٣", "²", "１８", "-3", "4.5", "", "x"]])
    assert got == [0.5, 0.5, 0.5, 0.5, 0.0, 0.0, 0.0, 0.0]


def test_soft_format_needs_single_line_reasoning():
    assert rewards.soft_format(["<reasoning>r</reasoning>\n<answer>4</answer>"]) == [0.5]
    assert rewards.soft_format(["<reasoning>r</reasoning><answer>4</answer> trailing"]) == [0.5]  # match, not full
    assert rewards.soft_format([LAYOUT.format("4") + "\n"]) == [0.0]  # no DOTALL: the asked-for layout fails
    assert rewards.soft_format(["hi <reasoning>r</reasoning><answer>4</answer>"]) == [0.0]  # must start there


def test_strict_format_needs_trailing_newline():
    assert rewards.strict_format([LAYOUT.format("4") + "\n"]) == [0.5]
    assert rewards.strict_format([LAYOUT.format("4")]) == [0.0]
    assert rewards.strict_format([LAYOUT.format("4") + "\nmore"]) == [0.0]
    two_lines = "<reasoning>\na\nb\n</reasoning>\n<answer>\n4\n</answer>\n"
    assert rewards.strict_format([two_lines]) == [0.0]  # no DOTALL: one reasoning line only


def test_xml_count_by_hand():
    perfect = LAYOUT.format("4") + "\n"
    assert rewards.xml_count([perfect]) == [0.5]
    # no final newline: "\n</answer>\n" is missing, so the <answer> term loses 0.001 x the whole length,
    # and the </answer> term loses 0.001 x (0 - 1), i.e. gains 0.001.
    bare = LAYOUT.format("4")
    assert len(bare) == 12 + 5 + 13 + 9 + 2 + 9 == 50  # "<reasoning>\n" "step\n" "</reasoning>\n" ...
    assert rewards.xml_count([bare]) == [pytest.approx(0.5 - 0.050 + 0.001)]
    # 5 trailing characters after "\n</answer>\n": -0.005 and -(6 - 1) x 0.001
    assert rewards.xml_count([perfect + "extra"]) == [pytest.approx(0.5 - 0.005 - 0.005)]
    # only the opening reasoning tag: 0.125
    assert rewards.xml_count(["<reasoning>\nthinking"]) == [0.125]
    # a tag seen twice earns nothing for that tag
    assert rewards.xml_count(["<reasoning>\n<reasoning>\n"]) == [0.0]
    assert rewards.xml_count([""]) == [0.0]


def test_cosine_length_by_hand():
    texts = ["", "x" * 100, "x" * 200, "x" * 300]
    # len 0 -> hi, len 100 -> middle (cos = 0), len 200 -> lo, len 300 -> wraps back to the middle
    assert rewards.cosine_length(texts, [True] * 4) == pytest.approx([1.0, 0.75, 0.5, 0.75])
    assert rewards.cosine_length(texts, [False] * 4) == pytest.approx([-1.0, -0.75, -0.5, -0.75])
    # len 400 wraps all the way back to the top
    assert rewards.cosine_length(["x" * 400], [True]) == pytest.approx([1.0])
    assert rewards.cosine_length(["x" * 50], [True], max_len=100) == pytest.approx([0.75])
    assert rewards.cosine_length(["x" * 50], [True]) == pytest.approx([0.75 + 0.25 * math.cos(math.pi / 4)])


def test_extractive_match():
    """By hand; the GSM8K cases, and the comparison with math-verify alone, are in test_eval.py."""
    completions = ["so \\boxed{1,000}", LAYOUT.format("$72"), "I get 71 and then 72", "nothing", LAYOUT.format("7"),
                   LAYOUT.format("72") + "\nthen 7 and 9"]
    answers = ["1000", "72", "72", "72", "72", "72"]
    assert rewards.extractive_match(completions, answers) == [1.0, 1.0, 1.0, 0.0, 0.0, 1.0]
    assert rewards.extractive_match(["nothing"], ["no number"]) == [0.0]  # nothing found never matches
    assert rewards.extractive_match(["\\boxed{\\frac{3}{4}}", "0.75"], ["0.75", "3/4"]) == [1.0, 1.0]  # values


def test_digit_fraction():
    assert rewards.digit_fraction(["123", "1a", "1 2 a b", "", "   ", "١٢", "12\n34"]) == [
        1.0, 0.5, 0.5, 0.0, 0.0, 0.0, 1.0,
    ]


def test_task_rewards_components():
    perfect = LAYOUT.format("7") + "\n"
    wrong = LAYOUT.format("8")
    r1 = rewards.task_rewards([perfect, wrong], ["7", "7"], "r1")
    assert list(r1) == ["xml_count", "soft_format", "strict_format", "integer", "correctness"]
    assert r1["correctness"] == [1.0, 0.0]
    assert r1["strict_format"] == [0.5, 0.0]
    assert r1["integer"] == [0.5, 0.5]
    assert r1["xml_count"] == pytest.approx([0.5, 0.5 - 0.050 + 0.001])
    assert rewards.task_rewards([perfect], ["7"], "memory-r") == rewards.task_rewards([perfect], ["7"], "r1")
    assert rewards.task_rewards([perfect], ["7"], "memory-r+") == rewards.task_rewards([perfect], ["7"], "r1")
    cos = rewards.task_rewards([perfect, wrong], ["7", "7"], "cosine")
    assert list(cos)[-1] == "cosine"
    assert cos["cosine"] == pytest.approx(rewards.cosine_length([perfect, wrong], [True, False]))
    assert cos["cosine"][0] > 0.5 and cos["cosine"][1] < -0.5
    numeric = rewards.task_rewards([LAYOUT.format("7.0")], ["7"], "r1", numeric=True)
    assert numeric["correctness"] == [1.0]


def test_task_rewards_unknown_method_is_one_line_user_error():
    with pytest.raises(UserError) as err:
        rewards.task_rewards(["x"], ["1"], "ppo")
    message = str(err.value)
    assert "\n" not in message
    assert all(m in message for m in ["r1", "cosine", "memory-r", "memory-r+"])
