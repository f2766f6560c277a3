"""Off-policy correction for tokens sampled by older weights than the ones being trained.

In the asynchronous modes a token may have been sampled by the engine under
weight version v (the behaviour policy, logprob `rollout_logprobs_BT`) while
the trainer is at version v + k. The trainer recomputes the logprobs of the
batch under its current weights before the update (`old_logprobs_BT`, the
proximal policy); the clipped PPO ratio is taken against those, and each
token's policy-gradient term is reweighted by pi_old / pi_behaviour:

- "tis" (truncated importance sampling): weight min(pi_old / pi_behaviour, cap);
  every token keeps some weight.
- "decoupled" (decoupled PPO): weight pi_old / pi_behaviour, and tokens whose
  weight exceeds `cap` are dropped from the loss (weight 0).
- "coupled" (PPO against the behaviour policy): no weights; the clipped ratio is
  pi_theta / pi_behaviour itself, so a token whose probability has already moved
  past the clip range since it was sampled gets no further push. With one update
  per batch (ppo_epochs 1, mini_batches 1) the proximal ratio of "decoupled" is
  exactly 1 and never clips: nothing bounds how far a stale batch moves the
  policy from the one that sampled it. "coupled" is that bound.

The weights are constants (no gradient) computed once per batch, so micro-batching
and data-parallel splits leave the loss unchanged.
"""

from __future__ import annotations

import torch

METHODS = ("none", "tis", "decoupled", "coupled")


def resolve(method: str, async_mode: str) -> str:
    """`auto` -> none in sync mode, coupled in the asynchronous modes (with one update per batch the other two
    leave a stale batch's step unbounded: at staleness 2 and lr 1e-4 they collapsed where coupled held)."""
    if method == "auto":
        return "none" if async_mode == "sync" else "coupled"
    if method not in METHODS:
        raise ValueError(f"unknown off-policy correction {method!r}; allowed values: auto, {', '.join(METHODS)}")
    return method


def weighs_tokens(method: str) -> bool:
    """Whether the method weights tokens by pi_old / pi_behaviour, which needs the old logprobs before the
    update ("tis", "decoupled"); "none" and "coupled" read only the behaviour logprobs."""
    return method not in ("none", "coupled")


def importance_weights(old_logprobs_BT: torch.Tensor, behaviour_logprobs_BT: torch.Tensor, mask_BT: torch.Tensor,
                       method: str, cap: float) -> tuple[torch.Tensor | None, dict[str, float]]:
    """Per-token weights [B, T] (None for "none") and statistics over the masked tokens."""
    if not weighs_tokens(method):
        return None, {}
    if cap < 1:
        raise ValueError(f"importance-weight cap must be >= 1, got {cap}")
    mask_BT = mask_BT > 0
    ratio_BT = torch.exp((old_logprobs_BT - behaviour_logprobs_BT).float()).masked_fill(~mask_BT, 1.0)
    over_BT = (ratio_BT > cap) & mask_BT
    if method == "tis":
        weights_BT = ratio_BT.clamp(max=cap)
    elif method == "decoupled":
        weights_BT = ratio_BT.masked_fill(over_BT, 0.0)
    else:
        raise ValueError(f"unknown off-policy correction {method!r}; allowed values: {', '.join(METHODS)}")
    weights_BT = weights_BT * mask_BT
    n = mask_BT.sum().clamp(min=1)
    stats = {"is_weight_mean": float(weights_BT.sum() / n), "is_ratio_max": float(ratio_BT[mask_BT].max())
             if bool(mask_BT.any()) else 1.0, "is_capped_frac": float(over_BT.sum() / n)}
    return weights_BT, stats


def ratio_reference(method: str, old_logprobs_BT: torch.Tensor | None,
                    behaviour_logprobs_BT: torch.Tensor) -> torch.Tensor | None:
    """The logprobs the clipped ratio is taken against: the behaviour policy's for "coupled", else the
    proximal (trainer's, before this update) ones; None (no separate forward: the update's own) stays None."""
    if method != "coupled":
        return old_logprobs_BT
    return behaviour_logprobs_BT.to(torch.float32 if old_logprobs_BT is None else old_logprobs_BT.dtype)
