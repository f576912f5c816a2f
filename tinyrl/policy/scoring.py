"""Scoring: the log-prob of each completion token under the policy and under the reference (the same weights, the
adapter off), at a given temperature, the LM head `chunk` rows at a time.

Owns `completion_logprobs`, `reference_logprobs` and their parts: `_TokenLogprob` (the chunk's hand-written
backward: one fp32 logits block), `completion_hidden` (the rows of a group run their shared prompt once, where
`share_scoring` and `can_share_prompt` allow). Imports torch, tinyrl.hub (what the installed transformers can do)
and policy.model.
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torch.utils.checkpoint import checkpoint

from tinyrl import hub
from tinyrl.policy.model import _cache_keyword, causal_lm, positions


def _logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
            temperature: float) -> torch.Tensor:
    """The head's fp32 logits over the temperature, divided in place: still one fp32 block."""
    logits = torch.nn.functional.linear(hidden, weight, bias).float()  # [c, Tc, V] fp32
    return logits.div_(temperature) if temperature != 1.0 else logits  # [c, Tc, V]


def _logprob_and_lse(hidden, weight, bias, targets, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """log softmax(logits / T)[target] and logsumexp(logits / T), holding one fp32 block: exp runs in place."""
    logits = _logits(hidden, weight, bias, temperature)  # [c, Tc, V]
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # [c, Tc]
    top = logits.amax(-1, keepdim=True)  # [c, Tc, 1]
    lse = logits.sub_(top).exp_().sum(-1).log_().add_(top.squeeze(-1))  # [c, Tc]
    return picked - lse, lse


class _TokenLogprob(torch.autograd.Function):
    """The log-prob of each target token under the LM head at temperature T, log softmax(logits / T)[target],
    with a hand-written backward. Scored at the sampling temperature, these are the log-probs of the distribution
    the completions were drawn from (as current TRL does).

    Autograd through gather - logsumexp keeps 16 B per logit alive in backward (the fp32 logits, logsumexp's
    softmax, and a gradient from each branch before they are summed). Here forward saves only the logsumexp,
    and backward recomputes the logits once and turns them into their gradient in place,
    d logp / d logits = (onehot(target) - softmax(logits / T)) / T: one fp32 block, 4 B per logit (plus a 16-bit
    copy of it when the head is 16-bit). budget.logprob_bytes counts the same."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature=1.0):
        logp, lse = _logprob_and_lse(hidden, weight, bias, targets, temperature)
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.temperature = temperature
        return logp  # [c, Tc]

    @staticmethod
    def backward(ctx, grad):  # grad: [c, Tc]
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        g = _logits(hidden, weight, bias, ctx.temperature)  # [c, Tc, V] recomputed, over T
        if ctx.temperature != 1.0:
            grad = grad / ctx.temperature  # [c, Tc]: the 1/T of d (logits / T) / d logits, before it spans V
        g.sub_(lse.unsqueeze(-1)).exp_().mul_(-grad.unsqueeze(-1))  # -grad * softmax
        g.scatter_add_(-1, targets.unsqueeze(-1), grad.unsqueeze(-1))  # + grad at the target
        g = g.to(hidden.dtype)
        grad_hidden = g @ weight if ctx.needs_input_grad[0] else None  # [c, Tc, D]
        grad_weight = g.flatten(0, -2).T @ hidden.flatten(0, -2) if ctx.needs_input_grad[1] else None
        grad_bias = g.flatten(0, -2).sum(0) if bias is not None and ctx.needs_input_grad[2] else None
        return grad_hidden, grad_weight, grad_bias, None, None


def _plain_linear(head: torch.nn.Module) -> bool:
    """A torch Linear with a plain weight, whose forward nobody replaced or hooked (a quantised, adapted or
    hooked head is scored as a module, through autograd)."""
    return (type(head) is torch.nn.Linear and type(head.weight) is torch.nn.Parameter and "forward" not in vars(head)
            and not head._forward_hooks and not head._forward_pre_hooks)


def _token_logprobs(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor,
                    temperature: float = 1.0) -> torch.Tensor:
    """The general path, for heads that are not a plain Linear: autograd through gather - logsumexp of
    logits / T. Not in place: a head's last op may keep its output for backward."""
    logits = head(hidden).float()  # [c, Tc, V] fp32
    if temperature != 1.0:
        logits = logits / temperature  # [c, Tc, V]
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)  # [c, Tc]


def completion_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, n_completion: int,
                        chunk: int, temperature: float = 1.0) -> torch.Tensor:
    """Log-prob of each completion token under softmax(logits / temperature), computing the LM head `chunk` rows
    at a time. Scored at the sampling temperature, these are the log-probs of the distribution the completions
    were drawn from (as current TRL does); 1.0 scores the model's own softmax.

    Only completion positions go through the LM head, and each chunk's logits are recomputed in backward, so the
    full [B, T, V] fp32 logits never exist: the peak is one [chunk, Tc, V] fp32 block (`_TokenLogprob`).
    Rows that share a prompt run it once (`completion_hidden`).
    """
    causal = causal_lm(model)
    hidden = completion_hidden(causal.get_decoder(), input_ids, attention_mask, n_completion)  # [B, Tc, H]
    head = causal.get_output_embeddings()
    targets = input_ids[:, -n_completion:]  # [B, Tc]
    plain = _plain_linear(head)
    rows = []
    for s in range(0, input_ids.shape[0], chunk):
        h, t = hidden[s:s + chunk], targets[s:s + chunk]
        if plain:  # without grad (the reference pass) only its forward runs and nothing is kept
            rows.append(_TokenLogprob.apply(h, head.weight, head.bias, t, temperature))  # [c, Tc]
        elif torch.is_grad_enabled():
            rows.append(checkpoint(_token_logprobs, head, h, t, temperature, use_reentrant=False))  # [c, Tc]
        else:
            rows.append(_token_logprobs(head, h, t, temperature))  # [c, Tc]
    return torch.cat(rows)  # [B, Tc]


def completion_hidden(decoder, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      n_completion: int) -> torch.Tensor:
    """The decoder's last hidden state before each completion token: [B, Tc, H].

    The G rows of a GRPO group repeat one prompt. Their distinct prompts (all but the last token) run through the
    decoder once, and every row's completion attends to its prompt's keys and values (`_prompt_kv_class`). That is
    exactly the per-row computation, gradients included: a prompt's K/V feed all its rows, so backward sums them.
    It saves (G-1)/G of the prompt tokens' compute and activations, forward and backward.
    """
    n_prefix = input_ids.shape[1] - n_completion - 1  # prompt tokens that only feed the cache
    position_ids = positions(attention_mask)  # [B, T]
    unique = owner = None
    if n_prefix >= 1 and share_scoring(input_ids.device) and can_share_prompt(decoder):
        prefix = torch.cat([input_ids[:, :n_prefix], attention_mask[:, :n_prefix]], -1)  # [B, 2*n_prefix]
        unique, owner = torch.unique(prefix, dim=0, return_inverse=True)  # [k, 2*n_prefix], [B]
    if unique is None or len(unique) == len(input_ids):  # nothing to share
        hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=False).last_hidden_state  # [B, T, H]
        return hidden[:, -n_completion - 1:-1]  # [B, Tc, H]
    first = torch.empty(len(unique), dtype=torch.long, device=owner.device)
    first.scatter_(0, owner, torch.arange(len(owner), device=owner.device))  # [k] a row holding each prompt
    kv, keyword = _prompt_kv_class()(), _cache_keyword(type(decoder))
    with _cache_through_checkpoints(decoder):
        decoder(input_ids=input_ids[first, :n_prefix], attention_mask=attention_mask[first, :n_prefix],
                position_ids=position_ids[first, :n_prefix], use_cache=False, **{keyword: kv})
        return decoder(input_ids=input_ids[:, n_prefix:-1], attention_mask=attention_mask[:, :-1],
                       position_ids=position_ids[:, n_prefix:-1], use_cache=False,
                       **{keyword: kv.for_rows(owner)}).last_hidden_state  # [B, Tc, H]


def share_scoring(device: torch.device) -> bool:
    """Whether training runs a group's shared prompt once on this device (budget.estimate plans the same way).

    On a CPU, compute is the cost: sharing saves (G-1)/G of the prompt tokens' work. On CUDA, scoring a
    micro-batch of a small model is bound by kernel launches, and the prompt's own decoder call doubles them: on an
    H200, the training phase took 1.5-1.7x as long with sharing as without, for 2-6 % less training memory (rows of
    equal settings in bench/results/budget_gpu.json, with sharing, and budget_gpu_2026-11-25.json, without). So
    CUDA scores every row whole. Generation shares the prompt's prefill on every device."""
    return device.type != "cuda"


@functools.lru_cache(maxsize=None)
def _prompt_kv_class():
    """A KV cache that never changes what it holds, so a gradient-checkpoint replay of a layer sees the same keys
    and values as the first pass. Empty, it records each layer's prompt K/V once (a replay's recomputed copies are
    not kept); `for_rows(owner)` gives a cache that
    answers each layer with row `owner[i]`'s prompt K/V followed by the new tokens'."""
    from transformers import DynamicCache

    class PromptKV(DynamicCache):
        def __init__(self, kv=None, owner=None):
            super().__init__()
            self.kv, self.owner = kv if kv is not None else {}, owner
            for layer, (k, v) in sorted(self.kv.items()):  # a [1, 1, Tp, d] slice sizes the attention mask
                DynamicCache.update(self, k[:1, :1].detach(), v[:1, :1].detach(), layer)

        def update(self, key_states, value_states, layer_idx, *args, **kwargs):
            if self.owner is None:  # the prompt pass: record once (a checkpoint replay recomputes the same
                self.kv.setdefault(layer_idx, (key_states, value_states))  # states; the first ones stay)
                return key_states, value_states
            k, v = self.kv[layer_idx]  # [k, h, Tp, d]
            return torch.cat([k[self.owner], key_states], -2), torch.cat([v[self.owner], value_states], -2)

        def for_rows(self, owner):
            return PromptKV(self.kv, owner)

    return PromptKV


@functools.lru_cache(maxsize=None)
def prompt_sharing_available() -> bool:
    """Whether the installed transformers has the per-layer switch that keeps a read-only cache through gradient
    checkpointing (`GradientCheckpointingLayer._can_checkpoint_with_cache`). Read from its source rather than
    imported, so the planner can ask in a blink."""
    return "_can_checkpoint_with_cache" in hub.transformers_source("modeling_layers.py")


def can_share_prompt(decoder) -> bool:
    """Prompt sharing needs plain full attention in every layer (no sliding windows) and transformers' per-layer
    switch that keeps a read-only cache through a gradient checkpoint (`prompt_sharing_available`)."""
    if not prompt_sharing_available():
        return False
    cfg = decoder.config  # the same rule as budget.full_attention, which plans for it
    if set(getattr(cfg, "layer_types", None) or ["full_attention"]) != {"full_attention"}:
        return False
    if getattr(cfg, "sliding_window", None) is not None and getattr(cfg, "use_sliding_window", None) is not False:
        return False
    layers = [m for m in decoder.modules() if m is not decoder and getattr(m, "gradient_checkpointing", False)]
    if not layers:  # not checkpointed, or checkpointed by the decoder's own loop (older transformers): no switch
        return not getattr(decoder, "gradient_checkpointing", False)
    return all(hasattr(m, "_can_checkpoint_with_cache") for m in layers)


@contextlib.contextmanager
def _cache_through_checkpoints(decoder):
    """transformers drops the cache of a checkpointed layer unless the layer says the cache is read-only."""
    layers = [m for m in decoder.modules() if hasattr(m, "_can_checkpoint_with_cache")]
    for layer in layers:
        layer._can_checkpoint_with_cache = True
    try:
        yield
    finally:
        for layer in layers:
            del layer._can_checkpoint_with_cache  # back to the class default


def reference_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, n_completion: int,
                       chunk: int, temperature: float = 1.0) -> torch.Tensor:
    """Log-probs under the reference policy: the same weights with the LoRA adapter switched off, scored at the
    same temperature as the policy's (`completion_logprobs`), so the KL compares like with like."""
    with torch.no_grad(), model.disable_adapter():
        return completion_logprobs(model, input_ids, attention_mask, n_completion, chunk, temperature)  # [B, Tc]
