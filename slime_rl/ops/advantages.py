"""Advantage ops (public API): GRPO group normalization, RLOO, discounted returns and GAE.

Kernels: csrc/cpu/advantages.cpp, csrc/cuda/advantages.cu; references (and the
masked-token semantics of the scans): slime_rl/ops/reference.py; tests:
tests/test_ops.py (group_normalize), tests/test_advantage_ops.py; benchmarks:
benchmarks/bench_group_normalize.py, benchmarks/kernels/bench_gae.py.

Advantages and returns are training targets and carry no gradient in PPO-style
losses: detach the values (critic outputs) before calling, and the compiled
kernels run. An input that requires grad (with grad mode on) takes the
differentiable reference instead, which is correct but slow.

Layouts of the scans: padded [B, T] (each row one sequence; cu_seqlens None) or
packed [N] with cu_seqlens int [S + 1] (sequence s = tokens cu[s]:cu[s+1]).
Outputs have the input's layout. The values of cu_seqlens (starts at 0, never
decreases, ends at N) are checked by the C++ kernel and the reference; the CUDA
kernel only clamps them (checking would need a host sync).
"""

from __future__ import annotations

import torch

from slime_rl.ops import _backend, reference


def _fresh_like(x: torch.Tensor) -> torch.Tensor:
    # The kernels return fresh contiguous tensors of the input's shape and dtype.
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@_backend.fake("group_normalize")
def _group_normalize_fake(rewards: torch.Tensor, eps: float, scale_by_std: bool) -> torch.Tensor:
    return _fresh_like(rewards)


@_backend.fake("loo_advantages")
def _loo_advantages_fake(rewards: torch.Tensor) -> torch.Tensor:
    return _fresh_like(rewards)


@_backend.fake("discounted_returns")
def _discounted_returns_fake(
    rewards: torch.Tensor, mask: torch.Tensor, cu_seqlens: torch.Tensor, gamma: float
) -> torch.Tensor:
    return _fresh_like(rewards)


@_backend.fake("gae")
def _gae_fake(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, cu_seqlens: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    return _fresh_like(rewards), _fresh_like(rewards)


def _check_groups(op: str, rewards_GN: torch.Tensor) -> None:
    if rewards_GN.dim() != 2:
        raise ValueError(f"{op}: rewards_GN must be 2-D [num_groups, n], got {tuple(rewards_GN.shape)}")
    if rewards_GN.shape[1] < 1:
        raise ValueError(f"{op}: groups must hold at least one sample, got shape {tuple(rewards_GN.shape)}")
    if not rewards_GN.is_floating_point():
        raise TypeError(f"{op}: rewards_GN must be a floating tensor, got {rewards_GN.dtype}")


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
    _check_groups("group_normalize", rewards_GN)
    if _backend.choose("group_normalize", rewards_GN, impl) == "reference":
        return reference.group_normalize(rewards_GN, eps, scale_by_std)
    return torch.ops.slime_rl.group_normalize(rewards_GN, float(eps), bool(scale_by_std))


def loo_advantages(rewards_GN: torch.Tensor, impl: str | None = None) -> torch.Tensor:
    """RLOO advantages: adv_GN[g, i] = r[g, i] - mean_{j != i} r[g, j].

    rewards_GN: [num_groups, n] floating rewards, one group per row; a group
    of one sample gets 0. Computed in float64, returned in the input dtype.
    impl forces a path for this call.
    """
    _check_groups("loo_advantages", rewards_GN)
    if _backend.choose("loo_advantages", rewards_GN, impl) == "reference":
        return reference.loo_advantages(rewards_GN)
    return torch.ops.slime_rl.loo_advantages(rewards_GN)


def _check_discount(op: str, name: str, x: float) -> float:
    x = float(x)
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"{op}: {name} must be in [0, 1], got {x}")
    return x


def _to_packed(
    op: str, rewards: torch.Tensor, mask: torch.Tensor, cu_seqlens: torch.Tensor | None, values: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Checks the scan inputs; returns (rewards_N, mask_N, values_N, cu_seqlens int64) in the packed layout."""
    if not rewards.is_floating_point():
        raise TypeError(f"{op}: rewards must be a floating tensor, got {rewards.dtype}")
    if mask.shape != rewards.shape:
        raise ValueError(f"{op}: mask must have rewards' shape {tuple(rewards.shape)}, got {tuple(mask.shape)}")
    if mask.is_complex():
        raise TypeError(f"{op}: mask must be bool, integer or floating (nonzero = the token counts), got {mask.dtype}")
    tensors = {"mask": mask}
    if values is not None:
        if values.shape != rewards.shape:
            raise ValueError(f"{op}: values must have rewards' shape {tuple(rewards.shape)}, got {tuple(values.shape)}")
        if values.dtype != rewards.dtype:
            raise TypeError(f"{op}: values must have rewards' dtype {rewards.dtype}, got {values.dtype}")
        tensors["values"] = values
    if cu_seqlens is None:
        if rewards.dim() != 2:
            raise ValueError(
                f"{op}: rewards must be padded [B, T] when cu_seqlens is None "
                f"(or packed [N] with cu_seqlens), got shape {tuple(rewards.shape)}"
            )
        batch, length = rewards.shape
        cu_seqlens = torch.arange(batch + 1, device=rewards.device, dtype=torch.int64) * length
    else:
        if rewards.dim() != 1:
            raise ValueError(
                f"{op}: rewards must be packed 1-D [N] when cu_seqlens is given, got {tuple(rewards.shape)}"
            )
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
            raise ValueError(f"{op}: cu_seqlens must be 1-D [num_seqs + 1], got shape {tuple(cu_seqlens.shape)}")
        if cu_seqlens.is_floating_point() or cu_seqlens.is_complex() or cu_seqlens.dtype == torch.bool:
            raise TypeError(f"{op}: cu_seqlens must be an integer tensor, got {cu_seqlens.dtype}")
        tensors["cu_seqlens"] = cu_seqlens
        cu_seqlens = cu_seqlens.to(torch.int64)
    for name, t in tensors.items():
        if t.device != rewards.device:
            raise ValueError(f"{op}: {name} must be on rewards' device {rewards.device}, got {t.device}")
    values_N = values.reshape(-1) if values is not None else None
    return rewards.reshape(-1), mask.reshape(-1), values_N, cu_seqlens


def discounted_returns(
    rewards: torch.Tensor,
    mask: torch.Tensor,
    gamma: float,
    cu_seqlens: torch.Tensor | None = None,
    impl: str | None = None,
) -> torch.Tensor:
    """Discounted returns G_t = r_t + gamma G_next within each sequence; masked tokens skipped.

    rewards: floating, padded [B, T] (cu_seqlens None) or packed [N] with
    cu_seqlens [S + 1]; mask: rewards' shape, bool or numeric (nonzero = the
    token counts); gamma in [0, 1]. Masked tokens get 0 and the scan passes
    through them (reference.py states the semantics). Returns rewards' shape
    and dtype; computed in float64. impl forces a path for this call.
    """
    op = "discounted_returns"
    gamma = _check_discount(op, "gamma", gamma)
    r_N, m_N, _, cu = _to_packed(op, rewards, mask, cu_seqlens, None)
    if _backend.choose(op, rewards, impl) == "reference":
        ret_N = reference.discounted_returns(r_N, m_N, cu, gamma)
    else:
        ret_N = torch.ops.slime_rl.discounted_returns(r_N, m_N, cu, gamma)
    return ret_N.view(rewards.shape)


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float,
    lam: float,
    cu_seqlens: torch.Tensor | None = None,
    impl: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE advantages and returns (= advantages + values) within each sequence; masked tokens skipped.

    rewards, values (same dtype): floating, padded [B, T] (cu_seqlens None) or
    packed [N] with cu_seqlens [S + 1]; mask: rewards' shape, bool or numeric
    (nonzero = the token counts); gamma, lam in [0, 1]. Masked tokens get 0 and
    the scan passes through them; the value after a sequence's last unmasked
    token is 0 (reference.py states the recurrences). Returns two tensors of
    rewards' shape and dtype; computed in float64. Detach values to run the
    compiled kernels (module docstring). impl forces a path for this call.
    """
    op = "gae"
    gamma, lam = _check_discount(op, "gamma", gamma), _check_discount(op, "lam", lam)
    r_N, m_N, v_N, cu = _to_packed(op, rewards, mask, cu_seqlens, values)
    # choose() looks at one tensor's requires_grad: critic values are the one that usually has it.
    probe = values if values.requires_grad else rewards
    if _backend.choose(op, probe, impl) == "reference":
        adv_N, ret_N = reference.gae(r_N, v_N, m_N, cu, gamma, lam)
    else:
        adv_N, ret_N = torch.ops.slime_rl.gae(r_N, v_N, m_N, cu, gamma, lam)
    return adv_N.view(rewards.shape), ret_N.view(rewards.shape)
