"""Policy losses (PPO's clipped surrogate, GSPO, CISPO), the KL estimators and the critic's value loss.

Every loss is a sum of per-token terms times `batch.loss_weights_BT`, which
carry the mask and the aggregation (`batch.token_loss_weights`) and are
computed once per mini-batch: splitting it into micro-batches or DP ranks
leaves the loss and its gradient unchanged.

- ppo (Schulman et al., 2017): -min(r A, clip(r, 1 - eps_low, 1 + eps_high) A) per token, r = pi / pi_old;
  eps_high > eps_low is DAPO's clip-higher; `dual_clip_c` (Ye et al., 2020) caps a negative advantage's
  term at -c A.
- gspo (Zheng et al., 2025, GSPO-token form): the ratio of a sequence is the geometric mean of its token
  ratios, s_i = exp(mean_t log r_t), clipped as a whole; every token carries s_i with the gradient of its
  own log-probability (s_i,t = sg[s_i] pi_t / sg[pi_t]), so with a sequence-mean aggregation the gradient
  is GSPO's sequence-level one.
- cispo (MiniMax-M1, 2025): -sg[clip(r, 1 - eps_low, 1 + eps_high)] A log pi per token: the clipped IS
  weight is a stop-gradient coefficient, so no token's gradient is ever dropped.

The log-ratio is clamped to +-LOG_RATIO_CLAMP before exp (a finite loss and gradient at any ratio).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from slime_rl.types import TrainBatch

LOG_RATIO_CLAMP = 20.0  # |log pi/pi_old| beyond this counts as this: exp() stays finite, its gradient 0 outside
K3_MAX = 10.0  # k3 per token is bounded here (as verl and OpenRLHF bound it)
POLICY_LOSSES = ("ppo", "gspo", "cispo")


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


def _ratio_stats(ratio_BT, log_ratio_BT, clipped_BT, weights_BT) -> dict[str, torch.Tensor]:
    mask_BT = (weights_BT > 0).to(ratio_BT.dtype)
    clipped = clipped_BT.to(ratio_BT.dtype)
    return {
        "clip_frac": (clipped * weights_BT).sum(),
        "clip_frac_low": (clipped * (ratio_BT < 1.0) * weights_BT).sum(),
        "clip_frac_high": (clipped * (ratio_BT > 1.0) * weights_BT).sum(),
        "approx_kl": (0.5 * log_ratio_BT.square() * weights_BT).sum(),
        "ratio_max": (ratio_BT * mask_BT).max() if mask_BT.any() else ratio_BT.new_tensor(1.0),
        "ratio_min": torch.where(mask_BT > 0, ratio_BT, torch.ones_like(ratio_BT)).min(),
    }


def clipped_surrogate(log_ratio_BT: torch.Tensor, advantages_BT: torch.Tensor, weights_BT: torch.Tensor,
                      eps_low: float, eps_high: float, is_weights_BT: torch.Tensor | None = None,
                      dual_clip_c: float | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped surrogate from (already clamped) log-ratios, summed with per-token weights."""
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
        stats = _ratio_stats(ratio_BT, log_ratio_BT, clipped_BT > unclipped_BT, weights_BT)
        stats["dual_clip_frac"] = (dual_BT.to(ratio_BT.dtype) * weights_BT).sum()
    return (loss_BT * weights_BT).sum(), stats


def policy_loss(logprobs_BT: torch.Tensor, old_logprobs_BT: torch.Tensor, advantages_BT: torch.Tensor,
                weights_BT: torch.Tensor, eps_low: float, eps_high: float, is_weights_BT: torch.Tensor | None = None,
                dual_clip_c: float | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Token-level clipped surrogate (`ppo`); `is_weights_BT` (off-policy correction, algorithms.off_policy)
    scales each token's term."""
    log_ratio_BT = (logprobs_BT - old_logprobs_BT).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return clipped_surrogate(log_ratio_BT, advantages_BT, weights_BT, eps_low, eps_high, is_weights_BT, dual_clip_c)


def gspo_loss(logprobs_BT: torch.Tensor, old_logprobs_BT: torch.Tensor, advantages_BT: torch.Tensor,
              weights_BT: torch.Tensor, mask_BT: torch.Tensor, eps_low: float, eps_high: float,
              is_weights_BT: torch.Tensor | None = None, dual_clip_c: float | None = None):
    """GSPO: the sequence ratio exp(mean over the row's loss tokens of log r_t) on every token of the row."""
    token_BT = (logprobs_BT - old_logprobs_BT).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    mask_BT = (mask_BT > 0).to(token_BT.dtype)
    seq_B1 = (token_BT * mask_BT).sum(dim=1, keepdim=True) / mask_BT.sum(dim=1, keepdim=True).clamp(min=1.0)
    log_ratio_BT = seq_B1.detach() + logprobs_BT - logprobs_BT.detach()  # value log s_i, gradient d log pi_t
    return clipped_surrogate(log_ratio_BT, advantages_BT, weights_BT, eps_low, eps_high, is_weights_BT, dual_clip_c)


def cispo_loss(logprobs_BT: torch.Tensor, old_logprobs_BT: torch.Tensor, advantages_BT: torch.Tensor,
               weights_BT: torch.Tensor, eps_low: float, eps_high: float, is_weights_BT: torch.Tensor | None = None):
    """CISPO: -sg[clip(r)] A log pi per token."""
    log_ratio_BT = (logprobs_BT - old_logprobs_BT).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio_BT = torch.exp(log_ratio_BT)
    coef_BT = ratio_BT.clamp(1.0 - eps_low, 1.0 + eps_high).detach()
    loss_BT = -coef_BT * advantages_BT * logprobs_BT
    if is_weights_BT is not None:
        loss_BT = loss_BT * is_weights_BT
    with torch.no_grad():
        clipped_BT = (ratio_BT < 1.0 - eps_low) | (ratio_BT > 1.0 + eps_high)
        stats = _ratio_stats(ratio_BT, log_ratio_BT, clipped_BT, weights_BT)
        stats["dual_clip_frac"] = ratio_BT.new_zeros(())
    return (loss_BT * weights_BT).sum(), stats


@dataclass(frozen=True)
class PolicyLoss:
    """A LossFn for TrainerBackend.train_step: policy loss (+ KL in the loss) - entropy bonus.

    A plain dataclass (not a closure) so it pickles: trainer ranks in other
    processes receive it with every train_step.
    """

    eps_low: float
    eps_high: float
    kl_coef: float = 0.0  # the KL term in the loss (0 when the KL is in the reward)
    kl_type: str = "k3"
    entropy_coef: float = 0.0
    dual_clip_c: float | None = None
    kind: str = "ppo"  # ppo | gspo | cispo

    def __post_init__(self):
        if self.kind not in POLICY_LOSSES:
            raise ValueError(f"unknown policy loss {self.kind!r}; allowed values: {', '.join(POLICY_LOSSES)}")

    def __call__(self, logprobs_BT: torch.Tensor, entropy_BT: torch.Tensor, batch: TrainBatch):
        w_BT = batch.loss_weights_BT
        old_BT = batch.old_logprobs_BT
        if old_BT is None:
            if not batch.proximal_is_update:
                raise ValueError("the batch has no old logprobs and is not marked proximal_is_update")
            old_BT = logprobs_BT.detach()  # the one update's proximal policy is this very forward: ratio 1
        args = (logprobs_BT, old_BT, batch.advantages_BT, w_BT)
        if self.kind == "gspo":
            loss, stats = gspo_loss(*args, batch.response_mask_BT, self.eps_low, self.eps_high, batch.is_weights_BT,
                                    self.dual_clip_c)
        elif self.kind == "cispo":
            loss, stats = cispo_loss(*args, self.eps_low, self.eps_high, batch.is_weights_BT)
        else:
            loss, stats = policy_loss(*args, self.eps_low, self.eps_high, batch.is_weights_BT, self.dual_clip_c)
        stats["pg_loss"] = loss.detach()
        if batch.proximal_is_update:  # score_batch had no forward of its own to measure it on
            gap_BT = (logprobs_BT.detach() - batch.rollout_logprobs_BT).abs()
            stats["train_rollout_logprob_abs_diff"] = (gap_BT * w_BT).sum()
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
                     entropy_coef: float = 0.0, dual_clip_c: float | None = None, kind: str = "ppo") -> PolicyLoss:
    """A policy LossFn with these clip ranges and coefficients."""
    return PolicyLoss(eps_low, eps_high, kl_coef, kl_type, entropy_coef, dual_clip_c, kind)


@dataclass(frozen=True)
class ValueLoss:
    """The critic's ValueLossFn: 0.5 (V - R)^2, or PPO's clipped form max((V - R)^2, (V_clip - R)^2) / 2 with
    V_clip = V_old + clip(V - V_old, -clip, clip); weighted like the policy loss."""

    clip: float | None = 0.2

    def __call__(self, values_BT: torch.Tensor, batch: TrainBatch):
        w_BT = batch.loss_weights_BT
        err_BT = (values_BT - batch.returns_BT).square()
        if self.clip is None:
            loss_BT = err_BT
            clipped_BT = torch.zeros_like(err_BT, dtype=torch.bool)
        else:
            v_clip_BT = batch.values_BT + (values_BT - batch.values_BT).clamp(-self.clip, self.clip)
            err_clip_BT = (v_clip_BT - batch.returns_BT).square()
            loss_BT = torch.maximum(err_BT, err_clip_BT)
            clipped_BT = err_clip_BT > err_BT
        loss = 0.5 * (loss_BT * w_BT).sum()
        return loss, {"value_loss": loss.detach(), "value_clip_frac": (clipped_BT.to(w_BT.dtype) * w_BT).sum()}
