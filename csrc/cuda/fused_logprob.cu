// Row kernels of fused (linear +) logprob + entropy on the GPU. Torch glue, tiling and the
// GEMMs: fused_logprob_ops.cpp. No torch header here (see fused_logprob.h).
//
// fold_softmax_pieces: one thread block per row. Each thread walks its share of the row in
// 16-byte vectors (8 bf16/fp16, 4 fp32, 2 fp64), four loads in flight per thread, and keeps
// an online softmax over each group of four vectors: one max (packed for 16-bit types), a
// rescale if it beats the running max, then one exp per element. fp32 accumulation works in
// base 2 (y = x inv_t log2 e, e = 2^(y - m2) by ex2.approx.ftz, about 8 SASS instructions
// per bf16 element) and converts to natural-log pieces per thread; fp64 uses exp. The block
// then merges the per-thread triples (warp shuffles, then one shared-memory step across
// warps) and thread 0 merges the result into the running per-row pieces. Rows need not be
// aligned: the few elements before the first 16-byte boundary and after the last full vector
// are folded one at a time. On the logits variant this is a single read of the logits, so its
// speed is bounded by memory bandwidth (benchmarks/kernels/bench_fused_logprob.py --gpu).
// A -inf logit has probability 0: it adds exactly 0 to s and u, and a row of -inf only gives
// the empty pieces (-inf, 0, 0).
//
// logprob_grad: one thread block per row; dz_j = [g_lp (onehot_j - p_j) - g_ent p_j
// (log p_j + H)] / temperature, vectorized when every row of the input and the output is
// aligned for it, scalar otherwise; masked rows (both grads 0) are written as zeros without
// reading the input; p_j == 0 (a -inf logit) gives 0, not 0 * -inf.
//
// Accuracy of fp32: ex2.approx (relative error 2^-22) and __expf in the merges are of the order
// of the rounding of z - m itself, well inside the tolerance rule of
// tests/test_fused_logprob.py; c = inv_t log2 e is split in two floats so that the base-2
// arguments carry no bias from the rounding of c. fp64 uses exp.

#include "fused_logprob.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cfloat>
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

// 2^x by MUFU.EX2, subnormal results flushed to 0 (max relative error 2^-22).
__device__ __forceinline__ float ex2_ftz(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

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
// The empty set (or a set of -inf only) is (-inf, 0, 0).
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
// d = m - M <= 0, s = sum s e^d and u = sum e^d (u + s d). s == 0 marks an empty side.
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

// Per-thread fold state. Values are folded raw (x, not z = x * inv_t; inv_t > 0, so the max
// of x gives the max of z) one group at a time: one rescale if the group's max beats the
// running max, then one exp per value.
template <typename A>
struct FoldState;

// fp32 accumulation works in base 2: y = x c with c = inv_t log2(e) held as c_hi + c_lo
// (so y is not biased by the rounding of c), offset m2 = fl(mx c_hi), d = y - m2 by two FMAs,
// e = 2^d by ex2.approx.ftz, s = sum e, u = sum e d (base-2 units). d is clamped at -127,
// where e is 0 (flushed): a -inf logit, or a -inf offset (all values so far -inf; d = NaN,
// which fmaxf also maps to -127), adds exactly 0 to s and u.
struct FoldScaleF {
  float inv_t;
  float c_hi;
  float c_lo;
};

template <>
struct FoldState<float> {
  using Scale = FoldScaleF;
  float mx = neg_inf<float>();  // max raw x
  float m2 = neg_inf<float>();  // fl(mx * c_hi)
  float s = 0.f;
  float u = 0.f;

  __device__ __forceinline__ void raise(float xmax, const Scale& sc) {
    if (xmax > mx) {
      const float m2_new = xmax * sc.c_hi;
      if (s > 0.f) {
        const float d = m2 - m2_new;
        const float a = ex2_ftz(d);
        u = a * fmaf(s, d, u);
        s *= a;
      }
      mx = xmax;
      m2 = m2_new;
    }
  }
  __device__ __forceinline__ void add(float x, const Scale& sc) {
    const float d = fmaxf(fmaf(x, sc.c_lo, fmaf(x, sc.c_hi, -m2)), -127.f);
    const float e = ex2_ftz(d);
    s += e;
    u = fmaf(e, d, u);
  }
  // Natural-log pieces with m = fl(mx inv_t) (the z max, as the scalar path has it): shifts
  // the offset from m2 to m log2(e) (delta ~ an ulp of m2), then u *= ln 2.
  __device__ __forceinline__ Online<float> natural(const Scale& sc) const {
    if (s == 0.f) return empty_online<float>();
    const float m = mx * sc.inv_t;
    const float delta =
        static_cast<float>(static_cast<double>(m2) - static_cast<double>(m) * 1.4426950408889634);
    const float a = exp2f(delta);
    return {m, s * a, 0.69314718055994531f * (a * fmaf(s, delta, u))};
  }
};

// fp64: natural units and exp, as the reference; d is clamped at -DBL_MAX (e = 0 there) so a
// -inf value adds 0 and a -inf running max (d = NaN) does too.
struct FoldScaleD {
  double inv_t;
};

template <>
struct FoldState<double> {
  using Scale = FoldScaleD;
  double m = neg_inf<double>();  // max z
  double s = 0.0;
  double u = 0.0;

  __device__ __forceinline__ void raise(double xmax, const Scale& sc) {
    const double zmax = xmax * sc.inv_t;
    if (zmax > m) {
      if (s > 0.0) {
        const double d = m - zmax;
        const double a = exp(d);
        u = a * (u + s * d);
        s *= a;
      }
      m = zmax;
    }
  }
  __device__ __forceinline__ void add(double x, const Scale& sc) {
    const double d = fmax(x * sc.inv_t - m, -DBL_MAX);
    const double e = exp(d);
    s += e;
    u += e * d;
  }
  __device__ __forceinline__ Online<double> natural(const Scale&) const {
    if (s == 0.0) return empty_online<double>();
    return {m, s, u};
  }
};

// Max of the raw values of K vectors, in the accumulation type. 16-bit types: packed
// (two per instruction) first.
template <typename T, int N, int K>
struct VecsMax {
  __device__ __forceinline__ static typename AccOf<T>::type of(const Vec<T, N> (&v)[K]) {
    typename AccOf<T>::type r = to_acc(v[0].v[0]);
#pragma unroll
    for (int j = 0; j < K; ++j) {
#pragma unroll
      for (int k = 0; k < N; ++k) r = fmax(r, to_acc(v[j].v[k]));
    }
    return r;
  }
};

template <typename P, typename T, int N, int K>
__device__ __forceinline__ float packed_max(const Vec<T, N> (&v)[K]) {
  P r = reinterpret_cast<const P*>(v[0].v)[0];
#pragma unroll
  for (int j = 0; j < K; ++j) {
    const P* p = reinterpret_cast<const P*>(v[j].v);
#pragma unroll
    for (int k = (j == 0 ? 1 : 0); k < N / 2; ++k) r = __hmax2(r, p[k]);
  }
  return fmaxf(__low2float(r), __high2float(r));
}

template <int K>
struct VecsMax<__nv_bfloat16, 8, K> {
  __device__ __forceinline__ static float of(const Vec<__nv_bfloat16, 8> (&v)[K]) {
    return packed_max<__nv_bfloat162>(v);
  }
};

template <int K>
struct VecsMax<__half, 8, K> {
  __device__ __forceinline__ static float of(const Vec<__half, 8> (&v)[K]) {
    return packed_max<__half2>(v);
  }
};

// Element k of a vector in the accumulation type.
template <typename T, int N>
__device__ __forceinline__ typename AccOf<T>::type elem(const Vec<T, N>& v, int k) {
  return to_acc(v.v[k]);
}

// bf16 is the top half of an fp32: one shift or mask of the 32-bit word holding it.
template <int N>
__device__ __forceinline__ float elem(const Vec<__nv_bfloat16, N>& v, int k) {
  if constexpr (N % 2 == 0) {
    const uint32_t w = reinterpret_cast<const uint32_t*>(v.v)[k / 2];
    return __uint_as_float(k % 2 == 0 ? w << 16 : w & 0xffff0000u);
  } else {
    return to_acc(v.v[k]);
  }
}

// Folds K vectors of N values into st.
template <typename T, int N, int K, typename A>
__device__ __forceinline__ void fold_vecs(const Vec<T, N> (&v)[K],
                                          const typename FoldState<A>::Scale& sc,
                                          FoldState<A>& st) {
  st.raise(VecsMax<T, N, K>::of(v), sc);
#pragma unroll
  for (int j = 0; j < K; ++j) {
#pragma unroll
    for (int k = 0; k < N; ++k) st.add(elem(v[j], k), sc);
  }
}

template <typename T, typename A>
__device__ __forceinline__ void fold_one(T x, const typename FoldState<A>::Scale& sc,
                                         FoldState<A>& st) {
  const Vec<T, 1> v[1] = {{{x}}};
  fold_vecs<T, 1, 1, A>(v, sc, st);
}

// The pieces of the whole warp, in every lane (butterfly).
template <typename A>
__device__ __forceinline__ Online<A> warp_merge(Online<A> st) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset >>= 1) {
    const Online<A> other{__shfl_xor_sync(kFullMask, st.m, offset),
                          __shfl_xor_sync(kFullMask, st.s, offset),
                          __shfl_xor_sync(kFullMask, st.u, offset)};
    merge(st, other);
  }
  return st;
}

// The pieces of the whole block, in thread 0. blockDim.x: a multiple of 32, <= kMaxThreads.
template <typename A>
__device__ Online<A> block_merge(Online<A> st, Online<A>* smem) {
  st = warp_merge(st);
  const int lane = static_cast<int>(threadIdx.x) % kWarp;
  const int warp = static_cast<int>(threadIdx.x) / kWarp;
  const int num_warps = static_cast<int>(blockDim.x) / kWarp;
  if (num_warps == 1) return st;
  if (lane == 0) smem[warp] = st;
  __syncthreads();
  if (warp == 0) {
    st = warp_merge(lane < num_warps ? smem[lane] : empty_online<A>());
  }
  return st;
}

// Kernel scales of an inverse temperature (host side).
FoldScaleF fold_scale(float inv_t) {
  const double c = static_cast<double>(inv_t) * 1.4426950408889634;  // log2(e)
  const float c_hi = static_cast<float>(c);
  return {inv_t, c_hi, static_cast<float>(c - static_cast<double>(c_hi))};
}
FoldScaleD fold_scale(double inv_t) { return {inv_t}; }

// Fold blocks of kMaxThreads per SM the compiler must allow: 3 caps registers at 42 (4 = 32
// spills); fp64 (exp in double) gets no cap.
template <typename T>
struct FoldMinBlocks {
  static constexpr int value = 3;
};
template <>
struct FoldMinBlocks<double> {
  static constexpr int value = 1;
};

template <typename T>
__global__ void __launch_bounds__(kMaxThreads, FoldMinBlocks<T>::value)
    fold_softmax_pieces_kernel(const T* __restrict__ x_RC, int64_t ld, int64_t cols,
                               typename FoldState<typename AccOf<T>::type>::Scale sc, TargetMap tm,
                               Pieces<typename AccOf<T>::type> pieces, bool first, bool last) {
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

  FoldState<A> st;
  if (tid < head) fold_one<T, A>(row[tid], sc, st);
  for (int64_t j = tail + tid; j < cols; j += step) fold_one<T, A>(row[j], sc, st);
  const Vec<T, N>* body = reinterpret_cast<const Vec<T, N>*>(row + head);
  int64_t i = tid;
  for (; i + (kUnroll - 1) * step < num_vecs; i += kUnroll * step) {
    Vec<T, N> v[kUnroll];
#pragma unroll
    for (int k = 0; k < kUnroll; ++k) v[k] = body[i + k * step];  // all loads before any use
    fold_vecs<T, N, kUnroll, A>(v, sc, st);
  }
  for (; i < num_vecs; i += step) {
    const Vec<T, N> v[1] = {body[i]};
    fold_vecs<T, N, 1, A>(v, sc, st);
  }

  Online<A> piece = block_merge(st.natural(sc), smem);
  if (tid != 0) return;
  if (!first) {  // merge into the pieces of the earlier tiles of this row
    Online<A> running{pieces.max[r], pieces.sum[r], pieces.sum_z[r]};
    merge(running, piece);
    piece = running;
  }
  pieces.max[r] = piece.m;
  pieces.sum[r] = piece.s;
  pieces.sum_z[r] = piece.u;
  const int64_t target = tm.targets[r];
  const int64_t col = target - tm.col0;
  A target_z = first ? A(0) : pieces.target_z[r];  // the raw z of the target, once seen
  if (col >= 0 && col < cols) target_z = to_acc(row[col]) * sc.inv_t;
  if (last) {
    // An owned target in a row of -inf only (empty pieces) is -inf itself: keep it (not NaN).
    const bool owned = target >= tm.owned_begin && target < tm.owned_end;
    target_z = !owned ? A(0) : piece.s == A(0) ? neg_inf<A>() : target_z - piece.m;
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
      x_RC, ld, cols, fold_scale(inv_t), targets, pieces, first, last);
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
