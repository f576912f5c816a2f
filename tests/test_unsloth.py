"""backend=unsloth: the wiring, run on CPU through a stub `unsloth` module that records what tinyrl asks of
FastLanguageModel (the real package needs a GPU); one line without the package or without a GPU; nothing imports
unsloth unless asked."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from tinyrl import checkpoint, evaluate, loop, policy
from tinyrl.config import Config

STUB = '''
"""A stand-in for unsloth: loads with transformers + peft and records every call."""
import os
CALLS = []
if os.environ.get("UNSLOTH_STUB_MARK"):
    open(os.environ["UNSLOTH_STUB_MARK"], "w").close()


class FastLanguageModel:
    @staticmethod
    def from_pretrained(model_name, max_seq_length, dtype, load_in_4bit, device_map):
        from transformers import AutoModelForCausalLM, AutoTokenizer
        CALLS.append(("from_pretrained", dict(model_name=model_name, max_seq_length=max_seq_length, dtype=dtype,
                                              load_in_4bit=load_in_4bit)))
        return AutoModelForCausalLM.from_pretrained(model_name, dtype=dtype), AutoTokenizer.from_pretrained(model_name)

    @staticmethod
    def get_peft_model(model, r, lora_alpha, lora_dropout, bias, target_modules, use_gradient_checkpointing,
                       random_state):
        from peft import LoraConfig, get_peft_model
        CALLS.append(("get_peft_model", dict(r=r, lora_alpha=lora_alpha, target_modules=target_modules,
                                             use_gradient_checkpointing=use_gradient_checkpointing)))
        return get_peft_model(model, LoraConfig(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, bias=bias,
                                                target_modules=target_modules, task_type="CAUSAL_LM"))
'''


@pytest.fixture
def stub(tmp_path, monkeypatch):
    folder = tmp_path / "stubs" / "unsloth"
    folder.mkdir(parents=True)
    (folder / "__init__.py").write_text(textwrap.dedent(STUB))
    monkeypatch.syspath_prepend(str(tmp_path / "stubs"))
    yield str(tmp_path / "stubs")
    sys.modules.pop("unsloth", None)


def test_unsloth_backend_wiring_trains_and_saves_a_peft_adapter(stub, tiny_model, tmp_path, monkeypatch):
    monkeypatch.setattr(policy.loading, "UNSLOTH_DEVICES", ("cuda", "cpu"))
    common = dict(task="toy", model=tiny_model, steps=3, prompts_per_step=2, group_size=4, max_new_tokens=8,
                  lr=1e-2, max_grad_norm=1.0)
    run = loop.fit(Config(out=str(tmp_path / "run"), backend="unsloth", **common), quiet=True)
    import unsloth

    calls = dict(unsloth.CALLS)
    assert calls["from_pretrained"] == dict(model_name=tiny_model, max_seq_length=2048, dtype=torch.float32,
                                            load_in_4bit=False)
    assert calls["get_peft_model"] == dict(r=16, lora_alpha=32, target_modules=policy.UNSLOTH_TARGETS,
                                           use_gradient_checkpointing="unsloth")
    # the adapter it saved is an ordinary peft one: the default backend evaluates it, and training moved it
    model, _ = evaluate.load(Config(model=tiny_model, task="toy"), checkpoint.latest(run))
    fresh, _, _ = policy.load_policy(tiny_model, quant="none", dtype="auto", device="cpu", lora_rank=16,
                                     lora_alpha=32, grad_checkpointing=False, seed=0)
    trained = {k: v for k, v in model.state_dict().items() if "lora_B" in k}
    assert trained and any(not torch.equal(v, fresh.state_dict()[k]) for k, v in trained.items())


def run_cli(tiny_model, out, env, *sets):
    args = [sys.executable, "-m", "tinyrl.cli", "fit", "arith", "--model", tiny_model, "--out", out, "--steps", "1",
            "--set", "prompts_per_step=2", "--set", "group_size=2", "--set", "max_new_tokens=4", *sets]
    return subprocess.run(args, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1", **env})


def test_without_the_package_or_a_gpu_it_is_one_line(stub, tiny_model, tmp_path):
    done = run_cli(tiny_model, str(tmp_path / "a"), {}, "--set", "backend=unsloth")  # not installed here
    assert done.returncode == 2 and "backend=unsloth needs the unsloth package" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    done = run_cli(tiny_model, str(tmp_path / "b"), {"PYTHONPATH": stub}, "--set", "backend=unsloth")
    assert done.returncode == 2 and "backend=unsloth needs a CUDA GPU (this run is on cpu)" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_nothing_imports_unsloth_unless_asked(stub, tiny_model, tmp_path):
    mark = tmp_path / "imported"
    done = run_cli(tiny_model, str(tmp_path / "run"), {"PYTHONPATH": stub, "UNSLOTH_STUB_MARK": str(mark)})
    assert done.returncode == 0, done.stderr[-2000:]
    assert not mark.exists()
