"""Policy: load a causal LM with LoRA or QLoRA, sample completions, and compute completion log-probs in row chunks.

The parts, each importing only torch, the shared modules and policy.model:
  loading.py     load_policy: the model (transformers + peft, bitsandbytes for 4-bit, or Unsloth), its tokenizer
  model.py       the parts generation and scoring share: causal_lm, cache_keyword, positions
  generation.py  generate: shared prefill, laid-out cache, decoding, sampling (tinyrl/decoding.py: the CUDA-graph step)
  scoring.py     completion_logprobs and reference_logprobs: chunked log-probs with a hand-written backward
This file only re-exports them: `policy.generate`, `policy.load_policy`, ... as before the split. A name is looked up
where it is defined: to replace one for a test, patch it there (`policy.generation.decode`, not `policy.decode`).
"""

from tinyrl.policy.generation import (
    completion_mask,
    decode,
    eos_ids,
    eval_mode,
    generate,
    lay_out,
    lean_lora,
    next_tokens,
    shared_prefill,
)
from tinyrl.policy.loading import (
    ALIASES,
    SMOLLM2_GGUF,
    UNSLOTH_DEVICES,
    UNSLOTH_TARGETS,
    cache_root,
    check_plain_logits,
    check_unsloth,
    convert_gguf,
    cpu_bnb_workaround,
    load_policy,
    load_tokenizer,
    load_unsloth,
    pick_device,
    pick_dtype,
    resolve_model,
)
from tinyrl.policy.model import cache_keyword, causal_lm, positions
from tinyrl.policy.scoring import (  # the private three: tests check the hand-written backward against autograd
    _logprob_and_lse,  # noqa: F401
    _token_logprobs,  # noqa: F401
    _TokenLogprob,  # noqa: F401
    can_share_prompt,
    completion_hidden,
    completion_logprobs,
    prompt_sharing_available,
    reference_logprobs,
    share_scoring,
)

__all__ = [
    "ALIASES", "SMOLLM2_GGUF", "UNSLOTH_DEVICES", "UNSLOTH_TARGETS", "cache_keyword", "cache_root", "can_share_prompt",
    "causal_lm", "check_plain_logits", "check_unsloth", "completion_hidden", "completion_logprobs",
    "completion_mask", "convert_gguf", "cpu_bnb_workaround", "decode", "eos_ids", "eval_mode", "generate",
    "lay_out", "lean_lora", "load_policy", "load_tokenizer", "load_unsloth", "next_tokens", "pick_device",
    "pick_dtype", "positions", "prompt_sharing_available", "reference_logprobs", "resolve_model", "share_scoring",
    "shared_prefill",
]
