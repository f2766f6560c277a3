"""Loss numerics shared by every algorithm (issue 18, first part): log-ratio clamp, bounded k3, dual-clip,
clip fractions, and the loss aggregation modes. Hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from slime_rl.algorithms import kl_penalty, policy_loss, token_loss_weights
from slime_rl.algorithms import K3_MAX, LOG_RATIO_CLAMP


def test_extreme_log_ratios_give_a_finite_loss_and_gradient():
    for gap in (100.0, -100.0):
        lp = torch.tensor([[gap, 0.0]], requires_grad=True)
        old = torch.zeros(1, 2)
        adv = torch.tensor([[1.0, -1.0]])
        w = torch.full((1, 2), 0.5)
        loss, stats = policy_loss(lp, old, adv, w, 0.2, 0.2, dual_clip_c=3.0)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(lp.grad).all(), (gap, loss, lp.grad)
        assert math.isfinite(float(stats["ratio_max"])) and float(stats["ratio_max"]) <= math.exp(LOG_RATIO_CLAMP)
        for kind in ("k1", "k2", "k3"):
            lp2 = torch.tensor([[gap]], requires_grad=True)
            kl = kl_penalty(lp2, torch.zeros(1, 1), kind).sum()
            kl.backward()
            assert torch.isfinite(kl) and torch.isfinite(lp2.grad).all(), (kind, gap)


def test_k3_is_bounded_at_extreme_log_ratios():
    # log pi_ref/pi = 12: exp(12) - 12 - 1 = 1.6e5 unbounded
    lp = torch.tensor([[-12.0]], requires_grad=True)
    k3 = kl_penalty(lp, torch.zeros(1, 1), "k3")
    assert float(k3.detach()) == K3_MAX
    k3.sum().backward()
    assert float(lp.grad) == 0.0  # at the bound: no gradient of 1.6e5
    small = kl_penalty(torch.tensor([[-0.5]]), torch.zeros(1, 1), "k3")  # inside the bound: unchanged
    assert float(small) == pytest.approx(math.exp(0.5) - 0.5 - 1)


def test_dual_clip_caps_negative_advantages_only():
    lp = torch.log(torch.tensor([[5.0, 5.0, 2.0, 0.5]]))
    old = torch.zeros(1, 4)
    adv = torch.tensor([[-1.0, 1.0, -1.0, -2.0]])
    w = torch.full((1, 4), 0.25)
    # per token, eps 0.2: max(-A r, -A clip(r)):
    #   A=-1, r=5:   max(5, 1.2) = 5 -> capped at -A c = 3
    #   A=+1, r=5:   max(-5, -1.2) = -1.2 (positive advantages are never dual-clipped)
    #   A=-1, r=2:   max(2, 1.2) = 2 < 3, kept
    #   A=-2, r=0.5: max(1, 1.6) = 1.6 (clipped low)
    loss, stats = policy_loss(lp, old, adv, w, 0.2, 0.2, dual_clip_c=3.0)
    assert float(loss) == pytest.approx(0.25 * (3.0 - 1.2 + 2.0 + 1.6))
    assert float(stats["dual_clip_frac"]) == pytest.approx(0.25)
    plain, stats = policy_loss(lp, old, adv, w, 0.2, 0.2)
    assert float(plain) == pytest.approx(0.25 * (5.0 - 1.2 + 2.0 + 1.6)) and float(stats["dual_clip_frac"]) == 0
    # clipped tokens: #2 (ratio 5 > 1.2 with A > 0) high, #4 (ratio 0.5 < 0.8 with A < 0) low
    assert float(stats["clip_frac_high"]) == pytest.approx(0.25)
    assert float(stats["clip_frac_low"]) == pytest.approx(0.25)
    assert float(stats["clip_frac"]) == pytest.approx(0.5)


MASK = torch.tensor([[1.0, 1.0, 0.0, 0.0],  # 2 loss tokens
                     [0.0, 0.0, 0.0, 0.0],  # none (an aborted sample): must not dilute sequence means
                     [1.0, 0.0, 1.0, 1.0]])  # 3 loss tokens, one environment token (mask 0) between


@pytest.mark.parametrize("mode, expected_row_sums", [
    ("token_mean", [2 / 5, 0.0, 3 / 5]),
    ("token", [2 / 5, 0.0, 3 / 5]),
    ("seq_mean_token_mean", [1 / 2, 0.0, 1 / 2]),
    ("sequence", [1 / 2, 0.0, 1 / 2]),
    ("seq_mean_token_sum", [2 / 2, 0.0, 3 / 2]),
    ("constant", [2 / (2 * 8), 0.0, 3 / (2 * 8)]),
])
def test_aggregation_modes(mode, expected_row_sums):
    w = token_loss_weights(MASK, mode, constant_len=8)
    assert w.sum(dim=1).tolist() == pytest.approx(expected_row_sums)
    assert bool(((w > 0) == (MASK > 0)).all())  # weight exactly on the loss tokens
    # each row's tokens weigh the same (the environment token in row 3 gets nothing)
    assert w[2, 0] == w[2, 2] == w[2, 3] and w[2, 1] == 0


def test_aggregation_errors():
    with pytest.raises(ValueError, match="constant_len"):
        token_loss_weights(MASK, "constant")
    with pytest.raises(ValueError, match="allowed values"):
        token_loss_weights(MASK, "median")
