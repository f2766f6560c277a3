"""Pure-torch references for the compiled kernels in csrc/.

Each function here is the specification its kernels are tested against
(tests/test_ops.py, csrc/tests/) and the fallback the public ops in
slime_rl.ops use when no compiled kernel applies. They run on any device and
dtype, and are differentiable.

group_normalize departs from the textbook one-liner in one place: it computes
in float64 and rounds once to the input dtype. Summing float32 rewards in
float32 leaves a constant group (say all 0.7) with r - mean of ~1 ulp, and
with std also ~1 ulp the advantage becomes ulp / (ulp + eps) ~ 0.05 instead
of 0 — a systematic push on groups that carry no signal. In float64 a group
of identical float32 values has an exact mean, so its advantages are exactly 0.
The kernels accumulate in double for the same reason. loo_advantages,
discounted_returns and gae compute in float64 and round once too (tests:
tests/test_advantage_ops.py).
"""

from __future__ import annotations

import torch


def group_normalize(rewards_GN: torch.Tensor, eps: float = 1e-6, scale_by_std: bool = True) -> torch.Tensor:
    """GRPO advantages within each group (row) of rewards_GN [num_groups, n].

    adv_GN = (r - mean_g) / (std_g + eps) if scale_by_std else r - mean_g,
    std_g unbiased (correction=1, torch.std's default); a group of one sample
    has std 0 (torch.std would give NaN), so its advantage is 0. Returns the
    input's dtype; computed in float64.
    """
    if rewards_GN.numel() == 0:
        return torch.empty_like(rewards_GN)
    r_GN = rewards_GN.to(torch.float64)
    adv_GN = r_GN - r_GN.mean(dim=-1, keepdim=True)
    if scale_by_std:
        if r_GN.shape[-1] > 1:
            std_G1 = r_GN.std(dim=-1, keepdim=True)
        else:
            std_G1 = torch.zeros_like(r_GN[..., :1])
        adv_GN = adv_GN / (std_G1 + eps)
    return adv_GN.to(rewards_GN.dtype)


def loo_advantages(rewards_GN: torch.Tensor) -> torch.Tensor:
    """RLOO advantages within each group (row) of rewards_GN [num_groups, n].

    adv[g, i] = r[g, i] - mean_{j != i} r[g, j] = r_i - (S_g - r_i) / (n - 1),
    S_g the group's sum: each sample is compared with the mean of the others
    (Kool et al., 2019; Ahmadian et al., 2024), an unbiased baseline. A group
    of one sample has no others: its advantage is 0. Computed in float64 and
    rounded once (a constant float32 group gives exactly 0, see the module
    docstring); returns the input's dtype.
    """
    n = rewards_GN.shape[-1]
    if rewards_GN.numel() == 0 or n == 1:
        return torch.zeros_like(rewards_GN)
    r_GN = rewards_GN.to(torch.float64)
    baseline_GN = (r_GN.sum(dim=-1, keepdim=True) - r_GN) / (n - 1)
    return (r_GN - baseline_GN).to(rewards_GN.dtype)


# --- reverse scans over packed sequences -----------------------------------------------------------
#
# Packed layout: rewards/values/mask are 1-D [N]; cu_seqlens int64 [S + 1] with
# cu_seqlens[0] == 0, non-decreasing, cu_seqlens[S] == N; sequence s is tokens
# [cu_seqlens[s], cu_seqlens[s + 1]) (empty sequences allowed). The docstrings of
# discounted_returns and gae state the masked-token semantics the kernels follow.


def _check_packed(op: str, n: int, cu_seqlens: torch.Tensor) -> None:
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1 or cu_seqlens.dtype != torch.int64:
        raise ValueError(
            f"{op}: cu_seqlens must be a 1-D int64 tensor [num_seqs + 1], got "
            f"{cu_seqlens.dtype} of shape {tuple(cu_seqlens.shape)}"
        )
    if int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != n or bool((cu_seqlens[1:] < cu_seqlens[:-1]).any()):
        raise ValueError(
            f"{op}: cu_seqlens must start at 0, never decrease and end at the number of tokens {n}, "
            f"got {cu_seqlens.tolist() if cu_seqlens.numel() <= 16 else cu_seqlens}"
        )


def _to_padded(cu_seqlens: torch.Tensor, *tokens_N: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Gathers packed [N] tensors into padded [S, L] ones; returns (valid_SL, padded tensors)."""
    lengths_S = cu_seqlens[1:] - cu_seqlens[:-1]
    max_len = int(lengths_S.max()) if lengths_S.numel() else 0
    pos_L = torch.arange(max_len, device=cu_seqlens.device)
    valid_SL = pos_L < lengths_S[:, None]
    index_SL = (cu_seqlens[:-1, None] + pos_L).masked_fill(~valid_SL, 0)
    return valid_SL, [x_N[index_SL] for x_N in tokens_N]


def discounted_returns(
    rewards_N: torch.Tensor, mask_N: torch.Tensor, cu_seqlens: torch.Tensor, gamma: float
) -> torch.Tensor:
    """Discounted returns G [N] of packed sequences (layout above); masked tokens are skipped.

    Masked tokens (mask == 0) get return 0 and the scan passes through them as
    if they were absent: for the unmasked tokens t1 < t2 < ... < tk of a
    sequence, G_ti = r_ti + gamma * G_t(i+1), with G_t(k+1) = 0 (the episode
    ends with the sequence). Multi-turn RL needs exactly this: environment or
    tool tokens inside a response are masked out and must not break the credit
    assignment of the model's tokens around them.

    A loop over time steps from the end, vectorized across sequences on a
    padded [S, L] copy (padding is masked, so it passes through). Computed in
    float64 and rounded once to the rewards' dtype (the kernels accumulate in
    double too, so they agree with this to an ulp of the output).
    Differentiable in rewards.
    """
    _check_packed("discounted_returns", rewards_N.numel(), cu_seqlens)
    valid_SL, (r_SL, m_SL) = _to_padded(cu_seqlens, rewards_N.to(torch.float64), mask_N != 0)
    m_SL = m_SL & valid_SL
    ret_S = r_SL.new_zeros(r_SL.shape[0])
    cols = []
    for t in reversed(range(r_SL.shape[1])):
        m_S = m_SL[:, t]
        ret_S = torch.where(m_S, r_SL[:, t] + gamma * ret_S, ret_S)
        cols.append(torch.where(m_S, ret_S, 0.0))
    ret_SL = torch.stack(cols[::-1], dim=1) if cols else r_SL
    return ret_SL[valid_SL].to(rewards_N.dtype)


def gae(
    rewards_N: torch.Tensor,
    values_N: torch.Tensor,
    mask_N: torch.Tensor,
    cu_seqlens: torch.Tensor,
    gamma: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation (Schulman et al., 2016) over packed sequences (layout above).

    Returns (advantages [N], returns [N]). Masked tokens (mask == 0) get
    advantage 0 and return 0, and the scan passes through them as if they were
    absent: for the unmasked tokens t1 < t2 < ... < tk of a sequence,

        delta_ti = r_ti + gamma * V_t(i+1) - V_ti
        A_ti     = delta_ti + gamma * lam * A_t(i+1)
        returns  = A + V

    with V_t(k+1) = A_t(k+1) = 0: the episode ends with the sequence, so the
    last counted token bootstraps from nothing. A masked token in the middle
    (a tool response, say) neither contributes its reward nor lends its value
    to the token before it: that one bootstraps from the next *counted* token.
    lam = 1 gives advantages = discounted returns - values; lam = 0 the one-step
    TD error. Computed in float64 and rounded once to the rewards' dtype (as
    discounted_returns). Differentiable in rewards and values.
    """
    _check_packed("gae", rewards_N.numel(), cu_seqlens)
    valid_SL, (r_SL, v_SL, m_SL) = _to_padded(
        cu_seqlens, rewards_N.to(torch.float64), values_N.to(torch.float64), mask_N != 0
    )
    m_SL = m_SL & valid_SL
    next_value_S = r_SL.new_zeros(r_SL.shape[0])  # value of the next unmasked token (0: none)
    adv_S = r_SL.new_zeros(r_SL.shape[0])
    gamma_lam = gamma * lam
    adv_cols, ret_cols = [], []
    for t in reversed(range(r_SL.shape[1])):
        m_S, v_S = m_SL[:, t], v_SL[:, t]
        delta_S = r_SL[:, t] + gamma * next_value_S - v_S
        adv_S = torch.where(m_S, delta_S + gamma_lam * adv_S, adv_S)
        next_value_S = torch.where(m_S, v_S, next_value_S)
        adv_cols.append(torch.where(m_S, adv_S, 0.0))
        ret_cols.append(torch.where(m_S, adv_S + v_S, 0.0))
    if adv_cols:
        adv_SL, ret_SL = torch.stack(adv_cols[::-1], dim=1), torch.stack(ret_cols[::-1], dim=1)
    else:
        adv_SL = ret_SL = r_SL
    dtype = rewards_N.dtype
    return adv_SL[valid_SL].to(dtype), ret_SL[valid_SL].to(dtype)
