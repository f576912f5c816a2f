"""The parts of a loaded policy that generation and scoring both reach for: the transformers causal LM inside
peft, the keyword its decoder takes the KV cache by, and the position ids of left-padded rows.

A leaf of the policy package: imports torch only.
"""

from __future__ import annotations

import functools
import inspect

import torch


def causal_lm(model):
    """The transformers causal LM inside a peft model (its LoRA layers are injected in place), or the model."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids of left-padded rows: 0 at each row's first real token (pads get 0 too; they are masked)."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def cache_keyword(model) -> str:
    """transformers >= 5.2x calls the KV cache `cache`; earlier versions `past_key_values`."""
    return _cache_keyword(type(causal_lm(model).get_decoder()))


@functools.lru_cache(maxsize=None)
def _cache_keyword(decoder_class: type) -> str:
    return "cache" if "cache" in inspect.signature(decoder_class.forward).parameters else "past_key_values"
