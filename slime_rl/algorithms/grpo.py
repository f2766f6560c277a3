"""GRPO's group-normalized advantages on lists of scored groups (Shao et al., 2024, outcome supervision).

Every token of sample i in a group gets A_i = (r_i - mean(r)) / (std(r) + eps),
std unbiased; with `scale_by_std=False` only the mean is subtracted (Dr. GRPO).
The loop computes the same on a whole batch (`advantages.group_normalized`);
this list form serves callers holding groups (parity tests, benchmarks).
"""

from __future__ import annotations

import torch

from slime_rl import ops
from slime_rl.types import Sample


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
