"""The algorithm's and the critic's typed configuration (composed into `slime_rl.config.JobConfig`).

Every `--algo NAME` is a preset of these fields (`Algorithm.preset`): it is
applied over the defaults, then the config file and the flags override it one
field at a time (`slime_rl.config.build_config`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

AlgorithmName = Literal["GRPO", "DR_GRPO", "DAPO", "RLOO", "REINFORCE_PP", "REINFORCE_PPB", "PPO", "GSPO", "CISPO", "RAFT"]
LossAgg = Literal["token", "sequence", "token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "constant"]


@dataclass
class AlgorithmConfig:
    """Policy-gradient algorithm: advantages, policy loss, KL, epochs; `name` picks a preset of the rest."""

    name: AlgorithmName = "GRPO"  # case-insensitive on the command line; REINFORCE_PPB = REINFORCE++-baseline
    policy_loss: Literal["ppo", "gspo", "cispo"] = "ppo"  # ppo = token clipped surrogate; see algorithms/losses.py
    eps_clip_low: float = 0.2
    eps_clip_high: float = 0.2  # > eps_clip_low = DAPO's clip-higher
    dual_clip_c: float | None = None  # dual-clip: a negative advantage's loss is capped at -A * c (c > 1)
    kl_coef: float = 0.0  # > 0 keeps a reference model: a KL term in the loss, or in the reward (kl_in_reward)
    kl_type: Literal["k1", "k2", "k3"] = "k3"  # Schulman's estimators; k3 bounded at 10
    kl_in_reward: bool = False  # per-token reward -kl_coef * KL (REINFORCE++, PPO) instead of a loss term
    ref_update_every: int = 0  # copy the policy into the reference model every N RL steps (0 = never)
    # token (= token_mean), sequence (= seq_mean_token_mean), seq_mean_token_sum, constant (Dr. GRPO:
    # divided by loss_agg_len, the generation budget); see algorithms/batch.py token_loss_weights
    loss_agg: LossAgg = "token"
    loss_agg_len: int | None = None  # constant aggregation's length; None = rollout.max_new_tokens
    scale_adv_by_std: bool = True  # group advantages divided by the group's std (False: Dr. GRPO)
    adv_eps: float = 1e-6
    whiten_advantages: bool = False  # advantages whitened over the whole batch (all DP ranks)
    gamma: float = 1.0  # discount of token rewards (REINFORCE++ returns, GAE)
    lam: float = 0.95  # GAE's lambda (PPO)
    entropy_coef: float = 0.0
    best_min_reward: float | None = None  # RAFT: a group's best sample is kept only at this reward or above
    ppo_epochs: int = 1  # passes over each rollout batch
    mini_batches: int = 1  # optimizer steps per pass (the batch split in order)
    # DAPO: dynamic sampling, overlong reward shaping, truncated samples
    dynamic_sampling: bool = False  # drop groups whose rewards all agree; generate more until the batch is full
    dynamic_sampling_rounds: int = 4  # most extra generation rounds per step (sync mode)
    overlong_buffer_len: int = 0  # soft penalty over the last L tokens of the budget (0 = off)
    overlong_penalty: float = 1.0  # the penalty at the full budget (linear from 0 at budget - L)
    mask_truncated: bool = False  # samples cut by max_new_tokens get no loss
    # off-policy correction for tokens sampled by older weights than the trainer's (async modes):
    # tis = truncated importance sampling, weight min(pi_old / pi_behaviour, is_cap);
    # decoupled = decoupled PPO, weight pi_old / pi_behaviour, tokens past is_cap masked out;
    # auto = none in sync mode, decoupled in the async modes
    off_policy: Literal["auto", "none", "tis", "decoupled", "coupled"] = "auto"
    is_cap: float = 2.0


@dataclass
class CriticConfig:
    """The value model of PPO: the policy's architecture with a scalar head and an optimizer of its own."""

    path: str | None = None  # an HF checkpoint (token-classification critic or causal LM); None = the policy's
    lr: float = 1e-4
    warmup_steps: int = 0  # RL steps at the start that train the critic only (the policy waits)
    value_clip: float | None = 0.2  # clipped value loss around the old values (None = plain MSE)
    grad_clip: float = 1.0
    micro_batch_size: int = 64
