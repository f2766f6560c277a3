// Fused (linear +) logprob + entropy on the CPU: the four slime_rl::*_logprob_* ops.
//
// Reference: slime_rl/ops/fused_logprob.py (*_reference; the math is in fused_logprob.h).
// Tests: tests/test_fused_logprob.py and csrc/tests/test_fused_logprob.cpp.
//
// The linear variants walk over the logits z = hidden @ weight^T / temperature in
// chunk_vocab x chunk_tokens tiles, vocab chunks outside, token chunks inside, and never hold
// more than one tile of z:
//   * each tile is one GEMM, at::mm_out(W[v-chunk] @ hidden[t-chunk]^T) into a reused buffer
//     (BLAS; a hand loop would be far slower than the reference's own GEMM). The tile is
//     vocab-major, [vc, tc]: see "vocab-major tiles" below for why;
//   * the per-token work over a tile — the online softmax fold (forward) or the dz transform
//     (backward, in place) — runs with at::parallel_for over tokens and `omp simd` loops across
//     tokens, with a branch-free exp the compiler vectorizes, built twice on x86-64 (baseline
//     and AVX2+FMA, picked at load time by target_clones);
//   * the backward recomputes each tile, turns it into dz, and accumulates
//     grad_hidden[t-chunk] += dz @ W[v-chunk] and grad_weight[v-chunk] += dz^T @ hidden[t-chunk]
//     (two more GEMMs per tile; 4 GEMMs in all, one more than autograd through full logits).
// bf16/fp16 inputs are upcast (hidden once, weight chunk by chunk) and everything accumulates in
// fp32 (the softmax sums in double); fp64 stays fp64. Masked tokens (both output grads 0: prompt,
// padding) are dropped before the backward's GEMMs, so they cost nothing there.
// The logits variants work row by row (a token's logits are contiguous), in the same way.

#include "fused_logprob.h"

#include "../common/fused_logprob_args.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

// The float row loops are compiled for the baseline ISA and for x86-64-v3 (AVX2, FMA); the
// loader picks the best one for this CPU (GNU ifunc). Elsewhere: one baseline build.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define SLIME_RL_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define SLIME_RL_CLONES
#endif
#define SLIME_RL_INLINE inline __attribute__((always_inline))

namespace slime_rl {
namespace {

constexpr int64_t kGrainElems = 32768;  // logits elements per parallel task
constexpr int64_t kRowChunk = 4096;     // logits variants: columns folded per pass (stays in L1)

// Rows per parallel task for rows of n elements.
int64_t row_grain(int64_t n) { return std::max<int64_t>(1, kGrainElems / std::max<int64_t>(n, 1)); }

template <typename acc_t>
constexpr acc_t neg_inf() {
  return -std::numeric_limits<acc_t>::infinity();
}

SLIME_RL_INLINE int32_t float_bits(float f) {
  int32_t i;
  std::memcpy(&i, &f, sizeof i);
  return i;
}
SLIME_RL_INLINE float bits_float(int32_t i) {
  float f;
  std::memcpy(&f, &i, sizeof f);
  return f;
}

// e^x that `omp simd` loops vectorize: no calls, and every select is done on integer bit masks
// (GCC will not if-convert float compares under its default -ftrapping-math, and a loop with
// control flow stays scalar). x = n ln2 + r with |r| <= ln2/2 (ln2 split in two, Cody-Waite),
// e^r by the Cephes expf polynomial, 2^n built in the exponent bits: within 1 ulp of expf on
// [-87.3, 0] (measured max 0.7 ulp). The arguments here are z - max and log p, <= 0 up to
// rounding. Below -87.3365 it returns 0 where expf returns denormals (< 1.2e-38, nothing next
// to the max term 1); NaN gives NaN; above 88 it saturates at ~1.7e38 instead of inf.
SLIME_RL_INLINE float exp_fast(float x) {
  constexpr int32_t kLoAbs = 0x42aeac4a;  // bits of 87.3365f: e^-87.3365 ~ FLT_MIN
  constexpr int32_t kHiAbs = 0x42b00000;  // bits of 88.0f
  const int32_t xi = float_bits(x);
  const int32_t ax = xi & 0x7fffffff;
  const int32_t under = -static_cast<int32_t>((xi < 0) & (ax > kLoAbs));  // all ones: x < -87.34 or -NaN
  const int32_t over = -static_cast<int32_t>((xi >= 0) & (ax > kHiAbs));  // all ones: x > 88 or +NaN
  const float xc = bits_float((under & (kLoAbs | INT32_MIN)) | (over & kHiAbs) | (~(under | over) & xi));
  const float n = (xc * 1.44269504f + 12582912.0f) - 12582912.0f;  // round(x / ln2): 1.5 * 2^23 trick
  const float r = (xc - n * 0.693359375f) - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float e_r = p * r * r + r + 1.0f;
  const int32_t two_n = (static_cast<int32_t>(n) + 127) << 23;  // n in [-126, 127]
  const int32_t y = float_bits(e_r * bits_float(two_n));
  const int32_t nan = -static_cast<int32_t>(ax > 0x7f800000);
  return bits_float((nan & 0x7fc00000) | (~nan & ~under & y));
}
SLIME_RL_INLINE double exp_fast(double x) { return std::exp(x); }

// max(x, -1e4), NaN kept: for the exponents here (z - m, log p) e^x is exactly 0 below -1e4 (below
// -87.4 for exp_fast, -745 for double exp), so e^x * floor_exponent(x) is e^x * x, except for
// x = -inf (a -inf logit, a masked vocabulary entry: probability 0), where it is 0 instead of NaN,
// also after a multiplication by a large gradient. Float: integer selects, so the loops still
// vectorize (see exp_fast).
SLIME_RL_INLINE float floor_exponent(float x) {
  constexpr int32_t kFloorAbs = 0x461c4000;  // bits of 1e4f
  const int32_t xi = float_bits(x);
  const int32_t ax = xi & 0x7fffffff;
  const int32_t low = -static_cast<int32_t>((xi < 0) & (ax > kFloorAbs) & (ax <= 0x7f800000));
  return bits_float((low & (kFloorAbs | INT32_MIN)) | (~low & xi));
}
SLIME_RL_INLINE double floor_exponent(double x) { return x < -1e4 ? -1e4 : x; }

// The online-softmax state of one token: (max m, sum_j e^(z_j - m), sum_j e^(z_j - m)(z_j - m)).
template <typename acc_t>
struct RowPieces {
  acc_t max;
  acc_t sum;
  acc_t sum_z;
};

// Folds z_j = x_j * inv_t (j < n) into p. A larger max rescales what was summed:
// s' = s e^d, u' = e^d (u + s d) with d = m_old - m_new <= 0.
template <typename in_t, typename acc_t>
SLIME_RL_INLINE void fold_row(const in_t* x, int64_t n, acc_t inv_t, RowPieces<acc_t>& p) {
  acc_t chunk_max = neg_inf<acc_t>();
#pragma omp simd reduction(max : chunk_max)
  for (int64_t j = 0; j < n; ++j) chunk_max = std::max(chunk_max, static_cast<acc_t>(x[j]) * inv_t);
  if (chunk_max == neg_inf<acc_t>()) return;  // all -inf: adds nothing (and m - m would be NaN)
  if (chunk_max > p.max) {
    if (p.sum > 0) {
      const acc_t d = p.max - chunk_max;
      const acc_t a = std::exp(d);
      p.sum_z = a * (p.sum_z + p.sum * d);
      p.sum *= a;
    }
    p.max = chunk_max;
  }
  const acc_t m = p.max;
  acc_t s = 0, u = 0;
#pragma omp simd reduction(+ : s, u)
  for (int64_t j = 0; j < n; ++j) {
    const acc_t d = static_cast<acc_t>(x[j]) * inv_t - m;
    const acc_t e = exp_fast(d);
    s += e;
    u += e * floor_exponent(d);
  }
  p.sum += s;
  p.sum_z += u;
}

// Per-token scalars of the backward.
template <typename acc_t>
struct RowGrad {
  acc_t lse;      // global log-sum-exp of z
  acc_t g_lp;     // d loss / d logprob
  acc_t g_ent;    // d loss / d entropy
  acc_t entropy;  // global entropy (used only with g_ent)
};

// out_j = [g_lp (onehot_j - p_j) - g_ent p_j (log p_j + H)] * inv_t, p_j = e^(x_j inv_t - lse),
// onehot at column target_col (< 0: not in this row). out may alias x.
template <typename in_t, typename out_t, typename acc_t>
SLIME_RL_INLINE void grad_row(const in_t* x, out_t* out, int64_t n, acc_t inv_t, RowGrad<acc_t> g,
                              int64_t target_col) {
  if (g.g_lp == 0 && g.g_ent == 0) {  // a masked token: no gradient, no exp
    std::fill(out, out + n, static_cast<out_t>(0));
    return;
  }
  const bool has_target = target_col >= 0 && target_col < n;
  const acc_t x_target = has_target ? static_cast<acc_t>(x[target_col]) : acc_t(0);  // before out overwrites it
  // -p (g_lp + g_ent (log p + H)) = -p (c + g_ent log p)
  const acc_t c = g.g_lp + g.g_ent * g.entropy;
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const acc_t logp = static_cast<acc_t>(x[j]) * inv_t - g.lse;
    out[j] = static_cast<out_t>(-exp_fast(logp) * (c + g.g_ent * floor_exponent(logp)) * inv_t);
  }
  if (has_target) {  // in acc_t, so a bf16 output is rounded once
    const acc_t logp = x_target * inv_t - g.lse;
    const acc_t softmax_term = exp_fast(logp) * (c + g.g_ent * floor_exponent(logp));
    out[target_col] = static_cast<out_t>((g.g_lp - softmax_term) * inv_t);
  }
}

// The hot float loops, compiled per ISA; other types use the templates directly.
SLIME_RL_CLONES void fold_row_f32(const float* x, int64_t n, float inv_t, RowPieces<float>& p) {
  fold_row<float, float>(x, n, inv_t, p);
}
SLIME_RL_CLONES void grad_row_f32(const float* x, float* out, int64_t n, float inv_t, RowGrad<float> g,
                                  int64_t target_col) {
  grad_row<float, float, float>(x, out, n, inv_t, g, target_col);
}

template <typename in_t, typename acc_t>
void fold_pieces(const in_t* x, int64_t n, acc_t inv_t, RowPieces<acc_t>& p) {
  if constexpr (std::is_same_v<in_t, float> && std::is_same_v<acc_t, float>) {
    fold_row_f32(x, n, inv_t, p);
  } else {
    fold_row<in_t, acc_t>(x, n, inv_t, p);
  }
}

template <typename in_t, typename out_t, typename acc_t>
void write_grad(const in_t* x, out_t* out, int64_t n, acc_t inv_t, RowGrad<acc_t> g, int64_t target_col) {
  if constexpr (std::is_same_v<in_t, float> && std::is_same_v<out_t, float> && std::is_same_v<acc_t, float>) {
    grad_row_f32(x, out, n, inv_t, g, target_col);
  } else {
    grad_row<in_t, out_t, acc_t>(x, out, n, inv_t, g, target_col);
  }
}

// --- vocab-major tiles (the linear variants) -------------------------------------------------------
//
// A tile holds zT[j * ld + i], the logit (before 1 / temperature) of vocab row v0 + j for token
// t0 + i, computed as W_chunk @ hidden_chunk^T: BLAS ran this layout ~20% faster than
// hidden_chunk @ W_chunk^T for these shapes (MKL, 2-core AMD dev machine, measured). The
// per-token loops run along i, contiguous, so they vectorize across tokens; each parallel task
// owns a range of tokens (columns). Sums accumulate in double: a token sums ~V terms one after
// another, which in fp32 would cost ~sqrt(V) ulps.

// Online-softmax fold of a tile into tokens [0, n) of a task (pointers offset to its first token).
// tile_max: scratch of n elements.
template <typename acc_t>
SLIME_RL_INLINE void fold_tile(const acc_t* zT, int64_t ld, int64_t vc, int64_t n, acc_t inv_t, acc_t* max,
                               double* sum, double* sum_z, acc_t* tile_max) {
  for (int64_t i = 0; i < n; ++i) tile_max[i] = neg_inf<acc_t>();
  for (int64_t j = 0; j < vc; ++j) {
    const acc_t* z = zT + j * ld;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) tile_max[i] = std::max(tile_max[i], z[i] * inv_t);
  }
  for (int64_t i = 0; i < n; ++i) {  // a larger max rescales what was summed: s' = s e^d, u' = e^d (u + s d)
    if (tile_max[i] > max[i]) {
      if (sum[i] > 0) {
        const double d = static_cast<double>(max[i]) - static_cast<double>(tile_max[i]);
        const double a = std::exp(d);
        sum_z[i] = a * (sum_z[i] + sum[i] * d);
        sum[i] *= a;
      }
      max[i] = tile_max[i];
    }
  }
  for (int64_t j = 0; j < vc; ++j) {
    const acc_t* z = zT + j * ld;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      const acc_t d = z[i] * inv_t - max[i];
      const acc_t e = exp_fast(d);
      sum[i] += static_cast<double>(e);
      sum_z[i] += static_cast<double>(e * d);
    }
  }
}

// In place, z -> dz / temperature for tokens [0, n) of a task, without the one-hot term:
// -p (c + g_ent log p) inv_t with p = e^(z inv_t - lse), c = g_lp + g_ent H (per token).
template <typename acc_t>
SLIME_RL_INLINE void grad_tile(acc_t* zT, int64_t ld, int64_t vc, int64_t n, acc_t inv_t, const acc_t* lse,
                               const acc_t* c, const acc_t* g_ent) {
  for (int64_t j = 0; j < vc; ++j) {
    acc_t* z = zT + j * ld;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      const acc_t logp = z[i] * inv_t - lse[i];
      z[i] = -exp_fast(logp) * (c[i] + g_ent[i] * logp) * inv_t;
    }
  }
}

SLIME_RL_CLONES void fold_tile_f32(const float* zT, int64_t ld, int64_t vc, int64_t n, float inv_t, float* max,
                                   double* sum, double* sum_z, float* tile_max) {
  fold_tile<float>(zT, ld, vc, n, inv_t, max, sum, sum_z, tile_max);
}
SLIME_RL_CLONES void grad_tile_f32(float* zT, int64_t ld, int64_t vc, int64_t n, float inv_t, const float* lse,
                                   const float* c, const float* g_ent) {
  grad_tile<float>(zT, ld, vc, n, inv_t, lse, c, g_ent);
}

template <typename acc_t>
void fold_tile_any(const acc_t* zT, int64_t ld, int64_t vc, int64_t n, acc_t inv_t, acc_t* max, double* sum,
                   double* sum_z, acc_t* tile_max) {
  if constexpr (std::is_same_v<acc_t, float>) {
    fold_tile_f32(zT, ld, vc, n, inv_t, max, sum, sum_z, tile_max);
  } else {
    fold_tile<acc_t>(zT, ld, vc, n, inv_t, max, sum, sum_z, tile_max);
  }
}

template <typename acc_t>
void grad_tile_any(acc_t* zT, int64_t ld, int64_t vc, int64_t n, acc_t inv_t, const acc_t* lse, const acc_t* c,
                   const acc_t* g_ent) {
  if constexpr (std::is_same_v<acc_t, float>) {
    grad_tile_f32(zT, ld, vc, n, inv_t, lse, c, g_ent);
  } else {
    grad_tile<acc_t>(zT, ld, vc, n, inv_t, lse, c, g_ent);
  }
}

// --- backward inputs -----------------------------------------------------------------------------
// (argument checks: csrc/common/fused_logprob_args.h, shared with the CUDA glue)

using checks::inverse_temperature;

// Per-token backward inputs, read by the row loops.
template <typename acc_t>
struct GradInputs {
  const acc_t* lse = nullptr;
  const acc_t* entropy = nullptr;
  const acc_t* g_lp = nullptr;
  const acc_t* g_ent = nullptr;
  RowGrad<acc_t> at(int64_t t) const {
    return {lse[t], g_lp ? g_lp[t] : acc_t(0), g_ent ? g_ent[t] : acc_t(0), g_ent ? entropy[t] : acc_t(0)};
  }
};

// The checked, converted backward inputs (kept alive while the loops read them), with the
// CPU kernel's accessors.
struct GradTensors : checks::GradArgs {
  GradTensors() = default;
  GradTensors(const char* op, const at::Tensor& lse_T, const std::optional<at::Tensor>& entropy_T,
              const std::optional<at::Tensor>& grad_logprob_T, const std::optional<at::Tensor>& grad_entropy_T,
              int64_t T, at::ScalarType acc_type)
      : GradArgs(op, lse_T, entropy_T, grad_logprob_T, grad_entropy_T, T, acc_type, at::Device(at::kCPU)) {}
  // Bool [T]: tokens with a nonzero output gradient (NaN counts); needs any_grad().
  at::Tensor active() const {
    if (!g_ent.defined()) return g_lp.ne(0);
    return g_lp.defined() ? g_lp.ne(0).logical_or(g_ent.ne(0)) : g_ent.ne(0);
  }
  GradTensors rows(const at::Tensor& index) const {
    const auto pick = [&](const at::Tensor& t) { return t.defined() ? t.index_select(0, index) : t; };
    GradTensors out;
    out.lse = pick(lse), out.entropy = pick(entropy), out.g_lp = pick(g_lp), out.g_ent = pick(g_ent);
    return out;
  }
  template <typename acc_t>
  GradInputs<acc_t> pointers() const {
    const auto ptr = [](const at::Tensor& t) { return t.defined() ? t.const_data_ptr<acc_t>() : nullptr; };
    return {ptr(lse), ptr(entropy), ptr(g_lp), ptr(g_ent)};
  }
};

using Pieces4 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// Four [T] outputs of the forward: max -inf, the sums 0 (the answer when n_valid == 0).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> empty_pieces(int64_t T, at::ScalarType acc_type) {
  const auto opts = at::TensorOptions().dtype(acc_type);
  return {at::full({T}, -std::numeric_limits<double>::infinity(), opts), at::zeros({T}, opts),
          at::zeros({T}, opts), at::zeros({T}, opts)};
}

// Rows [v0, v0 + vc) of weight in acc_t: a view for fp32/fp64, else converted into buf.
at::Tensor weight_chunk(const at::Tensor& weight_VH, at::Tensor& buf_CH, int64_t v0, int64_t vc) {
  const at::Tensor rows = weight_VH.narrow(0, v0, vc);
  if (!buf_CH.defined()) return rows;
  return buf_CH.narrow(0, 0, vc).copy_(rows);
}

// --- the linear variants -------------------------------------------------------------------------

constexpr int64_t kTokenGrain = 64;  // tokens per parallel task over a tile (columns)

template <typename scalar_t>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_forward_impl(
    const at::Tensor& hidden_TH, const at::Tensor& weight_VH, const at::Tensor& targets_T, int64_t vocab_start,
    int64_t n_valid, double temperature, int64_t chunk_tokens, int64_t chunk_vocab) {
  using acc_t = at::opmath_type<scalar_t>;
  const at::ScalarType acc_type = c10::CppTypeToScalarType<acc_t>::value;
  const int64_t T = hidden_TH.size(0), H = hidden_TH.size(1);
  Pieces4 pieces = empty_pieces(T, acc_type);
  if (T == 0 || n_valid == 0) return pieces;
  acc_t* max_T = std::get<0>(pieces).mutable_data_ptr<acc_t>();
  acc_t* target_T = std::get<3>(pieces).mutable_data_ptr<acc_t>();  // z of the target, then minus max
  std::vector<double> sum_T(T, 0.0), sum_z_T(T, 0.0);
  const int64_t* targets = targets_T.const_data_ptr<int64_t>();
  const acc_t inv_t = inverse_temperature<acc_t>(temperature);

  const at::Tensor h_TH = hidden_TH.to(acc_type);  // a copy only for bf16/fp16
  const int64_t ct = std::min(chunk_tokens, T), cv = std::min(chunk_vocab, n_valid);
  const auto opts = at::TensorOptions().dtype(acc_type);
  at::Tensor tile_buf = at::empty({cv * ct}, opts);
  at::Tensor w_buf_CH = std::is_same_v<scalar_t, acc_t> ? at::Tensor() : at::empty({cv, H}, opts);
  for (int64_t v0 = 0; v0 < n_valid; v0 += cv) {
    const int64_t vc = std::min(cv, n_valid - v0);
    const at::Tensor w_CH = weight_chunk(weight_VH, w_buf_CH, v0, vc);
    for (int64_t t0 = 0; t0 < T; t0 += ct) {
      const int64_t tc = std::min(ct, T - t0);
      at::Tensor tile_VT = tile_buf.narrow(0, 0, vc * tc).view({vc, tc});
      at::mm_out(tile_VT, w_CH, h_TH.narrow(0, t0, tc).t());
      const acc_t* z = tile_VT.const_data_ptr<acc_t>();
      at::parallel_for(0, tc, kTokenGrain, [&](int64_t begin, int64_t end) {
        std::vector<acc_t> tile_max(end - begin);
        fold_tile_any<acc_t>(z + begin, tc, vc, end - begin, inv_t, max_T + t0 + begin, sum_T.data() + t0 + begin,
                             sum_z_T.data() + t0 + begin, tile_max.data());
        for (int64_t i = begin; i < end; ++i) {
          const int64_t col = targets[t0 + i] - vocab_start - v0;
          if (col >= 0 && col < vc) target_T[t0 + i] = z[col * tc + i] * inv_t;
        }
      });
    }
  }
  acc_t* out_sum_T = std::get<1>(pieces).mutable_data_ptr<acc_t>();
  acc_t* out_sum_z_T = std::get<2>(pieces).mutable_data_ptr<acc_t>();
  for (int64_t t = 0; t < T; ++t) {
    out_sum_T[t] = static_cast<acc_t>(sum_T[t]);
    out_sum_z_T[t] = static_cast<acc_t>(sum_z_T[t]);
    const int64_t local = targets[t] - vocab_start;
    target_T[t] = (local >= 0 && local < n_valid) ? target_T[t] - max_T[t] : acc_t(0);
  }
  return pieces;
}

template <typename scalar_t>
std::tuple<at::Tensor, at::Tensor> linear_backward_impl(const at::Tensor& hidden_TH, const at::Tensor& weight_VH,
                                                        const at::Tensor& targets_T, const GradTensors& grads,
                                                        int64_t vocab_start, int64_t n_valid, double temperature,
                                                        int64_t chunk_tokens, int64_t chunk_vocab) {
  using acc_t = at::opmath_type<scalar_t>;
  const at::ScalarType acc_type = c10::CppTypeToScalarType<acc_t>::value;
  const int64_t T = hidden_TH.size(0), H = hidden_TH.size(1);
  const auto opts = at::TensorOptions().dtype(acc_type);
  at::Tensor grad_weight_VH = at::zeros(weight_VH.sizes(), weight_VH.options());  // padding rows stay 0
  at::Tensor grad_hidden_TH = at::zeros({T, H}, opts);  // summed over vocab chunks in acc_t
  if (T == 0 || n_valid == 0 || !grads.any_grad()) {
    return {grad_hidden_TH.to(hidden_TH.scalar_type()), grad_weight_VH};
  }
  // Per token: g_lp, g_ent (0 when absent) and c = g_lp + g_ent H.
  const at::Tensor zero_T = at::zeros({T}, opts);
  const at::Tensor g_lp_T = grads.g_lp.defined() ? grads.g_lp : zero_T;
  const at::Tensor g_ent_T = grads.g_ent.defined() ? grads.g_ent : zero_T;
  const at::Tensor c_T = grads.g_ent.defined() ? g_lp_T + g_ent_T * grads.entropy : g_lp_T;
  const acc_t* lse = grads.lse.const_data_ptr<acc_t>();
  const acc_t* g_lp = g_lp_T.const_data_ptr<acc_t>();
  const acc_t* g_ent = g_ent_T.const_data_ptr<acc_t>();
  const acc_t* c = c_T.const_data_ptr<acc_t>();
  const int64_t* targets = targets_T.const_data_ptr<int64_t>();
  const acc_t inv_t = inverse_temperature<acc_t>(temperature);

  const at::Tensor h_TH = hidden_TH.to(acc_type);
  const int64_t ct = std::min(chunk_tokens, T), cv = std::min(chunk_vocab, n_valid);
  constexpr bool kUpcast = !std::is_same_v<scalar_t, acc_t>;
  at::Tensor tile_buf = at::empty({cv * ct}, opts);
  at::Tensor w_buf_CH = kUpcast ? at::empty({cv, H}, opts) : at::Tensor();
  at::Tensor gw_buf_CH = kUpcast ? at::empty({cv, H}, opts) : at::Tensor();
  for (int64_t v0 = 0; v0 < n_valid; v0 += cv) {
    const int64_t vc = std::min(cv, n_valid - v0);
    const at::Tensor w_CH = weight_chunk(weight_VH, w_buf_CH, v0, vc);
    // grad_weight rows of this chunk, summed over token chunks (in acc_t, then cast once).
    at::Tensor gw_CH = kUpcast ? gw_buf_CH.narrow(0, 0, vc) : grad_weight_VH.narrow(0, v0, vc);
    for (int64_t t0 = 0; t0 < T; t0 += ct) {
      const int64_t tc = std::min(ct, T - t0);
      const at::Tensor h_CH = h_TH.narrow(0, t0, tc);
      at::Tensor tile_VT = tile_buf.narrow(0, 0, vc * tc).view({vc, tc});
      at::mm_out(tile_VT, w_CH, h_CH.t());
      acc_t* z = tile_VT.mutable_data_ptr<acc_t>();
      at::parallel_for(0, tc, kTokenGrain, [&](int64_t begin, int64_t end) {
        // The one-hot term needs the target's logit, which grad_tile overwrites: read it first.
        std::vector<acc_t> z_target(end - begin);
        for (int64_t i = begin; i < end; ++i) {
          const int64_t col = targets[t0 + i] - vocab_start - v0;
          if (col >= 0 && col < vc) z_target[i - begin] = z[col * tc + i];
        }
        const int64_t t = t0 + begin;
        grad_tile_any<acc_t>(z + begin, tc, vc, end - begin, inv_t, lse + t, c + t, g_ent + t);
        for (int64_t i = begin; i < end; ++i) {
          const int64_t col = targets[t0 + i] - vocab_start - v0;
          if (col < 0 || col >= vc) continue;
          const acc_t logp = z_target[i - begin] * inv_t - lse[t0 + i];
          z[col * tc + i] = (g_lp[t0 + i] - exp_fast(logp) * (c[t0 + i] + g_ent[t0 + i] * logp)) * inv_t;
        }
      });
      grad_hidden_TH.narrow(0, t0, tc).addmm_(tile_VT.t(), w_CH);
      if (t0 == 0) {
        at::mm_out(gw_CH, tile_VT, h_CH);
      } else {
        gw_CH.addmm_(tile_VT, h_CH);
      }
    }
    if (kUpcast) grad_weight_VH.narrow(0, v0, vc).copy_(gw_CH);
  }
  return {grad_hidden_TH.to(hidden_TH.scalar_type()), grad_weight_VH};
}

// --- the logits variants -------------------------------------------------------------------------

template <typename scalar_t>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> logits_forward_impl(const at::Tensor& logits_TV,
                                                                               const at::Tensor& targets_T,
                                                                               int64_t vocab_start, int64_t n_valid,
                                                                               double temperature) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t T = logits_TV.size(0), ld = logits_TV.stride(0);
  Pieces4 pieces = empty_pieces(T, c10::CppTypeToScalarType<acc_t>::value);
  if (T == 0 || n_valid == 0) return pieces;
  acc_t* max_T = std::get<0>(pieces).mutable_data_ptr<acc_t>();
  acc_t* sum_T = std::get<1>(pieces).mutable_data_ptr<acc_t>();
  acc_t* sum_z_T = std::get<2>(pieces).mutable_data_ptr<acc_t>();
  acc_t* target_T = std::get<3>(pieces).mutable_data_ptr<acc_t>();
  const scalar_t* logits = logits_TV.const_data_ptr<scalar_t>();
  const int64_t* targets = targets_T.const_data_ptr<int64_t>();
  const acc_t inv_t = inverse_temperature<acc_t>(temperature);
  at::parallel_for(0, T, row_grain(n_valid), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const scalar_t* row = logits + t * ld;
      RowPieces<acc_t> p{neg_inf<acc_t>(), acc_t(0), acc_t(0)};
      for (int64_t c0 = 0; c0 < n_valid; c0 += kRowChunk) {
        fold_pieces(row + c0, std::min(kRowChunk, n_valid - c0), inv_t, p);
      }
      max_T[t] = p.max;
      sum_T[t] = p.sum;
      sum_z_T[t] = p.sum_z;
      const int64_t local = targets[t] - vocab_start;
      const bool owned = local >= 0 && local < n_valid;
      // a row of -inf only (max -inf): the target's logit is -inf too
      target_T[t] = !owned                        ? acc_t(0)
                    : p.max == neg_inf<acc_t>() ? p.max
                                                : static_cast<acc_t>(row[local]) * inv_t - p.max;
    }
  });
  return pieces;
}

template <typename scalar_t>
at::Tensor logits_backward_impl(const at::Tensor& logits_TV, const at::Tensor& targets_T, const GradTensors& grads,
                                int64_t vocab_start, int64_t n_valid, double temperature) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t T = logits_TV.size(0), v_local = logits_TV.size(1), ld = logits_TV.stride(0);
  if (!grads.any_grad()) return at::zeros({T, v_local}, logits_TV.options());
  at::Tensor grad_TV = at::empty({T, v_local}, logits_TV.options());
  if (T == 0) return grad_TV;
  const GradInputs<acc_t> in = grads.pointers<acc_t>();
  const scalar_t* logits = logits_TV.const_data_ptr<scalar_t>();
  scalar_t* out = grad_TV.mutable_data_ptr<scalar_t>();
  const int64_t* targets = targets_T.const_data_ptr<int64_t>();
  const acc_t inv_t = inverse_temperature<acc_t>(temperature);
  at::parallel_for(0, T, row_grain(v_local), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      scalar_t* out_row = out + t * v_local;
      const int64_t local = targets[t] - vocab_start;
      if (n_valid > 0) write_grad(logits + t * ld, out_row, n_valid, inv_t, in.at(t), local < n_valid ? local : -1);
      std::fill(out_row + n_valid, out_row + v_local, static_cast<scalar_t>(0));  // padding
    }
  });
  return grad_TV;
}

// 2-D with unit column stride (rows may be strided, e.g. a slice of a wider buffer).
at::Tensor unit_column_stride(const at::Tensor& x_TV) {
  return (x_TV.size(1) <= 1 || x_TV.stride(1) == 1) && x_TV.stride(0) >= x_TV.size(1) ? x_TV : x_TV.contiguous();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_logprob_forward_cpu(
    const at::Tensor& hidden_TH, const at::Tensor& weight_VH, const at::Tensor& targets_T, int64_t vocab_start,
    int64_t n_valid, double temperature, int64_t chunk_tokens, int64_t chunk_vocab) {
  constexpr const char* op = "slime_rl::linear_logprob_forward";
  checks::linear_args(op, hidden_TH, weight_VH, targets_T, vocab_start, n_valid, temperature, chunk_tokens, chunk_vocab,
                      c10::DeviceType::CPU);
  const at::Tensor hidden = hidden_TH.contiguous(), weight = weight_VH.contiguous();
  const at::Tensor targets = targets_T.to(at::kLong).contiguous();
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, hidden.scalar_type(), op, [&] {
    out = linear_forward_impl<scalar_t>(hidden, weight, targets, vocab_start, n_valid, temperature, chunk_tokens,
                                        chunk_vocab);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> linear_logprob_backward_cpu(
    const at::Tensor& hidden_TH, const at::Tensor& weight_VH, const at::Tensor& targets_T, const at::Tensor& lse_T,
    const std::optional<at::Tensor>& entropy_T, const std::optional<at::Tensor>& grad_logprob_T,
    const std::optional<at::Tensor>& grad_entropy_T, int64_t vocab_start, int64_t n_valid, double temperature,
    int64_t chunk_tokens, int64_t chunk_vocab) {
  constexpr const char* op = "slime_rl::linear_logprob_backward";
  checks::linear_args(op, hidden_TH, weight_VH, targets_T, vocab_start, n_valid, temperature, chunk_tokens, chunk_vocab,
                      c10::DeviceType::CPU);
  const at::Tensor hidden = hidden_TH.contiguous(), weight = weight_VH.contiguous();
  const at::Tensor targets = targets_T.to(at::kLong).contiguous();
  const GradTensors grads(op, lse_T, entropy_T, grad_logprob_T, grad_entropy_T, hidden.size(0),
                          at::toOpMathType(hidden.scalar_type()));
  const auto run = [&](const at::Tensor& h_TH, const at::Tensor& t_T, const GradTensors& g) {
    std::tuple<at::Tensor, at::Tensor> out;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h_TH.scalar_type(), op, [&] {
      out = linear_backward_impl<scalar_t>(h_TH, weight, t_T, g, vocab_start, n_valid, temperature, chunk_tokens,
                                           chunk_vocab);
    });
    return out;
  };
  if (grads.any_grad()) {
    // Masked tokens (prompt, padding: both output grads 0) contribute nothing: drop them before
    // the GEMMs, which then run on the active rows only.
    const at::Tensor rows = grads.active().nonzero().squeeze(1);
    if (rows.numel() < hidden.size(0)) {
      auto [grad_active_TH, grad_weight_VH] =
          run(hidden.index_select(0, rows), targets.index_select(0, rows), grads.rows(rows));
      return {at::zeros_like(hidden).index_copy_(0, rows, grad_active_TH), grad_weight_VH};
    }
  }
  return run(hidden, targets, grads);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> logits_logprob_forward_cpu(
    const at::Tensor& logits_TV, const at::Tensor& targets_T, int64_t vocab_start, int64_t n_valid,
    double temperature) {
  constexpr const char* op = "slime_rl::logits_logprob_forward";
  checks::logits_args(op, logits_TV, targets_T, vocab_start, n_valid, temperature, c10::DeviceType::CPU);
  const at::Tensor logits = unit_column_stride(logits_TV);
  const at::Tensor targets = targets_T.to(at::kLong).contiguous();
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), op, [&] {
    out = logits_forward_impl<scalar_t>(logits, targets, vocab_start, n_valid, temperature);
  });
  return out;
}

at::Tensor logits_logprob_backward_cpu(const at::Tensor& logits_TV, const at::Tensor& targets_T,
                                       const at::Tensor& lse_T, const std::optional<at::Tensor>& entropy_T,
                                       const std::optional<at::Tensor>& grad_logprob_T,
                                       const std::optional<at::Tensor>& grad_entropy_T, int64_t vocab_start,
                                       int64_t n_valid, double temperature) {
  constexpr const char* op = "slime_rl::logits_logprob_backward";
  checks::logits_args(op, logits_TV, targets_T, vocab_start, n_valid, temperature, c10::DeviceType::CPU);
  const at::Tensor logits = unit_column_stride(logits_TV);
  const at::Tensor targets = targets_T.to(at::kLong).contiguous();
  const GradTensors grads(op, lse_T, entropy_T, grad_logprob_T, grad_entropy_T, logits.size(0),
                          at::toOpMathType(logits.scalar_type()));
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), op, [&] {
    out = logits_backward_impl<scalar_t>(logits, targets, grads, vocab_start, n_valid, temperature);
  });
  return out;
}

TORCH_LIBRARY_IMPL(slime_rl, CPU, m) {
  m.impl("linear_logprob_forward", &linear_logprob_forward_cpu);
  m.impl("linear_logprob_backward", &linear_logprob_backward_cpu);
  m.impl("logits_logprob_forward", &logits_logprob_forward_cpu);
  m.impl("logits_logprob_backward", &logits_logprob_backward_cpu);
}

}  // namespace slime_rl
