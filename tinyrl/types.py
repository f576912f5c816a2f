"""The frozen records that stages pass to each other. Shapes: P prompts, G group, T tokens, V vocab, D dim."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Example:
    """One task problem."""

    question: str  # the user-facing question text (the memory key)
    answer: str  # gold answer: for GSM8K the text after the first '####', stripped
    index: int  # row number in its source, for resume and per-example logs


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
    """Rewards for every completion: each component under its own name, and their sum."""

    components: dict[str, torch.Tensor]  # name -> [P*G] float
    correct: torch.Tensor  # [P*G] bool, extracted answer matched the gold answer

    @property
    def total(self) -> torch.Tensor:
        """[P*G] float: the sum of the components, each weight 1."""
        return torch.stack(list(self.components.values())).sum(0)


@dataclass(frozen=True)
class TrainBatch:
    """What the policy-gradient update needs: prompt+completion tokens and one advantage per completion."""

    input_ids: torch.Tensor  # [N, Tp+Tc] long, N = P*G
    attention_mask: torch.Tensor  # [N, Tp+Tc] long
    completion_mask: torch.Tensor  # [N, Tc] float
    advantages: torch.Tensor  # [N] float


@dataclass(frozen=True)
class StepResult:
    """What one GRPO update did."""

    loss: float  # summed over micro-batches
    kl: float  # mean KL per completion
    grad_norm: float  # before clipping (inf or nan when the step was skipped)
    skipped: bool  # loss or gradient not finite: nothing was applied
    scale: float = 1.0  # the fp16 loss scale after this update (1.0 without one)
