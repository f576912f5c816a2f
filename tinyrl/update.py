"""The update phase of a step, wired from grpo (the loss) and policy (log-probs): the loss and backward over
micro-batches, then the clipped optimizer step. loop.py calls it once per step; tests and benches call
`train_step` directly."""

from __future__ import annotations

import math

import torch

from tinyrl import grpo, meter, policy
from tinyrl.config import Config
from tinyrl.types import StepResult, TrainBatch

SKIP_ZERO_ADVANTAGE = True  # tests turn it off to check that skipping changes no bit of the update


def train_step(model, optimizer, batch: TrainBatch, cfg: Config, device, scaler=None) -> StepResult:
    """Loss and backward over micro-batches (`accumulate`: each trimmed to its longest prompt and completion, log-probs
    at the sampling temperature, fp16 loss scaled), then clip and step unless non-finite (`update`)."""
    loss, kl = accumulate(model, optimizer, batch, cfg, device, scaler)
    return update(optimizer, scaler, cfg.max_grad_norm, loss, kl)


def old_logprobs(model, batch: TrainBatch, cfg: Config, device) -> torch.Tensor:
    """[N, Tc] log-probs of every completion token under the policy as it is now, without grad: the denominators
    of the importance ratios when a generated batch is used for several updates (iterations > 1)."""
    temperature = cfg.temperature if cfg.score_at_temperature else 1.0
    out = torch.zeros(batch.completion_mask.shape, device=device)  # [N, Tc]
    with torch.no_grad():
        for s in range(0, batch.input_ids.shape[0], cfg.micro_batch):
            rows = slice(s, s + cfg.micro_batch)
            first, end, tc = _span(batch, rows)
            ids, attn = (batch.input_ids[rows, first:end].to(device), batch.attention_mask[rows, first:end].to(device))
            out[rows, :tc] = policy.completion_logprobs(model, ids, attn, tc, cfg.logprob_chunk,
                                                        temperature=temperature).float()
    return out


def _span(batch: TrainBatch, rows: slice) -> tuple[int, int, int]:
    """A micro-batch cut to its longest prompt and completion, read on the host copies: (first column, end column,
    completion tokens Tc)."""
    cmask = batch.completion_mask[rows]  # [b, Tc]
    tc, tp = int(cmask.sum(-1).max()), batch.input_ids.shape[1] - cmask.shape[1]
    attn = batch.attention_mask[rows, :tp]
    first = int(attn.sum(0).nonzero()[0]) if attn.any() else 0
    return first, tp + tc, tc


def accumulate(model, optimizer, batch: TrainBatch, cfg: Config, device, scaler=None, on_micro=None,
               old_logp: torch.Tensor | None = None, clips: list | None = None) -> tuple[float, float]:
    """Zero the gradients, then forward and backward every micro-batch: (summed loss, mean KL per completion).
    An out-of-memory retry repeats it: it changes no weight or optimizer state. `on_micro(done, total)` after each.
    At beta 0 a micro-batch whose advantages are all 0 adds exactly nothing, so it is not run (bit-for-bit).
    `old_logp` [N, Tc]: the ratio's denominators (iterations > 1); then `clips` gets the step's
    (clipped low, clipped high, out of) counts, once the pass completes."""
    n = batch.input_ids.shape[0]
    loss_mask = batch.completion_mask if batch.loss_mask is None else batch.loss_mask  # [N, Tc]
    tokens_total = int(loss_mask.sum())  # dapo / bnpo normalise by the step's tokens
    losses, kls, counts = [], [], []
    temperature = cfg.temperature if cfg.score_at_temperature else 1.0
    # backward sets the peak: in fp32 on CPU, handing the forward's freed heap back first lowers peak RSS by
    # ~150 MB at no measured cost (in bf16 it lowered nothing; docs/memory.md)
    trim = device.type == "cpu" and policy.causal_lm(model).dtype == torch.float32
    optimizer.zero_grad(set_to_none=True)
    # the batch goes to the device once, and the loss and KL come back once: each crossing waits for the device
    on_device = [t.to(device) for t in (batch.input_ids, batch.attention_mask, loss_mask, batch.advantages)]
    for s in range(0, n, cfg.micro_batch):
        rows = slice(s, s + cfg.micro_batch)
        if SKIP_ZERO_ADVANTAGE and not cfg.kl_beta and not batch.advantages[rows].any():  # no gradient, no KL
            kls.append(torch.zeros(batch.advantages[rows].shape[0]))
            if on_micro is not None:
                on_micro(min(s + cfg.micro_batch, n), n)
            continue
        first, end, tc = _span(batch, rows)
        ids, attn, cmask, adv = (on_device[0][rows, first:end], on_device[1][rows, first:end],
                                 on_device[2][rows, :tc], on_device[3][rows])  # [b, T'], [b, T'], [b, tc], [b]
        ref = (policy.reference_logprobs(model, ids, attn, tc, cfg.logprob_chunk, temperature=temperature)
               if cfg.kl_beta else None)
        logp = policy.completion_logprobs(model, ids, attn, tc, cfg.logprob_chunk, temperature=temperature)  # [b, tc]
        old = None if old_logp is None else old_logp[rows, :tc]  # [b, tc]
        eps = (cfg.epsilon, cfg.epsilon_high)
        loss, kl = grpo.loss(logp, ref, adv, cmask, cfg.kl_beta, n, kind=cfg.loss, eps=eps, old_logp=old,
                             level=cfg.importance_level, tokens_total=tokens_total, max_len=cfg.max_new_tokens)
        if old is not None:
            ratio = grpo.ratio(logp.detach(), old, cmask, cfg.importance_level)
            counts.append(grpo.clip_counts(ratio, adv, cmask, eps))
        if trim:
            meter.release_freed()
        (scaler.scale(loss) if scaler else loss).backward()
        losses.append(loss.detach())
        kls.append(kl)
        if on_micro is not None:
            on_micro(min(s + cfg.micro_batch, n), n)
    if clips is not None:
        clips.extend(counts)
    if not losses:  # every micro-batch skipped: the zero gradient AdamW would have seen (momentum, decay still act)
        for p in (p for g in optimizer.param_groups for p in g["params"]):
            p.grad = torch.zeros_like(p)
    return float(torch.stack(losses).sum()) if losses else 0.0, float(torch.cat(kls).mean())


def update(optimizer, scaler, max_grad_norm: float, loss: float, kl: float) -> StepResult:
    """Unscale (fp16), clip, and step unless the loss or the gradient norm is not finite."""
    if scaler:
        scaler.unscale_(optimizer)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_grad_norm))
    finite = math.isfinite(loss) and math.isfinite(grad_norm)
    if finite:
        (scaler or optimizer).step(*([optimizer] if scaler else []))
    if scaler:
        scaler.update()  # halves the scale after inf/nan gradients, grows it after a run of good steps
    return StepResult(loss, kl, grad_norm, skipped=not finite, scale=scaler.get_scale() if scaler else 1.0)
