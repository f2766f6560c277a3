// CPU advantage kernels (declarations for C++ callers and csrc/tests).
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

namespace slime_rl {

// rewards_GN: [num_groups, n] floating tensor (fp32, fp64, fp16, bf16).
// Returns adv_GN with the same shape and dtype:
//   (r - mean_g) / (std_g + eps)   if scale_by_std
//   (r - mean_g)                   otherwise
// std_g is the unbiased standard deviation (correction = 1, as torch.std);
// for n == 1 it is defined as 0, so every advantage is 0.
// Accumulates in double (as the reference does), so a constant group gives
// exactly 0; outputs round double -> float -> dtype, as torch casts do.
at::Tensor group_normalize_cpu(const at::Tensor& rewards_GN, double eps, bool scale_by_std);

// RLOO: adv_GN[g, i] = r[g, i] - mean_{j != i} r[g, j], computed as
// r_i - (S_g - r_i) / (n - 1) in double; 0 for groups of one sample.
at::Tensor loo_advantages_cpu(const at::Tensor& rewards_GN);

// Reverse scans over packed sequences. rewards_N (and values_N, same dtype):
// 1-D floating [N]; mask_N: [N], bool or numeric (nonzero = the token counts);
// cu_seqlens: int64 [S + 1], 0 = cu[0] <= cu[1] <= ... <= cu[S] = N, sequence s
// is tokens [cu[s], cu[s+1]); gamma, lam in [0, 1]. Masked tokens get 0 and the
// scan passes through them; past a sequence's last unmasked token everything is
// 0 (slime_rl/ops/reference.py states the recurrences). Double accumulation;
// outputs have the rewards' dtype.
at::Tensor discounted_returns_cpu(const at::Tensor& rewards_N, const at::Tensor& mask_N,
                                  const at::Tensor& cu_seqlens, double gamma);
// -> (advantages_N, returns_N = advantages_N + values_N; both 0 on masked tokens)
std::tuple<at::Tensor, at::Tensor> gae_cpu(const at::Tensor& rewards_N, const at::Tensor& values_N,
                                           const at::Tensor& mask_N, const at::Tensor& cu_seqlens,
                                           double gamma, double lam);

}  // namespace slime_rl
