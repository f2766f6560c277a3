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

}  // namespace cuda
}  // namespace slime_rl
