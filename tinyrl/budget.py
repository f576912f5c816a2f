"""Memory planner: choose every memory-relevant setting so a run fits the card the first time.

Pure arithmetic from the model's config.json, a sample of tokenized prompt lengths and what the device
supports: no torch, no weights, so `tinyrl plan` runs in well under a second on a machine without a GPU.
`estimate` says where every byte goes for one set of knobs; `plan` picks the knobs for a budget; docs/memory.md
explains each term and lists, in the planner's own order, what to try after an out-of-memory error.

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

from __future__ import annotations

import functools
import json
import math
import os
import re
import struct
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Iterable, Mapping

from tinyrl import hub
from tinyrl.errors import UserError

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30

# ---------------------------------------------------------------------------------------------------------
# Constants. Every one is a documented assumption, checked by bench/budget.py (GPU) and bench/budget_cpu.py (CPU).

PAPER = {"group_size": 16, "prompts_per_step": 16, "max_prompt_tokens": 256, "max_new_tokens": 200}  # §6, GSM8K
DEFAULT_LORA_RANK = 16  # the rank the planner starts from; RL updates need little rank, so it may go lower
MIN_GROUP_SIZE = 4  # advantages are normalised within a group; below 4 completions they are mostly noise
MIN_LORA_RANK = 4  # the planner lowers the rank 16 -> 8 -> 4 and no further
MIN_NEW_TOKENS = 64  # the planner never shortens completions below this (a GSM8K answer needs ~100 tokens)
NEW_TOKENS_STEP = 8  # completions are shortened in steps of this many tokens
TOKENS_PER_MICRO = 4096  # micro-batch target: largest power of two with B*T <= this (more buys little speed)
LOGPROB_CHUNK_MAX = 4  # a [1, Tc, V] row is already a full-width matmul: more rows only save kernel launches

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
MARGIN = 0.05  # share of the card the planner leaves unplanned (drivers, other processes, estimation error)
ENCODER_BYTES = 128 * MiB  # all-MiniLM-L6-v2 on the device: 22.7 M fp32 params (91 MB) + batch activations

QUANTS = ("4bit", "none")
DTYPES = {"bf16": 2, "fp16": 2, "fp32": 4}


# ---------------------------------------------------------------------------------------------------------
# Sizes on the command line.

_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)


def parse_bytes(text: str | int) -> int:
    """'8G', '7.5GiB', '8000M', '8GB' or a plain byte count -> bytes. K/M/G/T and KiB..TiB are binary
    (powers of 1024), KB..TB are decimal, as `--vram 8G` means the 8 GiB a card advertises.

    >>> parse_bytes("8G") == 8 * 2**30, parse_bytes("8000M") == 8000 * 2**20, parse_bytes("8GB")
    (True, True, 8000000000)
    """
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        match = _SIZE.match(str(text))
        if not match:
            raise UserError(f"cannot read the size {text!r}: write it like 8G, 7.5GiB, 8000M or 8GB")
        number, prefix, suffix = match.groups()
        power = "kmgt".find(prefix.lower()) + 1 if prefix else 0
        decimal = suffix.lower() == "b" and power > 0  # "GB" without the i
        value = int(float(number) * ((1000 if decimal else 1024) ** power))
    if value <= 0:
        raise UserError(f"the size {text!r} must be more than 0 bytes")
    return value


def format_bytes(n: float) -> str:
    """Bytes for people: '512.0 MiB', '7.50 GiB'."""
    if abs(n) >= GiB:
        return f"{n / GiB:.2f} GiB"
    if abs(n) >= MiB:
        return f"{n / MiB:.1f} MiB"
    if abs(n) >= KiB:
        return f"{n / KiB:.1f} KiB"
    return f"{int(n)} B"


# ---------------------------------------------------------------------------------------------------------
# The model, from its config.json.


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
        def read(fmt: str) -> Any:
            return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]

        def string() -> str:
            return f.read(read("<Q")).decode("utf-8", "replace")

        def value(kind: int) -> Any:
            if kind in _GGUF_SCALARS:
                return read(_GGUF_SCALARS[kind])
            if kind == 8:
                return string()
            if kind == 9:  # array: only its length is kept, elements are skipped
                item, count = read("<I"), read("<Q")
                if item in _GGUF_SCALARS:
                    f.seek(struct.calcsize(_GGUF_SCALARS[item]) * count, 1)
                else:
                    for _ in range(count):
                        value(item)
                return count
            raise ValueError(f"unknown GGUF value type {kind}")

        try:
            if f.read(4) != b"GGUF":
                raise ValueError("not a GGUF file")
            read("<I")  # version
            n_tensors, n_kv = read("<Q"), read("<Q")
            meta = {}
            for _ in range(n_kv):
                key = string()
                meta[key] = value(read("<I"))
            names = set()
            for _ in range(n_tensors):
                names.add(string())
                n_dims = read("<I")
                f.seek(8 * n_dims + 4 + 8, 1)  # dims (uint64 each), type (uint32), offset (uint64)
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


# ---------------------------------------------------------------------------------------------------------
# The device.


@dataclass(frozen=True)
class DeviceCaps:
    """What a device can do that changes the plan."""

    name: str
    total_bytes: int  # memory it exposes (nvidia-smi's total); 0 when unknown: --vram is trusted
    bf16: bool  # native bfloat16 (compute capability >= 8.0)
    fp16: bool = True  # usable float16 (sm60+)
    cuda: bool = True  # False: a CPU run (RAM is the budget, no 4-bit, fp32)
    fused_attention: bool = True  # SDPA kernel that never materialises [B, H, T, T]; False: eager attention


# Totals are approximately what nvidia-smi reports (ECC and driver reservations already taken off).
DEVICES: dict[str, DeviceCaps] = {
    "T4": DeviceCaps("T4", 15360 * MiB, bf16=False),
    "P100": DeviceCaps("P100", 16280 * MiB, bf16=False),
    "V100": DeviceCaps("V100", 16160 * MiB, bf16=False),
    "L4": DeviceCaps("L4", 22491 * MiB, bf16=True),
    "A10G": DeviceCaps("A10G", 22731 * MiB, bf16=True),
    "A100": DeviceCaps("A100", 81920 * MiB, bf16=True),
    "A100-40G": DeviceCaps("A100-40G", 40960 * MiB, bf16=True),
    "H100": DeviceCaps("H100", 81559 * MiB, bf16=True),
    "cuda": DeviceCaps("cuda", 0, bf16=True),  # an unnamed modern GPU: the default for `tinyrl plan`
    "cpu": DeviceCaps("cpu", 0, bf16=False, fp16=False, cuda=False),
}


def device_caps(name: str) -> DeviceCaps:
    """A preset by name, case-insensitive ('t4', 'H100', 'cpu')."""
    for key, caps in DEVICES.items():
        if key.lower() == name.strip().lower():
            return caps
    raise UserError(f"unknown device {name!r}: use one of {', '.join(DEVICES)}")


def detect_caps(device: str = "auto") -> DeviceCaps:
    """The device this process would train on (`device`: the run's --device: auto, cpu, cuda or cuda:N). Imports
    torch, so only call it when about to train."""
    import torch  # noqa: PLC0415 - deliberately lazy: `plan` must not pay for torch

    if device == "cpu" or not torch.cuda.is_available():
        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        return replace(DEVICES["cpu"], total_bytes=pages * size)
    index = torch.device(device).index if device.startswith("cuda") else None
    props = torch.cuda.get_device_properties(index or 0)
    return DeviceCaps(props.name, props.total_memory, bf16=props.major >= 8, fp16=props.major >= 6)


# ---------------------------------------------------------------------------------------------------------
# One set of knobs and where its bytes go.


@dataclass(frozen=True)
class Settings:
    """The memory-relevant knobs; the names are Config fields."""

    group_size: int = PAPER["group_size"]  # G completions per prompt
    prompts_per_step: int = PAPER["prompts_per_step"]  # P prompts per optimiser step
    gen_batch: int = 16  # Bg sequences in flight while generating (of P*G)
    micro_batch: int = 4  # B sequences per forward/backward
    logprob_chunk: int = 1  # rows of [rows, Tc, V] log-prob buffers alive at once (<= micro_batch)
    lora_rank: int = DEFAULT_LORA_RANK  # r
    quant: str = "4bit"  # "4bit": NF4 base linear layers; "none": whole model in the compute dtype
    dtype: str = "bf16"  # compute dtype: "bf16" | "fp16" | "fp32"
    grad_checkpointing: bool = True  # recompute each decoder layer in backward
    max_prompt_tokens: int = PAPER["max_prompt_tokens"]  # prompts are left-truncated to this
    max_new_tokens: int = PAPER["max_new_tokens"]  # completion cap Tc


KNOBS: tuple[str, ...] = tuple(f.name for f in fields(Settings))
# Config fields `plan` takes from the run as they are (its `base`): what the user asked for, not what fits
GIVEN = ("group_size", "prompts_per_step", "max_prompt_tokens", "max_new_tokens", "top_p")


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
    whether decoding replays a CUDA graph (default: on CUDA where the cache is laid out, as decode=auto does)."""
    g, s = geometry, settings
    c = DTYPES[s.dtype]
    L, D, V, I, H = g.layers, g.hidden, g.vocab, g.intermediate, g.heads  # noqa: N806 - the shape vocabulary
    tp = min(prompt_len, s.max_prompt_tokens)
    tc = s.max_new_tokens
    t = tp + tc
    n_seq = s.prompts_per_step * s.group_size
    n_lora = g.lora_params(s.lora_rank)
    terms: list[Term] = []

    def add(phase: str, name: str, nbytes: int, formula: str) -> int:
        terms.append(Term(phase, name, int(nbytes), formula))
        return int(nbytes)

    # fixed: lives from start to end --------------------------------------------------------------------
    if s.quant == "4bit":
        per_layer = sum(nf4_bytes(a * b) for _, a, b in g.linears())
        fixed = add("fixed", "weights: linear layers (NF4)", L * per_layer,
                    f"L·Σ(n/2 + n/64 + 4n/16384 + 1092 B), n = in·out of 7 linears = {L}·{per_layer}")
    else:
        fixed = add("fixed", f"weights: linear layers ({s.dtype})", g.linear_params() * c,
                    f"L·Σ in·out·c = {g.linear_params()}·{c}")
    if g.qkv_bias:
        fixed += add("fixed", "weights: q/k/v biases", L * (g.q_dim + 2 * g.kv_dim) * c,
                     f"L·(H+2KV)·hd·c = {L}·{g.q_dim + 2 * g.kv_dim}·{c}")
    fixed += add("fixed", "weights: embeddings", V * D * c, f"V·D·c = {V}·{D}·{c}")
    if not g.tied_embeddings:
        fixed += add("fixed", "weights: lm_head", V * D * c, f"V·D·c = {V}·{D}·{c} (untied)")
    fixed += add("fixed", "weights: norms", (2 * L + 1) * D * c, f"(2L+1)·D·c = {2 * L + 1}·{D}·{c}")
    lora_formula = f"r·L·Σ(in+out) = {s.lora_rank}·{L}·{n_lora // max(1, s.lora_rank * L)} = {n_lora:,} params"
    fixed += add("fixed", "LoRA weights (fp32)", 4 * n_lora, f"4·{lora_formula}")
    fixed += add("fixed", "AdamW moments (2 × fp32)", 8 * n_lora, "8 B per LoRA param")
    if encoder_bytes:
        fixed += add("fixed", "memory encoder (MiniLM)", encoder_bytes, "22.7 M fp32 params + batch activations")
    fixed += add("fixed", "rollout buffers", n_seq * (t * 16 + tc * 16),
                 f"P·G·(T·(8+8) + Tc·4·4) = {n_seq}·({t}·16 + {tc}·16)")

    dequant = 0
    if s.quant == "4bit":
        biggest = max(a * b for _, a, b in g.linears())
        dequant = biggest * c  # bitsandbytes dequantises one weight for batched matmuls and in backward

    # generation: prefill the distinct prompts of Bg sequences once, repeat their cache rows, decode Tc steps --
    bg = s.gen_batch
    kp = prefill_rows(bg, s.group_size) if shared_prompts else bg
    if laid_out is None:
        laid_out = shared_prompts and g.full_attention and tp > 1 and cache_lays_out()  # 1-token prompts: no prefill
    kv_per_token = 2 * L * g.kv_dim * c
    kv = add("generation", "KV cache", kv_per_token * t * bg,
             f"2·L·KV·hd·T·Bg·c = 2·{L}·{g.kv_heads}·{g.head_dim}·{t}·{bg}·{c}")
    per_tok = layer_nograd_bytes_per_token(g, c, tp, caps.fused_attention)
    prefill = add("generation", "prefill (one layer, no grad)", kp * tp * per_tok,
                  f"k·Tp·(I·(2c+8) + D·(c+8) + Tp·c) = {kp}·{tp}·{per_tok}, k = distinct prompts of Bg rows")
    if laid_out:  # policy.lay_out: the cache allocated at full length once, the k prompts' rows copied into it
        prompt_kv = add("generation", "prompt KV (k distinct prompts)", kv_per_token * tp * kp,
                        f"2·L·KV·hd·Tp·k·c = {kv_per_token}·{tp}·{kp}")
        growth = prompt_kv + add("generation", "laying out: one layer's prompt K repeated to Bg rows",
                                 g.kv_dim * tp * bg * c, f"KV·hd·Tp·Bg·c = {g.kv_dim}·{tp}·{bg}·{c}")
    else:  # DynamicCache: Bg copies of the prompt rows, then torch.cat grows every layer every step
        repeated = kp if shared_prompts else 0  # the k prefilled rows, alive while their copies are made
        prompt_kv = add("generation", "prompt KV before and after repeating", kv_per_token * tp * (repeated + bg),
                        f"2·L·KV·hd·Tp·(k+Bg)·c = {kv_per_token}·{tp}·({repeated}+{bg})")
        growth = add("generation", "KV growth (torch.cat of one layer)", g.kv_dim * t * bg * c,
                     f"KV·hd·T·Bg·c = {g.kv_dim}·{t}·{bg}·{c}")
    per_logit = sampling_bytes(top_p, caps.cuda)
    sampling = add("generation", "sampling logits", bg * V * per_logit,
                   f"Bg·V·{per_logit} = {bg}·{V}·{per_logit}" + (f" (top_p {top_p})" if top_p < 1 else ""))
    attention = 0
    if repeats_kv is None:
        repeats_kv = decode_repeats_kv()
    if g.heads > g.kv_heads and repeats_kv:  # grouped-query attention with a mask (left padding): transformers
        # repeats one layer's K and V to all H heads in every decoding step, however long the cache is
        attention = add("generation", "decode attention: one layer's K/V repeated to H heads",
                        2 * g.q_dim * t * bg * c, f"2·H·hd·T·Bg·c = 2·{g.heads}·{g.head_dim}·{t}·{bg}·{c}")
    if dequant:
        add("generation", "dequantised weight (NF4 -> c)", dequant, "max(in·out)·c")
    # a decoding step's moments come one after another: a layer's cache grows (or is laid out, before the first
    # step), then its attention runs; sampling follows the last layer (policy.decode frees the logits first).
    # Replayed as a CUDA graph (tinyrl.decoding, on CUDA where the cache is laid out), the step's temporaries stay
    # allocated in the graph's pool from capture to the last token: counted together, not one after another
    if graphs is None:
        graphs = caps.cuda and laid_out
    step_moment, step_rule = max(attention, sampling), "max(attention, sampling)"
    if graphs:
        step_moment = add("generation", "CUDA graph pool: one step's attention + sampling + static buffers",
                          attention + sampling + bg * (t * (1 + c) + tc * 16),
                          f"attention + sampling + Bg·(T·(1+c) + Tc·16) = {attention} + {sampling} + "
                          f"{bg}·({t}·{1 + c} + {tc}·16)")
        step_rule = "graph pool"
    generation = max(prompt_kv + prefill, kv + max(growth, step_moment)) + dequant
    grow = "prompt KV + laying out" if laid_out else "growth"
    generation_rule = (f"max(prompt KV + prefill, KV + max({grow}, {step_rule}))"
                       + (" + dequantised" if dequant else ""))

    # training: reference pass, then forward/backward of one micro-batch, then the optimiser step -------
    # With shared prompts the kt distinct prompts of a micro-batch run once (kt·Tp tokens) and its B completions
    # (B·Tc tokens) attend to them; the prompts' K/V stay alive for the whole pass, and each layer's attention
    # keeps them repeated for B rows and H heads. The prompts' pass through the last layer feeds nothing (only its
    # K/V are read), so autograd keeps L-1 layers' worth of it.
    b, k = s.micro_batch, s.logprob_chunk
    lp_grad, lp_nograd = (16, 8) if autograd_logprobs else (logprob_bytes(c), logprob_bytes(c))
    kt = prefill_rows(b, s.group_size)
    if shared_scoring is None:
        shared_scoring = shared_prompts and not caps.cuda
    shared = shared_scoring and g.full_attention and kt < b and tp > 1
    n = kt * tp + b * tc if shared else b * t  # tokens through the decoder
    tokens = f"(kt·Tp + B·Tc) = ({kt}·{tp} + {b}·{tc})" if shared else f"B·T = {b}·{t}"
    # The prompts and the completions are two decoder calls: one layer's working set holds the larger one's tokens
    call = max(kt * tp, b * tc) if shared else n
    per_call = "m" if shared else "n"
    calls = f"m = max(kt·Tp, B·Tc) = {call}"
    grads = add("training", "LoRA grads (fp32)", 4 * n_lora, "4 B per LoRA param")
    shared_kv = add("training", "shared prompts' K/V", kv_per_token * kt * tp,
                    f"2·L·KV·hd·kt·Tp·c = {kv_per_token}·{kt}·{tp}, kt = distinct prompts of B rows") if shared else 0
    repeat_kv = b * tp * 2 * g.q_dim * c if shared else 0
    ref_tok = layer_nograd_bytes_per_token(g, c, t, caps.fused_attention, lora=False)  # the adapter is off
    ref = add("training", "reference pass (no grad)",
              shared_kv + n * D * c + max(call * ref_tok + repeat_kv, k * tc * V * lp_nograd),
              f"K/V + n·D·c + max({per_call}·one layer{' + B·Tp·2·H·hd·c' if shared else ''}, "
              f"chunk·Tc·V·{lp_nograd}), n = {tokens}" + (f", {calls}" if shared else ""))
    saved = layer_saved_bytes_per_token(g, s.lora_rank, c, t, caps.fused_attention)
    back = layer_backward_bytes_per_token(g, c)
    if s.grad_checkpointing:
        kept = add("training", "checkpoint boundaries", L * n * D * c, f"L·n·D·c, n = {tokens}")
        layer = add("training", "one layer recomputed + its backward", call * (saved + back)
                    + repeat_kv, f"{per_call}·(saved + grads) = {call}·({saved} + {back})"
                    + (f" + B·Tp·2·H·hd·c = {repeat_kv}, {calls}" if shared else ""))
    else:
        kept = add("training", "activations of all layers", (L * n - (kt * tp if shared else 0)) * saved
                   + L * repeat_kv, f"L·n·saved = {L}·{n}·{saved}" if not shared else
                   f"((L·n - kt·Tp)·saved + L·B·Tp·2·H·hd·c = ({L}·{n} - {kt}·{tp})·{saved} + {L}·{repeat_kv}")
        layer = add("training", "one layer's backward", call * back,
                    f"{per_call}·grads = {call}·{back}" + (f", {calls}" if shared else ""))
    kept += shared_kv
    final = add("training", "final norm + hidden", b * tc * D * (4 + c) if shared else n * D * (4 + c),
                f"B·Tc·D·(4+c) = {b}·{tc}·{D}·{4 + c}" if shared else f"B·T·D·(4+c) = {n}·{D}·{4 + c}")
    chunk = add("training", "log-prob chunk (with grads)", k * tc * V * lp_grad,
                f"chunk·Tc·V·{lp_grad} = {k}·{tc}·{V}·{lp_grad}")
    loss = add("training", "loss working set", LOSS_TENSORS * b * tc * 4,
               f"{LOSS_TENSORS}·B·Tc·4 = {LOSS_TENSORS}·{b}·{tc}·4")
    step = add("training", "AdamW step temporaries", 4 * n_lora, "4 B per LoRA param (foreach sqrt)")
    if dequant:
        add("training", "dequantised weight (NF4 -> c)", dequant, "max(in·out)·c")
    fwd_bwd = kept + final + loss + max(chunk, layer)
    training = grads + max(ref, fwd_bwd, step) + dequant
    training_rule = (f"grads + max(reference, {'shared K/V + ' if shared else ''}"
                     f"{'boundaries' if s.grad_checkpointing else 'activations'} + final + "
                     f"loss + max(log-prob chunk, {'layer' if s.grad_checkpointing else 'backward'}), step)"
                     + (" + dequantised" if dequant else ""))

    # overhead ------------------------------------------------------------------------------------------
    phase = max(generation, training)
    if caps.cuda:
        overhead = add("overhead", "CUDA context", CUDA_CONTEXT_BYTES, "constant: H200 measurement, rounded up")
        overhead += add("overhead", "CUDA workspaces", CUDA_WORKSPACE_BYTES, "cuBLAS/SDPA/bnb scratch, constant")
    else:
        overhead = add("overhead", "python + torch runtime", CPU_RUNTIME_BYTES, "resident size before any tensor")
    overhead += add("overhead", "allocator fragmentation", int(FRAGMENTATION * phase),
                    f"{FRAGMENTATION:.0%} of the larger phase = {FRAGMENTATION}·{phase}")
    return Breakdown(tuple(terms), fixed, generation, training, overhead, generation_rule, training_rule)


# ---------------------------------------------------------------------------------------------------------
# The planner.


@dataclass(frozen=True)
class Plan:
    """The chosen knobs, the byte table behind them, and why each knob has its value."""

    model: str
    device: str
    vram_bytes: int  # what --vram said
    budget_bytes: int  # what the plan must fit in: min(--vram, the device's total) less the margin
    prompt_len: int  # Tp: the longest sampled prompt, capped at max_prompt_tokens
    group_size: int
    prompts_per_step: int
    gen_batch: int
    micro_batch: int
    logprob_chunk: int
    lora_rank: int
    quant: str
    dtype: str
    grad_checkpointing: bool
    max_prompt_tokens: int
    max_new_tokens: int
    breakdown: Breakdown
    reasons: tuple[tuple[str, Any, str], ...]  # (knob, value, why)

    def settings(self) -> Settings:
        return Settings(**self.knobs())

    def knobs(self) -> dict[str, Any]:
        """The knob values by Config field name."""
        return {name: getattr(self, name) for name in KNOBS}

    def metrics(self) -> dict[str, int]:
        """The planned peaks fit logs every step next to the measured ones (docs/metrics.md, plan/*)."""
        bd = self.breakdown
        return {"plan/generate": bd.fixed + bd.generation, "plan/train": bd.fixed + bd.training,
                "plan/device": bd.peak}


def plan_for(cfg, geometry: ModelGeometry, prompt_lengths: Iterable[int], caps: DeviceCaps,
             pins: frozenset[str]) -> Plan:
    """The plan for a run's Config under its --vram: the knobs in `pins` (set by hand) kept, the settings the
    planner does not choose (GIVEN) taken as they are, the sentence encoder counted for the memory methods."""
    return plan(geometry, parse_bytes(cfg.vram), prompt_lengths, caps, {k: getattr(cfg, k) for k in KNOBS if k in pins},
                base={k: getattr(cfg, k) for k in GIVEN},
                encoder_bytes=ENCODER_BYTES if cfg.method.startswith("memory") else 0)


# Structural levels, most preferred first: 16-bit keeps the paper's numerics (no quantisation error in policy
# or reference) and is at least as fast; checkpointing changes no numbers, it only costs ~1/3 more training
# compute, so it is given up before 16-bit is. Within a level the LoRA rank goes down first.
LEVELS: tuple[tuple[str, bool], ...] = (("none", False), ("none", True), ("4bit", False), ("4bit", True))


def plan(
    geometry: ModelGeometry,
    vram_bytes: int,
    prompt_lengths: Iterable[int],
    caps: DeviceCaps = DEVICES["cuda"],
    pins: Mapping[str, Any] | None = None,
    *,
    base: Mapping[str, Any] | None = None,
    encoder_bytes: int = ENCODER_BYTES,
) -> Plan:
    """Choose every knob so the run fits in `vram_bytes` on `caps`.

    `pins` are values the user set: kept as they are, or a one-line UserError says what would fit. `base`
    overrides the paper's starting values (PAPER) for other tasks, e.g. AI-MO's 512/300 tokens and 64 prompts.
    Order (the "what to try on OOM" list in docs/memory.md follows it):
      1. group_size, prompts_per_step, lengths: the paper's values (G never below 4; memory does not depend on
         P, generation and training loop over P*G; a larger G only shares one prefill among more rows);
      2. dtype: bf16 where supported, else fp16 on a GPU, fp32 on a CPU;
      3. for each level of LEVELS (16-bit without, then with checkpointing; 4-bit without, then with), for
         rank 16, 8, 4: accept the first where the micro-batch target (~4k tokens) and at least G sequences in
         flight fit; gen_batch is then the most that fits (up to P*G);
      4. otherwise the cheapest level and rank with smaller micro-batch and gen_batch (down to 1);
      5. otherwise, the last resort, shorter completions (down to MIN_NEW_TOKENS) with micro_batch 1;
      6. the rank is raised back up wherever that costs nothing;
      7. logprob_chunk: the most rows (<= micro_batch, <= LOGPROB_CHUNK_MAX) that do not raise the peak;
      8. before 7, on CUDA: micro_batch grown to the most that fits (each micro-batch costs kernel launches).
    """
    pins = _check_pins(dict(pins or {}), caps)
    start = {**PAPER, "lora_rank": DEFAULT_LORA_RANK, **(base or {}), **pins}
    top_p = start.get("top_p", 1.0)
    budget = _budget(vram_bytes, caps)
    lengths = [int(x) for x in prompt_lengths]
    dtype = pins.get("dtype") or ("bf16" if caps.bf16 else "fp16" if caps.fp16 and caps.cuda else "fp32")
    tp = min(max(lengths), start["max_prompt_tokens"]) if lengths else start["max_prompt_tokens"]
    n_seq = start["group_size"] * start["prompts_per_step"]

    levels = [lv for lv in LEVELS if (caps.cuda or lv[0] == "none")
              and pins.get("quant", lv[0]) == lv[0] and pins.get("grad_checkpointing", lv[1]) == lv[1]]
    if not levels:  # 4-bit pinned on a CPU
        levels = [(pins["quant"], pins.get("grad_checkpointing", True))]
    ranks = [pins["lora_rank"]] if "lora_rank" in pins else _halvings(start["lora_rank"], MIN_LORA_RANK)

    def settings(quant: str, ckpt: bool, rank: int, bg: int, b: int, tc: int, chunk: int = 1) -> Settings:
        return Settings(group_size=start["group_size"], prompts_per_step=start["prompts_per_step"],
                        gen_batch=pins.get("gen_batch", bg), micro_batch=pins.get("micro_batch", b),
                        logprob_chunk=pins.get("logprob_chunk", min(chunk, pins.get("micro_batch", b))),
                        lora_rank=rank, quant=quant, dtype=dtype, grad_checkpointing=ckpt,
                        max_prompt_tokens=start["max_prompt_tokens"], max_new_tokens=tc)

    def peak(s: Settings) -> int:
        return estimate(geometry, s, tp, caps, encoder_bytes, top_p=top_p).peak

    def most(candidates: list[int], make) -> int | None:  # largest candidate whose settings fit
        return next((x for x in candidates if peak(make(x)) <= budget), None)

    micro_floor = pins.get("logprob_chunk", 1)  # a pinned chunk needs at least that many rows per micro-batch

    def micro_target(tc: int) -> int:
        if "micro_batch" in pins:
            return pins["micro_batch"]
        return max(micro_floor, min(n_seq, _pow2_floor(max(1, TOKENS_PER_MICRO // (tp + tc)))))

    gen_cands = [pins["gen_batch"]] if "gen_batch" in pins else _gen_candidates(n_seq)
    gen_floor = min(start["group_size"], n_seq) if "gen_batch" not in pins else pins["gen_batch"]
    tc0 = start["max_new_tokens"]
    chosen = None
    stage = ""
    # 3. preferred levels with comfortable batches
    m_target = micro_target(tc0)
    for quant, ckpt in levels:
        for rank in ranks:
            if peak(settings(quant, ckpt, rank, 1, m_target, tc0)) > budget:
                continue
            bg = most(gen_cands, lambda x: settings(quant, ckpt, rank, x, 1, tc0))
            if bg is not None and bg >= gen_floor:
                chosen, stage = (quant, ckpt, rank, bg, m_target, tc0), "preferred"
                break
        if chosen:
            break
    # 4. cheapest level, smaller batches
    quant, ckpt = levels[-1]
    if chosen is None:
        rank = ranks[-1]
        b = most(_halvings(m_target, micro_floor), lambda x: settings(quant, ckpt, rank, 1, x, tc0))
        bg = most(gen_cands, lambda x: settings(quant, ckpt, rank, x, 1, tc0))
        if b is not None and bg is not None:
            chosen, stage = (quant, ckpt, rank, bg, b, tc0), "small batches"
    # 5. last resort: shorter completions
    if chosen is None and "max_new_tokens" not in pins:
        rank = ranks[-1]
        b = pins.get("micro_batch", micro_floor)
        for tc in range(tc0 - NEW_TOKENS_STEP, MIN_NEW_TOKENS - 1, -NEW_TOKENS_STEP):
            if peak(settings(quant, ckpt, rank, 1, b, tc)) <= budget:
                bg = most(gen_cands, lambda x: settings(quant, ckpt, rank, x, b, tc))
                if bg is not None:
                    chosen, stage = (quant, ckpt, rank, bg, b, tc), "shortened"
                    break
    if chosen is None:
        raise UserError(_no_fit_message(geometry, vram_bytes, budget, lengths, caps, pins, base, encoder_bytes))

    quant, ckpt, rank, bg, b, tc = chosen
    # 6. the rank back up where it is free
    rank = next(r for r in ranks if r >= rank and peak(settings(quant, ckpt, r, bg, b, tc)) <= budget)
    # 8 (before 7, which depends on it). On CUDA, the largest micro-batch the budget allows: a GPU micro-batch costs
    # its kernel launches whatever its rows, so fewer, larger ones are faster; a CPU gains nothing past ~4k tokens
    if caps.cuda and "micro_batch" not in pins and stage == "preferred":
        b = next((x for x in _halvings(n_seq, b + 1) if peak(settings(quant, ckpt, rank, bg, x, tc)) <= budget), b)
    # 7. log-prob chunk: the most rows that do not raise the peak
    base_peak = peak(settings(quant, ckpt, rank, bg, b, tc, 1))
    chunk = 1
    if "logprob_chunk" not in pins:
        for k in _halvings(min(b, LOGPROB_CHUNK_MAX), 1):
            if peak(settings(quant, ckpt, rank, bg, b, tc, k)) <= base_peak:
                chunk = k
                break
    final = settings(quant, ckpt, rank, bg, b, tc, chunk)
    breakdown = estimate(geometry, final, tp, caps, encoder_bytes, top_p=top_p)
    reasons = _reasons(geometry, final, breakdown, tp, lengths, caps, pins, start, stage, budget, encoder_bytes)
    return Plan(model=geometry.name, device=caps.name, vram_bytes=vram_bytes, budget_bytes=budget, prompt_len=tp,
                **{name: getattr(final, name) for name in KNOBS}, breakdown=breakdown, reasons=reasons)


def minimum_bytes(
    geometry: ModelGeometry,
    prompt_lengths: Iterable[int],
    caps: DeviceCaps = DEVICES["cuda"],
    pins: Mapping[str, Any] | None = None,
    *,
    base: Mapping[str, Any] | None = None,
    encoder_bytes: int = ENCODER_BYTES,
) -> int:
    """The smallest --vram any plan with these pins fits in (the cheapest knobs, shortest completions)."""
    pins = _check_pins(dict(pins or {}), caps)
    start = {**PAPER, "lora_rank": DEFAULT_LORA_RANK, **(base or {}), **pins}
    lengths = [int(x) for x in prompt_lengths]
    tp = min(max(lengths), start["max_prompt_tokens"]) if lengths else start["max_prompt_tokens"]
    quant = pins.get("quant", "4bit" if caps.cuda else "none")
    s = Settings(
        group_size=start["group_size"], prompts_per_step=start["prompts_per_step"],
        gen_batch=pins.get("gen_batch", 1), micro_batch=pins.get("micro_batch", 1),
        logprob_chunk=pins.get("logprob_chunk", 1), lora_rank=pins.get("lora_rank", MIN_LORA_RANK), quant=quant,
        dtype=pins.get("dtype") or ("bf16" if caps.bf16 else "fp16" if caps.fp16 and caps.cuda else "fp32"),
        grad_checkpointing=pins.get("grad_checkpointing", True), max_prompt_tokens=start["max_prompt_tokens"],
        max_new_tokens=pins.get("max_new_tokens", min(MIN_NEW_TOKENS, start["max_new_tokens"])))
    need = estimate(geometry, s, tp, caps, encoder_bytes, top_p=start.get("top_p", 1.0)).peak
    return math.ceil(need / (1 - MARGIN))


def _budget(vram_bytes: int, caps: DeviceCaps) -> int:
    usable = min(vram_bytes, caps.total_bytes) if caps.total_bytes else vram_bytes
    return int(usable * (1 - MARGIN))


def _check_pins(pins: dict[str, Any], caps: DeviceCaps) -> dict[str, Any]:
    unknown = sorted(set(pins) - set(KNOBS))
    if unknown:
        raise UserError(f"unknown setting {', '.join(unknown)}: the planner's settings are {', '.join(KNOBS)}")
    for name, value in pins.items():
        if name in ("quant", "dtype", "grad_checkpointing"):
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UserError(f"{name} must be a whole number of at least 1, not {value!r}")
    if pins.get("group_size", MIN_GROUP_SIZE) < MIN_GROUP_SIZE:
        raise UserError(f"group_size must be at least {MIN_GROUP_SIZE} (advantages are normalised within a group; "
                        f"with {pins['group_size']} completions they are mostly noise)")
    if "quant" in pins and pins["quant"] not in QUANTS:
        raise UserError(f"quant must be one of {', '.join(QUANTS)}, not {pins['quant']!r}")
    if "dtype" in pins:
        if pins["dtype"] not in DTYPES:
            raise UserError(f"dtype must be one of {', '.join(DTYPES)}, not {pins['dtype']!r}")
        if pins["dtype"] == "bf16" and not caps.bf16:
            raise UserError(f"{caps.name} has no bf16: set dtype=fp16" + (" or dtype=fp32" if caps.cuda else "")
                            if caps.fp16 and caps.cuda else f"{caps.name} has no bf16: set dtype=fp32")
        if pins["dtype"] == "fp16" and not (caps.fp16 and caps.cuda):
            raise UserError(f"{caps.name} has no usable fp16: set dtype=fp32")
    if "grad_checkpointing" in pins and not isinstance(pins["grad_checkpointing"], bool):
        raise UserError(f"grad_checkpointing must be true or false, not {pins['grad_checkpointing']!r}")
    if "logprob_chunk" in pins and pins["logprob_chunk"] > pins.get("micro_batch", pins["logprob_chunk"]):
        raise UserError(f"logprob_chunk ({pins['logprob_chunk']}) cannot exceed micro_batch ({pins['micro_batch']})")
    return pins


def _pow2_floor(n: int) -> int:
    return 1 << (max(1, n).bit_length() - 1)


def _halvings(n: int, floor: int) -> list[int]:
    """n, then powers of two below it, down to floor: 16 -> [16, 8, 4]; 12 -> [12, 8, 4]."""
    out = [n]
    x = _pow2_floor(n)
    if x == n:
        x //= 2
    while x >= floor:
        out.append(x)
        x //= 2
    return [v for v in out if v >= floor] or [floor]


def _gen_candidates(n_seq: int) -> list[int]:
    return _halvings(n_seq, 1)


def _no_fit_message(geometry, vram_bytes, budget, lengths, caps, pins, base, encoder_bytes) -> str:
    need = minimum_bytes(geometry, lengths, caps, pins, base=base, encoder_bytes=encoder_bytes)
    have = format_bytes(vram_bytes)
    if pins:
        pinned = ", ".join(f"{k}={v}" for k, v in sorted(pins.items()))
        head = f"{geometry.name} with {pinned} does not fit in {have}: that needs at least {format_bytes(need)}"
        try:
            free = plan(geometry, vram_bytes, lengths, caps, {}, base=base, encoder_bytes=encoder_bytes)
        except UserError:
            free = None
        if free is not None:
            changed = ", ".join(f"{k}={getattr(free, k)}" for k in sorted(pins) if getattr(free, k) != pins[k])
            return f"{head}; unpinned, {have} fits " + (f"with {changed}" if changed else "(see tinyrl plan)")
        bare = minimum_bytes(geometry, lengths, caps, {}, base=base, encoder_bytes=encoder_bytes)
        return f"{head}; even unpinned it needs {format_bytes(bare)}"
    return (f"{geometry.name} does not fit in {have} on {caps.name}: the smallest plan (4-bit, checkpointing, rank "
            f"{MIN_LORA_RANK}, 1 sequence at a time, {MIN_NEW_TOKENS} new tokens) needs {format_bytes(need)}")


def _reasons(g, s, bd, tp, lengths, caps, pins, start, stage, budget, encoder_bytes):
    """(knob, value, why) for every knob, in the planner's order."""
    def alt(**change) -> int:
        return estimate(g, replace(s, **change), tp, caps, encoder_bytes, top_p=start.get("top_p", 1.0)).peak

    def why(name: str, text: str) -> tuple[str, Any, str]:
        return (name, getattr(s, name), "pinned" if name in pins else text)

    t = tp + s.max_new_tokens
    out = [
        why("group_size", f"paper value (G={PAPER['group_size']}); its completions share one prompt prefill"),
        why("prompts_per_step", "paper value; generation and training loop over P·G, so memory does not depend on it"),
        why("max_prompt_tokens", f"paper value; sampled prompts need up to {max(lengths) if lengths else '?'} tokens, "
                                 f"so Tp={tp}"),
    ]
    if caps.bf16:
        dtype_why = f"{caps.name} supports bf16"
    elif s.dtype == "fp16":
        dtype_why = (f"{caps.name} has no bf16: fp16 compute, fp32 LoRA weights, dynamic loss scaling (a step "
                     "whose gradients overflow is skipped: amp/skipped)")
    else:
        dtype_why = f"{caps.name} has neither bf16 nor usable fp16"
    out.append(why("dtype", dtype_why))

    if s.quant == "none":
        quant_why = "16-bit weights fit: the paper's numerics, no quantisation error"
    else:
        need = alt(quant="none")
        quant_why = (f"16-bit weights would need {format_bytes(need)} with these batches (budget "
                     f"{format_bytes(budget)})" if caps.cuda else "4-bit")
    out.append(why("quant", quant_why))
    if s.grad_checkpointing:
        off = alt(grad_checkpointing=False)
        ckpt_why = f"without it the peak would be {format_bytes(off)} (budget {format_bytes(budget)})"
    else:
        ckpt_why = "all activations of a micro-batch fit; saves ~1/3 of the training compute"
    out.append(why("grad_checkpointing", ckpt_why))
    if s.lora_rank == start["lora_rank"]:
        rank_why = "default rank" if start["lora_rank"] == DEFAULT_LORA_RANK else "requested rank"
    else:
        rank_why = (f"lowered from {start['lora_rank']} to keep the settings above (RL updates carry little "
                    "information; low ranks lose little)")
    out.append(why("lora_rank", rank_why))

    n_seq = s.prompts_per_step * s.group_size
    kv = bd.term("KV cache").bytes
    gen_why = f"{s.gen_batch} of {n_seq} sequences in flight: KV cache {format_bytes(kv)}"
    if s.gen_batch < n_seq:
        bigger = next(x for x in reversed(_gen_candidates(n_seq)) if x > s.gen_batch)
        gen_why += f"; {bigger} would need {format_bytes(alt(gen_batch=bigger))}"
    out.append(why("gen_batch", gen_why))
    target = min(n_seq, _pow2_floor(max(1, TOKENS_PER_MICRO // t)))
    if caps.cuda and s.micro_batch >= target:
        micro_why = (f"{s.micro_batch}·{t} tokens per forward: the most that fit (on a GPU a micro-batch costs its "
                     "kernel launches whatever its size)")
        if s.micro_batch < n_seq:
            bigger = next(x for x in reversed(_halvings(n_seq, 1)) if x > s.micro_batch)
            micro_why += f"; {bigger} would need {format_bytes(alt(micro_batch=bigger))}"
    elif s.micro_batch >= target:
        micro_why = f"{s.micro_batch}·{t} tokens per forward (~{TOKENS_PER_MICRO} tokens; more buys little speed)"
    else:
        micro_why = f"{2 * s.micro_batch} would need {format_bytes(alt(micro_batch=2 * s.micro_batch))}"
    out.append(why("micro_batch", micro_why))
    row = bd.term("log-prob chunk (with grads)").bytes // s.logprob_chunk
    out.append(why("logprob_chunk", f"each [1, Tc, V] row with grads is {format_bytes(row)}; the most rows "
                                    f"(<= micro_batch, <= {LOGPROB_CHUNK_MAX}) that do not raise the peak"))
    if s.max_new_tokens < start["max_new_tokens"]:
        tc_why = (f"shortened from {start['max_new_tokens']}: the last resort, nothing else fits "
                  f"(never below {MIN_NEW_TOKENS})")
    else:
        tc_why = "paper value" if start["max_new_tokens"] == PAPER["max_new_tokens"] else "task value"
    out.append(why("max_new_tokens", tc_why))
    if stage == "small batches" and "gen_batch" not in pins:
        out.append(("note", "", "even 4-bit with checkpointing leaves room only for small batches; slow but fits"))
    return tuple(out)


def format_plan(plan_: Plan) -> str:
    """The byte table and the chosen settings as plain text (fixed-width columns, fine inside rich)."""
    bd = plan_.breakdown
    width = max(len(t.name) for t in bd.terms) + 2
    lines = [f"{plan_.model} on {plan_.device}: --vram {format_bytes(plan_.vram_bytes)}, planned within "
             f"{format_bytes(plan_.budget_bytes)} ({MARGIN:.0%} margin), Tp={plan_.prompt_len}, "
             f"Tc={plan_.max_new_tokens}", "",
             f"{'phase':<11}{'term':<{width}}{'MiB':>10}  formula"]
    totals = {"fixed": bd.fixed, "generation": bd.generation, "training": bd.training, "overhead": bd.overhead}
    rules = {"generation": bd.generation_rule, "training": bd.training_rule, "fixed": "sum", "overhead": "sum"}
    for phase in ("fixed", "generation", "training", "overhead"):
        for t in (t for t in bd.terms if t.phase == phase):
            lines.append(f"{phase:<11}{t.name:<{width}}{t.bytes / MiB:>10.1f}  {t.formula}")
        lines.append(f"{'':<11}{'= ' + phase:<{width}}{totals[phase] / MiB:>10.1f}  {rules[phase]}")
        lines.append("")
    lines.append(f"peak ({bd.peak_phase}) = fixed + max(generation, training) + overhead = {format_bytes(bd.peak)} "
                 f"of {format_bytes(plan_.budget_bytes)} ({bd.peak / plan_.budget_bytes:.0%})")
    lines += ["", f"{'setting':<20}{'value':>7}  why"]
    for name, value, text in plan_.reasons:
        shown = {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value
        lines.append(f"{name:<20}{str(shown):>7}  {text}")
    return "\n".join(lines)
