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
