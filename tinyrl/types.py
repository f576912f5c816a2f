"""The frozen records that stages pass to each other. Shapes: P prompts, G group, T tokens, V vocab, D dim."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class Example:
    """One task problem."""

    question: str  # the user-facing question text (the memory key)
    answer: str  # gold answer: for GSM8K the text after the first '####', stripped
    index: int  # row number in its source, for resume and per-example logs
    prompt: Any = None  # TRL's `prompt` column when the data has one: a string, or a tuple of {role, content} turns
    columns: dict = field(default_factory=dict, compare=False, repr=False)  # the row's columns, for reward functions


@dataclass(frozen=True)
class PromptBatch:
    """P rendered, tokenized, left-padded and left-truncated prompts."""

    examples: tuple[Example, ...]  # P
    texts: tuple[str, ...]  # P rendered prompts (chat template applied)
    input_ids: torch.Tensor  # [P, Tp] long, left-padded
    attention_mask: torch.Tensor  # [P, Tp] long


@dataclass(frozen=True)
class Rollouts:
    """G sampled completions per prompt, row r belongs to prompt r // G."""

    prompts: PromptBatch
    group_size: int  # G
    completion_ids: torch.Tensor  # [P*G, Tc] long, pad after the first EOS
    completion_mask: torch.Tensor  # [P*G, Tc] float, 1 up to and including the first EOS
    completions: tuple[str, ...]  # P*G decoded texts, special tokens removed
    truncated: torch.Tensor  # [P*G] bool, no EOS within the token cap


@dataclass(frozen=True)
class Scored:
    """Rewards for every completion: each component under its own name, and their weighted sum."""

    components: dict[str, torch.Tensor]  # name -> [P*G] float; NaN: that function had no opinion (TRL's None)
    correct: torch.Tensor  # [P*G] bool, the task's success signal (the gold answer matched, by default)
    weights: dict[str, float] = field(default_factory=dict)  # name -> weight; 1 when absent

    @property
    def total(self) -> torch.Tensor:
        """[P*G] float: the sum of the components times their weights, a NaN counting as 0 (TRL's nansum)."""
        stacked = torch.stack([v * self.weights[k] if k in self.weights else v
                               for k, v in self.components.items()])
        return stacked.nansum(0) if stacked.isnan().any() else stacked.sum(0)


@dataclass(frozen=True)
class TrainBatch:
    """What the policy-gradient update needs: prompt+completion tokens and one advantage per completion."""

    input_ids: torch.Tensor  # [N, Tp+Tc] long, N = P*G
    attention_mask: torch.Tensor  # [N, Tp+Tc] long
    completion_mask: torch.Tensor  # [N, Tc] float
    advantages: torch.Tensor  # [N] float
    loss_mask: torch.Tensor | None = None  # [N, Tc] float: the tokens the loss counts (default completion_mask)


@dataclass(frozen=True)
class StepResult:
    """What one GRPO update did."""

    loss: float  # summed over micro-batches
    kl: float  # mean KL per completion
    grad_norm: float  # before clipping (inf or nan when the step was skipped)
    skipped: bool  # loss or gradient not finite: nothing was applied
    scale: float = 1.0  # the fp16 loss scale after this update (1.0 without one)
