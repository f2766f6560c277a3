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
The kernels accumulate in double for the same reason.
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
