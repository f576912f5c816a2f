"""The byte formulas: what one term of the table costs, per weight, per token or per logit.

Owns the measured constants (NF4 block sizes, bytes per sampled logit, the CUDA context and workspaces, the CPU
runtime, fragmentation, the sentence encoder), the per-layer and per-token formulas phases.estimate sums
(`nf4_bytes`, `layer_saved_bytes_per_token`, ...) and the two questions asked of the installed transformers
(`decode_repeats_kv`, `cache_lays_out`, read from its source through tinyrl.hub). Imports budget.units,
budget.geometry (the ModelGeometry it reads) and tinyrl.hub; no torch.
"""

from __future__ import annotations

import functools
import math

from tinyrl import hub
from tinyrl.budget.geometry import ModelGeometry
from tinyrl.budget.units import MiB

NF4_BLOCK = 64  # bitsandbytes NF4: one absmax per 64 weights ...
NF4_BLOCK2 = 256  # ... and with double quantisation those absmax are uint8, with an fp32 scale per 256 of them
NF4_STATE_BYTES = 16 * 4 + 256 * 4 + 4  # per layer: NF4 code table, nested 8-bit code table, offset

# Bytes per [Bg, V] logit in a decoding step (policy.decode + next_tokens): the fp32 logits 4 + probabilities 4 +
# float64 CDF 8 = 16 at top_p = 1; with top-p the probabilities sorted (4) and their int64 order (8) instead: 24.
# Measured on CPU by bench/budget_cpu.py (15.98 and 23.97). On CUDA the sort (a segmented radix sort) holds 16 B
# more of its own buffers: top-p measured 24.02 B above top_p = 1 on an H200 (bench/budget.py --top-p 0.9, qwen 8G).
SAMPLING_BYTES = {"all": 16, "top-p": 24, "top-p cuda": 40}


def sampling_bytes(top_p: float, cuda: bool = False) -> int:
    if top_p >= 1.0:
        return SAMPLING_BYTES["all"]
    return SAMPLING_BYTES["top-p cuda" if cuda else "top-p"]


def logprob_bytes(c: int) -> int:
    """Bytes per element of one log-prob chunk's [chunk, Tc, V] block, with or without grad.

    policy._TokenLogprob holds one fp32 logits block (exp and the gradient run in place), plus the head's 16-bit
    output while it is cast to fp32 (forward, and the recompute in backward) and the gradient's 16-bit copy for
    the matmul back to the hidden states. Autograd through gather - logsumexp held 16 (measured on an H200 and
    on CPU before the hand-written backward)."""
    return 4 + (c if c < 4 else 0)


LOSS_TENSORS = 16  # the loss' working set: about this many [B, Tc] fp32 tensors

# Framework overhead. The CUDA context was measured by bench/budget.py on an H200 (torch 2.11, CUDA 13.0): 619 MiB
# right after the model loads, 790-873 MiB once the kernels of a step have loaded; 900 MiB rounds that up. Other
# cards and CUDA versions differ by up to a few hundred MiB (unmeasured). `fit --vram` caps torch's allocator at
# V less this.
CUDA_CONTEXT_BYTES = 900 * MiB  # CUDA context + kernels loaded lazily; outside torch's allocator
CUDA_WORKSPACE_BYTES = 64 * MiB  # cuBLAS/cuBLASLt workspaces, SDPA and bitsandbytes scratch
CPU_RUNTIME_BYTES = 400 * MiB  # CPU runs: resident size of python + torch before any tensor
FRAGMENTATION = 0.10  # allocator slack on top of the larger phase (growing KV cache, varying shapes)
ENCODER_BYTES = 128 * MiB  # all-MiniLM-L6-v2 on the device: 22.7 M fp32 params (91 MB) + batch activations


def nf4_bytes(n: int) -> int:
    """Bytes of one NF4 double-quantised weight of n elements: 4-bit codes, a uint8 absmax per 64 weights,
    an fp32 scale per 256 absmax, and the quant state's code tables (see NF4_STATE_BYTES)."""
    blocks = math.ceil(n / NF4_BLOCK)
    return math.ceil(n / 2) + blocks + 4 * math.ceil(blocks / NF4_BLOCK2) + NF4_STATE_BYTES


def layer_saved_bytes_per_token(g: ModelGeometry, rank: int, c: int, seq: int, fused_attention: bool = True) -> int:
    """What autograd keeps for backward inside one decoder layer, per token of a training micro-batch.

    norms: the fp32 input of both RMSNorms (8D). LoRA inputs: peft casts x to fp32 for each adapter, so q/k/v
    keep three fp32 copies of the normed input and gate/up two (20D); in fp32 there is no cast and one shared
    input per block is kept (8D). Frozen base weights keep nothing (no weight grad; bitsandbytes keeps only the
    packed weight). Attention: q after RoPE, k and v repeated to H heads (HF repeats them whenever a padding mask
    is passed), the SDPA output (4·H·hd·c), o_proj's fp32 input (4·H·hd), log-sum-exp (4H) and the float mask
    row (seq·c). MLP: gate, silu(gate), up (3·I·c) and down's fp32 input (4I). LoRA A outputs: 7 × 4r.
    Eager attention adds the fp32 softmax and its c-dtype copy: H·seq·(4 + c).
    """
    d, q, h, i = g.hidden, g.q_dim, g.heads, g.intermediate
    lora_in = 20 * d if c != 4 else 8 * d
    saved = 8 * d + lora_in + 4 * q * c + 4 * q + 4 * h + seq * c + 3 * i * c + 4 * i + 28 * rank
    if not fused_attention:
        saved += h * seq * (4 + c)
    return saved


def layer_backward_bytes_per_token(g: ModelGeometry, c: int) -> int:
    """Gradients alive beyond the saved tensors while one layer runs backward (autograd frees saved tensors and
    consumed grads as it goes): one [I] grad in c plus, when c is not fp32, the fp32 grad of down's LoRA input;
    two [D] grads in c plus two fp32 ones. Fitted to bench/budget_cpu.py's checkpointed runs (one layer
    recomputed and its backward, measured with a small vocabulary so the log-prob chunk is not the peak)."""
    lora = 4 if c != 4 else 0
    return g.intermediate * (c + lora) + g.hidden * (2 * c + 2 * lora)


def prefill_rows(gen_batch: int, group_size: int) -> int:
    """The most distinct prompts among gen_batch consecutive rows (batches start at multiples of gen_batch) of
    the P*G prompt-major rows: each is prefilled once (policy.shared_prefill).

    >>> prefill_rows(256, 16), prefill_rows(8, 16), prefill_rows(24, 16), prefill_rows(3, 16), prefill_rows(1, 16)
    (16, 1, 2, 2, 1)
    >>> all(prefill_rows(b, g) == max(len({r // g for r in range(j * b, j * b + b)}) for j in range(g))
    ...     for b in range(1, 40) for g in range(1, 20))
    True
    """
    return min(gen_batch, -(-(gen_batch + group_size - math.gcd(gen_batch, group_size)) // group_size))


def layer_nograd_bytes_per_token(g: ModelGeometry, c: int, seq: int, fused_attention: bool = True,
                                 lora: bool = True) -> int:
    """Peak live bytes of one layer's forward without grad (prefill, reference pass), per token: silu(gate) and
    up in c plus, with the adapter on, two fp32 [I] LoRA temporaries (lora_B out, scaled sum), the residual
    stream and fp32 norm temporaries, and the float mask row. Eager attention adds scores, fp32 softmax and probs.
    The reference pass runs with the adapter off (`lora=False`)."""
    nograd = g.intermediate * (2 * c + (8 if lora else 0)) + g.hidden * (c + 8) + seq * c
    if not fused_attention:
        nograd += g.heads * seq * (2 * c + 4)
    return nograd


@functools.lru_cache(maxsize=None)
def decode_repeats_kv() -> bool:
    """Whether the installed transformers, with a mask (left padding), repeats a grouped-query layer's K/V to all
    heads in each decoding step (`repeat_kv`), rather than folding the query heads into the K/V heads
    (`pack_gqa`, in newer releases; 5.17 has it not, 5.24 has). Read from its source, so the planner stays fast;
    True (the larger plan) when it cannot tell."""
    return "pack_gqa" not in hub.transformers_source("integrations/sdpa_attention.py")


@functools.lru_cache(maxsize=None)
def cache_lays_out() -> bool:
    """Whether policy.lay_out can preallocate the decoding cache with the installed transformers: its caches are
    made of `DynamicLayer`s with an `is_initialized` flag (transformers 5; older releases grow the cache by
    torch.cat; 4.5x had DynamicLayer without the flag). Read from its source, so the planner stays fast; False
    (the larger plan) when it cannot tell."""
    source = hub.transformers_source("cache_utils.py")
    return "class DynamicLayer(" in source and "self.is_initialized" in source
