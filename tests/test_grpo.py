"""GRPO math against values computed by hand."""

import math

import pytest
import torch

from tinyrl import grpo


def test_advantages_by_hand():
    # group [0, 0, 1, 1]: mean 0.5, unbiased std sqrt(1/3) = 0.57735; (1 - .5) / (.57735 + 1e-4) = 0.86588
    adv = grpo.advantages(torch.tensor([0.0, 0.0, 1.0, 1.0, 2.0, 2.0, 2.0, 2.0]), 4)
    expected = 0.5 / (math.sqrt(1 / 3) + 1e-4)
    assert adv[:4].tolist() == pytest.approx([-expected, -expected, expected, expected], abs=1e-6)
    assert adv[4:].tolist() == [0.0, 0.0, 0.0, 0.0]  # zero-variance group: no signal


def test_kl_k3_by_hand():
    # delta = ref - logp; k3 = e^delta - delta - 1
    kl = grpo.kl_k3(torch.tensor([0.0, -1.0, -2.0]), torch.tensor([0.0, 0.0, -1.5]))
    assert kl.tolist() == pytest.approx([0.0, math.e - 2, math.exp(0.5) - 1.5], abs=1e-6)


def test_loss_masks_after_eos_and_averages_per_completion():
    logp = torch.tensor([[-1.0, -2.0, -9.0], [-1.0, -1.0, -1.0]], requires_grad=True)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])  # completion 0 ended at token 1 (its EOS)
    adv = torch.tensor([1.0, -1.0])
    loss, kl = grpo.loss(logp, logp.detach().clone(), adv, mask, beta=0.04, n_total=2)
    # ratio = 1 and KL = 0: per completion -A, mean over completions (-1 + 1) / 2 = 0
    assert loss.item() == pytest.approx(0.0)
    assert kl.tolist() == [0.0, 0.0]
    loss.backward()
    # d/dlogp of -(A * ratio) averaged over each completion's tokens, then over 2 completions:
    # completion 0: -1 / 2 tokens / 2 = -0.25 on its two tokens, 0 after EOS; completion 1: +1 / 3 / 2
    assert logp.grad.tolist()[0] == pytest.approx([-0.25, -0.25, 0.0])
    assert logp.grad.tolist()[1] == pytest.approx([1 / 6] * 3)


def test_loss_kl_term_by_hand():
    logp = torch.zeros(1, 2, requires_grad=True)
    ref = torch.full((1, 2), -1.0)
    loss, kl = grpo.loss(logp, ref, torch.zeros(1), torch.ones(1, 2), beta=0.5, n_total=1)
    assert kl.item() == pytest.approx(math.exp(-1))  # e^-1 - (-1) - 1
    assert loss.item() == pytest.approx(0.5 * math.exp(-1))
    loss.backward()
    # d k3 / d logp = 1 - e^(ref - logp) = 1 - e^-1, times beta, over 2 tokens
    assert logp.grad.tolist()[0] == pytest.approx([0.5 * (1 - math.exp(-1)) / 2] * 2)


def test_micro_batches_sum_to_the_full_batch_loss():
    torch.manual_seed(0)
    logp, ref = torch.randn(4, 5), torch.randn(4, 5)
    adv, mask = torch.randn(4), (torch.rand(4, 5) > 0.3).float()
    full, _ = grpo.loss(logp, ref, adv, mask, 0.04, 4)
    parts = sum(grpo.loss(logp[i:i + 2], ref[i:i + 2], adv[i:i + 2], mask[i:i + 2], 0.04, 4)[0] for i in (0, 2))
    assert parts.item() == pytest.approx(full.item(), abs=1e-6)


def test_lr_schedule_warmup_then_cosine():
    lrs = [grpo.lr_at(s, 20, 1e-3, 0.1) for s in range(21)]
    assert lrs[0] == 0.0 and lrs[1] == pytest.approx(5e-4) and lrs[2] == pytest.approx(1e-3)
    assert lrs[11] == pytest.approx(5e-4)  # halfway through the 18 decay steps
    assert all(a >= b for a, b in zip(lrs[2:], lrs[3:])) and lrs[20] == pytest.approx(0.0)


def paper_loss(logp, ref, adv, mask, beta, n):
    """tinyrl's loss before the options (#24): -(A * exp(logp - logp.detach())) + beta * k3, token mean, mean."""
    per_token = -(adv.unsqueeze(-1) * torch.exp(logp - logp.detach())) + beta * grpo.kl_k3(logp, ref)
    return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)).sum() / n


def test_one_update_per_batch_with_clipping_is_bit_for_bit_todays_update():
    torch.manual_seed(0)
    logp, ref = torch.randn(6, 7, requires_grad=True), torch.randn(6, 7)
    adv, mask = torch.randn(6), (torch.rand(6, 7) > 0.3).float()
    before = paper_loss(logp, ref, adv, mask, 0.04, 6)
    (g_before,) = torch.autograd.grad(before, logp)
    after, _ = grpo.loss(logp, ref, adv, mask, 0.04, 6, eps=(0.2, 0.28))
    (g_after,) = torch.autograd.grad(after, logp)
    assert torch.equal(before, after) and torch.equal(g_before, g_after)


def two_groups():
    """2 groups of 2 completions; rewards [1, 0 | 1, 1]; lengths 2, 1, 3, 1 of at most 3 tokens."""
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    return rewards, mask


def test_reward_scalings_by_hand():
    rewards, _ = two_groups()
    # group 1: mean 0.5, unbiased std sqrt(0.5) = 0.70711; group 2: mean 1, std 0
    group = grpo.advantages(rewards, 2)
    assert group.tolist() == pytest.approx([0.5 / (0.5 ** 0.5 + 1e-4), -0.5 / (0.5 ** 0.5 + 1e-4), 0.0, 0.0])
    # batch std of [1, 0, 1, 1]: mean 0.75, unbiased variance (3 x 0.0625 + 0.5625) / 3 = 0.25, std 0.5
    batch = grpo.advantages(rewards, 2, scale="batch")
    assert batch.tolist() == pytest.approx([0.5 / 0.5001, -0.5 / 0.5001, 0.0, 0.0])
    assert grpo.advantages(rewards, 2, scale="none").tolist() == [0.5, -0.5, 0.0, 0.0]


@pytest.mark.parametrize("kind, expected_grad_row0", [
    ("grpo", -1 / 2 / 4),  # A / (its 2 tokens) / (4 completions)
    ("dapo", -1 / 7),  # A / (7 completion tokens in the batch)
    ("bnpo", -1 / 7),
    ("dr_grpo", -1 / (4 * 3)),  # A / (4 completions x 3 max new tokens)
])
def test_each_normalisation_by_hand(kind, expected_grad_row0):
    _, mask = two_groups()
    adv = torch.tensor([1.0, -1.0, 0.0, 0.0])
    logp = torch.zeros(4, 3, requires_grad=True)
    loss, _ = grpo.loss(logp, None, adv, mask, 0.0, 4, kind=kind, tokens_total=7, max_len=3)
    loss.backward()
    # -A per token: the loss is -(sum of A over tokens) / normaliser; row 0 has A = 1 on 2 tokens, row 1 -1 on 1
    assert logp.grad[0].tolist() == pytest.approx([expected_grad_row0] * 2 + [0.0])
    second = {"grpo": 1 / 1 / 4, "dapo": 1 / 7, "bnpo": 1 / 7, "dr_grpo": 1 / 12}[kind]
    assert logp.grad[1].tolist() == pytest.approx([second, 0.0, 0.0])
    assert loss.item() == pytest.approx({"grpo": (-1 + 1) / 4, "dapo": (-2 + 1) / 7, "bnpo": (-2 + 1) / 7,
                                         "dr_grpo": (-2 + 1) / 12}[kind])


def test_sequence_level_ratio_is_the_exp_of_the_mean_log_ratio_and_clips_as_a_whole():
    _, mask = two_groups()
    logp = torch.zeros(4, 3)
    old = torch.tensor([[-0.2, -0.4, 5.0], [0.0, 5.0, 5.0], [0.1, 0.1, 0.1], [0.5, 0.0, 0.0]])
    coef = grpo.ratio(logp, old, mask, "sequence")  # masked tokens of `old` (5.0) play no part
    assert coef.squeeze(-1).tolist() == pytest.approx([math.exp(0.3), 1.0, math.exp(-0.1), math.exp(-0.5)])
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0])
    low, high, of = grpo.clip_counts(coef, adv, mask, (0.2, 0.2))
    assert (low, high, of) == (1, 1, 4)  # row 3 (0.61 < 0.8, A < 0) and row 0 (1.35 > 1.2, A > 0), of 4 ratios


def trl_loss(kind, level, logp, old, ref, adv, mask, beta, eps, max_len):
    """TRL's own GRPOTrainer._compute_loss on these tensors: one process, one micro-batch per step."""
    from collections import defaultdict
    from types import SimpleNamespace as NS

    trl_grpo = pytest.importorskip("trl.trainer.grpo_trainer")
    stub = NS(top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level=level, beta=beta,
              args=NS(use_bias_correction_kl=False, delta=None, steps_per_generation=1), loss_type=kind,
              epsilon_low=eps[0], epsilon_high=eps[1], use_vllm=False, vllm_importance_sampling_correction=False,
              model=NS(training=True), current_gradient_accumulation_steps=1, max_completion_length=max_len,
              accelerator=NS(num_processes=1, gather=lambda x: x, reduce=lambda x, reduction: x),
              aux_loss_enabled=False, _entropy_bonus_enabled=False, _metrics=defaultdict(lambda: defaultdict(list)),
              _get_per_token_logps_and_entropies=lambda *a, **k: (logp, torch.zeros_like(logp), None))
    n, tc = mask.shape
    inputs = {"prompt_ids": torch.zeros(n, 1, dtype=torch.long), "prompt_mask": torch.ones(n, 1, dtype=torch.long),
              "completion_ids": torch.zeros(n, tc, dtype=torch.long), "completion_mask": mask, "advantages": adv,
              "old_per_token_logps": old, "ref_per_token_logps": ref, "num_items_in_batch": mask.sum()}
    return trl_grpo.GRPOTrainer._compute_loss(stub, None, inputs), stub._metrics["train"]


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("kind", ["grpo", "dr_grpo", "dapo", "bnpo"])
def test_each_loss_equals_trls_on_the_same_tensors(kind, level):
    """Values and gradients against TRL's implementation, with an older policy (several updates per batch), the
    KL to a reference, asymmetric clipping (DAPO's clip-higher) and a ragged mask."""
    if level == "sequence" and kind != "grpo":
        pytest.skip("TRL warns these normalisations sum per-token terms; sequence level is for grpo (GSPO)")
    torch.manual_seed(1)
    mask = (torch.rand(6, 8) > 0.25).float()
    mask[:, 0] = 1.0
    logp = (-torch.rand(6, 8) * 3).requires_grad_()
    old = (logp + 0.3 * torch.randn(6, 8)).detach()
    ref = (logp + 0.2 * torch.randn(6, 8)).detach()
    adv, eps = torch.randn(6), (0.2, 0.28)
    want, metrics = trl_loss(kind, level, logp, old, ref, adv, mask, 0.04, eps, 8)
    (want_grad,) = torch.autograd.grad(want, logp)
    got, _ = grpo.loss(logp, ref, adv, mask, 0.04, 6, kind=kind, old_logp=old, eps=eps, level=level,
                       tokens_total=int(mask.sum()), max_len=8)
    (got_grad,) = torch.autograd.grad(got, logp)
    assert got.item() == pytest.approx(want.item(), rel=1e-5, abs=1e-7)
    assert torch.allclose(got_grad, want_grad, rtol=1e-5, atol=1e-7)
    low, high, of = grpo.clip_counts(grpo.ratio(logp, old, mask, level), adv, mask, eps)
    assert low / of == pytest.approx(metrics["clip_ratio/low_mean"][0], abs=1e-6)
    assert high / of == pytest.approx(metrics["clip_ratio/high_mean"][0], abs=1e-6)
    assert low + high > 0  # the clip did bite somewhere: the comparison means something
