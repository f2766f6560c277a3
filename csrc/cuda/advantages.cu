// Advantage kernels on the GPU. Torch glue: advantages_ops.cpp. This file
// includes no torch header (see advantages.h).
//
// group_normalize, loo_advantages: one block per group. Each block strides over
// its group's n rewards: sums, then writes. Reductions are warp shuffles
// followed by one shared-memory step across warps. Simple rather than fastest:
// for the usual n (8-64) most threads of a block idle; a warp-per-group variant
// is the obvious next step if this ever shows up in a profile.
//
// discounted_returns, gae: one warp per sequence, walking it from the end in
// chunks of 32 lanes x kTokensPerLane tokens. Both are first-order linear
// recurrences run backwards, x_t = b_t + a_t x_{t+1}, and maps x -> b + a x
// compose associatively, so a chunk is one warp scan: each lane composes its
// own tokens, a shuffle scan gives every lane the composition of the lanes
// after it, the carry from the previous (later) chunk goes in, and each lane
// replays its tokens serially to write them. Masked tokens are the identity map
// (a = 1, b = 0) and are written as 0. GAE needs two such scans per chunk: the
// value of the next unmasked token (a = 0, b = V_t at unmasked tokens), which
// gives the deltas, then the advantages (a = gamma lam, b = delta_t).
//
// Reference: slime_rl/ops/reference.py.

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

template <typename T>
__global__ void loo_advantages_kernel(const T* __restrict__ in_GN, T* __restrict__ out_GN,
                                      int64_t n) {
  using A = double;
  __shared__ A smem[kMaxThreads / kWarp];
  const T* r = in_GN + static_cast<int64_t>(blockIdx.x) * n;
  T* adv = out_GN + static_cast<int64_t>(blockIdx.x) * n;
  A sum = 0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) sum += to_acc(r[i]);
  sum = block_sum(sum, smem);
  const A others = static_cast<A>(n - 1);
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    const A ri = to_acc(r[i]);
    // r_i - mean of the others; a group of one sample has no others: 0.
    adv[i] = from_acc<T>(n > 1 ? ri - (sum - ri) / others : A(0));
  }
}

// ---- reverse linear-recurrence scans, one warp per sequence ----

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kTokensPerLane = 4;
constexpr int kChunk = kWarp * kTokensPerLane;
constexpr int kWarpsPerBlock = 8;

// The map x -> b + a * x.
struct Affine {
  double a;
  double b;
};

// The map "apply later, then earlier": x_t = b_e + a_e (b_l + a_l x).
__device__ __forceinline__ Affine compose(Affine earlier, Affine later) {
  return {earlier.a * later.a, earlier.b + earlier.a * later.b};
}

// Lane l gets the composition of lanes l+1 .. 31 (the identity for lane 31);
// *all gets the composition of every lane. A Hillis-Steele suffix scan.
__device__ __forceinline__ Affine warp_scan_after(Affine v, Affine* all) {
  const int lane = static_cast<int>(threadIdx.x % kWarp);
#pragma unroll
  for (int offset = 1; offset < kWarp; offset <<= 1) {
    const Affine later{__shfl_down_sync(kFullMask, v.a, offset),
                       __shfl_down_sync(kFullMask, v.b, offset)};
    if (lane + offset < kWarp) v = compose(v, later);
  }
  *all = {__shfl_sync(kFullMask, v.a, 0), __shfl_sync(kFullMask, v.b, 0)};
  Affine after{__shfl_down_sync(kFullMask, v.a, 1), __shfl_down_sync(kFullMask, v.b, 1)};
  if (lane == kWarp - 1) after = {1.0, 0.0};
  return after;
}

// Tokens [begin, end) of sequence s, clamped into [0, n]: a malformed
// cu_seqlens (not checked on the GPU, that would need a host sync) cannot
// make a warp read or write out of bounds.
__device__ __forceinline__ void sequence_bounds(const int64_t* cu, int64_t s, int64_t n,
                                                int64_t* begin, int64_t* end) {
  const int64_t b = min(max(cu[s], int64_t(0)), n);
  *begin = b;
  *end = min(max(cu[s + 1], b), n);
}

template <typename T>
__global__ void discounted_returns_kernel(const T* __restrict__ r_N, const bool* __restrict__ m_N,
                                          const int64_t* __restrict__ cu, T* __restrict__ ret_N,
                                          int64_t num_seqs, int64_t n, double gamma) {
  const int64_t s = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  if (s >= num_seqs) return;  // uniform across the warp
  const int lane = static_cast<int>(threadIdx.x % kWarp);
  int64_t begin, end;
  sequence_bounds(cu, s, n, &begin, &end);
  double carry = 0.0;  // G at the first unmasked token at or after chunk_end; 0 past the end
  for (int64_t chunk_end = end; chunk_end > begin; chunk_end -= kChunk) {
    const int64_t chunk_begin = max(begin, chunk_end - kChunk);
    const int64_t first = chunk_begin + static_cast<int64_t>(lane) * kTokensPerLane;
    double r[kTokensPerLane];
    bool m[kTokensPerLane];
#pragma unroll
    for (int k = 0; k < kTokensPerLane; ++k) {
      const int64_t t = first + k;
      m[k] = t < chunk_end && m_N[t];
      r[k] = m[k] ? to_acc(r_N[t]) : 0.0;
    }
    Affine mine{1.0, 0.0};
#pragma unroll
    for (int k = kTokensPerLane - 1; k >= 0; --k) {
      if (m[k]) mine = compose({gamma, r[k]}, mine);
    }
    Affine all;
    const Affine after = warp_scan_after(mine, &all);
    double g = after.b + after.a * carry;
#pragma unroll
    for (int k = kTokensPerLane - 1; k >= 0; --k) {
      const int64_t t = first + k;
      if (t >= chunk_end) continue;
      if (m[k]) g = r[k] + gamma * g;
      ret_N[t] = from_acc<T>(m[k] ? g : 0.0);
    }
    carry = all.b + all.a * carry;
  }
}

template <typename T>
__global__ void gae_kernel(const T* __restrict__ r_N, const T* __restrict__ v_N,
                           const bool* __restrict__ m_N, const int64_t* __restrict__ cu,
                           T* __restrict__ adv_N, T* __restrict__ ret_N, int64_t num_seqs,
                           int64_t n, double gamma, double gamma_lam) {
  const int64_t s = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  if (s >= num_seqs) return;  // uniform across the warp
  const int lane = static_cast<int>(threadIdx.x % kWarp);
  int64_t begin, end;
  sequence_bounds(cu, s, n, &begin, &end);
  double value_carry = 0.0;  // value of the first unmasked token at or after chunk_end
  double adv_carry = 0.0;    // advantage there; both 0 past the sequence's end
  for (int64_t chunk_end = end; chunk_end > begin; chunk_end -= kChunk) {
    const int64_t chunk_begin = max(begin, chunk_end - kChunk);
    const int64_t first = chunk_begin + static_cast<int64_t>(lane) * kTokensPerLane;
    double r[kTokensPerLane], v[kTokensPerLane], delta[kTokensPerLane];
    bool m[kTokensPerLane];
#pragma unroll
    for (int k = 0; k < kTokensPerLane; ++k) {
      const int64_t t = first + k;
      m[k] = t < chunk_end && m_N[t];
      r[k] = m[k] ? to_acc(r_N[t]) : 0.0;
      v[k] = m[k] ? to_acc(v_N[t]) : 0.0;
    }
    // Scan 1: the value of the next unmasked token ("x -> V_t" at unmasked tokens).
    Affine mine{1.0, 0.0};
#pragma unroll
    for (int k = kTokensPerLane - 1; k >= 0; --k) {
      if (m[k]) mine = {0.0, v[k]};
    }
    Affine all;
    Affine after = warp_scan_after(mine, &all);
    double next_value = after.b + after.a * value_carry;
    value_carry = all.b + all.a * value_carry;
#pragma unroll
    for (int k = kTokensPerLane - 1; k >= 0; --k) {
      delta[k] = m[k] ? r[k] + gamma * next_value - v[k] : 0.0;
      if (m[k]) next_value = v[k];
    }
    // Scan 2: the advantages.
    mine = {1.0, 0.0};
#pragma unroll
    for (int k = kTokensPerLane - 1; k >= 0; --k) {
      if (m[k]) mine = compose({gamma_lam, delta[k]}, mine);
    }
    after = warp_scan_after(mine, &all);
    double a = after.b + after.a * adv_carry;
#pragma unroll
    for (int k = kTokensPerLane - 1; k >= 0; --k) {
      const int64_t t = first + k;
      if (t >= chunk_end) continue;
      if (m[k]) a = delta[k] + gamma_lam * a;
      adv_N[t] = from_acc<T>(m[k] ? a : 0.0);
      ret_N[t] = from_acc<T>(m[k] ? a + v[k] : 0.0);
    }
    adv_carry = all.b + all.a * adv_carry;
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

template <typename T>
cudaError_t launch_loo_advantages(const T* in_GN, T* out_GN, int64_t num_groups, int64_t n,
                                  cudaStream_t stream) {
  if (num_groups == 0 || n == 0) return cudaSuccess;
  if (num_groups > 0x7fffffffLL) return cudaErrorInvalidValue;  // gridDim.x limit
  const int64_t warps = (n + kWarp - 1) / kWarp;
  const int threads = static_cast<int>(warps * kWarp < kMaxThreads ? warps * kWarp : kMaxThreads);
  loo_advantages_kernel<T><<<static_cast<unsigned int>(num_groups), threads, 0, stream>>>(in_GN,
                                                                                         out_GN, n);
  return cudaGetLastError();
}

// Blocks of kWarpsPerBlock warps, one sequence per warp.
static cudaError_t sequence_grid(int64_t num_seqs, unsigned int* blocks) {
  const int64_t b = (num_seqs + kWarpsPerBlock - 1) / kWarpsPerBlock;
  if (b > 0x7fffffffLL) return cudaErrorInvalidValue;  // gridDim.x limit
  *blocks = static_cast<unsigned int>(b);
  return cudaSuccess;
}

template <typename T>
cudaError_t launch_discounted_returns(const T* rewards_N, const bool* mask_N,
                                      const int64_t* cu_seqlens, T* returns_N, int64_t num_seqs,
                                      int64_t num_tokens, double gamma, cudaStream_t stream) {
  if (num_seqs == 0 || num_tokens == 0) return cudaSuccess;
  unsigned int blocks = 0;
  const cudaError_t status = sequence_grid(num_seqs, &blocks);
  if (status != cudaSuccess) return status;
  discounted_returns_kernel<T><<<blocks, kWarpsPerBlock * kWarp, 0, stream>>>(
      rewards_N, mask_N, cu_seqlens, returns_N, num_seqs, num_tokens, gamma);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_gae(const T* rewards_N, const T* values_N, const bool* mask_N,
                       const int64_t* cu_seqlens, T* advantages_N, T* returns_N, int64_t num_seqs,
                       int64_t num_tokens, double gamma, double lam, cudaStream_t stream) {
  if (num_seqs == 0 || num_tokens == 0) return cudaSuccess;
  unsigned int blocks = 0;
  const cudaError_t status = sequence_grid(num_seqs, &blocks);
  if (status != cudaSuccess) return status;
  gae_kernel<T><<<blocks, kWarpsPerBlock * kWarp, 0, stream>>>(
      rewards_N, values_N, mask_N, cu_seqlens, advantages_N, returns_N, num_seqs, num_tokens,
      gamma, gamma * lam);
  return cudaGetLastError();
}

#define SLIME_RL_INSTANTIATE_ADVANTAGES(T)                                                        \
  template cudaError_t launch_loo_advantages<T>(const T*, T*, int64_t, int64_t, cudaStream_t);    \
  template cudaError_t launch_discounted_returns<T>(const T*, const bool*, const int64_t*, T*,    \
                                                    int64_t, int64_t, double, cudaStream_t);      \
  template cudaError_t launch_gae<T>(const T*, const T*, const bool*, const int64_t*, T*, T*,     \
                                     int64_t, int64_t, double, double, cudaStream_t);
SLIME_RL_INSTANTIATE_ADVANTAGES(float)
SLIME_RL_INSTANTIATE_ADVANTAGES(double)
SLIME_RL_INSTANTIATE_ADVANTAGES(__half)
SLIME_RL_INSTANTIATE_ADVANTAGES(__nv_bfloat16)
#undef SLIME_RL_INSTANTIATE_ADVANTAGES

}  // namespace cuda
}  // namespace slime_rl
