"""Advantage estimators over a whole `TrainBatch` (every DP rank's rows: the driver computes them once).

The batch carries one scalar reward per row (`rewards_B`, after reward
shaping) and the group of each row (`group_B`). An estimator returns
per-token advantages [B, T] (0 off the loss mask) and, for a critic, returns.

Conventions (each peer picks differently; these are ours):
- group std is unbiased (Bessel), eps added to the std: (r - mean) / (std + eps), as verl's GRPO
  (OpenRLHF's group_norm uses the same form with eps 1e-9);
- a group of one sample gets advantage 0 under every group estimator (GRPO, Dr. GRPO, RLOO, the
  REINFORCE++ baseline): it has nothing to be compared with;
- whitening is over every loss token of the batch (all DP ranks, since the driver sees the whole batch),
  with the unbiased token variance and eps inside the square root: (x - mean) / sqrt(var + 1e-8), the
  mean shifted back out (as verl's masked_whiten; OpenRLHF whitens with the biased variance and
  per-rank statistics unless told to all-reduce);
- token rewards (REINFORCE++, PPO): the scalar reward sits on the last loss token of the row; with
  `kl_in_reward` every loss token also gets -kl_coef * KL(old || ref) with the configured estimator.
"""

from __future__ import annotations

import torch

from slime_rl import ops
from slime_rl.algorithms.losses import kl_penalty
from slime_rl.types import TrainBatch

WHITEN_EPS = 1e-8


def group_rows(group_B: torch.Tensor) -> list[torch.Tensor]:
    """Row indices of each group, in order of first appearance."""
    order: dict[int, list[int]] = {}
    for row, g in enumerate(group_B.tolist()):
        order.setdefault(g, []).append(row)
    return [torch.tensor(rows, dtype=torch.long) for rows in order.values()]


def per_group(rewards_B: torch.Tensor, group_B: torch.Tensor, fn) -> torch.Tensor:
    """Apply a [G, N] -> [G, N] op to the rewards of each group (groups of one size batched together)."""
    out_B = torch.zeros_like(rewards_B, dtype=torch.float32)
    by_size: dict[int, list[torch.Tensor]] = {}
    for rows in group_rows(group_B):
        by_size.setdefault(len(rows), []).append(rows)
    for groups in by_size.values():
        rows_GN = torch.stack(groups)
        out_B[rows_GN.reshape(-1)] = fn(rewards_B[rows_GN].to(torch.float32)).reshape(-1)
    return out_B


def group_normalized(batch: TrainBatch, scale_by_std: bool, eps: float) -> torch.Tensor:
    """GRPO: (r - group mean) / (group std + eps); Dr. GRPO without the std. A group whose rewards all agree
    (a lone sample included) gets 0 even with eps = 0 (0 / 0 is taken as 0)."""
    adv_B = per_group(batch.rewards_B, batch.group_B,
                      lambda r_GN: ops.group_normalize(r_GN, eps=eps, scale_by_std=scale_by_std))
    return torch.nan_to_num(adv_B, nan=0.0)


def leave_one_out(batch: TrainBatch) -> torch.Tensor:
    """RLOO: r_i - mean of the others in its group (`ops.loo_advantages`)."""
    return per_group(batch.rewards_B, batch.group_B, ops.loo_advantages)


def best_of_group(batch: TrainBatch, min_reward: float | None = None) -> torch.Tensor:
    """RAFT: 1 on the samples that reach their group's best reward, when some sample of the group scored lower
    (and, with `min_reward`, the best is at least that: the best of failures is no example); 0 elsewhere (a
    group whose rewards all agree teaches nothing)."""

    def pick(r_GN: torch.Tensor) -> torch.Tensor:
        top, low = r_GN.max(dim=1, keepdim=True).values, r_GN.min(dim=1, keepdim=True).values
        good = top > low if min_reward is None else (top > low) & (top >= min_reward)
        return ((r_GN == top) & good).to(torch.float32)

    return per_group(batch.rewards_B, batch.group_B, pick)


def group_mean_baseline(batch: TrainBatch) -> torch.Tensor:
    """REINFORCE++-baseline: r - group mean."""
    return per_group(batch.rewards_B, batch.group_B, lambda r_GN: r_GN - r_GN.mean(dim=1, keepdim=True))


def broadcast(adv_B: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
    """A per-sequence advantage on every loss token of its row."""
    return adv_B.to(torch.float32)[:, None] * mask_BT


def last_token_BT(mask_BT: torch.Tensor) -> torch.Tensor:
    """1 on the last loss token of each row (none on a row without loss tokens)."""
    mask_BT = mask_BT > 0
    T = mask_BT.shape[1]
    pos_BT = torch.arange(T).expand_as(mask_BT)
    last_B = torch.where(mask_BT, pos_BT, -1).max(dim=1).values
    return ((pos_BT == last_B[:, None]) & mask_BT).to(torch.float32)


def token_rewards(batch: TrainBatch, scalar_B: torch.Tensor, kl_coef: float = 0.0, kl_type: str = "k1") -> torch.Tensor:
    """Per-token rewards [B, T]: the scalar on the last loss token, minus kl_coef * KL(old || ref) per token."""
    mask_BT = batch.response_mask_BT
    r_BT = last_token_BT(mask_BT) * scalar_B.to(torch.float32)[:, None]
    if kl_coef > 0:
        r_BT = r_BT - kl_coef * kl_penalty(batch.old_logprobs_BT, batch.ref_logprobs_BT, kl_type) * mask_BT
    return r_BT


def whiten(x_BT: torch.Tensor, mask_BT: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) over the loss tokens (unbiased variance); 0 off the mask."""
    mask_BT = (mask_BT > 0).to(torch.float64)
    n = mask_BT.sum()
    if n < 2:  # one token (or none) has no spread to divide by
        return torch.zeros_like(x_BT, dtype=torch.float32)
    x = x_BT.to(torch.float64)
    mean = (x * mask_BT).sum() / n
    var = ((x - mean).square() * mask_BT).sum() / (n - 1)
    out = (x - mean) * torch.rsqrt(var + WHITEN_EPS)
    if not shift_mean:
        out = out + mean
    return (out * mask_BT).to(torch.float32)


def discounted_returns(batch: TrainBatch, r_BT: torch.Tensor, gamma: float) -> torch.Tensor:
    """G_t = r_t + gamma G_next over the loss tokens (environment tokens skipped; `ops.discounted_returns`)."""
    return ops.discounted_returns(r_BT, batch.response_mask_BT, gamma)


def gae(batch: TrainBatch, r_BT: torch.Tensor, gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE advantages and returns from the critic's values of the batch (`ops.gae`)."""
    values_BT = batch.values_BT.detach().to(r_BT.dtype) * batch.response_mask_BT
    return ops.gae(r_BT, values_BT, batch.response_mask_BT, gamma, lam)
