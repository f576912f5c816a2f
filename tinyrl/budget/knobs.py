"""The knobs: the memory-relevant settings the planner chooses, where it starts them and how far it moves them.

Owns Settings (one set of knobs; the names are Config fields), KNOBS and GIVEN, the paper's starting values
(PAPER, DEFAULT_LORA_RANK), the planner's limits (MIN_*, TOKENS_PER_MICRO, LOGPROB_CHUNK_MAX, MARGIN), the values a
knob can take (QUANTS, DTYPES with their bytes per element) and the candidate ladders (`_halvings`). Imports
nothing from tinyrl: every other part of the planner may import it.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

# Every constant is a documented assumption, checked by bench/budget.py (GPU) and bench/budget_cpu.py (CPU).

PAPER = {"group_size": 16, "prompts_per_step": 16, "max_prompt_tokens": 256, "max_new_tokens": 200}  # §6, GSM8K
DEFAULT_LORA_RANK = 16  # the rank the planner starts from; RL updates need little rank, so it may go lower
MIN_GROUP_SIZE = 4  # advantages are normalised within a group; below 4 completions they are mostly noise
MIN_LORA_RANK = 4  # the planner lowers the rank 16 -> 8 -> 4 and no further
MIN_NEW_TOKENS = 64  # the planner never shortens completions below this (a GSM8K answer needs ~100 tokens)
NEW_TOKENS_STEP = 8  # completions are shortened in steps of this many tokens
TOKENS_PER_MICRO = 4096  # micro-batch target: largest power of two with B*T <= this (more buys little speed)
LOGPROB_CHUNK_MAX = 4  # a [1, Tc, V] row is already a full-width matmul: more rows only save kernel launches
MARGIN = 0.05  # share of the card the planner leaves unplanned (drivers, other processes, estimation error)

QUANTS = ("4bit", "none")
DTYPES = {"bf16": 2, "fp16": 2, "fp32": 4}


@dataclass(frozen=True)
class Settings:
    """The memory-relevant knobs; the names are Config fields."""

    group_size: int = PAPER["group_size"]  # G completions per prompt
    prompts_per_step: int = PAPER["prompts_per_step"]  # P prompts per optimiser step
    gen_batch: int = 16  # Bg sequences in flight while generating (of P*G)
    micro_batch: int = 4  # B sequences per forward/backward
    logprob_chunk: int = 1  # rows of [rows, Tc, V] log-prob buffers alive at once (<= micro_batch)
    lora_rank: int = DEFAULT_LORA_RANK  # r
    quant: str = "4bit"  # "4bit": NF4 base linear layers; "none": whole model in the compute dtype
    dtype: str = "bf16"  # compute dtype: "bf16" | "fp16" | "fp32"
    grad_checkpointing: bool = True  # recompute each decoder layer in backward
    max_prompt_tokens: int = PAPER["max_prompt_tokens"]  # prompts are left-truncated to this
    max_new_tokens: int = PAPER["max_new_tokens"]  # completion cap Tc


KNOBS: tuple[str, ...] = tuple(f.name for f in fields(Settings))
# Config fields `plan` takes from the run as they are (its `base`): what the user asked for, not what fits
GIVEN = ("group_size", "prompts_per_step", "max_prompt_tokens", "max_new_tokens", "top_p", "kl_beta")


def _pow2_floor(n: int) -> int:
    return 1 << (max(1, n).bit_length() - 1)


def _halvings(n: int, floor: int) -> list[int]:
    """n, then powers of two below it, down to floor: 16 -> [16, 8, 4]; 12 -> [12, 8, 4]."""
    out = [n]
    x = _pow2_floor(n)
    if x == n:
        x //= 2
    while x >= floor:
        out.append(x)
        x //= 2
    return [v for v in out if v >= floor] or [floor]


def _gen_candidates(n_seq: int) -> list[int]:
    return _halvings(n_seq, 1)
