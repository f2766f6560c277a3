"""GRPO advantages, loss aggregation and clipping on hand-computed cases."""

import math

import pytest
import torch

from slime_rl.algorithms import build_train_batch, grpo_advantages, kl_penalty, policy_loss, token_loss_weights
from slime_rl.types import Sample


def _group(rewards):
    return [Sample(prompt_ids=[1], response_ids=[5], reward=r, index=i) for i, r in enumerate(rewards)]


def test_group_normalized_advantages_by_hand():
    # rewards [1, 0, 0, 1]: mean 0.5, unbiased std sqrt(1/3)
    adv = grpo_advantages([_group([1, 0, 0, 1])], scale_by_std=True, eps=0.0)[0]
    s = math.sqrt(1 / 3)
    assert adv == pytest_approx([0.5 / s, -0.5 / s, -0.5 / s, 0.5 / s])
    adv = grpo_advantages([_group([3, 1])], scale_by_std=False)[0]
    assert adv == pytest_approx([1.0, -1.0])


def test_uniform_group_has_zero_advantage():
    assert grpo_advantages([_group([1, 1, 1])])[0] == [0.0, 0.0, 0.0]


def test_ragged_groups():
    adv = grpo_advantages([_group([1, 0]), _group([2, 2, 5])], scale_by_std=False)
    assert adv[0] == pytest_approx([0.5, -0.5])
    assert adv[1] == pytest_approx([-1.0, -1.0, 2.0])


def test_dict_rewards_use_reward_key():
    g = [Sample(prompt_ids=[1], reward={"reward": 1.0, "format_correct": 1.0}),
         Sample(prompt_ids=[1], reward={"reward": 0.0, "format_correct": 1.0})]
    assert grpo_advantages([g], scale_by_std=False)[0] == pytest_approx([0.5, -0.5])


def pytest_approx(xs):
    import pytest

    return pytest.approx(xs, rel=1e-6, abs=1e-6)


def test_loss_weights_token_vs_sequence():
    mask = torch.tensor([[0, 1, 1, 1], [0, 1, 0, 0]], dtype=torch.float32)
    tok = token_loss_weights(mask, "token")
    assert torch.allclose(tok, mask / 4)
    seq = token_loss_weights(mask, "sequence")
    assert torch.allclose(seq, torch.tensor([[0, 1 / 6, 1 / 6, 1 / 6], [0, 0.5, 0, 0]]))
    assert math.isclose(float(seq.sum()), 1.0, rel_tol=1e-6)


def test_policy_loss_at_ratio_one_is_minus_weighted_advantage():
    lp = torch.tensor([[0.0, -1.0, -2.0]])
    adv = torch.tensor([[0.0, 2.0, -1.0]])
    w = torch.tensor([[0.0, 0.5, 0.5]])
    loss, stats = policy_loss(lp, lp.clone(), adv, w, 0.2, 0.2)
    assert math.isclose(float(loss), -(2.0 * 0.5 + -1.0 * 0.5))
    assert float(stats["clip_frac"]) == 0.0 and float(stats["approx_kl"]) == 0.0


def test_policy_loss_clipping_by_hand():
    old = torch.zeros(1, 4)
    # ratios e^0.5 ~ 1.65 (pos adv -> clipped at 1.2), e^-0.5 ~ 0.61 (neg adv -> clipped at 0.8)
    lp = torch.tensor([[0.5, -0.5, 0.5, -0.5]])
    adv = torch.tensor([[1.0, -1.0, -1.0, 1.0]])
    w = torch.full((1, 4), 0.25)
    loss, stats = policy_loss(lp, old, adv, w, 0.2, 0.2)
    r = math.exp(0.5)
    expected = 0.25 * (-1.2 + 0.8 + r + -math.exp(-0.5))
    assert math.isclose(float(loss), expected, rel_tol=1e-6)
    assert math.isclose(float(stats["clip_frac"]), 0.5)
    # clip-higher: a wider upper range lets the first token's ratio through further
    loss_hi, _ = policy_loss(lp, old, adv, w, 0.2, 0.28)
    assert math.isclose(float(loss_hi), expected + 0.25 * (1.2 - 1.28), rel_tol=1e-6)
    # gradient flows only through unclipped tokens
    lp.requires_grad_(True)
    policy_loss(lp, old, adv, w, 0.2, 0.2)[0].backward()
    assert lp.grad[0, 0] == 0 and lp.grad[0, 1] == 0 and lp.grad[0, 2] != 0 and lp.grad[0, 3] != 0


def test_kl_estimators():
    lp = torch.tensor([-1.0, -2.0])
    ref = torch.tensor([-1.5, -2.0])
    d = ref - lp
    assert torch.allclose(kl_penalty(lp, ref, "k1"), -d)
    assert torch.allclose(kl_penalty(lp, ref, "k2"), 0.5 * d * d)
    assert torch.allclose(kl_penalty(lp, ref, "k3"), torch.exp(d) - d - 1)
    assert float(kl_penalty(lp, lp, "k3").abs().sum()) == 0.0


def test_build_train_batch_layout():
    s1 = Sample(prompt_ids=[1, 2], response_ids=[3, 4, 5], rollout_logprobs=[-0.1, -0.2, -0.3])
    s2 = Sample(prompt_ids=[1], response_ids=[6], rollout_logprobs=[-0.5], loss_mask=[1])
    b = build_train_batch([s1, s2], [1.0, -1.0], pad_id=0)
    assert b.input_ids_BT.tolist() == [[1, 2, 3, 4, 5], [1, 6, 0, 0, 0]]
    assert b.attention_mask_BT.tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    assert b.response_mask_BT.tolist() == [[0, 0, 1, 1, 1], [0, 1, 0, 0, 0]]
    assert b.advantages_BT.tolist() == [[0, 0, 1, 1, 1], [0, -1, 0, 0, 0]]
    assert torch.allclose(b.rollout_logprobs_BT[0, 2:], torch.tensor([-0.1, -0.2, -0.3]))
    assert math.isclose(float(b.loss_weights_BT.sum()), 1.0, rel_tol=1e-6)
