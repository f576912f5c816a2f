"""The byte table of one set of knobs, phase by phase: what lives the whole run, the generation phase's peak, the
training phase's peak, and the framework's overhead.

Owns Term, Breakdown and `estimate`, which reads as its list of phases (`_fixed`, `_generation`, `_training`,
`_overhead`), each adding its terms in the order the table prints them. Imports budget.geometry, budget.device,
budget.knobs and budget.terms; not the search or its explanation.
"""

from __future__ import annotations

from dataclasses import dataclass

from tinyrl.budget.device import DEVICES, DeviceCaps
from tinyrl.budget.geometry import ModelGeometry
from tinyrl.budget.knobs import DTYPES, Settings
from tinyrl.budget.terms import (
    CPU_RUNTIME_BYTES,
    CUDA_CONTEXT_BYTES,
    CUDA_WORKSPACE_BYTES,
    ENCODER_BYTES,
    FRAGMENTATION,
    LOSS_TENSORS,
    cache_lays_out,
    decode_repeats_kv,
    layer_backward_bytes_per_token,
    layer_nograd_bytes_per_token,
    layer_saved_bytes_per_token,
    logprob_bytes,
    nf4_bytes,
    prefill_rows,
    sampling_bytes,
)


@dataclass(frozen=True)
class Term:
    """One line of the byte table."""

    phase: str  # "fixed" (lives the whole run), "generation", "training" or "overhead"
    name: str
    bytes: int
    formula: str  # symbols, then the numbers put in


@dataclass(frozen=True)
class Breakdown:
    """Where the bytes of one set of knobs go. peak = fixed + max(generation, training) + overhead."""

    terms: tuple[Term, ...]
    fixed: int
    generation: int  # the generation phase's peak above `fixed`
    training: int  # the training phase's peak above `fixed`
    overhead: int
    generation_rule: str  # how the generation terms combine into `generation`
    training_rule: str  # how the training terms combine into `training`

    @property
    def peak(self) -> int:
        return self.fixed + max(self.generation, self.training) + self.overhead

    @property
    def peak_phase(self) -> str:
        return "generation" if self.generation >= self.training else "training"

    def term(self, name: str) -> Term:
        """The term called `name` (KeyError when the plan has none)."""
        for t in self.terms:
            if t.name == name:
                return t
        raise KeyError(name)


def estimate(
    geometry: ModelGeometry,
    settings: Settings,
    prompt_len: int,
    caps: DeviceCaps = DEVICES["cuda"],
    encoder_bytes: int = ENCODER_BYTES,
    shared_prompts: bool = True,
    top_p: float = 1.0,
    shared_scoring: bool | None = None,
    repeats_kv: bool | None = None,
    laid_out: bool | None = None,
    autograd_logprobs: bool = False,
    graphs: bool | None = None,
    reference: bool = True,
) -> Breakdown:
    """Peak bytes of a run with `settings` on `caps`, term by term. `prompt_len` is Tp, the padded prompt length
    (the longest prompt of a batch, at most max_prompt_tokens). `shared_prompts=False` models a run as it was
    before the rows of a group shared their prompt (every row prefilled and trained on its own copy of the
    prompt), to re-score measurements taken then. `shared_scoring`: whether training runs a group's prompt once
    (default: where policy.share_scoring does, i.e. not on CUDA, and only with shared_prompts). `repeats_kv`:
    whether decoding repeats K/V to every head (default: what the installed transformers does). `laid_out`:
    whether generation lays the cache out at full length once (policy.lay_out; default: where it can).
    `autograd_logprobs`: log-prob chunks through autograd (16 B per element with grad, 8 without), as for a head
    that is not a plain Linear and as every run did before policy._TokenLogprob, to re-score those. `graphs`:
    whether decoding replays a CUDA graph (default: on CUDA where the cache is laid out, as decode=auto does).
    `reference`: whether training runs the reference pass (kl_beta > 0); at beta 0 it is not counted."""
    run, table = _run(geometry, settings, prompt_len, caps), _Table()
    fixed = _fixed(table, run, encoder_bytes)
    generation, generation_rule = _generation(table, run, shared_prompts, top_p, repeats_kv, laid_out, graphs)
    training, training_rule = _training(table, run, shared_prompts, shared_scoring, autograd_logprobs, reference)
    overhead = _overhead(table, caps, max(generation, training))
    return Breakdown(tuple(table.terms), fixed, generation, training, overhead, generation_rule, training_rule)


class _Table:
    """The terms as they are written, in order; `add` returns the bytes it wrote, to be summed."""

    def __init__(self):
        self.terms: list[Term] = []

    def add(self, phase: str, name: str, nbytes: int, formula: str) -> int:
        self.terms.append(Term(phase, name, int(nbytes), formula))
        return int(nbytes)


@dataclass(frozen=True)
class _Run:
    """What every phase reads: the model, the knobs, the device and the lengths they imply."""

    g: ModelGeometry
    s: Settings
    caps: DeviceCaps
    c: int  # bytes per element of the compute dtype
    tp: int  # Tp: prompt tokens, at most max_prompt_tokens
    tc: int  # Tc: completion tokens
    n_lora: int  # LoRA parameters
    dequant: int  # bitsandbytes dequantises one weight for batched matmuls and in backward (0 without 4-bit)

    @property
    def t(self) -> int:  # T = Tp + Tc
        return self.tp + self.tc

    @property
    def kv_per_token(self) -> int:  # K and V of every layer, one token of one sequence
        return 2 * self.g.layers * self.g.kv_dim * self.c


def _run(g: ModelGeometry, s: Settings, prompt_len: int, caps: DeviceCaps) -> _Run:
    c = DTYPES[s.dtype]
    dequant = max(a * b for _, a, b in g.linears()) * c if s.quant == "4bit" else 0
    return _Run(g, s, caps, c, tp=min(prompt_len, s.max_prompt_tokens), tc=s.max_new_tokens,
                n_lora=g.lora_params(s.lora_rank), dequant=dequant)


def _fixed(table: _Table, run: _Run, encoder_bytes: int) -> int:
    """What lives from start to end: weights, LoRA and its optimiser state, the encoder, the rollouts."""
    g, s, c, n_lora = run.g, run.s, run.c, run.n_lora
    L, D, V = g.layers, g.hidden, g.vocab  # noqa: N806 - the shape vocabulary
    t, tc = run.t, run.tc
    n_seq = s.prompts_per_step * s.group_size
    if s.quant == "4bit":
        per_layer = sum(nf4_bytes(a * b) for _, a, b in g.linears())
        fixed = table.add("fixed", "weights: linear layers (NF4)", L * per_layer,
                          f"L·Σ(n/2 + n/64 + 4n/16384 + 1092 B), n = in·out of 7 linears = {L}·{per_layer}")
    else:
        fixed = table.add("fixed", f"weights: linear layers ({s.dtype})", g.linear_params() * c,
                          f"L·Σ in·out·c = {g.linear_params()}·{c}")
    if g.qkv_bias:
        fixed += table.add("fixed", "weights: q/k/v biases", L * (g.q_dim + 2 * g.kv_dim) * c,
                           f"L·(H+2KV)·hd·c = {L}·{g.q_dim + 2 * g.kv_dim}·{c}")
    fixed += table.add("fixed", "weights: embeddings", V * D * c, f"V·D·c = {V}·{D}·{c}")
    if not g.tied_embeddings:
        fixed += table.add("fixed", "weights: lm_head", V * D * c, f"V·D·c = {V}·{D}·{c} (untied)")
    fixed += table.add("fixed", "weights: norms", (2 * L + 1) * D * c, f"(2L+1)·D·c = {2 * L + 1}·{D}·{c}")
    lora_formula = f"r·L·Σ(in+out) = {s.lora_rank}·{L}·{n_lora // max(1, s.lora_rank * L)} = {n_lora:,} params"
    fixed += table.add("fixed", "LoRA weights (fp32)", 4 * n_lora, f"4·{lora_formula}")
    fixed += table.add("fixed", "AdamW moments (2 × fp32)", 8 * n_lora, "8 B per LoRA param")
    if encoder_bytes:
        fixed += table.add("fixed", "memory encoder (MiniLM)", encoder_bytes,
                           "22.7 M fp32 params + batch activations")
    fixed += table.add("fixed", "rollout buffers", n_seq * (t * 16 + tc * 16),
                       f"P·G·(T·(8+8) + Tc·4·4) = {n_seq}·({t}·16 + {tc}·16)")
    return fixed


def _generation(table: _Table, run: _Run, shared_prompts: bool, top_p: float, repeats_kv: bool | None,
                laid_out: bool | None, graphs: bool | None) -> tuple[int, str]:
    """Generation's peak above `fixed`, and how its terms combine: the distinct prompts of Bg sequences prefilled
    once, their cache rows repeated, Tc decoding steps."""
    g, s, c, tp, t = run.g, run.s, run.c, run.tp, run.t
    bg = s.gen_batch
    kp = prefill_rows(bg, s.group_size) if shared_prompts else bg
    if laid_out is None:
        laid_out = shared_prompts and g.full_attention and tp > 1 and cache_lays_out()  # 1-token prompts: no prefill
    kv = table.add("generation", "KV cache", run.kv_per_token * t * bg,
                   f"2·L·KV·hd·T·Bg·c = 2·{g.layers}·{g.kv_heads}·{g.head_dim}·{t}·{bg}·{c}")
    per_tok = layer_nograd_bytes_per_token(g, c, tp, run.caps.fused_attention)
    prefill = table.add("generation", "prefill (one layer, no grad)", kp * tp * per_tok,
                        f"k·Tp·(I·(2c+8) + D·(c+8) + Tp·c) = {kp}·{tp}·{per_tok}, "
                        "k = distinct prompts of Bg rows")
    prompt_kv, growth = _prompt_cache(table, run, bg, kp, laid_out, shared_prompts)
    attention, sampling = _step_temporaries(table, run, bg, top_p, repeats_kv)
    if run.dequant:
        table.add("generation", "dequantised weight (NF4 -> c)", run.dequant, "max(in·out)·c")
    # a decoding step's moments come one after another: a layer's cache grows (or is laid out, before the first
    # step), then its attention runs; sampling follows the last layer (policy.decode frees the logits first).
    # Replayed as a CUDA graph (tinyrl.decoding, on CUDA where the cache is laid out), the step's temporaries stay
    # allocated in the graph's pool from capture to the last token: counted together, not one after another
    if graphs is None:
        graphs = run.caps.cuda and laid_out
    step_moment, step_rule = max(attention, sampling), "max(attention, sampling)"
    if graphs:
        step_moment = table.add("generation", "CUDA graph pool: one step's attention + sampling + static buffers",
                                attention + sampling + bg * (t * (1 + c) + run.tc * 16),
                                f"attention + sampling + Bg·(T·(1+c) + Tc·16) = {attention} + {sampling} + "
                                f"{bg}·({t}·{1 + c} + {run.tc}·16)")
        step_rule = "graph pool"
    generation = max(prompt_kv + prefill, kv + max(growth, step_moment)) + run.dequant
    grow = "prompt KV + laying out" if laid_out else "growth"
    rule = f"max(prompt KV + prefill, KV + max({grow}, {step_rule}))" + (" + dequantised" if run.dequant else "")
    return generation, rule


def _prompt_cache(table: _Table, run: _Run, bg: int, kp: int, laid_out: bool, shared_prompts: bool
                  ) -> tuple[int, int]:
    """The prompts' K/V once prefilled, and what making room for Bg rows costs on top: (prompt KV, growth)."""
    g, c, tp, t, kv_per_token = run.g, run.c, run.tp, run.t, run.kv_per_token
    if laid_out:  # policy.lay_out: the cache allocated at full length once, the k prompts' rows copied into it
        prompt_kv = table.add("generation", "prompt KV (k distinct prompts)", kv_per_token * tp * kp,
                              f"2·L·KV·hd·Tp·k·c = {kv_per_token}·{tp}·{kp}")
        growth = prompt_kv + table.add("generation", "laying out: one layer's prompt K repeated to Bg rows",
                                       g.kv_dim * tp * bg * c, f"KV·hd·Tp·Bg·c = {g.kv_dim}·{tp}·{bg}·{c}")
    else:  # DynamicCache: Bg copies of the prompt rows, then torch.cat grows every layer every step
        repeated = kp if shared_prompts else 0  # the k prefilled rows, alive while their copies are made
        prompt_kv = table.add("generation", "prompt KV before and after repeating",
                              kv_per_token * tp * (repeated + bg),
                              f"2·L·KV·hd·Tp·(k+Bg)·c = {kv_per_token}·{tp}·({repeated}+{bg})")
        growth = table.add("generation", "KV growth (torch.cat of one layer)", g.kv_dim * t * bg * c,
                           f"KV·hd·T·Bg·c = {g.kv_dim}·{t}·{bg}·{c}")
    return prompt_kv, growth


def _step_temporaries(table: _Table, run: _Run, bg: int, top_p: float, repeats_kv: bool | None) -> tuple[int, int]:
    """One decoding step's working set beyond the cache: (attention, sampling)."""
    g, c, t = run.g, run.c, run.t
    per_logit = sampling_bytes(top_p, run.caps.cuda)
    nucleus = f" (top_p {top_p})" if top_p < 1 else ""
    sampling = table.add("generation", "sampling logits", bg * g.vocab * per_logit,
                         f"Bg·V·{per_logit} = {bg}·{g.vocab}·{per_logit}{nucleus}")
    attention = 0
    if repeats_kv is None:
        repeats_kv = decode_repeats_kv()
    if g.heads > g.kv_heads and repeats_kv:  # grouped-query attention with a mask (left padding): transformers
        # repeats one layer's K and V to all H heads in every decoding step, however long the cache is
        attention = table.add("generation", "decode attention: one layer's K/V repeated to H heads",
                              2 * g.q_dim * t * bg * c,
                              f"2·H·hd·T·Bg·c = 2·{g.heads}·{g.head_dim}·{t}·{bg}·{c}")
    return attention, sampling


@dataclass(frozen=True)
class _Tokens:
    """The tokens one training micro-batch runs through the decoder. With shared prompts the kt distinct prompts
    of a micro-batch run once (kt·Tp tokens) and its B completions (B·Tc tokens) attend to them; the prompts' K/V
    stay alive for the whole pass, and each layer's attention keeps them repeated for B rows and H heads. The
    prompts' pass through the last layer feeds nothing (only its K/V are read), so autograd keeps L-1 layers'
    worth of it."""

    kt: int  # distinct prompts of the B rows
    shared: bool  # the prompts run once, the completions attend to them
    n: int  # tokens through the decoder
    call: int  # the tokens of the larger of its decoder calls: one layer's working set holds them
    text: str  # n, as a formula
    per_call: str  # the symbol of `call` in formulas
    calls: str  # `call`, as a formula


def _tokens(run: _Run, shared_prompts: bool, shared_scoring: bool | None) -> _Tokens:
    s, tp, tc, t = run.s, run.tp, run.tc, run.t
    b = s.micro_batch
    kt = prefill_rows(b, s.group_size)
    if shared_scoring is None:
        shared_scoring = shared_prompts and not run.caps.cuda
    shared = shared_scoring and run.g.full_attention and kt < b and tp > 1
    n = kt * tp + b * tc if shared else b * t
    text = f"(kt·Tp + B·Tc) = ({kt}·{tp} + {b}·{tc})" if shared else f"B·T = {b}·{t}"
    # The prompts and the completions are two decoder calls: one layer's working set holds the larger one's tokens
    call = max(kt * tp, b * tc) if shared else n
    return _Tokens(kt, shared, n, call, text, "m" if shared else "n", f"m = max(kt·Tp, B·Tc) = {call}")


def _training(table: _Table, run: _Run, shared_prompts: bool, shared_scoring: bool | None,
              autograd_logprobs: bool, reference: bool = True) -> tuple[int, str]:
    """Training's peak above `fixed`, and how its terms combine: the reference pass (no grad) of one micro-batch,
    then its forward/backward, then the optimiser step."""
    g, s, c, tp, tc = run.g, run.s, run.c, run.tp, run.tc
    D, V = g.hidden, g.vocab  # noqa: N806 - the shape vocabulary
    b, k = s.micro_batch, s.logprob_chunk
    lp_grad, lp_nograd = (16, 8) if autograd_logprobs else (logprob_bytes(c), logprob_bytes(c))
    tok = _tokens(run, shared_prompts, shared_scoring)
    kt, shared, n, call, per_call, calls = tok.kt, tok.shared, tok.n, tok.call, tok.per_call, tok.calls
    grads = table.add("training", "LoRA grads (fp32)", 4 * run.n_lora, "4 B per LoRA param")
    shared_kv = table.add("training", "shared prompts' K/V", run.kv_per_token * kt * tp,
                          f"2·L·KV·hd·kt·Tp·c = {run.kv_per_token}·{kt}·{tp}, kt = distinct prompts of B rows"
                          ) if shared else 0
    repeat_kv = b * tp * 2 * g.q_dim * c if shared else 0
    ref_tok = layer_nograd_bytes_per_token(g, c, run.t, run.caps.fused_attention, lora=False)  # the adapter is off
    ref = table.add("training", "reference pass (no grad)",
                    shared_kv + n * D * c + max(call * ref_tok + repeat_kv, k * tc * V * lp_nograd),
                    f"K/V + n·D·c + max({per_call}·one layer{' + B·Tp·2·H·hd·c' if shared else ''}, "
                    f"chunk·Tc·V·{lp_nograd}), n = {tok.text}" + (f", {calls}" if shared else "")
                    ) if reference else table.add("training", "reference pass (none: kl_beta 0)", 0, "0")
    kept, layer = _activations(table, run, tok, repeat_kv)
    kept += shared_kv
    final = table.add("training", "final norm + hidden", b * tc * D * (4 + c) if shared else n * D * (4 + c),
                      f"B·Tc·D·(4+c) = {b}·{tc}·{D}·{4 + c}" if shared else f"B·T·D·(4+c) = {n}·{D}·{4 + c}")
    chunk = table.add("training", "log-prob chunk (with grads)", k * tc * V * lp_grad,
                      f"chunk·Tc·V·{lp_grad} = {k}·{tc}·{V}·{lp_grad}")
    loss = table.add("training", "loss working set", LOSS_TENSORS * b * tc * 4,
                     f"{LOSS_TENSORS}·B·Tc·4 = {LOSS_TENSORS}·{b}·{tc}·4")
    step = table.add("training", "AdamW step temporaries", 4 * run.n_lora, "4 B per LoRA param (foreach sqrt)")
    if run.dequant:
        table.add("training", "dequantised weight (NF4 -> c)", run.dequant, "max(in·out)·c")
    fwd_bwd = kept + final + loss + max(chunk, layer)
    training = grads + max(ref, fwd_bwd, step) + run.dequant
    rule = (f"grads + max({'reference, ' if reference else ''}{'shared K/V + ' if shared else ''}"
            f"{'boundaries' if s.grad_checkpointing else 'activations'} + final + "
            f"loss + max(log-prob chunk, {'layer' if s.grad_checkpointing else 'backward'}), step)"
            + (" + dequantised" if run.dequant else ""))
    return training, rule


def _activations(table: _Table, run: _Run, tok: _Tokens, repeat_kv: int) -> tuple[int, int]:
    """What the forward keeps for backward, and the one layer whose backward runs at a time: (kept, layer).
    With gradient checkpointing each layer's input is kept and the layer recomputed in backward."""
    g, s, c, tp = run.g, run.s, run.c, run.tp
    L, D = g.layers, g.hidden  # noqa: N806 - the shape vocabulary
    kt, shared, n, call, per_call, calls = tok.kt, tok.shared, tok.n, tok.call, tok.per_call, tok.calls
    saved = layer_saved_bytes_per_token(g, s.lora_rank, c, run.t, run.caps.fused_attention)
    back = layer_backward_bytes_per_token(g, c)
    if s.grad_checkpointing:
        kept = table.add("training", "checkpoint boundaries", L * n * D * c, f"L·n·D·c, n = {tok.text}")
        layer = table.add("training", "one layer recomputed + its backward", call * (saved + back)
                          + repeat_kv, f"{per_call}·(saved + grads) = {call}·({saved} + {back})"
                          + (f" + B·Tp·2·H·hd·c = {repeat_kv}, {calls}" if shared else ""))
    else:
        kept = table.add("training", "activations of all layers", (L * n - (kt * tp if shared else 0)) * saved
                         + L * repeat_kv, f"L·n·saved = {L}·{n}·{saved}" if not shared else
                         f"((L·n - kt·Tp)·saved + L·B·Tp·2·H·hd·c = ({L}·{n} - {kt}·{tp})·{saved} + "
                         f"{L}·{repeat_kv}")
        layer = table.add("training", "one layer's backward", call * back,
                          f"{per_call}·grads = {call}·{back}" + (f", {calls}" if shared else ""))
    return kept, layer


def _overhead(table: _Table, caps: DeviceCaps, phase: int) -> int:
    """The framework's bytes: the CUDA context and workspaces (or the CPU runtime), and fragmentation on top of the
    larger phase."""
    if caps.cuda:
        overhead = table.add("overhead", "CUDA context", CUDA_CONTEXT_BYTES, "constant: H200 measurement, rounded up")
        overhead += table.add("overhead", "CUDA workspaces", CUDA_WORKSPACE_BYTES, "cuBLAS/SDPA/bnb scratch, constant")
    else:
        overhead = table.add("overhead", "python + torch runtime", CPU_RUNTIME_BYTES, "resident size before any tensor")
    overhead += table.add("overhead", "allocator fragmentation", int(FRAGMENTATION * phase),
                          f"{FRAGMENTATION:.0%} of the larger phase = {FRAGMENTATION}·{phase}")
    return overhead
