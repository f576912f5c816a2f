"""Prompts: examples -> chat messages -> one left-padded, left-truncated token batch (`PromptBatch`).

The system prompt is the reference's XML layout prompt, verbatim (leading, blank and trailing newlines included).
Few-shot turns come from the classic GSM8K chain-of-thought exemplars (Wei et al. 2022; the reasoning texts as
in the reference, which also carries a ninth, non-GSM8K exemplar that is left out here). Each row draws its own
exemplars with `random.Random(f"{seed}:{example.index}")`, so a row's prompt depends only on (seed, row); the
reference shuffles with the global RNG instead.

A tokenizer without a chat template gets a plain layout, one block per turn and an open assistant turn:
"System: ...\\n\\nUser: ...\\n\\nAssistant: ...\\n\\nUser: ...\\n\\nAssistant:" (turn contents stripped).
"""

from __future__ import annotations

import random

import torch

from tinyrl.errors import UserError
from tinyrl.types import Example, PromptBatch

SYSTEM_PROMPT = """
Respond in the following format:

<reasoning>
...
</reasoning>
<answer>
...
</answer>
"""
TOY_SYSTEM_PROMPT = "Answer briefly."
AIMO_SYSTEM_PROMPT = (  # DeepSeek-R1's, as open-r1 and TRL's NuminaMath recipe use it (the paper's AI-MO runs)
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. The assistant "
    "first thinks about the reasoning process in the mind and then provides the user with the answer. The reasoning "
    "process and answer are enclosed within <think> </think> and <answer> </answer> tags, respectively, i.e., "
    "<think> reasoning process here </think><answer> answer here </answer>"
)
XML_LAYOUT = "<reasoning>\n{reasoning}\n</reasoning>\n<answer>\n{answer}\n</answer>\n"

FEWSHOT_EXEMPLARS = [  # (question, reasoning, answer)
    (
        "There are 15 trees in the grove. Grove workers will plant trees in the grove today. After they are done, "
        "there will be 21 trees. How many trees did the grove workers plant today?",
        "There are 15 trees originally. Then there were 21 trees after some more were planted. So there must have "
        "been 21 - 15 = 6. So the answer is 6.",
        "6",
    ),
    (
        "If there are 3 cars in the parking lot and 2 more cars arrive, how many cars are in the parking lot?",
        "There are originally 3 cars. 2 more cars arrive. 3 + 2 = 5.",
        "5",
    ),
    (
        "Leah had 32 chocolates and her sister had 42. If they ate 35, how many pieces do they have left in total?",
        "Originally, Leah had 32 chocolates. Her sister had 42. So in total they had 32 + 42 = 74. After eating 35, "
        "they had 74 - 35 = 39.",
        "39",
    ),
    (
        "Jason had 20 lollipops. He gave Denny some lollipops. Now Jason has 12 lollipops. How many lollipops did "
        "Jason give to Denny?",
        "Jason started with 20 lollipops. Then he had 12 after giving some to Denny. So he gave Denny 20 - 12 = 8.",
        "8",
    ),
    (
        "Shawn has five toys. For Christmas, he got two toys each from his mom and dad. How many toys does he have "
        "now?",
        "Shawn started with 5 toys. If he got 2 toys each from his mom and dad, then that is 4 more toys. "
        "5 + 4 = 9.",
        "9",
    ),
    (
        "There were nine computers in the server room. Five more computers were installed each day, from monday to "
        "thursday. How many computers are now in the server room?",
        "There were originally 9 computers. For each of 4 days, 5 more computers were added. So 5 * 4 = 20 "
        "computers were added. 9 + 20 is 29.",
        "29",
    ),
    (
        "Michael had 58 golf balls. On tuesday, he lost 23 golf balls. On wednesday, he lost 2 more. How many golf "
        "balls did he have at the end of wednesday?",
        "Michael started with 58 golf balls. After losing 23 on tuesday, he had 58 - 23 = 35. After losing 2 more, "
        "he had 35 - 2 = 33 golf balls.",
        "33",
    ),
    (
        "Olivia has $23. She bought five bagels for $3 each. How much money does she have left?",
        "Olivia had 23 dollars. 5 bagels for 3 dollars each will be 5 x 3 = 15 dollars. So she has 23 - 15 dollars "
        "left. 23 - 15 is 8.",
        "8",
    ),
]


def messages(
    example: Example, few_shot: int = 0, seed: int = 0, system_prompt: str | None = SYSTEM_PROMPT
) -> list[dict]:
    """Chat turns for one example: system (unless None), `few_shot` exemplar pairs, then the question.

    >>> ex = Example(question="What is 2 + 3?", answer="5", index=0)
    >>> [m["role"] for m in messages(ex, few_shot=1, seed=0)]
    ['system', 'user', 'assistant', 'user']
    """
    if not 0 <= few_shot <= len(FEWSHOT_EXEMPLARS):
        raise UserError(f"few_shot must be between 0 and {len(FEWSHOT_EXEMPLARS)}, got {few_shot}")
    turns = [] if system_prompt is None else [{"role": "system", "content": system_prompt}]
    rng = random.Random(f"{seed}:{example.index}")
    for i in rng.sample(range(len(FEWSHOT_EXEMPLARS)), few_shot):
        question, reasoning, answer = FEWSHOT_EXEMPLARS[i]
        turns.append({"role": "user", "content": question})
        turns.append({"role": "assistant", "content": XML_LAYOUT.format(reasoning=reasoning, answer=answer)})
    turns.append({"role": "user", "content": example.question})
    return turns


def plain_layout(turns: list[dict]) -> str:
    """The fallback text layout for tokenizers without a chat template, ending in an open assistant turn.

    >>> plain_layout([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}])
    'System: Be brief.\\n\\nUser: Hi?\\n\\nAssistant:'
    """
    return "".join(f"{t['role'].capitalize()}: {t['content'].strip()}\n\n" for t in turns) + "Assistant:"


def render(
    examples: list[Example],
    tokenizer,
    max_prompt_tokens: int,
    few_shot: int = 0,
    seed: int = 0,
    system_prompt: str | None = SYSTEM_PROMPT,
) -> PromptBatch:
    """Chat-template, tokenize (no extra special tokens), keep each prompt's last `max_prompt_tokens` tokens,
    and left-pad with the pad token (eos when there is none). `texts` holds the rendered prompts before truncation.
    An example with its own `prompt` (TRL's column) uses it instead of the system prompt, few-shot turns and
    question: a conversation is chat-templated as it is, a string is the text as it is.
    """
    if max_prompt_tokens < 1:
        raise UserError(f"max_prompt_tokens must be at least 1, got {max_prompt_tokens}")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise UserError("the tokenizer has neither a pad token nor an eos token; pick a model that has one")
    texts = []
    for example in examples:
        if isinstance(example.prompt, str):  # TRL's standard format: the model's input as is
            texts.append(example.prompt)
            continue
        turns = list(example.prompt) if example.prompt else messages(example, few_shot, seed, system_prompt)
        if getattr(tokenizer, "chat_template", None):
            texts.append(tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True))
        else:
            texts.append(plain_layout(turns))
    tokenized = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    rows = [ids[-max_prompt_tokens:] for ids in tokenized]  # keep the tail: the question sits at the end
    width = max((len(ids) for ids in rows), default=0)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # [P, Tp]
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)  # [P, Tp]
    for r, ids in enumerate(rows):
        input_ids[r, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)  # [len(ids)] into row r's tail
        attention_mask[r, width - len(ids) :] = 1  # [len(ids)]
    return PromptBatch(
        examples=tuple(examples), texts=tuple(texts), input_ids=input_ids, attention_mask=attention_mask
    )
