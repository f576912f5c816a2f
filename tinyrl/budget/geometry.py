"""The model, as the planner sees it: the shape of a decoder-only transformer, read from its config.json.

Owns ModelGeometry (hidden size, layers, heads, MLP width, vocabulary; parameter and LoRA counts),
`geometry_from_config`, and `load_model_config`, which finds config.json in a local folder or file, a GGUF file's
metadata (read with the stdlib), the Hugging Face cache, the built-in PUBLIC_CONFIGS, or the Hub (the planner's one
network access). Imports tinyrl.hub and tinyrl.errors only: no other part of the planner, and no torch.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Mapping

from tinyrl import hub
from tinyrl.errors import UserError


@dataclass(frozen=True)
class ModelGeometry:
    """The shape of a decoder-only transformer with a gated (SwiGLU) MLP: llama, qwen2, mistral, falcon3."""

    name: str
    hidden: int  # D
    layers: int  # L
    heads: int  # H
    kv_heads: int  # KV
    head_dim: int  # hd
    intermediate: int  # I
    vocab: int  # V
    tied_embeddings: bool  # lm_head shares the embedding matrix
    qkv_bias: bool = False  # qwen2 has biases on q, k, v
    full_attention: bool = True  # no sliding-window layers: rows of a group share one prompt pass in training

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def linears(self) -> tuple[tuple[str, int, int], ...]:
        """(name, in_features, out_features) of the seven linear layers of one decoder layer."""
        d, q, kv, i = self.hidden, self.q_dim, self.kv_dim, self.intermediate
        return (("q", d, q), ("k", d, kv), ("v", d, kv), ("o", q, d), ("gate", d, i), ("up", d, i), ("down", i, d))

    def linear_params(self) -> int:
        """Weights of the linear layers of all decoder layers."""
        return self.layers * sum(a * b for _, a, b in self.linears())

    def params(self) -> int:
        """All parameters (what the model card calls its size)."""
        embed = self.vocab * self.hidden * (1 if self.tied_embeddings else 2)
        bias = self.layers * (self.q_dim + 2 * self.kv_dim) if self.qkv_bias else 0
        return self.linear_params() + embed + bias + (2 * self.layers + 1) * self.hidden

    def lora_params(self, rank: int) -> int:
        """LoRA A [r, in] and B [out, r] on every linear layer of every decoder layer."""
        return rank * self.layers * sum(a + b for _, a, b in self.linears())


def geometry_from_config(cfg: Mapping[str, Any], name: str | None = None) -> ModelGeometry:
    """A HF config.json (as a dict) -> ModelGeometry. Multimodal configs use their `text_config`."""
    if "text_config" in cfg and "hidden_size" not in cfg:
        cfg = {**cfg["text_config"], "_name_or_path": cfg.get("_name_or_path")}
    name = name or str(cfg.get("_name_or_path") or cfg.get("model_type") or "model")
    missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                           "vocab_size") if not cfg.get(k)]
    if missing:
        raise UserError(f"config.json of {name} lacks {', '.join(missing)}: tinyrl plans llama/qwen2-style models")
    model_type = str(cfg.get("model_type", "")).lower()
    hidden, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
    return ModelGeometry(
        name=name,
        hidden=hidden,
        layers=int(cfg["num_hidden_layers"]),
        heads=heads,
        kv_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=int(cfg.get("head_dim") or hidden // heads),
        intermediate=int(cfg["intermediate_size"]),
        vocab=int(cfg["vocab_size"]),
        # transformers' llama/qwen2/mistral configs default to untied when the key is absent
        tied_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=bool(cfg.get("attention_bias", model_type.startswith("qwen2"))),
        full_attention=full_attention(cfg),
    )


def full_attention(cfg: Mapping[str, Any]) -> bool:
    """Every layer attends to the whole sequence: no sliding-window or other layer types (config.json as a dict).

    >>> full_attention({"sliding_window": 32768, "use_sliding_window": False}), full_attention({"sliding_window": 4096})
    (True, False)
    """
    if set(cfg.get("layer_types") or ["full_attention"]) != {"full_attention"}:
        return False
    return cfg.get("sliding_window") is None or cfg.get("use_sliding_window") is False


# Public config.json values (the fields the planner reads). Qwen2.5 and Llama-3.2 checked against copies of
# their config.json; SmolLM2 against the metadata of its GGUF; Falcon3-1B's shape (2048/18/8/4, head_dim 256,
# 131072 vocab) matches copies of its config, its tie_word_embeddings=false is recalled (1.67 B parameters
# with an untied 131072 x 2048 lm_head agrees with the model card).
PUBLIC_CONFIGS: dict[str, dict[str, Any]] = {
    "Qwen/Qwen2.5-0.5B-Instruct": {
        "model_type": "qwen2", "hidden_size": 896, "num_hidden_layers": 24, "num_attention_heads": 14,
        "num_key_value_heads": 2, "intermediate_size": 4864, "vocab_size": 151936, "tie_word_embeddings": True,
        "max_position_embeddings": 32768, "torch_dtype": "bfloat16",
    },
    "meta-llama/Llama-3.2-1B-Instruct": {
        "model_type": "llama", "hidden_size": 2048, "num_hidden_layers": 16, "num_attention_heads": 32,
        "num_key_value_heads": 8, "head_dim": 64, "intermediate_size": 8192, "vocab_size": 128256,
        "tie_word_embeddings": True, "attention_bias": False, "max_position_embeddings": 131072,
        "torch_dtype": "bfloat16",
    },
    "tiiuae/Falcon3-1B-Instruct": {
        "model_type": "llama", "hidden_size": 2048, "num_hidden_layers": 18, "num_attention_heads": 8,
        "num_key_value_heads": 4, "head_dim": 256, "intermediate_size": 8192, "vocab_size": 131072,
        "tie_word_embeddings": False, "attention_bias": False, "max_position_embeddings": 8192,
        "torch_dtype": "bfloat16",
    },
    "HuggingFaceTB/SmolLM2-135M-Instruct": {
        "model_type": "llama", "hidden_size": 576, "num_hidden_layers": 30, "num_attention_heads": 9,
        "num_key_value_heads": 3, "head_dim": 64, "intermediate_size": 1536, "vocab_size": 49152,
        "tie_word_embeddings": True, "attention_bias": False, "max_position_embeddings": 8192,
        "torch_dtype": "bfloat16",
    },
}
_PUBLIC_ALIASES = {k.split("/")[1].lower(): k for k in PUBLIC_CONFIGS}
_PUBLIC_ALIASES["unsloth/llama-3.2-1b-instruct"] = "meta-llama/Llama-3.2-1B-Instruct"


def load_model_config(model: str) -> dict[str, Any]:
    """config.json of `model` as a dict, looked up in order: a local folder (or a config.json, or a .gguf
    file, or a folder holding one .gguf), the Hugging Face cache, the built-in PUBLIC_CONFIGS, the Hub
    (unless HF_HUB_OFFLINE is set). `_source` in the result says which. One-line UserError when none has it."""
    path = Path(model).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file():
            return _read_json(path / "config.json", model, "folder")
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return _gguf_config(ggufs[0])
    elif path.is_file():
        return _gguf_config(path) if path.suffix == ".gguf" else _read_json(path, model, "file")
    cached = _hf_cache_config(model)
    if cached is not None:
        return _read_json(cached, model, "hf-cache")
    key = _PUBLIC_ALIASES.get(model.lower(), model if model in PUBLIC_CONFIGS else None)
    key = key or _PUBLIC_ALIASES.get(model.rsplit("/", 1)[-1].lower())
    if key:
        return {**PUBLIC_CONFIGS[key], "_name_or_path": key, "_source": "built-in"}
    if "/" in model and not hub.offline():
        try:  # the one network access; huggingface_hub is imported only here
            from huggingface_hub import hf_hub_download

            return _read_json(Path(hf_hub_download(model, "config.json", etag_timeout=3)), model, "hub")
        except Exception:  # noqa: BLE001 - any failure is the same message to the user
            pass
    raise UserError(f"cannot read config.json of {model!r}: pass --model a local folder containing config.json")


def _read_json(path: Path, model: str, source: str) -> dict[str, Any]:
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read {path}: {err}") from None
    return {"_name_or_path": model, **cfg, "_source": source}


def _hf_cache_config(model: str) -> Path | None:
    """config.json of repo `model` in the local Hugging Face cache, or None (no network)."""
    if model.count("/") != 1:
        return None
    cache = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if not cache:
        home = os.environ.get("HF_HOME") or os.path.join(
            os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "huggingface")
        cache = os.path.join(home, "hub")
    repo = Path(cache) / ("models--" + model.replace("/", "--"))
    ref = repo / "refs" / "main"
    if ref.is_file():
        config = repo / "snapshots" / ref.read_text().strip() / "config.json"
        if config.is_file():
            return config
    found = sorted(repo.glob("snapshots/*/config.json"))
    return found[-1] if found else None



_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


def _gguf_config(path: Path) -> dict[str, Any]:
    """Read a GGUF file's metadata and tensor names (stdlib only) and express it as a HF config dict."""
    with open(path, "rb") as f:
        try:
            meta, names = _gguf_header(f)
        except (ValueError, struct.error, OSError) as err:
            raise UserError(f"cannot read the GGUF metadata of {path}: {err}") from None
    arch = meta.get("general.architecture", "llama")
    get = lambda key, default=None: meta.get(f"{arch}.{key}", default)  # noqa: E731
    heads = get("attention.head_count")
    cfg = {
        "_name_or_path": str(path), "_source": "gguf", "model_type": arch,
        "hidden_size": get("embedding_length"), "num_hidden_layers": get("block_count"),
        "num_attention_heads": heads, "num_key_value_heads": get("attention.head_count_kv", heads),
        "intermediate_size": get("feed_forward_length"),
        "vocab_size": get("vocab_size") or meta.get("tokenizer.ggml.tokens"),
        "tie_word_embeddings": "output.weight" not in names,
    }
    if get("attention.key_length"):
        cfg["head_dim"] = get("attention.key_length")
    return cfg


def _gguf_header(f: BinaryIO) -> tuple[dict[str, Any], set[str]]:
    """A GGUF file's metadata (key -> value; arrays as their length) and the names of its tensors."""
    if f.read(4) != b"GGUF":
        raise ValueError("not a GGUF file")
    _gguf_read(f, "<I")  # version
    n_tensors, n_kv = _gguf_read(f, "<Q"), _gguf_read(f, "<Q")
    meta = {}
    for _ in range(n_kv):
        key = _gguf_string(f)
        meta[key] = _gguf_value(f, _gguf_read(f, "<I"))
    names = set()
    for _ in range(n_tensors):
        names.add(_gguf_string(f))
        n_dims = _gguf_read(f, "<I")
        f.seek(8 * n_dims + 4 + 8, 1)  # dims (uint64 each), type (uint32), offset (uint64)
    return meta, names


def _gguf_read(f: BinaryIO, fmt: str) -> Any:
    return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]


def _gguf_string(f: BinaryIO) -> str:
    return f.read(_gguf_read(f, "<Q")).decode("utf-8", "replace")


def _gguf_value(f: BinaryIO, kind: int) -> Any:
    if kind in _GGUF_SCALARS:
        return _gguf_read(f, _GGUF_SCALARS[kind])
    if kind == 8:
        return _gguf_string(f)
    if kind == 9:  # array: only its length is kept, elements are skipped
        item, count = _gguf_read(f, "<I"), _gguf_read(f, "<Q")
        if item in _GGUF_SCALARS:
            f.seek(struct.calcsize(_GGUF_SCALARS[item]) * count, 1)
        else:
            for _ in range(count):
                _gguf_value(f, item)
        return count
    raise ValueError(f"unknown GGUF value type {kind}")
