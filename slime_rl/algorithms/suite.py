"""The algorithms `--algo` names: each a preset, an advantage estimator and a policy loss.

| name          | advantages                                  | loss / extras                                  |
|---------------|---------------------------------------------|------------------------------------------------|
| GRPO          | group mean / std                            | clipped surrogate                              |
| DR_GRPO       | group mean only                             | constant normaliser (no length bias)           |
| DAPO          | group mean / std                            | clip-higher, token mean, dynamic sampling,     |
|               |                                             | overlong reward shaping                        |
| RLOO          | leave-one-out baseline                      | clipped surrogate                              |
| REINFORCE_PP  | KL in the token reward, discounted returns, | clipped surrogate                              |
|               | whitened over the batch                     |                                                |
| REINFORCE_PPB | group-mean baseline, whitened over batch    | clipped surrogate                              |
| PPO           | GAE from a learned critic, whitened         | clipped surrogate; clipped value loss          |
| GSPO          | group mean / std                            | sequence-level ratio and clip                  |
| CISPO         | group mean / std                            | clipped IS weight as a stop-gradient coefficient|
| RAFT          | 1 on each group's best samples (at least    | likelihood of the best (reward-ranked SFT)     |
|               | best_min_reward when set), 0 elsewhere      |                                                |

Every option stays a config field: a preset only changes defaults, and e.g.
`--algo GRPO --algorithm.kl_in_reward true --algorithm.kl_coef 0.01` adds the
KL to GRPO's per-token advantages (its discounted returns).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from slime_rl.algorithms import advantages as est
from slime_rl.algorithms.base import Needs, register
from slime_rl.algorithms.losses import PolicyLoss
from slime_rl.types import TrainBatch


class PolicyGradient:
    """Shared behaviour: a scalar advantage per sequence on its loss tokens (plus the discounted KL rewards with
    `kl_in_reward`), optional whitening over the batch, and the configured policy loss."""

    name = ""
    summary = ""
    paper = ""

    def preset(self, job_cfg: Any) -> dict[str, Any]:
        return {}

    def needs(self, cfg: Any) -> Needs:
        return Needs(reference=cfg.kl_coef > 0, dynamic_sampling=cfg.dynamic_sampling,
                     global_whitening=cfg.whiten_advantages, old_logprobs=cfg.kl_in_reward and cfg.kl_coef > 0)

    def scalar_advantages(self, batch: TrainBatch, cfg: Any) -> torch.Tensor:
        raise NotImplementedError

    def advantages(self, batch: TrainBatch, cfg: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        mask_BT = batch.response_mask_BT
        adv_BT = est.broadcast(self.scalar_advantages(batch, cfg), mask_BT)
        if cfg.kl_in_reward and cfg.kl_coef > 0:
            kl_BT = est.token_rewards(batch, torch.zeros_like(batch.rewards_B), cfg.kl_coef, cfg.kl_type)
            adv_BT = adv_BT + est.discounted_returns(batch, kl_BT, cfg.gamma)
        return self.finish(adv_BT, mask_BT, cfg), None

    @staticmethod
    def token_rewards(batch: TrainBatch, scalar_B: torch.Tensor, cfg: Any) -> torch.Tensor:
        """The scalar on each row's last loss token, with the KL per token when it is in the reward."""
        return est.token_rewards(batch, scalar_B, cfg.kl_coef if cfg.kl_in_reward else 0.0, cfg.kl_type)

    @staticmethod
    def finish(adv_BT: torch.Tensor, mask_BT: torch.Tensor, cfg: Any) -> torch.Tensor:
        return est.whiten(adv_BT, mask_BT) if cfg.whiten_advantages else adv_BT * mask_BT

    def loss(self, cfg: Any) -> PolicyLoss:
        return PolicyLoss(cfg.eps_clip_low, cfg.eps_clip_high, 0.0 if cfg.kl_in_reward else cfg.kl_coef, cfg.kl_type,
                          cfg.entropy_coef, cfg.dual_clip_c, cfg.policy_loss)


class GRPO(PolicyGradient):
    name = "GRPO"
    summary = "group-normalized outcome advantages (r - mean) / std, clipped surrogate, no critic"
    paper = "Shao et al., 2024, DeepSeekMath (arXiv:2402.03300)"

    def scalar_advantages(self, batch: TrainBatch, cfg: Any) -> torch.Tensor:
        return est.group_normalized(batch, cfg.scale_adv_by_std, cfg.adv_eps)


class DrGRPO(GRPO):
    name = "DR_GRPO"
    summary = "GRPO without the std division and with a constant loss normaliser: no length or difficulty bias"
    paper = "Liu et al., 2025, Understanding R1-Zero-Like Training (arXiv:2503.20783)"

    def preset(self, job_cfg: Any) -> dict[str, Any]:
        return {"algorithm.scale_adv_by_std": False, "algorithm.loss_agg": "constant"}


class DAPO(GRPO):
    name = "DAPO"
    summary = ("GRPO with clip-higher (0.2 / 0.28), token-mean loss, dynamic sampling (groups whose rewards all "
               "agree are replaced) and a soft overlong penalty over the last fifth of the budget")
    paper = "Yu et al., 2025, DAPO (arXiv:2503.14476)"

    def preset(self, job_cfg: Any) -> dict[str, Any]:
        return {"algorithm.eps_clip_low": 0.2, "algorithm.eps_clip_high": 0.28, "algorithm.loss_agg": "token_mean",
                "algorithm.dynamic_sampling": True,
                "algorithm.overlong_buffer_len": max(1, job_cfg.rollout.max_new_tokens // 5),
                "algorithm.overlong_penalty": 1.0}


class GSPO(GRPO):
    name = "GSPO"
    summary = "group-normalized advantages; sequence-level ratio (geometric mean of token ratios), clipped per sequence"
    paper = "Zheng et al., 2025, Group Sequence Policy Optimization (arXiv:2507.18071)"

    def preset(self, job_cfg: Any) -> dict[str, Any]:
        return {"algorithm.policy_loss": "gspo", "algorithm.eps_clip_low": 3e-4, "algorithm.eps_clip_high": 4e-4,
                "algorithm.loss_agg": "seq_mean_token_mean"}


class CISPO(GRPO):
    name = "CISPO"
    summary = "group-normalized advantages; the clipped IS weight is a stop-gradient coefficient, no token dropped"
    paper = "MiniMax, 2025, MiniMax-M1 (arXiv:2506.13585)"

    def preset(self, job_cfg: Any) -> dict[str, Any]:
        return {"algorithm.policy_loss": "cispo", "algorithm.eps_clip_low": 1.0, "algorithm.eps_clip_high": 0.28,
                "algorithm.loss_agg": "token_mean"}


class RAFT(PolicyGradient):
    name = "RAFT"
    summary = ("reward-ranked fine-tuning: the likelihood of each group's best samples (advantage 1 when the group's "
               "rewards differ), nothing pushed down; sharpens a warm-started policy without raising its entropy")
    paper = "Dong et al., 2023, RAFT: Reward rAnked FineTuning (arXiv:2304.06767)"

    def scalar_advantages(self, batch: TrainBatch, cfg: Any) -> torch.Tensor:
        return est.best_of_group(batch, cfg.best_min_reward)


class RLOO(PolicyGradient):
    name = "RLOO"
    summary = "leave-one-out baseline: r_i - mean of the other samples of its group"
    paper = "Ahmadian et al., 2024, Back to Basics (arXiv:2402.14740); Kool et al., 2019"

    def scalar_advantages(self, batch: TrainBatch, cfg: Any) -> torch.Tensor:
        return est.leave_one_out(batch)


class ReinforcePP(PolicyGradient):
    name = "REINFORCE_PP"
    summary = "REINFORCE++: per-token KL in the reward, discounted returns, whitened over the whole batch"
    paper = "Hu, 2025, REINFORCE++ (arXiv:2501.03262)"

    def preset(self, job_cfg: Any) -> dict[str, Any]:
        return {"algorithm.kl_coef": 0.01, "algorithm.kl_in_reward": True, "algorithm.kl_type": "k1",
                "algorithm.whiten_advantages": True, "algorithm.gamma": 1.0}

    def scalar(self, batch: TrainBatch, cfg: Any) -> torch.Tensor:
        return batch.rewards_B

    def advantages(self, batch: TrainBatch, cfg: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        r_BT = self.token_rewards(batch, self.scalar(batch, cfg), cfg)
        return self.finish(est.discounted_returns(batch, r_BT, cfg.gamma), batch.response_mask_BT, cfg), None


class ReinforcePPBaseline(ReinforcePP):
    name = "REINFORCE_PPB"
    summary = "REINFORCE++-baseline: group-mean baseline, then whitening over the whole batch"
    paper = "Hu, 2025, REINFORCE++ (arXiv:2501.03262), the baseline variant"

    def preset(self, job_cfg: Any) -> dict[str, Any]:
        return {"algorithm.whiten_advantages": True, "algorithm.gamma": 1.0}

    def scalar(self, batch: TrainBatch, cfg: Any) -> torch.Tensor:
        return est.group_mean_baseline(batch)


class PPO(PolicyGradient):
    name = "PPO"
    summary = "a learned critic: GAE (gamma, lambda) advantages, whitened; clipped value loss, critic warm-up"
    paper = "Schulman et al., 2017 (arXiv:1707.06347); GAE: Schulman et al., 2016; ReFT: Luong et al., 2024"

    def preset(self, job_cfg: Any) -> dict[str, Any]:
        return {"algorithm.whiten_advantages": True, "algorithm.gamma": 1.0, "algorithm.lam": 0.95}

    def needs(self, cfg: Any) -> Needs:
        return dataclasses.replace(super().needs(cfg), critic=True)

    def advantages(self, batch: TrainBatch, cfg: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        if batch.values_BT is None:
            raise ValueError("PPO needs the critic's values of the batch (batch.values_BT)")
        r_BT = self.token_rewards(batch, batch.rewards_B, cfg)
        adv_BT, returns_BT = est.gae(batch, r_BT, cfg.gamma, cfg.lam)
        return self.finish(adv_BT, batch.response_mask_BT, cfg), returns_BT


for _algorithm in (GRPO(), DrGRPO(), DAPO(), RLOO(), ReinforcePP(), ReinforcePPBaseline(), PPO(), GSPO(), CISPO(), RAFT()):
    register(_algorithm)
