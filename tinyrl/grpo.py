"""GRPO math: group advantages and their scaling, the clipped per-token loss with the k3 KL and its normalisations
(grpo, dr_grpo, dapo, bnpo; token- or sequence-level ratios), and the learning-rate schedule. Pure functions."""

from __future__ import annotations

import math

import torch

from tinyrl.types import PromptBatch, Rollouts, Scored, TrainBatch


SCALES = ("group", "batch", "none")  # what divides (r - group mean): the group's std, the batch's, or nothing
LOSSES = ("grpo", "dr_grpo", "dapo", "bnpo")  # how the per-token terms are normalised (`normalise`)
LEVELS = ("token", "sequence")  # the importance ratio per token (PPO, GRPO) or per completion (GSPO)


def advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-4, scale: str = "group") -> torch.Tensor:
    """(r - mean_G) / (std + eps): std of each group (`group`, the paper's), of the whole batch (`batch`), or no
    division (`none`, Dr. GRPO); unbiased std, as TRL.

    Group [1, 2, 3]: mean 2, std 1, so advantages are about [-1, 0, 1]:
    >>> [round(a, 4) for a in advantages(torch.tensor([1., 2., 3., 5., 5., 5.]), 3).tolist()]
    [-0.9999, 0.0, 0.9999, 0.0, 0.0, 0.0]
    >>> advantages(torch.tensor([1., 2., 3., 5., 5., 5.]), 3, scale="none").tolist()
    [-1.0, 0.0, 1.0, 0.0, 0.0, 0.0]
    """
    grouped = rewards.view(-1, group_size)  # [P, G]
    centred = grouped - grouped.mean(-1, keepdim=True)  # [P, G]
    if scale == "none":
        return centred.view(-1)  # [P*G]
    std = grouped.std(-1, keepdim=True) if scale == "group" else rewards.std()  # [P, 1] or []
    return (centred / (std + eps)).view(-1)  # [P*G]


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k3 estimator of KL(policy || reference) per token: exp(ref - logp) - (ref - logp) - 1 (>= 0).

    >>> round(kl_k3(torch.tensor([0.0]), torch.tensor([-1.0])).item(), 6)  # e^-1 + 1 - 1
    0.367879
    """
    delta = ref_logp - logp  # [N, Tc]
    return torch.exp(delta) - delta - 1  # [N, Tc]


def ratio(logp: torch.Tensor, old_logp: torch.Tensor | None, mask: torch.Tensor, level: str = "token"
          ) -> torch.Tensor:
    """The importance ratio pi / pi_old: per token [N, Tc], or per completion [N, 1] (GSPO: the exp of the mean
    log-ratio over its tokens). Without `old_logp` (one update per generated batch) it is 1 and carries the
    gradient of logp."""
    log_ratio = logp - (logp.detach() if old_logp is None else old_logp)  # [N, Tc]
    if level == "sequence":
        log_ratio = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1)).unsqueeze(-1)  # [N, 1]
    return torch.exp(log_ratio)


def clipped_objective(coef: torch.Tensor, adv: torch.Tensor, eps_low: float, eps_high: float) -> torch.Tensor:
    """Per token -min(r A, clip(r, 1 - eps_low, 1 + eps_high) A), PPO's clipped surrogate ([N, Tc] or [N, 1]).

    A ratio past the clip on the side its advantage pushes gets no gradient:
    >>> clipped_objective(torch.tensor([[1.5], [1.5], [0.5]]), torch.tensor([1.0, -1.0, -1.0]), 0.2, 0.2).tolist()
    [[-1.2000000476837158], [1.5], [0.800000011920929]]
    """
    a = adv.unsqueeze(-1)  # [N, 1]
    return -torch.min(coef * a, torch.clamp(coef, 1 - eps_low, 1 + eps_high) * a)


def normalise(per_token: torch.Tensor, mask: torch.Tensor, kind: str, n_total: int, tokens_total: int,
              max_len: int) -> torch.Tensor:
    """A micro-batch's share of the step's loss, so that summing over micro-batches gives the whole batch's:
    `grpo` each completion's token mean, then the mean over the N completions (the paper's, TRL's `grpo`);
    `dapo` and `bnpo` the sum over every token / the step's completion tokens (DAPO's token-level mean; TRL's
    `bnpo` takes the tokens of one device batch, which is this with one micro-batch per step);
    `dr_grpo` the sum / (N x max_new_tokens), a constant (Dr. GRPO: no length bias)."""
    masked = per_token * mask  # [b, Tc]
    if kind == "grpo":
        return (masked.sum(-1) / mask.sum(-1).clamp(min=1)).sum() / n_total
    if kind in ("dapo", "bnpo"):
        return masked.sum() / max(1, tokens_total)
    if kind == "dr_grpo":
        return masked.sum() / (n_total * max_len)
    raise ValueError(f"loss {kind!r}: choose one of {', '.join(LOSSES)}")


def loss(logp: torch.Tensor, ref_logp: torch.Tensor | None, adv: torch.Tensor, mask: torch.Tensor, beta: float,
         n_total: int, kind: str = "grpo", old_logp: torch.Tensor | None = None, eps: tuple[float, float] = (0.2, 0.2),
         level: str = "token", tokens_total: int = 0, max_len: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The GRPO loss of a micro-batch, scaled so summing over micro-batches gives the whole step's (`normalise`).

    Per token the clipped surrogate of the ratio to the generating policy (`ratio`; exactly -A x 1 with its
    gradient when it is the generating policy itself) plus beta x k3 KL to the reference; mask: up to and including
    the first EOS. Returns (loss, per-completion mean KL [N], detached).
    """
    per_token = clipped_objective(ratio(logp, old_logp, mask, level), adv, *eps)  # [N, Tc] or [N, 1]
    if ref_logp is not None and beta:
        kl = kl_k3(logp, ref_logp)  # [N, Tc]
        per_token = per_token + beta * kl
    else:
        kl = torch.zeros_like(logp)  # [N, Tc]
    per_token = per_token.expand_as(mask)  # a sequence-level term counts at each of its tokens, as in TRL
    lengths = mask.sum(-1).clamp(min=1)  # [N]
    kl_completion = ((kl * mask).sum(-1) / lengths).detach()  # [N]
    return normalise(per_token, mask, kind, n_total, tokens_total, max_len), kl_completion


def clip_counts(coef: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor, eps: tuple[float, float]
                ) -> tuple[int, int, int]:
    """(clipped low, clipped high, out of), as TRL's clip_ratio: a ratio below 1 - eps_low with a negative
    advantage, or above 1 + eps_high with a positive one; counted over the masked tokens (token-level ratios) or
    over the completions (sequence-level: one ratio each). Sums over micro-batches give the step's shares."""
    a = adv.unsqueeze(-1)  # [N, 1]
    low, high = (coef < 1 - eps[0]) & (a < 0), (coef > 1 + eps[1]) & (a > 0)  # [N, Tc] or [N, 1]
    if coef.shape[-1] == 1:
        return int(low.sum()), int(high.sum()), coef.shape[0]
    on = mask.bool()
    return int((low & on).sum()), int((high & on).sum()), int(on.sum())


def informative(correct: torch.Tensor, group_size: int) -> torch.Tensor:
    """[P] bool: the groups whose success signal is not the same for every completion (dynamic sampling keeps them).

    >>> informative(torch.tensor([True, False, True, True, False, False]), 2).tolist()
    [True, False, False]
    """
    grouped = correct.view(-1, group_size)  # [P, G]
    return grouped.any(-1) & ~grouped.all(-1)


def join(parts: list[tuple[Rollouts, Scored, torch.Tensor]]) -> tuple[Rollouts, Scored]:
    """The kept groups ([P] bool each) of several generated batches as one: prompts left-padded and completions
    right-padded to the widest (padding masked out), in the order drawn."""
    g = parts[0][0].group_size
    tp = max(r.prompts.input_ids.shape[1] for r, _, _ in parts)
    tc = max(r.completion_ids.shape[1] for r, _, _ in parts)
    pad = torch.nn.functional.pad
    cols: dict[str, list] = {k: [] for k in ("examples", "texts", "ids", "mask", "cids", "cmask", "texts_c", "cut",
                                             "correct")}
    components: dict[str, list] = {k: [] for k in parts[0][1].components}
    for r, s, keep in parts:
        rows = keep.repeat_interleave(g)  # [P*G]
        cols["examples"] += [ex for ex, k in zip(r.prompts.examples, keep.tolist()) if k]
        cols["texts"] += [t for t, k in zip(r.prompts.texts, keep.tolist()) if k]
        cols["ids"].append(pad(r.prompts.input_ids[keep], (tp - r.prompts.input_ids.shape[1], 0)))
        cols["mask"].append(pad(r.prompts.attention_mask[keep], (tp - r.prompts.input_ids.shape[1], 0)))
        cols["cids"].append(pad(r.completion_ids[rows], (0, tc - r.completion_ids.shape[1])))
        cols["cmask"].append(pad(r.completion_mask[rows], (0, tc - r.completion_ids.shape[1])))
        cols["texts_c"] += [t for t, k in zip(r.completions, rows.tolist()) if k]
        cols["cut"].append(r.truncated[rows])
        cols["correct"].append(s.correct[rows])
        for k in components:
            components[k].append(s.components[k][rows])
    prompts = PromptBatch(tuple(cols["examples"]), tuple(cols["texts"]), torch.cat(cols["ids"]),
                          torch.cat(cols["mask"]))
    rollouts = Rollouts(prompts, g, torch.cat(cols["cids"]), torch.cat(cols["cmask"]), tuple(cols["texts_c"]),
                        torch.cat(cols["cut"]))
    scored = Scored({k: torch.cat(v) for k, v in components.items()}, torch.cat(cols["correct"]), parts[0][1].weights)
    return rollouts, scored


def train_batch(rollouts: Rollouts, adv: torch.Tensor, mask_truncated: bool = False) -> TrainBatch:
    """Join each prompt (repeated G times) with its completions; pad after EOS is masked out of attention. With
    `mask_truncated`, completions without an EOS are left out of the loss (their tokens still attend)."""
    g = rollouts.group_size
    prompt_ids = rollouts.prompts.input_ids.repeat_interleave(g, 0)  # [N, Tp]
    prompt_mask = rollouts.prompts.attention_mask.repeat_interleave(g, 0)  # [N, Tp]
    input_ids = torch.cat([prompt_ids, rollouts.completion_ids], 1)  # [N, Tp+Tc]
    attention = torch.cat([prompt_mask, rollouts.completion_mask.long()], 1)  # [N, Tp+Tc]
    loss_mask = rollouts.completion_mask * (~rollouts.truncated).unsqueeze(-1) if mask_truncated else None  # [N, Tc]
    return TrainBatch(input_ids=input_ids, attention_mask=attention, completion_mask=rollouts.completion_mask,
                      advantages=adv, loss_mask=loss_mask)


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
