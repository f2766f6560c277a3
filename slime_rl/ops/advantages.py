"""Advantage ops (public API): group-normalized advantages for GRPO.

Kernels: csrc/cpu/advantages.cpp, csrc/cuda/advantages.cu; reference:
slime_rl/ops/reference.py; tests: tests/test_ops.py; benchmark:
benchmarks/bench_group_normalize.py.
"""

from __future__ import annotations

import torch

from slime_rl.ops import _backend, reference


@_backend.fake("group_normalize")
def _group_normalize_fake(rewards: torch.Tensor, eps: float, scale_by_std: bool) -> torch.Tensor:
    # The kernels return a fresh contiguous tensor of the input's shape and dtype.
    return torch.empty_like(rewards, memory_format=torch.contiguous_format)


def group_normalize(
    rewards_GN: torch.Tensor, eps: float = 1e-6, scale_by_std: bool = True, impl: str | None = None
) -> torch.Tensor:
    """adv_GN = (r - mean_g) / (std_g + eps), or r - mean_g when not scale_by_std.

    rewards_GN: [num_groups, n] floating rewards (fp32, fp64, fp16, bf16), one
    group (the n samples of one prompt) per row. std is unbiased (correction
    1) and 0 for n == 1, so a lone sample gets advantage 0. Computed in
    float64, returned in the input dtype. impl forces "cuda", "cpp" or
    "reference" for this call (see slime_rl.ops._backend).
    """
    if rewards_GN.dim() != 2:
        raise ValueError(f"group_normalize: rewards_GN must be 2-D [num_groups, n], got {tuple(rewards_GN.shape)}")
    if rewards_GN.shape[1] < 1:
        raise ValueError(f"group_normalize: groups must hold at least one sample, got shape {tuple(rewards_GN.shape)}")
    if not rewards_GN.is_floating_point():
        raise TypeError(f"group_normalize: rewards_GN must be a floating tensor, got {rewards_GN.dtype}")
    if _backend.choose("group_normalize", rewards_GN, impl) == "reference":
        return reference.group_normalize(rewards_GN, eps, scale_by_std)
    return torch.ops.slime_rl.group_normalize(rewards_GN, float(eps), bool(scale_by_std))
