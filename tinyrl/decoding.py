"""Shape-static decoding (a leaf that tinyrl/policy/generation.py drives: imports no other tinyrl module): a decoding
step whose tensors keep one shape and one address from token to token, so that on CUDA it is captured once as a
CUDA graph and replayed per token (`decode_static(..., graphs=True)`).

Eager decoding (policy.decode) issues every kernel of every layer from Python, token after token: for a 0.5B model
thousands of launches per token, and a 200-token rollout is bound by them rather than by the GPU (issue #15: 1,811
tokens/s on an H100). A replayed graph issues the whole step at once. What differs from policy.decode, and why it
samples the same tokens:

- the cache is the laid-out one (policy.lay_out) and its layers answer with the whole buffer, not the filled part;
  a mask [b, 1, 1, N] (`masked`) hides the unfilled positions and the left padding. A masked position adds nothing
  to the softmax: the same attention;
- the positions, the write index and the step count are device tensors, advanced in place;
- the uniforms of inverse-CDF sampling are drawn for all steps before the first (policy.generate draws them for
  either path), so graph replays consume no random numbers of their own;
- whether every row has ended is read every CHECK_EVERY tokens (a host sync), not every token; steps after the last
  row ended write pads only, which policy.generate drops.

The graph lives for one call: its buffers (the cache among them) are freed before training, so the planner counts
one decoding step's temporaries as the graph's pool during generation only (budget.estimate). CPU decodes eagerly.

A step that waits for the host (a `.item()`, a data-dependent shape: transformers' dynamic and longrope RoPE read
`position_ids.max()`) cannot be captured, and a failed capture cannot be undone in torch 2.11-2.13: the thread
stays on the capture stream and the allocator in its capture state, so every later `empty_cache` fails. So the last
warm-up step runs under CUDA's sync debug mode, and a step that syncs decodes without a graph (said once); a
capture that fails all the same stops the run with a UserError that names `--set decode=eager`.
Imports tinyrl.errors only.
"""

from __future__ import annotations

import functools
import sys
import warnings

import torch

from tinyrl.errors import UserError

CHECK_EVERY = 8  # tokens between two reads of "has every row ended" (each read waits for the device)
WARMUP_STEPS = 2  # eager steps before the capture (cuBLAS and allocator set-up happen outside the graph)
MODES = ("auto", "eager", "static", "graph")
_failed: set[str] = set()  # reasons for decoding without graphs already reported (one line each per process)


def mode_for(decode: str, device: torch.device) -> str:
    """`auto`: graphs on CUDA, eager elsewhere. `static` runs the shape-static step without a graph (any device)."""
    if decode == "auto":
        return "graph" if device.type == "cuda" else "eager"
    if decode == "graph" and device.type != "cuda":
        return "static"  # a CUDA graph needs CUDA; the same steps run without one
    return decode


def supported(cache, config) -> bool:
    """Whether the static step can run: every layer of `cache` is policy.lay_out's (with the room it writes into),
    and the model's attention takes a 4-D mask as it is (SDPA and eager do; flash-attention kernels do not)."""
    layers = getattr(cache, "layers", None)
    return (bool(layers) and all(hasattr(layer, "buffers") for layer in layers)
            and getattr(config, "_attn_implementation", "sdpa") in ("sdpa", "eager"))


@functools.lru_cache(maxsize=None)
def _static_layer_class(laid_out_class: type):
    """policy.lay_out's layer, answering every update with the whole buffer after writing at the shared index `at`
    (a device tensor): the same shapes and addresses at every step."""

    class StaticLayer(laid_out_class):
        def update(self, key_states, value_states, *args, **kwargs):
            keys, values = self.buffers
            keys.index_copy_(2, self.at, key_states)
            values.index_copy_(2, self.at, value_states)
            return keys, values

    return StaticLayer


def masked(config, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An attention mask that masks everything, of the kind transformers makes for the model's attention (so the
    same kernels run as in eager decoding): bool for SDPA (True attends), else additive in the compute dtype (0
    attends; the dtype's minimum masks)."""
    if getattr(config, "_attn_implementation", None) == "sdpa":
        return torch.zeros(shape, dtype=torch.bool, device=device)
    return torch.full(shape, torch.finfo(dtype).min, dtype=dtype, device=device)


class StaticStep:
    """The state of b rows decoding into a laid-out cache, every tensor allocated once; `step()` samples one token
    per row and advances it in place. The rows' prompts are in the cache but for their last token (as for
    policy.decode)."""

    def __init__(self, decoder, head, keyword: str, input_ids: torch.Tensor, attention_mask: torch.Tensor, cache, *,
                 sample, max_new_tokens: int, min_new_tokens: int, eos: list[int], pad: int, temperature: float,
                 top_p: float, greedy: bool, uniforms: torch.Tensor | None):
        self.decoder, self.head, self.keyword, self.sample = decoder, head, keyword, sample
        self.cache, self.pad, self.min_new_tokens = cache, pad, min_new_tokens
        self.sampling = dict(temperature=temperature, top_p=top_p, greedy=greedy)
        dev, b = input_ids.device, input_ids.shape[0]
        first = cache.layers[0]
        n, size, dtype = first.keys.shape[-2], first.buffers[0].shape[-2], first.buffers[0].dtype
        if size < n + max_new_tokens:
            raise RuntimeError(f"laid-out cache of {size} positions has no room for {max_new_tokens} tokens after {n}")
        self.at = torch.tensor([n], device=dev)  # where the next token's K/V go
        self.i = torch.zeros(1, dtype=torch.long, device=dev)  # the step
        self.mask = masked(self.decoder.config, (b, 1, 1, size), dtype, dev)  # [b, 1, 1, N]
        self.attend = True if self.mask.dtype == torch.bool else 0
        self.mask[:, 0, 0, :n].masked_fill_(attention_mask[:, :n].bool(), self.attend)
        static = _static_layer_class(type(first))
        for layer in cache.layers:
            layer.__class__, layer.at = static, self.at
            layer.keys, layer.values = layer.buffers
            for buffer in layer.buffers:  # attention reads the unfilled part too (weighted 0: it must not be NaN)
                buffer[:, :, n:].zero_()
        self.token = input_ids[:, -1:].clone()  # [b, 1] the last prompt token, not yet in the cache
        self.position = attention_mask.sum(-1, keepdim=True) - 1  # [b, 1] its position (left padding aware)
        self.done = torch.zeros(b, dtype=torch.bool, device=dev)  # [b]
        self.out = torch.full((b, max_new_tokens), pad, dtype=torch.long, device=dev)  # [b, Tc]
        vocab = getattr(head, "out_features", None) or head.weight.shape[0]
        self.is_eos = torch.zeros(vocab, dtype=torch.bool, device=dev)  # [V]
        self.is_eos[eos] = True
        self.uniforms = uniforms  # [Tc, b, 1] float64, or None when greedy

    def step(self) -> None:
        self.mask.index_fill_(-1, self.at, self.attend)  # the new token attends to itself
        out = self.decoder(input_ids=self.token, attention_mask=self.mask, position_ids=self.position,
                           use_cache=True, **{self.keyword: self.cache})
        logits = self.head(out.last_hidden_state[:, -1]).float()  # [b, V]
        del out
        if self.min_new_tokens:  # EOS held back: a where over [b, V] (no indexing, nothing the host must wait for)
            logits = torch.where(self.is_eos & (self.i < self.min_new_tokens), -torch.inf, logits)
        u = None if self.uniforms is None else self.uniforms.index_select(0, self.i)[0]  # [b, 1]
        token = torch.where(self.done, self.pad, self.sample(logits, **self.sampling, u=u))  # [b]
        del logits
        self.out.index_copy_(1, self.i, token[:, None])
        self.done |= self.is_eos[token]
        self.token.copy_(token[:, None])
        self.position.add_(1)
        self.at.add_(1)
        self.i.add_(1)

    def capture(self):
        """The step captured as a CUDA graph; its replay. Call after a warm-up step that made no host sync
        (`host_syncs`). torch.cuda.graph synchronizes and empties the cache before it captures. An OOM goes to the
        loop's back-off (the capture ended cleanly: anything else from it would have come out instead)."""
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):  # other threads' CUDA calls are theirs
                self.step()
        except torch.cuda.OutOfMemoryError:
            raise  # the loop's back-off halves gen_batch, as for any step that does not fit
        except Exception as err:  # noqa: BLE001 - the process cannot recover its CUDA state: stop, resumably
            raise UserError(f"CUDA graph capture failed ({_first_line(err)}); rerun the same command with --resume "
                            "--set decode=eager (it resumes from the last checkpoint)") from None
        return graph.replay


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0][:160]}" if text else type(err).__name__


def host_syncs(run) -> list[str]:
    """Run `run()` with CUDA's sync debug mode on; the warnings of the host syncs it made (none: it can be
    captured). Other warnings pass through."""
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            run()
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    syncs = [str(w.message) for w in caught if "synchronizing" in str(w.message)]
    for w in caught:
        if "synchronizing" not in str(w.message):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return syncs


def _say_once(reason: str) -> None:
    if reason not in _failed:
        _failed.add(reason)
        print(f"decoding without CUDA graphs: {reason}", file=sys.stderr, flush=True)


def decode_static(decoder, head, keyword: str, input_ids: torch.Tensor, attention_mask: torch.Tensor, cache, *,
                  max_new_tokens: int, graphs: bool, **kw) -> torch.Tensor:
    """policy.decode's contract ([b, Tc'] new tokens, pad after a row's first EOS) on a laid-out cache, the step
    shape-static and, with `graphs` (CUDA), captured after WARMUP_STEPS eager steps and replayed. Tc' is a
    multiple of CHECK_EVERY (or max_new_tokens): columns after every row ended are pads. `decoder`, `head`: the
    causal LM's; `keyword`: its cache argument; `sample`: policy.next_tokens (the rest as policy.decode's)."""
    state = StaticStep(decoder, head, keyword, input_ids, attention_mask, cache, max_new_tokens=max_new_tokens, **kw)
    run, taken = state.step, 0
    if graphs:
        syncs = []
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            while taken < min(WARMUP_STEPS, max_new_tokens):
                if taken == WARMUP_STEPS - 1:  # the first step may sync once to set things up; the last must not
                    syncs = host_syncs(state.step)
                else:
                    state.step()
                taken += 1
        torch.cuda.current_stream().wait_stream(stream)
        if syncs:
            _say_once(f"a decoding step waits for the host ({syncs[0].strip().splitlines()[0][:120]}); the same "
                      "tokens, step by step")
        elif taken < max_new_tokens:
            run = state.capture()
    while taken < max_new_tokens:
        if taken % CHECK_EVERY == 0 and taken and bool(state.done.all()):
            break
        run()
        taken += 1
    return state.out[:, :taken]  # the graph's pool is freed with it (policy.generate empties the cache once)
