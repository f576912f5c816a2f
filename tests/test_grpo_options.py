"""GRPO as people run it now (issue #24), wired into the loop: loss normalisations, reward scaling, truncated
completions out of the loss, sequence-level ratios, beta = 0 with no reference pass (and a plan that knows it), and
zero-advantage micro-batches skipped without changing one bit of the update (CPU, tiny model)."""

import copy

import pytest
import torch

from tinyrl import grpo, loop, update
from tinyrl.config import Config, apply_overrides
from tinyrl.errors import UserError
from tinyrl.types import TrainBatch

from test_train_step import load


def batch(advantages, truncated_rows=()):
    g = torch.Generator().manual_seed(0)
    n = len(advantages)
    ids = torch.randint(6, 60, (n, 14), generator=g)  # [N, 8 prompt + 6 completion tokens]
    cmask = torch.ones(n, 6)
    cmask[1, 3:] = 0  # one completion ended early
    loss_mask = cmask.clone()
    for r in truncated_rows:
        loss_mask[r] = 0
    return TrainBatch(input_ids=ids, attention_mask=torch.cat([torch.ones(n, 8, dtype=torch.long), cmask.long()], 1),
                      completion_mask=cmask, advantages=torch.tensor(advantages, dtype=torch.float32),
                      loss_mask=loss_mask if truncated_rows else None)


def step(model, optimizer, b, cfg, device):
    result = update.train_step(model, optimizer, b, cfg, device)
    return result, {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_settings_and_the_beta_alias():
    cfg = apply_overrides(Config(), ["beta=0", "loss=dapo", "scale_rewards=none", "mask_truncated=true",
                                     "importance_level=sequence", "epsilon_high=0.28"])
    assert (cfg.kl_beta, cfg.loss, cfg.scale_rewards, cfg.mask_truncated, cfg.importance_level, cfg.epsilon_high) \
        == (0.0, "dapo", "none", True, "sequence", 0.28)
    for bad, words in (("loss=ppo", "loss='ppo': choose one of grpo, dr_grpo, dapo, bnpo"),
                       ("scale_rewards=std", "scale_rewards='std'"), ("importance_level=seq", "importance_level"),
                       ("beta=-1", "kl_beta \\(beta\\) must be 0 or more")):
        with pytest.raises(UserError, match=words):
            apply_overrides(Config(), [bad])


@pytest.mark.parametrize("kind", ["grpo", "dr_grpo", "dapo", "bnpo"])
def test_each_loss_sums_over_micro_batches_to_the_whole_batch(tiny_model, kind):
    """The normaliser is the step's (completions, or tokens, or N x max_new_tokens), so one micro-batch of 4 and two
    of 2 give the same loss and gradient."""
    out = {}
    for micro in (4, 2):
        model, device = load(tiny_model, "fp32")
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.0)
        cfg = Config(micro_batch=micro, logprob_chunk=2, max_grad_norm=1e9, loss=kind, max_new_tokens=6)
        result = update.train_step(model, optimizer, batch((1.0, -1.0, 0.5, -0.5)), cfg, device)
        out[micro] = (result.loss, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert out[4][0] == pytest.approx(out[2][0], rel=1e-5, abs=1e-7)
    for name, g in out[4][1].items():
        assert torch.allclose(g, out[2][1][name], rtol=1e-4, atol=1e-7), name


def test_the_loss_kinds_differ_as_their_definitions_say(tiny_model):
    """At ratio 1 the surrogate is -A per token; with beta 0 the loss of each kind is a weighted sum of -A that can be
    written by hand from the token counts: lengths 6, 3, 6, 6 (row 1 ended early), A = 1, -1, .5, -.5."""
    a, lengths = [1.0, -1.0, 0.5, -0.5], [6, 3, 6, 6]
    expect = {"grpo": -sum(a) / 4, "dapo": -sum(x * n for x, n in zip(a, lengths)) / sum(lengths),
              "dr_grpo": -sum(x * n for x, n in zip(a, lengths)) / (4 * 6)}
    for kind, value in expect.items():
        model, device = load(tiny_model, "fp32")
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.0)
        cfg = Config(micro_batch=2, logprob_chunk=2, kl_beta=0.0, loss=kind, max_new_tokens=6)
        assert update.train_step(model, optimizer, batch(a), cfg, device).loss == pytest.approx(value, abs=1e-6), kind


def test_beta_zero_runs_no_reference_pass_and_the_plan_counts_none(tiny_model, monkeypatch):
    from tinyrl import budget

    def refuse(*args, **kwargs):
        raise AssertionError("reference pass at beta 0")

    monkeypatch.setattr(update.policy, "reference_logprobs", refuse)
    model, device = load(tiny_model, "fp32")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    result = update.train_step(model, optimizer, batch((1.0, -1.0, 0.5, -0.5)), Config(micro_batch=2, kl_beta=0.0),
                               device)
    assert result.kl == 0.0 and result.grad_norm > 0
    caps = budget.device_caps("T4")
    paper = loop.make_plan(Config(model=tiny_model, vram="2G"), frozenset(), caps)
    free = loop.make_plan(Config(model=tiny_model, vram="2G", kl_beta=0.0), frozenset(), caps)
    assert paper.breakdown.term("reference pass (no grad)").bytes > 0
    assert free.breakdown.term("reference pass (none: kl_beta 0)").bytes == 0
    assert free.breakdown.training <= paper.breakdown.training


@pytest.mark.parametrize("advantages", [(0.0, 0.0, 1.0, -1.0), (0.0, 0.0, 0.0, 0.0)])
def test_zero_advantage_micro_batches_are_skipped_bit_for_bit(tiny_model, monkeypatch, advantages):
    """At beta 0 a micro-batch whose advantages are all 0 adds exactly 0 to every gradient: skipping it leaves the
    update identical, bit for bit (AdamW still sees a zero gradient when every micro-batch is skipped)."""
    model, device = load(tiny_model, "fp32")
    params = lambda m: [p for p in m.parameters() if p.requires_grad]  # noqa: E731
    cfg = Config(micro_batch=2, logprob_chunk=2, kl_beta=0.0, lr=1e-2, weight_decay=0.1)
    twin = copy.deepcopy(model)
    opt, twin_opt = (torch.optim.AdamW(params(m), lr=1e-2, weight_decay=0.1) for m in (model, twin))
    real, calls = update.policy.completion_logprobs, []
    monkeypatch.setattr(update.policy, "completion_logprobs", lambda *a, **k: calls.append(1) or real(*a, **k))
    for _ in range(2):  # the second step has momentum from the first
        calls.clear()
        skipped, after = step(model, opt, batch(advantages), cfg, device)
        assert len(calls) == sum(any(advantages[i:i + 2]) for i in (0, 2))  # only informative micro-batches ran
        calls.clear()
        monkeypatch.setattr(update, "SKIP_ZERO_ADVANTAGE", False)
        full, twin_after = step(twin, twin_opt, batch(advantages), cfg, device)
        monkeypatch.setattr(update, "SKIP_ZERO_ADVANTAGE", True)
        assert skipped.loss == full.loss and skipped.grad_norm == full.grad_norm
        for name in after:
            assert torch.equal(after[name], twin_after[name]), name


def test_truncated_completions_leave_the_loss_but_not_the_advantages(tiny_model):
    """mask_truncated: a truncated row's tokens are out of the loss, so with every other advantage 0 nothing moves."""
    model, device = load(tiny_model, "fp32")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.0)
    cfg = Config(micro_batch=4, logprob_chunk=2, kl_beta=0.0)
    result = update.train_step(model, optimizer, batch((0.0, 0.0, 1.0, 0.0), truncated_rows=(2,)), cfg, device)
    assert result.loss == 0.0 and result.grad_norm == 0.0
    from tinyrl.types import PromptBatch, Rollouts

    prompts = PromptBatch((), (), torch.zeros(1, 2, dtype=torch.long), torch.ones(1, 2, dtype=torch.long))
    rollouts = Rollouts(prompts, 2, torch.ones(2, 3, dtype=torch.long), torch.ones(2, 3), ("a", "b"),
                        torch.tensor([False, True]))
    assert grpo.train_batch(rollouts, torch.zeros(2), mask_truncated=True).loss_mask.tolist() == [[1, 1, 1], [0, 0, 0]]
    assert grpo.train_batch(rollouts, torch.zeros(2)).loss_mask is None


def test_a_fit_with_every_option_runs_and_logs(tiny_model, tmp_path):
    cfg = Config(task="toy", model=tiny_model, out=str(tmp_path / "run"), steps=2, prompts_per_step=2, group_size=4,
                 max_new_tokens=8, lr=1e-2, kl_beta=0.0, loss="dr_grpo", scale_rewards="none", mask_truncated=True,
                 importance_level="sequence")
    run = loop.fit(cfg, quiet=True)
    import json
    import os

    rows = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
    assert len(rows) == 2 and all(r["kl"] == 0.0 for r in rows)


def test_the_first_of_several_updates_is_todays_update(tiny_model):
    """iterations > 1: the ratio's denominators are the log-probs before any update, so the first pass's gradient
    is the one-update gradient (ratio 1); clip counts come back once the pass completes."""
    grads = []
    for with_old in (False, True):
        model, device = load(tiny_model, "fp32")
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.0)
        cfg = Config(micro_batch=2, logprob_chunk=2, iterations=2, epsilon=0.2, epsilon_high=0.28)
        b, clips = batch((1.0, -1.0, 0.5, -0.5)), []
        old = update.old_logprobs(model, b, cfg, device) if with_old else None
        update.accumulate(model, optimizer, b, cfg, device, old_logp=old, clips=clips)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
        assert len(clips) == (2 if with_old else 0) and all(c[:2] == (0, 0) for c in clips)  # ratio 1: none clipped
    for name, g in grads[0].items():
        assert torch.allclose(g, grads[1][name], rtol=1e-5, atol=1e-8), name


def test_a_fit_with_two_updates_per_generated_batch(tiny_model, tmp_path, monkeypatch):
    updates = []
    real = loop.update
    monkeypatch.setattr(loop, "update", lambda *a, **k: updates.append(1) or real(*a, **k))
    cfg = Config(task="toy", model=tiny_model, out=str(tmp_path / "run"), steps=3, prompts_per_step=2, group_size=4,
                 max_new_tokens=8, lr=1e-2, iterations=2, epsilon_high=0.28)
    run = loop.fit(cfg, quiet=True)
    import json
    import os

    rows = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
    assert len(updates) == 6 and len(rows) == 3  # two optimizer updates per generated batch
    assert all(0 <= r["clip/low"] <= 1 and 0 <= r["clip/high"] <= 1 for r in rows)
    state = torch.load(os.path.join(run, "checkpoints", "step-000003", "optimizer.pt"), weights_only=False)
    assert int(next(iter(state["state"].values()))["step"]) == 6


# --- dynamic sampling ---------------------------------------------------------------------------------------------


def fake_rollouts(widths, correct, group_size=2):
    from tinyrl.types import Example, PromptBatch, Rollouts, Scored

    tp, tc = widths
    p = len(correct) // group_size
    examples = tuple(Example(f"q{tp}-{i}", "", i) for i in range(p))
    prompts = PromptBatch(examples, tuple(e.question for e in examples), torch.full((p, tp), 7),
                          torch.ones(p, tp, dtype=torch.long))
    n = len(correct)
    rollouts = Rollouts(prompts, group_size, torch.full((n, tc), 5), torch.ones(n, tc),
                        tuple(f"c{tp}-{i}" for i in range(n)), torch.zeros(n, dtype=torch.bool))
    scored = Scored({"r": torch.arange(n, dtype=torch.float32) + 10 * tp}, torch.tensor(correct))
    return rollouts, scored


def test_join_keeps_the_informative_groups_padded_and_in_order():
    a = fake_rollouts((3, 2), [True, False, True, True])  # group 0 informative, group 1 uniform
    b = fake_rollouts((5, 4), [False, False, False, True])  # group 1 informative
    keep_a, keep_b = grpo.informative(a[1].correct, 2), grpo.informative(b[1].correct, 2)
    assert keep_a.tolist() == [True, False] and keep_b.tolist() == [False, True]
    rollouts, scored = grpo.join([(*a, keep_a), (*b, keep_b)])
    assert [e.question for e in rollouts.prompts.examples] == ["q3-0", "q5-1"]
    assert rollouts.prompts.input_ids.shape == (2, 5) and rollouts.prompts.attention_mask[0].tolist() == [0, 0, 1, 1, 1]
    assert rollouts.completion_ids.shape == (4, 4) and rollouts.completion_mask[0].tolist() == [1, 1, 0, 0]
    assert rollouts.completions == ("c3-0", "c3-1", "c5-2", "c5-3")
    assert scored.components["r"].tolist() == [30.0, 31.0, 52.0, 53.0] and scored.correct.tolist() == [
        True, False, False, True]
    assert grpo.informative(scored.correct, 2).all()


DIGITS = "def digits(completions, **kw):\n    return [sum(c.isdigit() for c in t) / max(1, len(t)) for t in completions]\n"


def test_dynamic_sampling_trains_only_on_informative_groups_and_resumes_to_the_same_draws(tiny_model, tmp_path,
                                                                                           monkeypatch):
    (tmp_path / "r.py").write_text(DIGITS)
    rows = [{"prompt": f"Write {i} digits."} for i in range(40)]
    trained, starts = [], []
    real_batch, real_draw = grpo.train_batch, loop.draw
    monkeypatch.setattr(loop.grpo, "train_batch", lambda r, *a, **k: trained.append(r) or real_batch(r, *a, **k))
    monkeypatch.setattr(loop, "draw", lambda parts, cfg, task, start, *a: starts.append(start) or real_draw(
        parts, cfg, task, start, *a))

    def fit(out, steps, resume=False):
        cfg = Config(task="custom", model=tiny_model, out=str(out), steps=steps, prompts_per_step=2, group_size=4,
                     max_new_tokens=8, lr=1e-2, save_every=1, reward_funcs=f"{tmp_path / 'r.py'}:digits",
                     success="digits>=0.25", dynamic_sampling=True, max_draws=3, seed=1)
        return loop.fit(cfg, quiet=True, resume=resume, data=rows)

    import json
    import os

    run = fit(tmp_path / "a", 4)
    metrics = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
    assert all({"sampling/draws", "sampling/dropped", "sampling/groups"} <= set(m) for m in metrics)
    assert any(m["sampling/dropped"] > 0 for m in metrics)  # some groups were uniform, so the check below bites
    for r, m in zip(trained, metrics):
        if m["sampling/groups"]:  # with none informative the last batch trains as it is (advantages all 0)
            assert len(r.completions) == 4 * m["sampling/groups"] and grpo.informative(_correct(r), 4).all()
    uninterrupted = list(starts)
    assert uninterrupted[0] == 0 and len(uninterrupted) == sum(m["sampling/draws"] for m in metrics)
    starts.clear()
    fit(tmp_path / "b", 2)
    fit(tmp_path / "b", 4, resume=True)
    assert starts == uninterrupted  # the data position came back from the checkpoint


def _correct(rollouts):
    return torch.tensor([sum(c.isdigit() for c in t) / max(1, len(t)) >= 0.25 for t in rollouts.completions])
