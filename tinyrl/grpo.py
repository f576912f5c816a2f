"""GRPO math: group advantages, the per-token loss with the k3 KL, and the learning-rate schedule. Pure functions."""

from __future__ import annotations

import math

import torch

from tinyrl.types import Rollouts, TrainBatch


def advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-4) -> torch.Tensor:
    """(r - mean_G) / (std_G + eps) within each group of G completions, unbiased std.

    Group [1, 2, 3]: mean 2, std 1, so advantages are about [-1, 0, 1]:
    >>> [round(a, 4) for a in advantages(torch.tensor([1., 2., 3., 5., 5., 5.]), 3).tolist()]
    [-0.9999, 0.0, 0.9999, 0.0, 0.0, 0.0]
    """
    grouped = rewards.view(-1, group_size)  # [P, G]
    mean = grouped.mean(-1, keepdim=True)  # [P, 1]
    std = grouped.std(-1, keepdim=True)  # [P, 1] unbiased
    return ((grouped - mean) / (std + eps)).view(-1)  # [P*G]


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k3 estimator of KL(policy || reference) per token: exp(ref - logp) - (ref - logp) - 1 (>= 0).

    >>> round(kl_k3(torch.tensor([0.0]), torch.tensor([-1.0])).item(), 6)  # e^-1 + 1 - 1
    0.367879
    """
    delta = ref_logp - logp  # [N, Tc]
    return torch.exp(delta) - delta - 1  # [N, Tc]


def loss(logp: torch.Tensor, ref_logp: torch.Tensor | None, adv: torch.Tensor, mask: torch.Tensor, beta: float,
         n_total: int) -> tuple[torch.Tensor, torch.Tensor]:
    """GRPO loss for a micro-batch, scaled so summing over micro-batches gives the mean over all n_total completions.

    Per token -(A * exp(logp - logp.detach()) - beta * KL); mean over each completion's tokens (mask: up to and
    including the first EOS), then mean over completions. Returns (loss, per-completion mean KL [N], detached).
    """
    ratio = torch.exp(logp - logp.detach())  # [N, Tc] == 1, carries the gradient of logp
    per_token = -(adv.unsqueeze(-1) * ratio)  # [N, Tc]
    if ref_logp is not None and beta:
        kl = kl_k3(logp, ref_logp)  # [N, Tc]
        per_token = per_token + beta * kl
    else:
        kl = torch.zeros_like(logp)  # [N, Tc]
    lengths = mask.sum(-1).clamp(min=1)  # [N]
    per_completion = (per_token * mask).sum(-1) / lengths  # [N]
    kl_completion = ((kl * mask).sum(-1) / lengths).detach()  # [N]
    return per_completion.sum() / n_total, kl_completion


def train_batch(rollouts: Rollouts, adv: torch.Tensor) -> TrainBatch:
    """Join each prompt (repeated G times) with its completions; pad after EOS is masked out of attention."""
    g = rollouts.group_size
    prompt_ids = rollouts.prompts.input_ids.repeat_interleave(g, 0)  # [N, Tp]
    prompt_mask = rollouts.prompts.attention_mask.repeat_interleave(g, 0)  # [N, Tp]
    input_ids = torch.cat([prompt_ids, rollouts.completion_ids], 1)  # [N, Tp+Tc]
    attention = torch.cat([prompt_mask, rollouts.completion_mask.long()], 1)  # [N, Tp+Tc]
    return TrainBatch(input_ids=input_ids, attention_mask=attention, completion_mask=rollouts.completion_mask,
                      advantages=adv)


def lr_at(step: int, total: int, peak: float, warmup_ratio: float) -> float:
    """Linear warm-up over warmup_ratio * total steps, then cosine decay to 0. `step` counts from 0.

    Ten steps, two of warm-up: 0, 0.5, then 1.0 decaying to 0.5 halfway through the remaining eight.
    >>> [round(lr_at(s, 10, 1.0, 0.2), 3) for s in (0, 1, 2, 6, 10)]
    [0.0, 0.5, 1.0, 0.5, 0.0]
    """
    warmup = int(math.ceil(warmup_ratio * total))
    if step < warmup:
        return peak * step / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
