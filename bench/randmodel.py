"""Random-init models with the geometry of public checkpoints, for benches that measure memory and speed.

The weights are random (memory and time do not depend on their values) and the tokenizer is character-level
with filler tokens up to the model's vocabulary, so any sampled id decodes, GSM8K prompts run past 256 tokens
(and are truncated to exactly the prompt cap), and a random model practically never samples EOS: every
completion runs to the cap, the worst case the planner plans for.

    python bench/randmodel.py Qwen/Qwen2.5-0.5B-Instruct /tmp/models/qwen   # writes the folder once
"""

from __future__ import annotations

import os
import shutil
import sys

CHARACTERS = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ .,:;!?#$%&<>/()[]{}=+-*_\n'\"|"
SPECIAL = ["<pad>", "<eos>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>"]
CHAT = ("{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] + '<eos>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}")


def char_tokenizer(vocab_size: int):
    """One token per character (plus specials), padded with filler tokens to vocab_size ids."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    names = SPECIAL + list(dict.fromkeys(CHARACTERS))
    names += [f"<f{i}>" for i in range(vocab_size - len(names))]
    core = Tokenizer(models.WordLevel({name: i for i, name in enumerate(names)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"<\|[a-z]+\|>|<eos>|<pad>|."), behavior="isolated")
    core.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>",
                                        unk_token="<unk>", additional_special_tokens=SPECIAL[3:])
    tokenizer.chat_template = CHAT
    return tokenizer


def make_random_model(name: str, folder: str, seed: int = 0) -> str:
    """Write a random-init bf16 copy of the public geometry `name` (a key of tinyrl.budget.PUBLIC_CONFIGS) with
    a character tokenizer to `folder`, once (written to a temp folder, then renamed). Returns folder."""
    if os.path.exists(os.path.join(folder, "config.json")):
        return folder
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from tinyrl.budget import PUBLIC_CONFIGS

    fields = {k: v for k, v in PUBLIC_CONFIGS[name].items() if not k.startswith("_") and k != "torch_dtype"}
    config = AutoConfig.for_model(fields.pop("model_type"), **fields, pad_token_id=0, bos_token_id=1,
                                  eos_token_id=1)
    torch.manual_seed(seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.generation_config.pad_token_id, model.generation_config.eos_token_id = 0, 1
    tmp = folder.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    char_tokenizer(config.vocab_size).save_pretrained(tmp)
    os.replace(tmp, folder)
    return folder


if __name__ == "__main__":
    print(make_random_model(sys.argv[1], sys.argv[2]))
