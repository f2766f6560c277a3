// Row kernels of fused (linear +) logprob + entropy on the GPU. Torch glue, tiling and the
// GEMMs: fused_logprob_ops.cpp. No torch header here (see fused_logprob.h).
//
// fold_softmax_pieces: one thread block per row. Each thread walks its share of the row in
// 16-byte vectors (8 bf16/fp16, 4 fp32, 2 fp64; four loads in flight per thread) and keeps an
// online softmax (m, s, u): a vector whose max exceeds m rescales s and u once, then each
// element adds e = exp(z - m) to s and e (z - m) to u, one exp per element. The block then
// merges the per-thread triples (warp shuffles, then one shared-memory step across warps)
// and thread 0 merges the result into the running per-row pieces. Rows need not be aligned:
// the few elements before the first 16-byte boundary and after the last full vector are
// folded one at a time. On the logits variant this is a single read of the logits, so its
// speed is bounded by memory bandwidth (benchmarks/kernels/bench_fused_logprob.py --gpu).
//
// logprob_grad: one thread block per row; dz_j = [g_lp (onehot_j - p_j) - g_ent p_j
// (log p_j + H)] / temperature, vectorized when every row of the input and the output is
// aligned for it, scalar otherwise; masked rows (both grads 0) are written as zeros without
// reading the input.
//
// exp is __expf (MUFU ex2) in fp32: its error, a few ulp near 0 growing with |z - m|, is of the
// order of the rounding of z - m itself, well inside the tolerance rule of
// tests/test_fused_logprob.py. fp64 uses exp.

#include "fused_logprob.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <climits>
#include <cmath>
#include <cstdint>

namespace slime_rl {
namespace cuda {
namespace {

constexpr int kWarp = 32;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kMaxThreads = 512;
constexpr int kUnroll = 4;  // 16-byte loads in flight per thread in the fold

__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }

// Rounds an accumulator value to the output type (round to nearest even, as torch's casts).
template <typename T>
struct FromAcc;
template <>
struct FromAcc<float> {
  __device__ __forceinline__ static float cast(float x) { return x; }
};
template <>
struct FromAcc<double> {
  __device__ __forceinline__ static double cast(double x) { return x; }
};
template <>
struct FromAcc<__half> {
  __device__ __forceinline__ static __half cast(float x) { return __float2half_rn(x); }
};
template <>
struct FromAcc<__nv_bfloat16> {
  __device__ __forceinline__ static __nv_bfloat16 cast(float x) { return __float2bfloat16_rn(x); }
};

__device__ __forceinline__ float fast_exp(float x) { return __expf(x); }
__device__ __forceinline__ double fast_exp(double x) { return exp(x); }

template <typename A>
__device__ __forceinline__ A neg_inf() {
  return -static_cast<A>(INFINITY);
}

// N elements of T loaded or stored as one access of N * sizeof(T) bytes.
template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

// Elements of T per 16-byte access.
template <typename T>
struct VecElems {
  static constexpr int value = static_cast<int>(16 / sizeof(T));
};

// Threads per block for a row of `items` units of work: a power of two in [32, 512].
int threads_for(int64_t items) {
  int threads = kWarp;
  while (threads < kMaxThreads && threads < items) threads *= 2;
  return threads;
}

bool aligned(const void* p, int64_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

// ---- online softmax ----

// Softmax pieces of a set of z values: m = max z, s = sum e^(z - m), u = sum e^(z - m)(z - m).
// The empty set is (-inf, 0, 0).
template <typename A>
struct Online {
  A m;
  A s;
  A u;
};

template <typename A>
__device__ __forceinline__ Online<A> empty_online() {
  return {neg_inf<A>(), A(0), A(0)};
}

// a <- pieces of the union of a's and b's (disjoint) sets: with M = max(m_a, m_b) and
// d = m - M <= 0, s = sum s e^d and u = sum e^d (u + s d).
template <typename A>
__device__ __forceinline__ void merge(Online<A>& a, const Online<A>& b) {
  if (b.s == A(0)) return;
  if (a.s == A(0)) {
    a = b;
    return;
  }
  const A m = a.m > b.m ? a.m : b.m;
  const A da = a.m - m;
  const A db = b.m - m;
  const A ea = fast_exp(da);
  const A eb = fast_exp(db);
  a.u = ea * (a.u + a.s * da) + eb * (b.u + b.s * db);
  a.s = ea * a.s + eb * b.s;
  a.m = m;
}

// Folds N values into st: one rescale if their max beats st.m, then one exp per value.
// e (z - m) is taken as 0 where e == 0, so a -inf logit adds nothing (not 0 * -inf = NaN).
template <int N, typename A>
__device__ __forceinline__ void fold_values(const A (&z)[N], Online<A>& st) {
  A vmax = z[0];
#pragma unroll
  for (int k = 1; k < N; ++k) vmax = z[k] > vmax ? z[k] : vmax;
  if (vmax > st.m) {
    if (st.s > A(0)) {
      const A d = st.m - vmax;
      const A a = fast_exp(d);
      st.u = a * (st.u + st.s * d);
      st.s *= a;
    }
    st.m = vmax;
  }
#pragma unroll
  for (int k = 0; k < N; ++k) {
    const A d = z[k] - st.m;
    const A e = fast_exp(d);
    st.s += e;
    st.u += e > A(0) ? e * d : A(0);
  }
}

template <typename T, typename A, int N>
__device__ __forceinline__ void fold_vec(const Vec<T, N>& v, A inv_t, Online<A>& st) {
  A z[N];
#pragma unroll
  for (int k = 0; k < N; ++k) z[k] = to_acc(v.v[k]) * inv_t;
  fold_values<N, A>(z, st);
}

template <typename T, typename A>
__device__ __forceinline__ void fold_one(T x, A inv_t, Online<A>& st) {
  const A z[1] = {to_acc(x) * inv_t};
  fold_values<1, A>(z, st);
}

// The pieces of the whole block, in thread 0. blockDim.x: a multiple of 32, <= kMaxThreads.
template <typename A>
__device__ Online<A> block_merge(Online<A> st, Online<A>* smem) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset >>= 1) {
    const Online<A> other{__shfl_xor_sync(kFullMask, st.m, offset),
                          __shfl_xor_sync(kFullMask, st.s, offset),
                          __shfl_xor_sync(kFullMask, st.u, offset)};
    merge(st, other);
  }
  const int lane = static_cast<int>(threadIdx.x) % kWarp;
  const int warp = static_cast<int>(threadIdx.x) / kWarp;
  const int num_warps = static_cast<int>(blockDim.x) / kWarp;
  if (num_warps == 1) return st;
  if (lane == 0) smem[warp] = st;
  __syncthreads();
  if (warp == 0) {
    st = lane < num_warps ? smem[lane] : empty_online<A>();
#pragma unroll
    for (int offset = kWarp / 2; offset > 0; offset >>= 1) {
      const Online<A> other{__shfl_xor_sync(kFullMask, st.m, offset),
                            __shfl_xor_sync(kFullMask, st.s, offset),
                            __shfl_xor_sync(kFullMask, st.u, offset)};
      merge(st, other);
    }
  }
  return st;
}

template <typename T>
__global__ void fold_softmax_pieces_kernel(const T* __restrict__ x_RC, int64_t ld, int64_t cols,
                                           typename AccOf<T>::type inv_t, TargetMap tm,
                                           Pieces<typename AccOf<T>::type> pieces, bool first,
                                           bool last) {
  using A = typename AccOf<T>::type;
  constexpr int N = VecElems<T>::value;
  __shared__ Online<A> smem[kMaxThreads / kWarp];
  const int64_t r = blockIdx.x;
  const T* row = x_RC + r * ld;
  const int64_t tid = threadIdx.x;
  const int64_t step = blockDim.x;

  // Split the row at 16-byte boundaries: [0, head) scalar, N-element vectors, [tail, cols) scalar.
  const int64_t past = static_cast<int64_t>(reinterpret_cast<uintptr_t>(row) % 16) / static_cast<int64_t>(sizeof(T));
  const int64_t head = min(cols, past == 0 ? int64_t(0) : N - past);
  const int64_t num_vecs = (cols - head) / N;
  const int64_t tail = head + num_vecs * N;

  Online<A> st = empty_online<A>();
  if (tid < head) fold_one(row[tid], inv_t, st);
  for (int64_t j = tail + tid; j < cols; j += step) fold_one(row[j], inv_t, st);
  const Vec<T, N>* body = reinterpret_cast<const Vec<T, N>*>(row + head);
  int64_t i = tid;
  for (; i + (kUnroll - 1) * step < num_vecs; i += kUnroll * step) {
    Vec<T, N> v[kUnroll];
#pragma unroll
    for (int k = 0; k < kUnroll; ++k) v[k] = body[i + k * step];
#pragma unroll
    for (int k = 0; k < kUnroll; ++k) fold_vec(v[k], inv_t, st);
  }
  for (; i < num_vecs; i += step) fold_vec(body[i], inv_t, st);

  st = block_merge(st, smem);
  if (tid != 0) return;
  if (!first) {  // merge into the pieces of the earlier tiles of this row
    Online<A> running{pieces.max[r], pieces.sum[r], pieces.sum_z[r]};
    merge(running, st);
    st = running;
  }
  pieces.max[r] = st.m;
  pieces.sum[r] = st.s;
  pieces.sum_z[r] = st.u;
  const int64_t target = tm.targets[r];
  const int64_t col = target - tm.col0;
  A target_z = first ? A(0) : pieces.target_z[r];  // the raw z of the target, once seen
  if (col >= 0 && col < cols) target_z = to_acc(row[col]) * inv_t;
  if (last) {
    const bool owned = target >= tm.owned_begin && target < tm.owned_end;
    target_z = owned ? target_z - st.m : A(0);
  }
  pieces.target_z[r] = target_z;
}

// ---- backward: dz of one row ----

// Per-row constants of dz_j = (-p_j (c + g_ent log p_j) + g_lp [j == target]) * inv_t,
// with c = g_lp + g_ent H and log p_j = z_j - lse.
template <typename A>
struct RowGrad {
  A inv_t;
  A lse;
  A c;
  A g_lp;
  A g_ent;
  int64_t target_col;

  __device__ __forceinline__ A operator()(A x, int64_t j) const {
    const A logp = x * inv_t - lse;
    const A p = fast_exp(logp);
    A d = p > A(0) ? -p * (c + g_ent * logp) : A(0);  // p == 0: no 0 * -inf for a -inf logit
    if (j == target_col) d += g_lp;
    return d * inv_t;
  }
};

template <typename Tin, typename Tout, bool kVector>
__global__ void logprob_grad_kernel(const Tin* x_RC, int64_t ldx, Tout* out_RC, int64_t ldo,
                                    int64_t cols, int64_t out_cols,
                                    typename AccOf<Tin>::type inv_t,
                                    const int64_t* __restrict__ targets, int64_t col0,
                                    GradRows<typename AccOf<Tin>::type> g) {
  // x_RC and out_RC may alias (in place): no __restrict__; each element is read, then written,
  // by the same thread.
  using A = typename AccOf<Tin>::type;
  constexpr int N = VecElems<Tin>::value;
  using VecIn = Vec<Tin, N>;
  using VecOut = Vec<Tout, N>;
  const int64_t r = blockIdx.x;
  const Tin* x = x_RC + r * ldx;
  Tout* out = out_RC + r * ldo;
  const int64_t tid = threadIdx.x;
  const int64_t step = blockDim.x;
  const Tout zero = FromAcc<Tout>::cast(A(0));

  const A g_lp = g.grad_logprob != nullptr ? g.grad_logprob[r] : A(0);
  const A g_ent = g.grad_entropy != nullptr ? g.grad_entropy[r] : A(0);
  const int64_t num_vecs = kVector ? cols / N : 0;
  if (g_lp == A(0) && g_ent == A(0)) {  // a masked token: no gradient (uniform over the block)
    VecOut zeros;
#pragma unroll
    for (int k = 0; k < N; ++k) zeros.v[k] = zero;
    for (int64_t i = tid; i < num_vecs; i += step) reinterpret_cast<VecOut*>(out)[i] = zeros;
    for (int64_t j = num_vecs * N + tid; j < out_cols; j += step) out[j] = zero;
    return;
  }
  const A entropy = g_ent != A(0) ? g.entropy[r] : A(0);
  const RowGrad<A> grad{inv_t, g.lse[r], g_lp + g_ent * entropy, g_lp, g_ent, targets[r] - col0};
  for (int64_t i = tid; i < num_vecs; i += step) {
    const VecIn v = reinterpret_cast<const VecIn*>(x)[i];
    VecOut o;
#pragma unroll
    for (int k = 0; k < N; ++k) o.v[k] = FromAcc<Tout>::cast(grad(to_acc(v.v[k]), i * N + k));
    reinterpret_cast<VecOut*>(out)[i] = o;
  }
  for (int64_t j = num_vecs * N + tid; j < cols; j += step) {
    out[j] = FromAcc<Tout>::cast(grad(to_acc(x[j]), j));
  }
  for (int64_t j = cols + tid; j < out_cols; j += step) out[j] = zero;  // vocab padding
}

}  // namespace

template <typename T>
cudaError_t launch_fold_softmax_pieces(const T* x_RC, int64_t ld, int64_t rows, int64_t cols,
                                       typename AccOf<T>::type inv_t, TargetMap targets,
                                       Pieces<typename AccOf<T>::type> pieces, bool first,
                                       bool last, cudaStream_t stream) {
  if (rows < 0 || rows > INT_MAX || cols < 0 || ld < cols) return cudaErrorInvalidValue;
  if (rows == 0) return cudaSuccess;
  const int64_t work = (cols + VecElems<T>::value * kUnroll - 1) / (VecElems<T>::value * kUnroll);
  fold_softmax_pieces_kernel<T><<<static_cast<unsigned>(rows), threads_for(work), 0, stream>>>(
      x_RC, ld, cols, inv_t, targets, pieces, first, last);
  return cudaGetLastError();
}

template <typename Tin, typename Tout>
cudaError_t launch_logprob_grad(const Tin* x_RC, int64_t ldx, Tout* out_RC, int64_t ldo,
                                int64_t rows, int64_t cols, int64_t out_cols,
                                typename AccOf<Tin>::type inv_t, const int64_t* targets,
                                int64_t col0, GradRows<typename AccOf<Tin>::type> grads,
                                cudaStream_t stream) {
  if (rows < 0 || rows > INT_MAX || cols < 0 || out_cols < cols || ldx < cols || ldo < out_cols) {
    return cudaErrorInvalidValue;
  }
  if (rows == 0) return cudaSuccess;
  constexpr int N = VecElems<Tin>::value;
  constexpr int64_t out_bytes = N * static_cast<int64_t>(sizeof(Tout));
  const bool vector = aligned(x_RC, 16) && (ldx * static_cast<int64_t>(sizeof(Tin))) % 16 == 0 &&
                      aligned(out_RC, out_bytes) &&
                      (ldo * static_cast<int64_t>(sizeof(Tout))) % out_bytes == 0;
  const int threads = threads_for((out_cols + 2 * N - 1) / (2 * N));
  const unsigned blocks = static_cast<unsigned>(rows);
  if (vector) {
    logprob_grad_kernel<Tin, Tout, true><<<blocks, threads, 0, stream>>>(
        x_RC, ldx, out_RC, ldo, cols, out_cols, inv_t, targets, col0, grads);
  } else {
    logprob_grad_kernel<Tin, Tout, false><<<blocks, threads, 0, stream>>>(
        x_RC, ldx, out_RC, ldo, cols, out_cols, inv_t, targets, col0, grads);
  }
  return cudaGetLastError();
}

#define SLIME_RL_FOLD(T)                                                                     \
  template cudaError_t launch_fold_softmax_pieces<T>(const T*, int64_t, int64_t, int64_t,    \
                                                     AccOf<T>::type, TargetMap,              \
                                                     Pieces<AccOf<T>::type>, bool, bool,     \
                                                     cudaStream_t);
SLIME_RL_FOLD(float)
SLIME_RL_FOLD(double)
SLIME_RL_FOLD(__half)
SLIME_RL_FOLD(__nv_bfloat16)
#undef SLIME_RL_FOLD

#define SLIME_RL_GRAD(Tin, Tout)                                                               \
  template cudaError_t launch_logprob_grad<Tin, Tout>(const Tin*, int64_t, Tout*, int64_t,     \
                                                      int64_t, int64_t, int64_t,               \
                                                      AccOf<Tin>::type, const int64_t*,        \
                                                      int64_t, GradRows<AccOf<Tin>::type>,     \
                                                      cudaStream_t);
SLIME_RL_GRAD(float, float)
SLIME_RL_GRAD(double, double)
SLIME_RL_GRAD(__half, __half)
SLIME_RL_GRAD(__nv_bfloat16, __nv_bfloat16)
SLIME_RL_GRAD(float, __half)
SLIME_RL_GRAD(float, __nv_bfloat16)
#undef SLIME_RL_GRAD

}  // namespace cuda
}  // namespace slime_rl
