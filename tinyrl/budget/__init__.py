"""Memory planner: choose every memory-relevant setting so a run fits the card the first time.

Pure arithmetic from the model's config.json, a sample of tokenized prompt lengths and what the device
supports: no torch, no weights, so `tinyrl plan` runs in well under a second on a machine without a GPU.
`estimate` says where every byte goes for one set of knobs; `plan` picks the knobs for a budget; docs/memory.md
explains each term and lists, in the planner's own order, what to try after an out-of-memory error.

The parts, each importing only those above it (and tinyrl.hub / tinyrl.errors):
  units.py     sizes: parse_bytes ('8G'), format_bytes
  geometry.py  the model: ModelGeometry from config.json (a folder, the HF cache, a GGUF, PUBLIC_CONFIGS, the Hub)
  device.py    the device: DeviceCaps, the DEVICES presets, detect_caps
  knobs.py     the knobs: Settings, the paper's starting values, the planner's limits
  terms.py     the byte formulas and their measured constants
  phases.py    estimate: the byte table, phase by phase (fixed, generation, training, overhead)
  explain.py   the plan in words: why each knob has its value, format_plan, the no-fit line
  search.py    plan: the search over the knobs, plan_for, minimum_bytes
This file only re-exports them: `budget.plan`, `budget.estimate`, ... as before the split.

Shapes: P prompts per step, G group size, B micro-batch, Bg sequences in flight while generating, Tp prompt
tokens, Tc completion tokens, T = Tp + Tc, D hidden, L layers, H / KV attention / key-value heads, hd head dim,
I MLP width, V vocabulary, r LoRA rank, c bytes per element of the compute dtype.

What is modelled (the training loop must keep to it, or the estimate is wrong):
  - base model: bitsandbytes NF4 with double quantisation on the decoder blocks' linear layers, or the whole
    model in the compute dtype; embeddings, lm_head and norms always in the compute dtype;
  - LoRA on q, k, v, o, gate, up, down of every layer; LoRA weights, grads and both AdamW moments in fp32;
    grads freed between steps (`zero_grad(set_to_none=True)`);
  - generation: policy.decode, Bg sequences at a time; the distinct prompts of those Bg are prefilled once and
    their cache rows copied for each completion into a cache laid out at full length (policy.shared_prefill,
    policy.lay_out; where transformers cannot, a DynamicCache grown by torch.cat); on CUDA each decoding step is
    a replayed CUDA graph (tinyrl.decoding) whose pool holds one step's temporaries together;
  - a decoding step of a grouped-query model repeats one layer's K/V to every head where transformers' SDPA
    path does so (`decode_repeats_kv`);
  - training: the no-grad reference pass (adapter disabled) of a micro-batch, then its forward/backward;
    on CPUs the distinct prompts of a micro-batch run once and each row's completion attends to its prompt's K/V
    (policy.completion_hidden), for full-attention models; on CUDA every row runs whole (policy.share_scoring);
    gradient checkpointing is non-reentrant at each decoder layer; log-probs only at completion positions,
    `logprob_chunk` rows at a time, each chunk's logits recomputed in backward and turned into their gradient in
    place (policy._TokenLogprob), so only one chunk's [chunk, Tc, V] fp32 block is ever alive.

The framework overhead (CUDA context, workspaces, allocator fragmentation) is a documented constant; the CUDA
context was calibrated by bench/budget.py on an H200, and bench/budget_cpu.py checks the activation and log-prob
terms on CPU (docs/memory.md has both tables).
"""

from tinyrl.budget.device import DEVICES, DeviceCaps, detect_caps, device_caps
from tinyrl.budget.explain import format_plan
from tinyrl.budget.geometry import (
    PUBLIC_CONFIGS,
    ModelGeometry,
    full_attention,
    geometry_from_config,
    load_model_config,
)
from tinyrl.budget.knobs import (
    DEFAULT_LORA_RANK,
    DTYPES,
    GIVEN,
    KNOBS,
    LOGPROB_CHUNK_MAX,
    MARGIN,
    MIN_GROUP_SIZE,
    MIN_LORA_RANK,
    MIN_NEW_TOKENS,
    NEW_TOKENS_STEP,
    PAPER,
    QUANTS,
    TOKENS_PER_MICRO,
    Settings,
)
from tinyrl.budget.phases import Breakdown, Term, estimate
from tinyrl.budget.search import LEVELS, Plan, minimum_bytes, plan, plan_for
from tinyrl.budget.terms import (
    CPU_RUNTIME_BYTES,
    CUDA_CONTEXT_BYTES,
    CUDA_WORKSPACE_BYTES,
    ENCODER_BYTES,
    FRAGMENTATION,
    LOSS_TENSORS,
    NF4_BLOCK,
    NF4_BLOCK2,
    NF4_STATE_BYTES,
    SAMPLING_BYTES,
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
from tinyrl.budget.units import GiB, KiB, MiB, format_bytes, parse_bytes

__all__ = [
    "Breakdown", "CPU_RUNTIME_BYTES", "CUDA_CONTEXT_BYTES", "CUDA_WORKSPACE_BYTES", "DEFAULT_LORA_RANK", "DEVICES",
    "DTYPES", "DeviceCaps", "ENCODER_BYTES", "FRAGMENTATION", "GIVEN", "GiB", "KNOBS", "KiB", "LEVELS",
    "LOGPROB_CHUNK_MAX", "LOSS_TENSORS", "MARGIN", "MIN_GROUP_SIZE", "MIN_LORA_RANK", "MIN_NEW_TOKENS", "MiB",
    "ModelGeometry", "NEW_TOKENS_STEP", "NF4_BLOCK", "NF4_BLOCK2", "NF4_STATE_BYTES", "PAPER", "PUBLIC_CONFIGS",
    "Plan", "QUANTS", "SAMPLING_BYTES", "Settings", "TOKENS_PER_MICRO", "Term", "cache_lays_out",
    "decode_repeats_kv", "detect_caps", "device_caps", "estimate", "format_bytes", "format_plan", "full_attention",
    "geometry_from_config", "layer_backward_bytes_per_token", "layer_nograd_bytes_per_token",
    "layer_saved_bytes_per_token", "load_model_config", "logprob_bytes", "minimum_bytes", "nf4_bytes",
    "parse_bytes", "plan", "plan_for", "prefill_rows", "sampling_bytes",
]
