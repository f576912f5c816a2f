"""The GRPO update (loop.train_step): log-probs at the sampling temperature, fp16 compute with dynamic loss scaling,
and the non-finite guard for every dtype (CPU, tiny model)."""

import copy
import json
import math
import os

import pytest
import torch

from tinyrl import checkpoint, grpo, loop, policy
from tinyrl.config import Config
from tinyrl.errors import UserError
from tinyrl.types import TrainBatch


def load(tiny_model, dtype):
    model, _, device = policy.load_policy(tiny_model, quant="none", dtype=dtype, device="cpu", lora_rank=4,
                                          lora_alpha=8, grad_checkpointing=True, seed=0)
    with torch.no_grad():  # LoRA B starts at 0: give it values so every LoRA weight gets a gradient
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.05)
    return model, device


def batch(advantages=(1.0, -1.0, 0.5, -0.5)):
    g = torch.Generator().manual_seed(0)
    n = len(advantages)
    ids = torch.randint(6, 60, (n, 14), generator=g)  # [N, Tp+Tc] 8 prompt + 6 completion tokens
    cmask = torch.ones(n, 6)
    cmask[1, 4:] = 0  # one completion ended early
    return TrainBatch(input_ids=ids, attention_mask=torch.cat([torch.ones(n, 8, dtype=torch.long), cmask.long()], 1),
                      completion_mask=cmask, advantages=torch.tensor(advantages))


def grads_after_step(tiny_model, dtype, scaler):
    model, device = load(tiny_model, dtype)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=0.0)  # grads stay in .grad, weights stay put
    cfg = Config(micro_batch=2, logprob_chunk=2, max_grad_norm=1e9)
    result = loop.train_step(model, optimizer, batch(), cfg, device, scaler)
    return result, {n: p.grad.float().clone() for n, p in model.named_parameters() if p.requires_grad}, model


def test_fp16_lora_weights_stay_fp32_and_gradients_match_fp32(tiny_model):
    class Spy(torch.amp.GradScaler):
        scaled = 0

        def scale(self, outputs):
            self.scaled += 1
            return super().scale(outputs)

    ref, ref_grads, _ = grads_after_step(tiny_model, "fp32", None)
    scaler = Spy("cpu")
    got, grads, model = grads_after_step(tiny_model, "fp16", scaler)
    assert scaler.scaled == 2  # each micro-batch's loss was scaled before its backward
    assert policy.causal_lm(model).dtype == torch.float16  # compute in fp16
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)  # LoRA weights in fp32
    assert not got.skipped and math.isfinite(got.loss) and scaler.get_scale() == 65536.0
    assert got.loss == pytest.approx(ref.loss, rel=1e-2, abs=1e-3)
    for name, g in ref_grads.items():  # unscaled before clipping: the fp32 run's gradients, to fp16 precision
        assert torch.linalg.norm(grads[name] - g) <= 2e-2 * torch.linalg.norm(g) + 1e-6, name


@pytest.mark.parametrize("dtype", ["fp16", "fp32"])
def test_a_non_finite_step_is_skipped_and_changes_nothing(tiny_model, dtype):
    model, device = load(tiny_model, dtype)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    scaler = torch.amp.GradScaler("cpu") if dtype == "fp16" else None
    before = copy.deepcopy({n: p.detach().clone() for n, p in model.named_parameters()})
    cfg = Config(micro_batch=2, logprob_chunk=2)
    result = loop.train_step(model, optimizer, batch((1.0, float("inf"), 0.5, -0.5)), cfg, device, scaler)
    assert result.skipped and not math.isfinite(result.grad_norm)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # nothing applied
    assert not optimizer.state  # AdamW never stepped: no moments
    if scaler:
        assert scaler.get_scale() == 32768.0  # halved after the overflow
    result = loop.train_step(model, optimizer, batch(), cfg, device, scaler)  # the next good batch trains
    assert not result.skipped and any(not torch.equal(p, before[n]) for n, p in model.named_parameters())


@pytest.mark.parametrize("at_temperature, expected", [(True, 0.7), (False, 1.0)])
def test_training_and_reference_log_probs_are_scored_at_the_sampling_temperature(tiny_model, monkeypatch,
                                                                                  at_temperature, expected):
    seen = []
    for name in ("completion_logprobs", "reference_logprobs"):
        real = getattr(policy, name)

        def spy(*args, _real=real, _name=name, **kw):
            seen.append((_name, kw.get("temperature", args[5] if len(args) > 5 else 1.0)))
            return _real(*args, **kw)

        monkeypatch.setattr(policy, name, spy)
    model, device = load(tiny_model, "fp32")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    cfg = Config(micro_batch=4, temperature=0.7, score_at_temperature=at_temperature)
    loop.train_step(model, optimizer, batch(), cfg, device)
    assert set(seen) == {("completion_logprobs", expected), ("reference_logprobs", expected)}


def rows(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_fp16_fit_trains_logs_the_scale_and_checkpoints_it(tiny_model, tmp_path):
    cfg = Config(task="toy", model=tiny_model, out=str(tmp_path / "run"), steps=4, prompts_per_step=2, group_size=4,
                 max_new_tokens=8, lr=1e-2, dtype="fp16", device="cpu", save_every=2)
    run = loop.fit(cfg, quiet=True)
    metrics = rows(os.path.join(run, "metrics.jsonl"))
    assert all(math.isfinite(m["loss"]) and m["amp/skipped"] == 0.0 for m in metrics)
    assert all(m["amp/scale"] == 65536.0 for m in metrics) and any(m["grad_norm"] > 0 for m in metrics)
    with open(os.path.join(checkpoint.latest(run), "state.json")) as f:
        assert json.load(f)["scaler"]["scale"] == 65536.0


def test_a_resumed_fp16_run_keeps_its_loss_scale(tiny_model, tmp_path, monkeypatch):
    """One overflow halves the scale at step 2; a crash after the step-2 checkpoint; the resumed run goes on with
    the halved scale, and every metric equals the uninterrupted run's."""
    real_advantages, real_take_step = grpo.advantages, loop.take_step

    def overflow_at_step_2(rewards, group_size, **kwargs):
        adv = real_advantages(rewards, group_size, **kwargs)
        return adv * float("inf") if overflow_at_step_2.calls == 2 else adv

    def counting(rewards, group_size, **kwargs):
        overflow_at_step_2.calls += 1
        return overflow_at_step_2(rewards, group_size, **kwargs)

    def crash_at_step_3(parts, cfg, train, step, log):
        if step == 2:
            raise RuntimeError("simulated crash")
        return real_take_step(parts, cfg, train, step, log)

    monkeypatch.setattr(loop.grpo, "advantages", counting)
    cfg = Config(task="toy", model=tiny_model, steps=4, prompts_per_step=2, group_size=4, max_new_tokens=8, lr=1e-2,
                 dtype="fp16", device="cpu", save_every=2)
    overflow_at_step_2.calls = 0
    reference = rows(os.path.join(loop.fit(replace(cfg, out=str(tmp_path / "ref")), quiet=True), "metrics.jsonl"))
    assert [m["amp/skipped"] for m in reference] == [0, 1, 0, 0] and reference[2]["amp/scale"] == 32768.0
    overflow_at_step_2.calls = 0
    run = replace(cfg, out=str(tmp_path / "run"))
    monkeypatch.setattr(loop, "take_step", crash_at_step_3)
    with pytest.raises(RuntimeError, match="simulated"):
        loop.fit(run, quiet=True)
    monkeypatch.setattr(loop, "take_step", real_take_step)
    resumed = rows(os.path.join(loop.fit(run, quiet=True), "metrics.jsonl"))
    assert strip(resumed) == strip(reference)


def strip(metrics):
    return [{k: v for k, v in m.items() if not k.startswith(("time/", "mem/"))} for m in metrics]


def replace(cfg, **kw):
    import dataclasses

    return dataclasses.replace(cfg, **kw)


def test_fit_stops_after_max_skipped_steps_naming_the_causes(tiny_model, tmp_path, monkeypatch):
    real_advantages = grpo.advantages
    calls = []

    def nan_from_step_3(rewards, group_size, **kwargs):
        calls.append(1)
        adv = real_advantages(rewards, group_size, **kwargs)
        return adv * float("nan") if len(calls) >= 3 else adv

    monkeypatch.setattr(loop.grpo, "advantages", nan_from_step_3)
    cfg = Config(task="toy", model=tiny_model, out=str(tmp_path / "run"), steps=10, prompts_per_step=2,
                 group_size=4, max_new_tokens=8, lr=1e-2, save_every=1, max_skipped_steps=2)
    with pytest.raises(UserError) as err:
        loop.fit(cfg, quiet=True)
    message = str(err.value)
    assert "2 steps in a row" in message and "lr 0.01 too high" in message and "dtype fp32" in message
    assert "\n" not in message
    assert "step-000003" in message  # the last checkpoint, whose weights are those after step 2
    metrics = rows(os.path.join(cfg.out, "metrics.jsonl"))
    assert [m["amp/skipped"] for m in metrics] == [0, 0, 1, 1]
    assert checkpoint.latest_name(cfg.out) == "step-000003"


@pytest.mark.parametrize("saved_fused", [False, None], ids=["cpu-begun", "older-tinyrl"])
def test_a_checkpoint_of_a_non_fused_optimizer_resumes_fused_and_the_loss_scaler_still_steps(tiny_model, tmp_path,
                                                                                            saved_fused):
    """#22: a run begun on CPU (or by a tinyrl before fused AdamW) resumes on CUDA with fused AdamW and fp16. Loading
    the saved optimizer state used to put the saved `fused` flag back into each group while the optimizer still told
    GradScaler it takes `found_inf` (AssertionError: Expected grad_scale and found_inf to be None); a bf16 run silently
    lost the fused kernel. CPU's fused AdamW stands in for CUDA's."""
    model, device = load(tiny_model, "fp32")
    trainable = [p for p in model.parameters() if p.requires_grad]
    before = torch.optim.AdamW(trainable, lr=1e-3, fused=saved_fused)
    loop.train_step(model, before, batch(), Config(micro_batch=2, logprob_chunk=2), device)  # some state to save
    path = checkpoint.save(str(tmp_path / "run"), 1, model, before, {"step": 1})
    resumed = torch.optim.AdamW(trainable, lr=1e-3, fused=True)
    checkpoint.load(path, model, resumed)
    assert all(group["fused"] is True for group in resumed.param_groups)
    assert torch.allclose(resumed.state[trainable[0]]["exp_avg"], before.state[trainable[0]]["exp_avg"])
    scaler = torch.amp.GradScaler("cpu")
    weights = [p.detach().clone() for p in trainable]
    result = loop.train_step(model, resumed, batch(), Config(micro_batch=2, logprob_chunk=2), device, scaler)
    assert not result.skipped and any(not torch.equal(w, p) for w, p in zip(weights, trainable))
