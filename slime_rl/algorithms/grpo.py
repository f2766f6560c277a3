"""GRPO: group-normalized advantages and the clipped policy loss.

Advantages (Shao et al., 2024, outcome supervision): every token of sample i in
a group gets A_i = (r_i - mean(r)) / (std(r) + eps), std unbiased; with
`scale_by_std=False` only the mean is subtracted (Dr. GRPO).

Loss: PPO's clipped surrogate with separate low/high clip ranges (DAPO's
"clip-higher"), ratio = exp(logp - logp_old), plus an optional KL penalty to a
reference model. The paper puts the KL in the loss with the k3 estimator; k1
and k2 are offered for ablations. Aggregation (token vs sequence mean) is
folded into per-token loss weights computed once per batch
(`batch.token_loss_weights`), so micro-batching never changes the result.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from slime_rl import ops
from slime_rl.algorithms.base import Needs, register
from slime_rl.types import Sample, TrainBatch


def grpo_advantages(groups: list[list[Sample]], scale_by_std: bool = True, eps: float = 1e-6) -> list[list[float]]:
    """One scalar advantage per sample, normalized within its group."""
    sizes = {len(g) for g in groups}
    if len(sizes) == 1:  # the common case: one [G, N] call into the kernel
        rewards_GN = torch.tensor([[s.scalar_reward for s in g] for g in groups], dtype=torch.float32)
        return ops.group_normalize(rewards_GN, eps=eps, scale_by_std=scale_by_std).tolist()
    out = []
    for g in groups:  # ragged groups (e.g. after filtering): one call each
        rewards_1N = torch.tensor([[s.scalar_reward for s in g]], dtype=torch.float32)
        out.append(ops.group_normalize(rewards_1N, eps=eps, scale_by_std=scale_by_std)[0].tolist())
    return out


LOG_RATIO_CLAMP = 20.0  # |log pi/pi_old| beyond this counts as this: exp() stays finite, its gradient 0 outside
K3_MAX = 10.0  # k3 per token is bounded here (as verl and OpenRLHF bound it)


def kl_penalty(logprobs_BT: torch.Tensor, ref_logprobs_BT: torch.Tensor, kind: str = "k3") -> torch.Tensor:
    """Per-token KL(pi || pi_ref) estimate from sampled tokens (Schulman's k1/k2/k3).

    The log-ratio is clamped to +-LOG_RATIO_CLAMP and k3 to [0, K3_MAX]: one token the policy has moved
    far from the reference (log-ratio -12 gives k3 = 1.6e5 unbounded) cannot dominate the loss or its
    gradient. verl clamps k3 to [-10, 10]; OpenRLHF clamps the log-ratio to [-10, 10] before k3.
    """
    log_ratio = (ref_logprobs_BT - logprobs_BT).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)  # log pi_ref / pi
    if kind == "k1":
        return -log_ratio
    if kind == "k2":
        return 0.5 * log_ratio.square()
    if kind == "k3":
        return (torch.exp(log_ratio) - log_ratio - 1.0).clamp(max=K3_MAX)
    raise ValueError(f"unknown KL estimator {kind!r}; allowed values: k1, k2, k3")


def policy_loss(
    logprobs_BT: torch.Tensor,
    old_logprobs_BT: torch.Tensor,
    advantages_BT: torch.Tensor,
    weights_BT: torch.Tensor,
    eps_low: float,
    eps_high: float,
    is_weights_BT: torch.Tensor | None = None,
    dual_clip_c: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate, summed with per-token weights (weights carry mask + aggregation); `is_weights_BT`
    (off-policy correction, see algorithms.off_policy) scales each token's term.

    The log-ratio is clamped to +-LOG_RATIO_CLAMP (finite loss and gradient at any ratio). `dual_clip_c`
    (Ye et al., 2020; > 1): for a negative advantage the loss is also capped at -A * c, so a token whose
    ratio exploded cannot push the policy without bound (verl's clip_ratio_c, default 3).
    """
    log_ratio_BT = (logprobs_BT - old_logprobs_BT).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio_BT = torch.exp(log_ratio_BT)
    unclipped_BT = -advantages_BT * ratio_BT
    clipped_BT = -advantages_BT * torch.clamp(ratio_BT, 1.0 - eps_low, 1.0 + eps_high)
    loss_BT = torch.maximum(unclipped_BT, clipped_BT)
    dual_BT = torch.zeros_like(loss_BT, dtype=torch.bool)
    if dual_clip_c is not None:
        cap_BT = -advantages_BT * dual_clip_c
        dual_BT = (advantages_BT < 0) & (loss_BT > cap_BT)
        loss_BT = torch.where(dual_BT, cap_BT, loss_BT)
    if is_weights_BT is not None:
        loss_BT = loss_BT * is_weights_BT
    with torch.no_grad():
        mask_BT = (weights_BT > 0).to(ratio_BT.dtype)
        clipped = (clipped_BT > unclipped_BT).to(ratio_BT.dtype)
        stats = {
            "clip_frac": (clipped * weights_BT).sum(),
            "clip_frac_low": (clipped * (ratio_BT < 1.0) * weights_BT).sum(),
            "clip_frac_high": (clipped * (ratio_BT > 1.0) * weights_BT).sum(),
            "dual_clip_frac": (dual_BT.to(ratio_BT.dtype) * weights_BT).sum(),
            "approx_kl": (0.5 * log_ratio_BT.square() * weights_BT).sum(),
            "ratio_max": (ratio_BT * mask_BT).max() if mask_BT.any() else ratio_BT.new_tensor(1.0),
            "ratio_min": torch.where(mask_BT > 0, ratio_BT, torch.ones_like(ratio_BT)).min(),
        }
    return (loss_BT * weights_BT).sum(), stats


@dataclass(frozen=True)
class PolicyLoss:
    """A LossFn for TrainerBackend.train_step: policy loss + KL + entropy bonus.

    A plain dataclass (not a closure) so it pickles: trainer ranks in other
    processes receive it with every train_step.
    """

    eps_low: float
    eps_high: float
    kl_coef: float = 0.0
    kl_type: str = "k3"
    entropy_coef: float = 0.0
    dual_clip_c: float | None = None

    def __call__(self, logprobs_BT: torch.Tensor, entropy_BT: torch.Tensor, batch: TrainBatch):
        w_BT = batch.loss_weights_BT
        loss, stats = policy_loss(logprobs_BT, batch.old_logprobs_BT, batch.advantages_BT, w_BT, self.eps_low,
                                  self.eps_high, batch.is_weights_BT, self.dual_clip_c)
        stats["pg_loss"] = loss.detach()
        if self.kl_coef > 0:
            kl = (kl_penalty(logprobs_BT, batch.ref_logprobs_BT, self.kl_type) * w_BT).sum()
            loss = loss + self.kl_coef * kl
            stats["kl_ref"] = kl.detach()
        entropy = (entropy_BT * w_BT).sum()
        if self.entropy_coef:
            loss = loss - self.entropy_coef * entropy
        stats["entropy"] = entropy.detach()
        return loss, stats


def make_policy_loss(eps_low: float, eps_high: float, kl_coef: float = 0.0, kl_type: str = "k3",
                     entropy_coef: float = 0.0, dual_clip_c: float | None = None) -> PolicyLoss:
    """The GRPO LossFn with these clip ranges and coefficients."""
    return PolicyLoss(eps_low, eps_high, kl_coef, kl_type, entropy_coef, dual_clip_c)


class GRPO:
    """Group-normalized advantages (`grpo_advantages`) and the clipped surrogate (`PolicyLoss`); a reference
    model only with a KL term (`kl_coef > 0`)."""

    name = "GRPO"

    def needs(self, cfg: Any) -> Needs:
        return Needs(reference=cfg.kl_coef > 0)

    def advantages(self, groups: list[list[Sample]], cfg: Any) -> list[list[float]]:
        return grpo_advantages(groups, scale_by_std=cfg.scale_adv_by_std, eps=cfg.adv_eps)

    def loss(self, cfg: Any) -> PolicyLoss:
        return make_policy_loss(cfg.eps_clip_low, cfg.eps_clip_high, cfg.kl_coef, cfg.kl_type, cfg.entropy_coef,
                                cfg.dual_clip_c)


register(GRPO())
