// CPU advantage kernels (declarations for C++ callers and csrc/tests).
#pragma once

#include <ATen/core/Tensor.h>

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

}  // namespace slime_rl
