// Argument checks of the advantage ops, shared by csrc/cpu/advantages.cpp and
// csrc/cuda/advantages_ops.cpp (schemas and semantics: csrc/registration.cpp,
// slime_rl/ops/reference.py). `kind` is the backend calling (CPU or CUDA).
#pragma once

#include "checks.h"

#include <ATen/ATen.h>

namespace slime_rl::checks {

// rewards [num_groups, n] with n >= 1 (group_normalize, loo_advantages).
inline void groups(const char* op, const at::Tensor& rewards_GN, c10::DeviceType kind) {
  TORCH_CHECK(rewards_GN.dim() == 2, op, ": rewards must be 2-D [num_groups, n], got shape ", rewards_GN.sizes());
  TORCH_CHECK(rewards_GN.size(1) >= 1, op, ": groups must hold at least one sample, got shape ", rewards_GN.sizes());
  floating(op, "rewards", rewards_GN);
  on_kind(op, "rewards", rewards_GN, kind);
}

// The packed layout of the scans: rewards and mask [num_tokens], cu_seqlens [num_seqs + 1]
// (int64). Checks shapes, dtypes and devices only: the values of cu_seqlens are the
// caller's to check where reading them is free (the CPU kernel does). Returns the mask as
// a contiguous bool tensor (nonzero = the token counts).
inline at::Tensor packed(const char* op, const at::Tensor& rewards_N, const at::Tensor& mask_N,
                         const at::Tensor& cu_seqlens, c10::DeviceType kind) {
  TORCH_CHECK(rewards_N.dim() == 1, op, ": rewards must be 1-D [num_tokens] (packed), got shape ", rewards_N.sizes());
  on_kind(op, "rewards", rewards_N, kind);
  floating(op, "rewards", rewards_N);
  TORCH_CHECK(mask_N.dim() == 1 && mask_N.size(0) == rewards_N.size(0), op, ": mask must have rewards' shape ",
              rewards_N.sizes(), ", got ", mask_N.sizes());
  same_device(op, "mask", mask_N, "rewards", rewards_N);
  TORCH_CHECK(cu_seqlens.dim() == 1 && cu_seqlens.size(0) >= 1, op,
              ": cu_seqlens must be 1-D [num_seqs + 1], got shape ", cu_seqlens.sizes());
  TORCH_CHECK(cu_seqlens.scalar_type() == at::kLong, op, ": cu_seqlens must be int64, got ", cu_seqlens.scalar_type());
  same_device(op, "cu_seqlens", cu_seqlens, "rewards", rewards_N);
  return (mask_N.scalar_type() == at::kBool ? mask_N : mask_N.ne(0)).contiguous();
}

// values of gae: rewards' shape, dtype and device.
inline void values_like(const char* op, const at::Tensor& values_N, const at::Tensor& rewards_N) {
  TORCH_CHECK(values_N.sizes() == rewards_N.sizes(), op, ": values must have rewards' shape ", rewards_N.sizes(),
              ", got ", values_N.sizes());
  TORCH_CHECK(values_N.scalar_type() == rewards_N.scalar_type(), op, ": values must have rewards' dtype ",
              rewards_N.scalar_type(), ", got ", values_N.scalar_type());
  same_device(op, "values", values_N, "rewards", rewards_N);
}

// gamma and lam lie in [0, 1].
inline void discount(const char* op, const char* name, double x) {
  TORCH_CHECK_VALUE(x >= 0.0 && x <= 1.0, op, ": ", name, " must be in [0, 1], got ", x);
}

}  // namespace slime_rl::checks
