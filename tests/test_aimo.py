"""AI-MO rewards against values computed by hand (docs/memory-r-plus.md §4)."""

import re

import pytest

from tinyrl import prompts, rewards
from tinyrl.errors import UserError


def test_think_format_is_dotall_and_anchored():
    texts = [
        "<think>\nI add.\n</think>\n<answer>\n4\n</answer>",  # multi-line: DOTALL
        "<think>a</think> <answer>4</answer>\n",  # `$` also matches before one final newline
        "<think>a</think><answer>4</answer>\n\n",  # not before two
        " <think>a</think><answer>4</answer>",  # `^`
        "<think>a</think>\nso\n<answer>4</answer>",  # only whitespace between the tags
        "<reasoning>a</reasoning><answer>4</answer>",  # the GSM8K tags are not these
    ]
    assert rewards.think_format(texts) == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    assert re.match(rewards.THINK_FORMAT, texts[0]) is None  # without DOTALL the first would fail


def test_reasoning_steps_by_hand():
    texts = [
        "Step 1: x\nStep 2: y\nStep 3: z\nStep 4: w",  # 4 markers: min(1, 4/3)
        "First, x. Next, y.",  # 2
        "1. x\n2. y\n3. z",  # `^\d+\.` without MULTILINE: only the first line's "1." (open-r1's quirk)
        "a\n- x\n- y\n* z",  # "\n-" twice, "\n*" once
        "step 1: lower case",  # case matters
        "",
    ]
    assert rewards.reasoning_steps(texts) == [1.0, 2 / 3, 1 / 3, 1.0, 0.0, 0.0]


def test_accuracy_reads_latex_golds():
    completions = ["<think>..</think><answer>\\frac{3}{4}</answer>", "<answer>0.75</answer>",
                   "<answer>\\frac{4}{3}</answer>", "no answer"]
    assert rewards.accuracy(completions, ["\\frac{3}{4}"] * 4) == [1.0, 1.0, 0.0, 0.0]
    with pytest.raises(ValueError):
        rewards.accuracy(completions)


def test_aimo_rewards_components():
    right, wrong = "<answer>3/4</answer>", "<answer>4/3</answer>"  # 20 characters each
    got = rewards.aimo_rewards([right, wrong], ["\\frac{3}{4}"] * 2, "r1")
    assert got == {"think_format": [0.0, 0.0], "reasoning_steps": [0.0, 0.0], "accuracy": [1.0, 0.0]}
    # cosine at len = max_len / 2: cos(pi / 2) = 0, so lo + (hi - lo) / 2: 0.75 right, -0.75 wrong
    cosine = rewards.aimo_rewards([right, wrong], ["\\frac{3}{4}"] * 2, "cosine", max_len=40)["cosine"]
    assert [round(c, 12) for c in cosine] == [0.75, -0.75]
    assert set(rewards.aimo_rewards([right], ["1"], "memory-r+")) == {"think_format", "reasoning_steps", "accuracy"}
    with pytest.raises(UserError) as err:
        rewards.aimo_rewards([right], ["1"], "grpo")
    assert "\n" not in str(err.value)


def test_system_prompt_is_r1s():
    assert prompts.AIMO_SYSTEM_PROMPT == (
        "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. The "
        "assistant first thinks about the reasoning process in the mind and then provides the user with the answer. "
        "The reasoning process and answer are enclosed within <think> </think> and <answer> </answer> tags, "
        "respectively, i.e., <think> reasoning process here </think><answer> answer here </answer>")
