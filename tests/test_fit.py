"""End to end on CPU with a tiny random model: fit learns a toy reward; QLoRA runs; eval reports both metrics."""

import json
import os
import subprocess
import sys
import types

import pytest
import torch
from safetensors.torch import load_file

from tinyrl import evaluate, loop, tasks
from tinyrl.config import Config

METRIC_KEYS = {"step", "reward/total", "correct", "len/mean", "len/min", "len/max", "len/frac_at_cap",
               "len/frac_short", "groups/frac_zero_var", "loss", "kl", "grad_norm", "lr", "time/generate",
               "time/score", "time/train", "time/step", "mem/generate", "mem/score", "mem/train"}


def rows(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_fit_learns_the_toy_reward(tiny_model, tmp_path):
    cfg = Config(task="toy", model=tiny_model, out=str(tmp_path / "run"), steps=30, prompts_per_step=8,
                 group_size=8, max_new_tokens=16, lr=1e-2, max_grad_norm=1.0, save_every=10, sample_every=5)
    run = loop.fit(cfg, quiet=True)
    metrics = rows(os.path.join(run, "metrics.jsonl"))
    assert len(metrics) == 30 and METRIC_KEYS <= set(metrics[0]) and "reward/digits" in metrics[0]
    first = sum(m["reward/total"] for m in metrics[:5]) / 5
    last = sum(m["reward/total"] for m in metrics[-5:]) / 5
    assert last > first + 0.25, (first, last)  # about 0.13 -> 0.8 on 2 CPU cores
    weights = load_file(os.path.join(run, "checkpoints", "step-000030", "adapter_model.safetensors"))
    lora_b = [v for k, v in weights.items() if "lora_B" in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b)  # LoRA B starts at zero: every one moved
    assert json.load(open(os.path.join(run, "config.json")))["lr"] == 1e-2
    assert len(rows(os.path.join(run, "samples.jsonl"))) >= 4


def test_qlora_fit_runs_end_to_end_on_cpu(tiny_model, tmp_path):
    pytest.importorskip("bitsandbytes")
    cfg = Config(task="toy", model=tiny_model, out=str(tmp_path / "run"), steps=3, prompts_per_step=2,
                 group_size=4, max_new_tokens=8, lr=1e-2, quant="4bit")
    run = loop.fit(cfg, quiet=True)
    metrics = rows(os.path.join(run, "metrics.jsonl"))
    assert len(metrics) == 3 and all(m["grad_norm"] > 0 for m in metrics[1:])
    weights = load_file(os.path.join(run, "checkpoints", "step-000003", "adapter_model.safetensors"))
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in weights.items())


def test_eval_writes_per_example_rows_with_both_metrics(tiny_model, tmp_path):
    cfg = Config(task="arith", model=tiny_model, max_new_tokens=8, gen_batch=4)
    out = str(tmp_path / "eval.jsonl")
    result = evaluate.evaluate(cfg, adapter=None, limit=6, out_path=out)
    assert result["n"] == 6 and set(result) == {"exact_match", "extractive_match", "n"}
    lines = rows(out)
    assert len(lines) == 6 and {"exact_match", "extractive_match", "completion"} <= set(lines[0])


def test_eval_scores_a_known_completion():
    """run_eval's scoring: exact match on <answer> as a string, extractive match by value (math-verify)."""
    from tinyrl import rewards

    text = "<reasoning>\n2+2\n</reasoning>\n<answer>\n4.0\n</answer>"
    assert rewards.correctness([text], ["4"]) == [0.0] and rewards.extractive_match([text], ["4"]) == [1.0]


def test_examples_for_step_is_a_seeded_permutation_per_epoch():
    data = list(range(10))
    picked = [x for step in range(5) for x in tasks.examples_for_step(data, step, 2, seed=3)]
    assert sorted(picked) == data  # one epoch covers every example once
    assert tasks.examples_for_step(data, 7, 2, seed=3) == tasks.examples_for_step(data, 7, 2, seed=3)
    assert torch.tensor(picked).tolist() != data  # shuffled


def test_memory_r_plus_fit_logs_memory_and_switches_explore_on(tiny_model, tmp_path):
    cfg = Config(task="arith", model=tiny_model, out=str(tmp_path / "run"), steps=4, prompts_per_step=2,
                 group_size=4, max_new_tokens=24, method="memory-r+", encoder="hashing", explore_warmup=3,
                 memory_order="read-before-write", save_every=2)
    run = loop.fit(cfg, quiet=True)
    metrics = rows(os.path.join(run, "metrics.jsonl"))
    on = [m["memory/explore_on"] for m in metrics]
    assert on[0] == 0 and on[-1] == 1  # 2 distinct questions after step 1 (< 3), 4 after step 2
    assert [m["memory/failure_keys"] for m in metrics] == [2, 4, 6, 8]  # the tiny model never answers correctly
    assert all(m["memory/failure_values"] == 4 * m["memory/failure_keys"] for m in metrics)
    assert {"reward/exploit", "reward/explore", "time/memory_recall_ms", "time/memory_share"} <= set(metrics[0])
    assert any(m["memory/explore"] > 0 for m in metrics[1:])  # read-before-write: failures earn explore
    assert os.path.isdir(os.path.join(run, "checkpoints", "step-000004", "memory"))
    inspect = subprocess.run([sys.executable, "-m", "tinyrl.cli", "memory", "inspect", run, "--question",
                              metrics_question(run)], capture_output=True, text=True)
    assert inspect.returncode == 0, inspect.stderr
    assert "failure        8 questions" in inspect.stdout and "distance 0.000" in inspect.stdout


def metrics_question(run):
    return rows(os.path.join(run, "samples.jsonl"))[0]["question"]


def test_oom_backoff_halves_and_continues_the_same_step(tiny_model, tmp_path, monkeypatch):
    """A simulated out-of-memory error (CPU test hook): training with micro_batch > 2 and generation with
    gen_batch > 4 'do not fit'; fit halves them, logs it, and every step still completes."""
    real_train, real_generate = loop.accumulate, loop.policy.generate
    calls = {"train": [], "generate": []}

    def accumulate(model, optimizer, batch, cfg, device, scaler, on_micro=None, *rest):
        calls["train"].append(cfg.micro_batch)
        if cfg.micro_batch > 2:
            raise torch.OutOfMemoryError("simulated")
        return real_train(model, optimizer, batch, cfg, device, scaler, on_micro, *rest)

    def generate(*args, **kw):
        calls["generate"].append(kw["gen_batch"])
        if kw["gen_batch"] > 4:
            raise torch.OutOfMemoryError("simulated")
        return real_generate(*args, **kw)

    monkeypatch.setattr(loop, "accumulate", accumulate)
    monkeypatch.setattr(loop.policy, "generate", generate)
    cfg = Config(task="toy", model=tiny_model, out=str(tmp_path / "run"), steps=3, prompts_per_step=2,
                 group_size=4, max_new_tokens=8, micro_batch=8, gen_batch=16, lr=1e-2)
    run = loop.fit(cfg, quiet=True)
    metrics = rows(os.path.join(run, "metrics.jsonl"))
    assert calls["train"] == [8, 4, 2, 2, 2] and calls["generate"] == [16, 8, 4, 4, 4]
    assert [m["oom/micro_batch"] for m in metrics] == [2, 2, 2] and metrics[0]["oom/backoffs"] == 4
    assert len(metrics) == 3 and metrics[-1]["grad_norm"] > 0


def test_oom_at_the_floor_is_one_clear_error(tiny_model, tmp_path, monkeypatch):
    from tinyrl.errors import UserError

    def accumulate(*args):
        raise torch.OutOfMemoryError("simulated")

    monkeypatch.setattr(loop, "accumulate", accumulate)
    cfg = Config(task="toy", model=tiny_model, out=str(tmp_path / "run"), steps=1, prompts_per_step=1,
                 group_size=2, max_new_tokens=4, micro_batch=2)
    with pytest.raises(UserError, match="micro_batch=1"):
        loop.fit(cfg, quiet=True)


def test_oom_messages_name_expandable_segments_on_cuda_with_the_default_allocator(monkeypatch):
    """On CUDA with torch's allocator unconfigured, the back-off warning and the floor error say which setting
    most often avoids fragmentation; on CPU, or once the user has configured the allocator, they do not."""
    from tinyrl import faults
    from tinyrl.errors import UserError

    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    monkeypatch.delenv("PYTORCH_ALLOC_CONF", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert faults.allocator_hint() == ""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert "expandable_segments:True" in faults.allocator_hint()
    lines = []
    log = types.SimpleNamespace(echo=lines.append, oom_backoffs=0)

    def run(cfg):
        raise torch.OutOfMemoryError("simulated")

    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    with pytest.raises(UserError, match="micro_batch=1.*expandable_segments:True"):
        faults.with_oom_backoff(run, Config(task="toy", model="m", micro_batch=2), "micro_batch", log)
    assert len(lines) == 1 and "micro_batch 2 -> 1" in lines[0] and "expandable_segments:True" in lines[0]
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:128")
    assert faults.allocator_hint() == ""


def test_eval_every_n_steps_during_fit(tiny_model, tmp_path):
    cfg = Config(task="arith", model=tiny_model, out=str(tmp_path / "run"), steps=2, prompts_per_step=1,
                 group_size=2, max_new_tokens=6, eval_every=2, eval_limit=3, gen_batch=4)
    metrics = rows(os.path.join(loop.fit(cfg, quiet=True), "metrics.jsonl"))
    assert "eval/exact_match" not in metrics[0] and metrics[1]["eval/n"] == 3
    assert 0.0 <= metrics[1]["eval/extractive_match"] <= 1.0


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_on_cpu_in_fp32_each_backward_starts_after_the_freed_heap_is_handed_back(tiny_model, tmp_path,
                                                                                 monkeypatch, dtype):
    """Backward sets the training peak; on CPU in fp32 the forward's freed heap goes back to the system
    (malloc_trim) between each micro-batch's loss and its backward. In bf16 that bought nothing, so it is not done."""
    events = []
    real_loss, real_backward, real_release = loop.grpo.loss, torch.autograd.backward, loop.meter.release_freed
    monkeypatch.setattr(loop.grpo, "loss", lambda *a, **k: events.append("loss") or real_loss(*a, **k))
    monkeypatch.setattr(torch.autograd, "backward", lambda *a, **k: events.append("backward") or real_backward(*a, **k))
    monkeypatch.setattr(loop.meter, "release_freed", lambda: events.append("trim") or real_release())
    cfg = Config(task="toy", model=tiny_model, out=str(tmp_path / "run"), steps=1, prompts_per_step=2,
                 group_size=4, max_new_tokens=8, micro_batch=4, gen_batch=8, dtype=dtype)
    loop.fit(cfg, quiet=True)
    training = events[events.index("loss"):]
    per_micro_batch = ["loss", "trim", "backward"] if dtype == "fp32" else ["loss", "backward"]
    assert training == per_micro_batch * 2  # two micro-batches of 4


def test_training_runs_in_train_mode_so_checkpointing_is_on(tiny_model, tmp_path, monkeypatch):
    """transformers checkpoints a decoder layer only while it is training; from_pretrained leaves eval mode."""
    real, modes = loop.accumulate, []

    def spy(model, *args, **kw):
        layers = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False)]
        modes.append((model.training, bool(layers) and all(m.training for m in layers)))
        return real(model, *args, **kw)

    monkeypatch.setattr(loop, "accumulate", spy)
    cfg = Config(task="toy", model=tiny_model, out=str(tmp_path / "run"), steps=2, prompts_per_step=2,
                 group_size=4, max_new_tokens=8)
    loop.fit(cfg, quiet=True)
    assert modes == [(True, True), (True, True)]  # after each step's generate (eval mode) too
