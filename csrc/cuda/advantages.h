// CUDA advantage kernels: torch-free launchers.
//
// Kept free of torch headers so `nvcc -c csrc/cuda/advantages.cu` compiles on
// any machine with a CUDA toolkit (including CPU-only torch installs, where
// torch's CUDA headers are incomplete). The torch glue — argument checks,
// the current stream, dtype dispatch, TORCH_LIBRARY_IMPL — is in
// advantages_ops.cpp, compiled only in CUDA builds.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace slime_rl {
namespace cuda {

// One block per group. in_GN/out_GN: device pointers to contiguous
// [num_groups, n] arrays. T is float, double, __half or __nv_bfloat16;
// all accumulate in double. Semantics as csrc/cpu/advantages.h (unbiased
// std, std = 0 when n == 1).
// Returns the launch status (cudaGetLastError after the launch).
template <typename T>
cudaError_t launch_group_normalize(const T* in_GN, T* out_GN, int64_t num_groups, int64_t n,
                                   double eps, bool scale_by_std, cudaStream_t stream);

// RLOO, one block per group: out = r_i - (S_g - r_i) / (n - 1), 0 when n == 1.
template <typename T>
cudaError_t launch_loo_advantages(const T* in_GN, T* out_GN, int64_t num_groups, int64_t n,
                                  cudaStream_t stream);

// Reverse scans over packed sequences, one warp per sequence (semantics:
// csrc/cpu/advantages.h). rewards_N/values_N/returns_N/advantages_N: [num_tokens];
// mask_N: bool [num_tokens]; cu_seqlens: int64 [num_seqs + 1] on the device, NOT
// validated here (that needs a host sync): each sequence is clamped into
// [0, num_tokens], and tokens no sequence covers are not written, so callers
// should zero-fill the outputs. Double accumulation.
template <typename T>
cudaError_t launch_discounted_returns(const T* rewards_N, const bool* mask_N,
                                      const int64_t* cu_seqlens, T* returns_N, int64_t num_seqs,
                                      int64_t num_tokens, double gamma, cudaStream_t stream);
template <typename T>
cudaError_t launch_gae(const T* rewards_N, const T* values_N, const bool* mask_N,
                       const int64_t* cu_seqlens, T* advantages_N, T* returns_N, int64_t num_seqs,
                       int64_t num_tokens, double gamma, double lam, cudaStream_t stream);

}  // namespace cuda
}  // namespace slime_rl
