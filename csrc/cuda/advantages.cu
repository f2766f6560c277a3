// Group-normalized advantages (GRPO) on the GPU: one block per group.
//
// Reference: slime_rl/ops/reference.py::group_normalize. Torch glue:
// advantages_ops.cpp. This file includes no torch header (see advantages.h).
//
// Each block strides over its group's n rewards three times: sum -> mean,
// squared deviations -> unbiased std, then writes. Reductions are warp
// shuffles followed by one shared-memory step across warps. Simple rather
// than fastest: for the usual n (8-64) most threads of a block idle; a
// warp-per-group variant is the obvious next step if this ever shows up in a
// profile.

#include "advantages.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace slime_rl {
namespace cuda {
namespace {

constexpr int kWarp = 32;
constexpr int kMaxThreads = 256;

// Everything accumulates in double, like the CPU kernel and the reference:
// for float32 rewards that keeps a constant group (e.g. all 0.7) at exactly
// zero advantage, where fp32 sums leave (r - mean) ~ 1 ulp and, divided by
// (std ~ 1 ulp) + eps, advantages of ~0.05. The cost is irrelevant at reward
// sizes. Outputs round double -> float -> T, as torch's casts do.
__device__ __forceinline__ double to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ double to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ double to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_acc(double x);
template <>
__device__ __forceinline__ float from_acc<float>(double x) { return static_cast<float>(x); }
template <>
__device__ __forceinline__ double from_acc<double>(double x) { return x; }
template <>
__device__ __forceinline__ __half from_acc<__half>(double x) {
  return __float2half_rn(static_cast<float>(x));
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(double x) {
  return __float2bfloat16_rn(static_cast<float>(x));
}

template <typename A>
__device__ __forceinline__ A warp_sum(A v) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Sum of v over the block; every thread gets the result. blockDim.x must be
// a multiple of 32. smem holds one partial per warp.
template <typename A>
__device__ A block_sum(A v, A* smem) {
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  const int num_warps = blockDim.x / kWarp;
  v = warp_sum(v);
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < num_warps ? smem[lane] : A(0);
    v = warp_sum(v);
    if (lane == 0) smem[0] = v;
  }
  __syncthreads();
  const A total = smem[0];
  __syncthreads();  // smem may be reused by the next call
  return total;
}

template <typename T>
__global__ void group_normalize_kernel(const T* __restrict__ in_GN, T* __restrict__ out_GN,
                                       int64_t n, double eps, bool scale_by_std) {
  using A = double;
  __shared__ A smem[kMaxThreads / kWarp];
  const T* r = in_GN + static_cast<int64_t>(blockIdx.x) * n;
  T* adv = out_GN + static_cast<int64_t>(blockIdx.x) * n;

  A sum = 0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) sum += to_acc(r[i]);
  const A mean = block_sum(sum, smem) / static_cast<A>(n);

  A denom = 1;
  if (scale_by_std) {
    A sq = 0;
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
      const A d = to_acc(r[i]) - mean;
      sq += d * d;
    }
    sq = block_sum(sq, smem);
    // Unbiased (n - 1); a single sample has no spread: std = 0.
    const A std_g = n > 1 ? sqrt(sq / static_cast<A>(n - 1)) : A(0);
    denom = std_g + static_cast<A>(eps);
  }
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    adv[i] = from_acc<T>((to_acc(r[i]) - mean) / denom);
  }
}

}  // namespace

template <typename T>
cudaError_t launch_group_normalize(const T* in_GN, T* out_GN, int64_t num_groups, int64_t n,
                                   double eps, bool scale_by_std, cudaStream_t stream) {
  if (num_groups == 0 || n == 0) return cudaSuccess;
  if (num_groups > 0x7fffffffLL) return cudaErrorInvalidValue;  // gridDim.x limit
  // Threads: n rounded up to whole warps, at most kMaxThreads.
  const int64_t warps = (n + kWarp - 1) / kWarp;
  const int threads = static_cast<int>(warps * kWarp < kMaxThreads ? warps * kWarp : kMaxThreads);
  group_normalize_kernel<T><<<static_cast<unsigned int>(num_groups), threads, 0, stream>>>(
      in_GN, out_GN, n, eps, scale_by_std);
  return cudaGetLastError();
}

template cudaError_t launch_group_normalize<float>(const float*, float*, int64_t, int64_t, double,
                                                   bool, cudaStream_t);
template cudaError_t launch_group_normalize<double>(const double*, double*, int64_t, int64_t,
                                                    double, bool, cudaStream_t);
template cudaError_t launch_group_normalize<__half>(const __half*, __half*, int64_t, int64_t,
                                                    double, bool, cudaStream_t);
template cudaError_t launch_group_normalize<__nv_bfloat16>(const __nv_bfloat16*, __nv_bfloat16*,
                                                           int64_t, int64_t, double, bool,
                                                           cudaStream_t);

}  // namespace cuda
}  // namespace slime_rl
