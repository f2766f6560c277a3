"""The algorithm suite on hand-computed cases: every estimator and loss, presets, the seam, dynamic sampling.

Layout used throughout: row b = prompt + response right-padded; the mask marks loss tokens.
"""

from __future__ import annotations

import math

import pytest
import torch

from slime_rl import algorithms
from slime_rl.algorithms import advantages as est
from slime_rl.algorithms.config import AlgorithmConfig
from slime_rl.algorithms.losses import cispo_loss, gspo_loss
from slime_rl.config import ConfigError, build_config
from slime_rl.types import Sample, SampleStatus, TrainBatch

ALL = ("GRPO", "DR_GRPO", "DAPO", "RLOO", "REINFORCE_PP", "REINFORCE_PPB", "PPO", "GSPO", "CISPO", "RAFT")


def batch_of(rewards, groups, mask_rows, **extra) -> TrainBatch:
    mask = torch.tensor(mask_rows, dtype=torch.float32)
    B, T = mask.shape
    b = TrainBatch(input_ids_BT=torch.ones(B, T, dtype=torch.long), attention_mask_BT=torch.ones(B, T, dtype=torch.long),
                   response_mask_BT=mask, advantages_BT=torch.zeros(B, T), rollout_logprobs_BT=torch.zeros(B, T),
                   loss_weights_BT=algorithms.token_loss_weights(mask, "token_mean"),
                   rewards_B=torch.tensor(rewards, dtype=torch.float32), group_B=torch.tensor(groups))
    for k, v in extra.items():
        setattr(b, k, v)
    return b


def near(t: torch.Tensor, expected, tol: float = 1e-6) -> bool:
    torch.testing.assert_close(t.detach().double(), torch.tensor(expected, dtype=torch.float64), atol=tol, rtol=tol)
    return True


def cfg(name: str, **over) -> AlgorithmConfig:
    c = build_config(overrides=[("algorithm.name", name)]).algorithm
    for k, v in over.items():
        setattr(c, k, v)
    return c


def test_every_name_is_registered_case_insensitively_with_a_summary_and_paper():
    assert set(algorithms.implemented()) == set(ALL)
    for name in ALL:
        a = algorithms.get(name.lower())
        assert a is algorithms.get(name) and a.summary and a.paper
    with pytest.raises(NotImplementedError, match="implemented: CISPO"):
        algorithms.get("SAC")


def test_presets_move_defaults_and_every_field_stays_overridable():
    c = build_config(overrides=[("algorithm.name", "dapo")])
    assert c.algorithm.name == "DAPO" and (c.algorithm.eps_clip_low, c.algorithm.eps_clip_high) == (0.2, 0.28)
    assert c.algorithm.dynamic_sampling and c.algorithm.overlong_buffer_len == c.rollout.max_new_tokens // 5
    c = build_config({"algorithm": {"name": "DAPO", "eps_clip_high": 0.3}},
                     [("rollout.max_new_tokens", 40), ("algorithm.dynamic_sampling", False)])
    assert (c.algorithm.eps_clip_high, c.algorithm.dynamic_sampling, c.algorithm.overlong_buffer_len) == (0.3, False, 8)
    assert build_config(overrides=[("algorithm.name", "Dr_Grpo")]).algorithm.loss_agg == "constant"
    assert build_config(overrides=[("algorithm.name", "GRPO")]) == build_config()  # GRPO = the defaults
    ppo = build_config(overrides=[("algorithm.name", "PPO")])
    assert algorithms.get("PPO").needs(ppo.algorithm).critic and ppo.algorithm.whiten_advantages
    with pytest.raises(ConfigError, match="algorithm.kl_in_reward"):
        build_config(overrides=[("algorithm.name", "REINFORCE_PP"), ("algorithm.kl_coef", 0.0)])
    with pytest.raises(ConfigError, match="algorithm.name: invalid value 'SAC'; allowed values: GRPO"):
        build_config(overrides=[("algorithm.name", "SAC")])


MASK = [[0, 1, 1, 0], [0, 1, 0, 1], [0, 1, 1, 1], [0, 1, 0, 0], [0, 0, 1, 1]]  # mid-sequence 0s, padding


def test_group_estimators_by_hand_including_a_lone_sample_and_equal_rewards():
    # groups: {0, 1, 2} rewards 1, 0, 0; {3} alone; {4} alone
    b = batch_of([1.0, 0.0, 0.0, 5.0, 0.0], [0, 0, 0, 1, 2], MASK)
    s = math.sqrt(1 / 3)  # unbiased std of (1, 0, 0)
    grpo = est.group_normalized(b, scale_by_std=True, eps=0.0)
    assert grpo.tolist() == pytest.approx([(2 / 3) / s, (-1 / 3) / s, (-1 / 3) / s, 0.0, 0.0], abs=1e-6)
    assert est.group_normalized(b, False, 0.0).tolist() == pytest.approx([2 / 3, -1 / 3, -1 / 3, 0, 0], abs=1e-6)
    assert est.leave_one_out(b).tolist() == pytest.approx([1.0, -0.5, -0.5, 0.0, 0.0], abs=1e-6)
    assert est.group_mean_baseline(b).tolist() == pytest.approx([2 / 3, -1 / 3, -1 / 3, 0, 0], abs=1e-6)
    assert est.best_of_group(b).tolist() == [1.0, 0.0, 0.0, 0.0, 0.0]  # lone samples: nothing to rank
    ties = batch_of([2.0, -1.0, 2.0, 0.5], [0, 0, 0, 0], MASK[:4])
    assert est.best_of_group(ties).tolist() == [1.0, 0.0, 1.0, 0.0]  # every sample at the best reward
    assert est.best_of_group(ties, min_reward=2.0).tolist() == [1.0, 0.0, 1.0, 0.0]
    assert est.best_of_group(ties, min_reward=3.0).tolist() == [0.0] * 4  # the best of failures: no example
    equal = batch_of([1.0, 1.0, 1.0], [0, 0, 0], MASK[:3])
    for a in ("GRPO", "DR_GRPO", "RLOO", "RAFT"):
        adv, ret = algorithms.get(a).advantages(equal, cfg(a))
        assert ret is None and adv.abs().max() == 0
    # per-token: the scalar sits on every loss token, never on masked ones (padding, environment tokens)
    adv, _ = algorithms.get("RLOO").advantages(b, cfg("RLOO"))
    assert adv.tolist() == [[0, 1, 1, 0], [0, -0.5, 0, -0.5], [0, -0.5, -0.5, -0.5], [0, 0, 0, 0], [0, 0, 0, 0]]


def test_reinforce_pp_token_rewards_returns_and_global_whitening_by_hand():
    mask = [[0, 1, 0, 1], [0, 1, 1, 0]]  # row 0 has an environment token at t=2
    old = torch.tensor([[0.0, -1.0, -9.0, -2.0], [0.0, -1.0, -1.0, 0.0]])
    ref = torch.tensor([[0.0, -1.5, 0.0, -1.0], [0.0, -1.0, -3.0, 0.0]])
    b = batch_of([1.0, 0.0], [0, 0], mask, old_logprobs_BT=old, ref_logprobs_BT=ref)
    c = cfg("REINFORCE_PP", kl_coef=0.1, whiten_advantages=False)  # k1 = log pi_old - log pi_ref
    r = est.token_rewards(b, b.rewards_B, c.kl_coef, c.kl_type)
    assert near(r, [[0, -0.05, 0, 1 + 0.1], [0, 0, -0.2, 0]], 1e-6)
    adv, ret = algorithms.get("REINFORCE_PP").advantages(b, c)
    assert ret is None
    assert near(adv, [[0, 1.05, 0, 1.1], [0, -0.2, -0.2, 0]], 1e-6)  # gamma 1: sums
    adv_g, _ = algorithms.get("REINFORCE_PP").advantages(b, cfg("REINFORCE_PP", kl_coef=0.1, gamma=0.5,
                                                                whiten_advantages=False))
    assert adv_g[0, 1] == pytest.approx(-0.05 + 0.5 * 1.1)  # the environment token is skipped by the scan
    # whitening: over the 4 loss tokens of the batch, unbiased variance
    white, _ = algorithms.get("REINFORCE_PP").advantages(b, cfg("REINFORCE_PP", kl_coef=0.1))
    x = torch.tensor([1.05, 1.1, -0.2, -0.2], dtype=torch.float64)
    expect = (x - x.mean()) / torch.sqrt(x.var(unbiased=True) + 1e-8)
    got = white[torch.tensor(mask) > 0]
    assert got.tolist() == pytest.approx(expect.tolist(), abs=1e-6) and white[0, 2] == 0 and white[1, 3] == 0
    # the baseline variant: r - group mean, then whitening; a lone token batch is not divided by zero
    ppb, _ = algorithms.get("REINFORCE_PPB").advantages(b, cfg("REINFORCE_PPB", whiten_advantages=False))
    assert near(ppb, [[0, 0.5, 0, 0.5], [0, -0.5, -0.5, 0]], 1e-6)
    one = batch_of([3.0], [0], [[0, 1]])
    assert algorithms.get("REINFORCE_PPB").advantages(one, cfg("REINFORCE_PPB"))[0].abs().max() == 0


def test_ppo_gae_with_the_critics_values_by_hand():
    mask = [[0, 1, 1, 0], [0, 1, 0, 1]]
    values = torch.tensor([[9.0, 0.5, 0.25, 9.0], [9.0, 0.5, 9.0, 1.0]])  # off-mask values never count
    b = batch_of([1.0, 0.0], [0, 0], mask, values_BT=values * torch.tensor(mask))
    c = cfg("PPO", whiten_advantages=False, gamma=1.0, lam=0.5)
    adv, ret = algorithms.get("PPO").advantages(b, c)
    # row 0: delta_2 = 1 - 0.25 = 0.75, delta_1 = 0 + 0.25 - 0.5 = -0.25; A_1 = -0.25 + 0.5 * 0.75 = 0.125
    # row 1: tokens 1 and 3 (2 is an environment token): delta_3 = 0 - 1 = -1, delta_1 = 1 - 0.5 = 0.5,
    #        A_1 = 0.5 + 0.5 * -1 = 0
    assert near(adv, [[0, 0.125, 0.75, 0], [0, 0.0, 0, -1.0]], 1e-6)
    assert near(ret, [[0, 0.625, 1.0, 0], [0, 0.5, 0, 0.0]], 1e-6)
    with pytest.raises(ValueError, match="values"):
        algorithms.get("PPO").advantages(batch_of([1.0], [0], [[0, 1]]), c)


def test_gspo_uses_one_clipped_ratio_per_sequence_and_its_gradient_is_the_sequence_level_one():
    mask = torch.tensor([[0, 1, 1, 0], [0, 1, 0, 1]], dtype=torch.float32)
    old = torch.zeros(2, 4)
    lp = torch.tensor([[0.0, 0.3, -0.1, 5.0], [0.0, 0.001, 7.0, 0.0]], requires_grad=True)
    adv = torch.tensor([[0, 1.0, 1.0, 0], [0, -1.0, 0, -1.0]])
    w = algorithms.token_loss_weights(mask, "seq_mean_token_mean")
    loss, stats = gspo_loss(lp, old, adv, w, mask, 0.0003, 0.0004)
    loss.backward()
    s0, s1 = math.exp(0.1), math.exp(0.0005)  # geometric means over each row's loss tokens
    # row 0: s0 > 1 + 4e-4 with A > 0: clipped, no gradient; row 1: s1 inside [1-3e-4, 1+4e-4]: -A s1 per token
    assert float(loss.detach()) == pytest.approx(0.5 * -(1.0004) + 0.5 * s1, abs=1e-6)
    assert lp.grad[0].abs().max() == 0
    assert lp.grad[1].tolist() == pytest.approx([0, 0.25 * s1, 0, 0.25 * s1], rel=1e-5)  # 1/S * 1/|y| * s1 * -A
    assert float(stats["clip_frac"]) == pytest.approx(0.5) and s0 > 1


def test_cispo_keeps_every_tokens_gradient_with_a_clipped_stop_gradient_weight():
    lp = torch.log(torch.tensor([[2.0, 0.5, 1.1]])).requires_grad_(True)
    old = torch.zeros(1, 3)
    adv = torch.tensor([[1.0, 1.0, -1.0]])
    w = torch.full((1, 3), 1 / 3)
    loss, stats = cispo_loss(lp, old, adv, w, eps_low=1.0, eps_high=0.28)
    loss.backward()
    # weights sg[clip(r, 0, 1.28)] = 1.28, 0.5, 1.1; gradient of -w A log pi is -w A / 3
    assert near(lp.grad, [[-1.28 / 3, -0.5 / 3, 1.1 / 3]], 1e-5)
    assert float(stats["clip_frac"]) == pytest.approx(1 / 3)


@pytest.mark.parametrize("kind", ["ppo", "gspo", "cispo"])
def test_every_policy_loss_is_finite_at_log_ratios_of_plus_minus_100(kind):
    for gap in (100.0, -100.0):
        mask = torch.tensor([[0.0, 1.0, 1.0]])
        b = batch_of([1.0], [0], mask.tolist(), old_logprobs_BT=torch.zeros(1, 3),
                     advantages_BT=torch.tensor([[0.0, 1.0, -1.0]]), ref_logprobs_BT=torch.zeros(1, 3))
        lp = torch.tensor([[0.0, gap, -gap]], requires_grad=True)
        loss_fn = algorithms.make_policy_loss(0.2, 0.28, kl_coef=0.1, kl_type="k3", dual_clip_c=3.0, kind=kind)
        loss, stats = loss_fn(lp, torch.zeros(1, 3), b)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(lp.grad).all(), (kind, gap, loss, lp.grad)
        assert all(math.isfinite(float(v)) for v in stats.values())


def test_value_loss_clipped_by_hand():
    mask = [[0, 1, 1]]
    b = batch_of([0.0], [0], mask, values_BT=torch.tensor([[0.0, 1.0, 1.0]]),
                 returns_BT=torch.tensor([[0.0, 2.0, 0.0]]))
    b.loss_weights_BT = algorithms.token_loss_weights(b.response_mask_BT, "token_mean")
    v = torch.tensor([[0.0, 1.5, 0.1]], requires_grad=True)
    loss, stats = algorithms.ValueLoss(clip=0.2)(v, b)
    # token 1: clipped value 1.2 -> (1.2 - 2)^2 = 0.64 > (1.5 - 2)^2 = 0.25: the clipped one (no gradient)
    # token 2: clipped 0.8 -> 0.64 < 0.01? no: (0.8)^2 = 0.64 > (0.1)^2 = 0.01: clipped again
    assert float(loss.detach()) == pytest.approx(0.5 * (0.64 + 0.64) / 2)
    assert float(stats["value_clip_frac"]) == pytest.approx(1.0)
    loss.backward()
    assert v.grad.abs().max() == 0
    plain, _ = algorithms.ValueLoss(clip=None)(v, b)
    assert float(plain.detach()) == pytest.approx(0.5 * (0.25 + 0.01) / 2)


def test_truncated_samples_masked_and_the_overlong_penalty():
    s = [Sample(prompt_ids=[1, 2], response_ids=[3, 4, 5], reward=1.0, status=SampleStatus.TRUNCATED),
         Sample(prompt_ids=[1], response_ids=[3], reward=0.0)]
    b = algorithms.build_train_batch(s, None, 0, mask_truncated=True)
    assert b.response_mask_BT.tolist() == [[0, 0, 0, 0, 0], [0, 1, 0, 0, 0]]
    assert b.rewards_B.tolist() == [1.0, 0.0] and b.group_B.tolist() == [0, 0]
    assert float(b.loss_weights_BT.sum()) == pytest.approx(1.0)  # the masked row does not dilute the mean
    # budget 20, buffer 4: no penalty up to 16 tokens, then linear to -penalty at 20
    assert [algorithms.overlong_penalty(n, 20, 4, 1.0) for n in (10, 16, 17, 18, 20)] == [0, 0, -0.25, -0.5, -1.0]
    assert algorithms.overlong_penalty(20, 20, 0, 1.0) == 0.0


def test_dynamic_sampling_refills_a_sync_batch_and_only_filters_otherwise():
    from slime_rl.producer import DynamicSampling, SyncRollout

    def group(rewards):
        return [Sample(prompt_ids=[1], response_ids=[2], reward=r) for r in rewards]

    class Source(SyncRollout):
        def __init__(self, waves):
            self.waves, self.asked = waves, []

        def get(self, step, trainer_version, n=None):
            self.asked.append(n)
            return self.waves.pop(0)[: n or 4]

        def metrics(self):
            return {}

    src = Source([[group([1, 1]), group([0, 1]), group([0, 0]), group([1, 1])],  # 1 of 4 has signal
                  [group([1, 0]), group([0, 0]), group([0, 1]), group([1, 0]), group([1, 1])]])
    ds = DynamicSampling(src, target=4, rounds=2)
    batch = ds.get(0, 0)
    assert len(batch) == 4 and all(max(s.reward for s in g) > min(s.reward for s in g) for g in batch)
    assert src.asked == [None, 12]  # 3 missing at a keep rate of 1/4 -> 12 more groups asked for
    m = ds.metrics()
    assert m["rollout/filtered_groups_frac"] == pytest.approx(5 / 9) and m["rollout/sampling_rounds"] == 2
    assert m["rollout/extra_samples"] == (9 - 4) * 2

    class Replay:
        def get(self, step, trainer_version):
            return [group([1, 1]), group([0, 1])]

        def metrics(self):
            return {}

    ds = DynamicSampling(Replay(), target=2, rounds=3)
    assert len(ds.get(0, 0)) == 1 and ds.metrics()["rollout/filtered_groups_frac"] == 0.5
