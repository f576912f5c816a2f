"""Generation: G completions per prompt, sampled with the KV cache, gen_batch sequences at a time.

Owns `generate` and its parts: `shared_prefill` (each distinct prompt prefilled once, its cache rows repeated),
`lay_out` (the cache preallocated at full length and written in place), `decode` (tinyrl's own eager decoding loop),
`next_tokens` (sampling by inverting the CDF, top-p), `lean_lora` (LoRA layers as lean closures while sampling),
`eos_ids` and `completion_mask`. On CUDA each decoding step is a replayed CUDA graph: its static step lives in
tinyrl.decoding, a leaf this module drives. Imports torch, tinyrl.decoding, tinyrl.types and policy.model.
"""

from __future__ import annotations

import contextlib
import functools

import torch

from tinyrl import decoding
from tinyrl.policy.model import cache_keyword, causal_lm, positions
from tinyrl.types import PromptBatch, Rollouts


def eos_ids(model, tokenizer) -> list[int]:
    ids = {tokenizer.eos_token_id}
    gen = getattr(model, "generation_config", None)
    extra = getattr(gen, "eos_token_id", None)
    ids.update(extra if isinstance(extra, list) else [extra])
    return sorted(i for i in ids if i is not None)


def completion_mask(ids: torch.Tensor, eos: list[int]) -> torch.Tensor:
    """1.0 for every token up to and including the first EOS, 0.0 after it.

    >>> completion_mask(torch.tensor([[5, 2, 7], [5, 6, 7]]), [2]).tolist()
    [[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]]
    """
    is_eos = torch.isin(ids, torch.tensor(eos, device=ids.device))  # [N, Tc]
    after = (is_eos.cumsum(-1) - is_eos.long()) > 0  # [N, Tc] strictly after the first EOS
    return (~after).float()  # [N, Tc]


def shared_prefill(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, owners: torch.Tensor,
                   room: int = 0):
    """The KV cache of len(owners) sequences whose prompts are rows `owners` of input_ids, each distinct prompt
    prefilled once (all but its last token, which `decode` feeds first) and its cache rows repeated, with `room`
    positions to spare for decoding where the cache can be laid out in place (`lay_out`).

    The G completions of a prompt share it, so the prefill costs P rows of compute and working memory, not P*G.
    Runs the decoder only: no logits for prompt positions. Positions are the cumsum of the mask, as in `decode`.
    """
    unique, inverse = torch.unique(owners, return_inverse=True)  # [k], [b]
    ids, mask = input_ids[unique, :-1], attention_mask[unique, :-1]  # [k, Tp-1]
    out = causal_lm(model).get_decoder()(input_ids=ids, attention_mask=mask, position_ids=positions(mask),
                                         use_cache=True)
    cache = out[cache_keyword(model)]
    del out  # the prompts' last hidden states: not needed, and not planned for while the cache is laid out
    inverse = inverse.to(ids.device)
    if not (room and lay_out(cache, inverse, room)):
        cache.batch_select_indices(inverse)  # k rows -> b rows
    return cache


def lay_out(cache, rows: torch.Tensor, room: int) -> bool:
    """Copy a prefilled cache's rows `rows` into buffers with `room` more positions, allocated once per layer, and
    make each layer write new tokens into them in place. Without it every decoding step grows every layer by
    torch.cat: a copy of the whole cache per token, and on CUDA ever larger blocks that the caching allocator
    cannot reuse (Falcon3-1B's 8.6 GB cache fragmented a 16 GiB budget on an H200). Only for caches made of
    transformers' plain DynamicLayer (not sliding windows); returns False, changing nothing, otherwise."""
    layers = getattr(cache, "layers", None)
    if not layers or any(type(layer).__name__ != "DynamicLayer" or not getattr(layer, "is_initialized", False)
                         or layer.keys.dim() != 4 for layer in layers):
        return False
    laid_out = _laid_out_layer_class()
    for layer in layers:
        n = layer.keys.shape[-2]
        full = (len(rows), layer.keys.shape[1], n + room, layer.keys.shape[-1])
        keys, values = layer.keys.new_empty(full), layer.values.new_empty(full)  # [b, KV, n + room, hd]
        keys[:, :, :n] = layer.keys[rows]
        values[:, :, :n] = layer.values[rows]
        layer.__class__ = laid_out  # a DynamicLayer whose update writes in place (no reference cycle)
        layer.buffers = keys, values
        layer.keys, layer.values = keys[:, :, :n], values[:, :, :n]  # the k-row prompt K/V are freed here
    return True


@functools.lru_cache(maxsize=None)
def _laid_out_layer_class():
    """transformers' DynamicLayer, but `update` writes into preallocated `buffers` and returns views of the
    filled part; everything else (get_seq_length, mask sizes) reads those views as it would the grown tensors."""
    from transformers.cache_utils import DynamicLayer

    class LaidOutLayer(DynamicLayer):
        def update(self, key_states, value_states, *args, **kwargs):
            keys, values = self.buffers
            start = self.keys.shape[-2]
            end = start + key_states.shape[-2]
            if end > keys.shape[-2]:
                raise RuntimeError(f"laid-out KV cache full: {end} > {keys.shape[-2]} positions")
            keys[:, :, start:end] = key_states
            values[:, :, start:end] = value_states
            self.keys, self.values = keys[:, :, :end], values[:, :, :end]
            return self.keys, self.values

        def _unsupported(self, *args, **kwargs):
            raise RuntimeError("a laid-out KV cache only appends (policy.decode); it cannot be cropped, reset "
                               "or have its rows reselected")

        batch_select_indices = batch_repeat_interleave = reorder_cache = crop = reset = _unsupported

    return LaidOutLayer


@torch.no_grad()
def generate(model, tokenizer, prompts: PromptBatch, *, group_size: int, max_new_tokens: int, gen_batch: int,
             temperature: float = 0.9, top_p: float = 1.0, min_new_tokens: int = 0, greedy: bool = False,
             share_prefill: bool = True, decode_mode: str = "auto", on_batch=None) -> Rollouts:
    """Sample G completions per prompt, gen_batch sequences at a time, with the KV cache. With share_prefill
    each prompt of a batch is prefilled once for all its completions in that batch (`shared_prefill`),
    then `decode` samples from the policy itself, its LoRA layers run as lean closures (`lean_lora`); on CUDA each
    decoding step is one replayed CUDA graph (`decoding`, decode_mode "auto"), with the same tokens.
    The uniforms each batch samples with are drawn before its first step, whichever way it decodes.
    `on_batch(done, total)`, if given, is called after each batch (progress, and where a stop request may land)."""
    device = next(model.parameters()).device
    mode = decoding.mode_for(decode_mode, device)
    eos = eos_ids(model, tokenizer)
    pad = tokenizer.pad_token_id
    prompt_ids, prompt_mask = prompts.input_ids.to(device), prompts.attention_mask.to(device)  # [P, Tp]
    ids = prompt_ids.repeat_interleave(group_size, 0)  # [P*G, Tp]
    mask = prompt_mask.repeat_interleave(group_size, 0)  # [P*G, Tp]
    chunks = []
    with eval_mode(model), lean_lora(model):
        for s in range(0, ids.shape[0], gen_batch):
            rows = torch.arange(s, min(s + gen_batch, ids.shape[0]), device=device)  # [b]
            source = (prompt_ids, prompt_mask, rows // group_size) if share_prefill else (ids, mask, rows)
            cache = (shared_prefill(model, *source, room=max_new_tokens)
                     if ids.shape[1] > 1 else None)  # 1-token prompts: nothing to prefill
            uniforms = None if greedy else torch.rand(max_new_tokens, len(rows), 1, dtype=torch.float64,
                                                      device=device)  # [Tc, b, 1]
            settings = dict(max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, eos=eos, pad=pad,
                            temperature=temperature, top_p=top_p, greedy=greedy, uniforms=uniforms)
            causal = causal_lm(model)
            if mode != "eager" and decoding.supported(cache, causal.config):
                new = decoding.decode_static(causal.get_decoder(), causal.get_output_embeddings(),
                                             cache_keyword(model), ids[rows], mask[rows], cache, sample=next_tokens,
                                             graphs=mode == "graph", **settings)  # [b, Tc']
            else:
                new = decode(model, ids[rows], mask[rows], cache, **settings)  # [b, Tc']
            del cache  # this batch's full KV cache: free it before the next batch's prefill
            chunks.append(torch.nn.functional.pad(new, (0, max_new_tokens - new.shape[1]), value=pad))
            if on_batch is not None:
                on_batch(min(s + gen_batch, ids.shape[0]), ids.shape[0])
    if mode == "graph":  # the last batch's graph pool, before training (each capture empties the cache before it)
        torch.cuda.empty_cache()
    completion_ids = torch.cat(chunks).cpu()  # [P*G, Tc]
    cmask = completion_mask(completion_ids, eos)  # [P*G, Tc]
    has_eos = torch.isin(completion_ids, torch.tensor(eos)).any(-1)  # [P*G]
    completion_ids = torch.where(cmask.bool(), completion_ids, torch.full_like(completion_ids, pad))
    lengths = cmask.sum(-1).long() - has_eos.long()  # [P*G] tokens before the EOS
    texts = tuple(tokenizer.decode(row[:n], skip_special_tokens=True) for row, n in zip(completion_ids, lengths))
    return Rollouts(prompts=prompts, group_size=group_size, completion_ids=completion_ids, completion_mask=cmask,
                    completions=texts, truncated=~has_eos)


@contextlib.contextmanager
def eval_mode(model):
    """Eval mode inside, the mode it had after, also after an error: the loop catches an OOM in generation and
    retries, and a model left in eval mode would train without gradient checkpointing."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def decode(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, cache, *, max_new_tokens: int,
           min_new_tokens: int, eos: list[int], pad: int, temperature: float, top_p: float,
           greedy: bool, uniforms: torch.Tensor | None = None) -> torch.Tensor:
    """Continue b left-padded prompts whose KV cache holds all but their last token (or None for 1-token
    prompts): [b, Tc'] new tokens, pad after a row's first EOS, stopping early once every row has ended.

    tinyrl's own loop rather than HF `generate`, which applies the model's generation_config defaults (e.g.
    Qwen2.5-Instruct's repetition_penalty 1.1 and top_k 20) on top of the settings asked for: a penalty on tokens
    already written, which the loss knows nothing of. Here each token is drawn from exactly softmax(logits /
    temperature), cut to the top-p nucleus when top_p < 1, and the LM head runs on the last position only.
    `uniforms` [Tc, b, 1]: each step's draws (else torch.rand per step).
    """
    causal = causal_lm(model)
    decoder, head, keyword = causal.get_decoder(), causal.get_output_embeddings(), cache_keyword(model)
    eos_t = torch.tensor(eos, device=input_ids.device)
    token = input_ids[:, -1:]  # [b, 1] the last prompt token, not yet in the cache
    position = attention_mask.sum(-1, keepdim=True) - 1  # [b, 1] its position (left padding aware)
    mask, done, new = attention_mask, torch.zeros_like(token[:, 0], dtype=torch.bool), []
    for step in range(max_new_tokens):
        out = decoder(input_ids=token, attention_mask=mask, position_ids=position, use_cache=True, **{keyword: cache})
        cache = out[keyword]
        logits = head(out.last_hidden_state[:, -1]).float()  # [b, V]
        if step < min_new_tokens:
            logits[:, eos_t] = -torch.inf
        u = None if uniforms is None else uniforms[step]  # [b, 1]
        token = torch.where(done, pad, next_tokens(logits, temperature, top_p, greedy, u))  # [b]
        del logits, out  # not alive during the next step's forward (budget: generation is a max of moments)
        new.append(token)
        done |= torch.isin(token, eos_t)
        if bool(done.all()):
            break
        token, position = token[:, None], position + 1  # [b, 1]
        mask = torch.cat([mask, torch.ones_like(token)], -1)  # [b, T+1]
    return torch.stack(new, -1)  # [b, Tc']


@contextlib.contextmanager
def lean_lora(model):
    """Inference through LoRA layers without peft's per-call bookkeeping.

    Each LoRA linear layer with one active plain adapter (no dropout, no DoRA or other variant) gets a closure as
    its forward. It runs the same ops in the same order as peft, so the results are bit-identical. An 8-row fp32
    decoding step of SmolLM2-135M (210 LoRA layers) on 2 CPU cores takes 193 CPU-ms through peft, 178 lean,
    157 with the adapter off (bench/profile_cpu.py).
    Inference only: the closure ignores `disable_adapter`, and autograd is not considered.
    """
    patched = [(m, forward) for m in model.modules() if (forward := _lean_forward(m)) is not None]
    for m, forward in patched:
        m.forward = forward
    try:
        yield
    finally:
        for m, _ in patched:
            del m.forward  # back to the class's forward


def _lean_forward(m):
    """The closure for one peft LoRA layer, or None if it needs peft's own forward."""
    try:
        from peft.tuners.lora import LoraLayer
        from peft.tuners.lora.layer import Linear
    except ImportError:
        return None
    if not isinstance(m, LoraLayer) or m.merged or m.disable_adapters or torch.is_autocast_enabled():
        return None
    if "forward" in vars(m):  # already replaced (accelerate's hooks do that, and so does an outer lean_lora)
        return None
    if len(m.active_adapters) != 1:
        return None
    name = m.active_adapters[0]  # below: DoRA and other variants (peft >= 0.16 and before), dropout
    if name in getattr(m, "lora_variant", {}) or getattr(m, "use_dora", {}).get(name, False):
        return None
    if name not in m.lora_A or not isinstance(m.lora_dropout[name], torch.nn.Identity):
        return None
    a, b, scale, base = m.lora_A[name], m.lora_B[name], m.scaling[name], m.base_layer
    if any(x._forward_hooks or x._forward_pre_hooks for x in (a, b)):
        return None
    cast = getattr(m, "cast_input_dtype_enabled", True)
    linear = torch.nn.functional.linear

    def lora(x):
        if cast and x.dtype != a.weight.dtype:
            x = x.to(a.weight.dtype)
        return linear(linear(x, a.weight, a.bias), b.weight, b.bias) * scale

    if type(m) is Linear:  # peft.tuners.lora.layer.Linear: result + B(A(x))·s, then back to the base's dtype
        def combine(result, x):
            return (result + lora(x)).to(result.dtype)
    elif type(m).__name__ == "Linear4bit":  # peft.tuners.lora.bnb: B(A(x))·s cast to the base's dtype, then added
        def combine(result, x):
            return result + lora(x).to(result.dtype)
    else:
        return None

    def forward(x, *args, **kwargs):
        if args or kwargs:  # e.g. peft's adapter_names: its own forward knows what they mean
            return type(m).forward(m, x, *args, **kwargs)
        return combine(base(x), x)

    return forward


def next_tokens(logits: torch.Tensor, temperature: float, top_p: float, greedy: bool,
                u: torch.Tensor | None = None) -> torch.Tensor:
    """One token per row: the argmax, or a draw from softmax(logits / temperature) restricted to the smallest set
    of most likely tokens whose mass reaches top_p (all of them at top_p = 1). Sampled by inverting the CDF with
    one uniform per row: `u` [b, 1] float64 in [0, 1), else torch.rand (torch.manual_seed makes either repeatable).

    Working set per logit beyond the caller's fp32 logits (budget.sampling_bytes plans for it): the probabilities
    (4 B) and the float64 CDF (8 B); with top_p < 1 the probabilities sorted (4 B) with their int64 order (8 B)
    instead, the CDF taken in sorted order.

    >>> next_tokens(torch.tensor([[0.0, 3.0, 1.0]]), 1.0, 1.0, greedy=True).tolist()
    [1]
    """
    if greedy:
        return logits.argmax(-1)  # [b]
    probs = torch.softmax(logits / temperature, -1)  # [b, V]
    order = None
    if top_p < 1.0:
        probs, order = probs.sort(-1, descending=True)  # [b, V] each
    cdf = probs.double()  # [b, V] float64: fp32 steps of 6e-8 near 1 would drop tokens
    del probs
    cdf.cumsum_(-1)
    last = cdf[:, -1:]  # [b, 1] all the mass
    if order is not None:  # keep the head up to the first token whose cumulative mass reaches top_p
        end = torch.searchsorted(cdf, torch.full_like(last, top_p)).clamp_(max=cdf.shape[-1] - 1)  # [b, 1]
        last = cdf.gather(-1, end)  # [b, 1] the nucleus' mass
    u = (torch.rand(last.shape, device=cdf.device, dtype=cdf.dtype) if u is None else u) * last  # [b, 1]
    picked = torch.searchsorted(cdf, u, right=True).clamp_(max=cdf.shape[-1] - 1)  # [b, 1]
    if order is not None:
        picked = order.gather(-1, torch.minimum(picked, end))  # [b, 1] back to vocabulary ids
    return picked.squeeze(-1)  # [b]
