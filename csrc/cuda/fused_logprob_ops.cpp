// Torch glue for the CUDA fused (linear +) logprob + entropy ops (row kernels:
// fused_logprob.cu): checks, device guard, current stream, the token x vocab tiling with its
// GEMMs, dtype dispatch, registration. Compiled only in CUDA builds (setup.py CUDAExtension,
// the JIT loader with a CUDA torch, CMake with SLIME_RL_WITH_CUDA=ON).
//
// The linear variants walk over z = hidden @ weight^T in chunk_tokens x chunk_vocab tiles,
// vocab chunks outside and token chunks inside (a weight chunk stays in L2 across the token
// chunks), and hold one tile of z at a time:
//   forward:  tile = hidden[t-chunk] @ W[v-chunk]^T (cuBLAS), then fold_softmax_pieces merges
//             the tile into the running per-token pieces;
//   backward: the tile is recomputed, logprob_grad turns it into dz, then
//             grad_hidden[t-chunk] += dz @ W[v-chunk] and grad_weight[v-chunk] += dz^T @ hidden[t-chunk].
// Precision, for bf16/fp16 inputs: every GEMM runs on the 16-bit operands with fp32
// accumulation and writes fp32 (torch's out_dtype GEMMs, torch >= 2.8), so z and the running
// gradient sums are fp32 like the reference's (which upcasts and keeps full logits). dz is
// rounded to the input dtype once, to be a GEMM operand: the same rounding plain torch
// autograd applies to its grad_logits, and within the tolerance rule of
// tests/test_fused_logprob.py. fp32 and fp64 inputs stay in their dtype throughout (dz in
// place in the tile). Extra memory: one fp32 tile (plus a 16-bit dz tile), a fp32 [T, H]
// grad_hidden sum and a fp32 [chunk_vocab, H] grad_weight sum for 16-bit inputs.
// The logits variants run the row kernels over the given logits directly.

#include "fused_logprob.h"
#include "glue.h"

#include "../common/fused_logprob_args.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>
#include <torch/version.h>

#include <algorithm>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>
#include <utility>

// GEMMs with 16-bit inputs and an fp32 output (aten::mm.dtype_out, aten::baddbmm.dtype_out).
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 8)
#define SLIME_RL_HAS_OUT_DTYPE_GEMM 1
#else
#define SLIME_RL_HAS_OUT_DTYPE_GEMM 0
#endif

namespace slime_rl {
namespace {

using Pieces4 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

using cuda_glue::check_launch;
using cuda_glue::CudaType;
using checks::inverse_temperature;

at::ScalarType acc_type_of(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// out = a @ b, or out += a @ b when accumulate; out is fp32 (fp64 for fp64 inputs), a and b are
// in the input dtype. 16-bit inputs: cuBLAS with fp32 accumulation and fp32 output, so nothing
// is rounded to 16 bits (torch < 2.8 lacks those GEMMs: upcast copies, fp32 GEMMs).
void gemm_into(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, bool accumulate) {
  if (a.scalar_type() == out.scalar_type()) {
    if (accumulate) {
      out.addmm_(a, b);
    } else {
      at::mm_out(out, a, b);
    }
    return;
  }
#if SLIME_RL_HAS_OUT_DTYPE_GEMM
  if (!accumulate) {
    at::mm_out(out, a, b, out.scalar_type());
    return;
  }
  // addmm's out_dtype overload wants a 16-bit `self`; baddbmm's accumulates into its fp32 out.
  at::Tensor out_1MN = out.unsqueeze(0);
  at::baddbmm_out(out_1MN, out_1MN, a.unsqueeze(0), b.unsqueeze(0), out.scalar_type());
#else
  const at::Tensor a_acc = a.to(out.scalar_type());
  const at::Tensor b_acc = b.to(out.scalar_type());
  if (accumulate) {
    out.addmm_(a_acc, b_acc);
  } else {
    at::mm_out(out, a_acc, b_acc);
  }
#endif
}

// --- backward inputs (argument checks: csrc/common/fused_logprob_args.h) ----------------------------

// The checked, converted per-token inputs of the backward, with row pointers for the kernels.
struct GradTensors : checks::GradArgs {
  using GradArgs::GradArgs;

  // Pointers to rows [t0, ...).
  template <typename A>
  cuda::GradRows<A> rows_from(int64_t t0) const {
    const auto ptr = [t0](const at::Tensor& t) { return t.defined() ? t.const_data_ptr<A>() + t0 : nullptr; };
    return {ptr(lse), ptr(entropy), ptr(g_lp), ptr(g_ent)};
  }
};

// The launches index rows with int.
void check_rows(const char* op, const at::Tensor& x_TX) {
  TORCH_CHECK(x_TX.size(0) <= std::numeric_limits<int>::max(), op, ": at most 2^31 - 1 rows, got ", x_TX.size(0));
}

// Four [T] pieces: uninitialized (the kernels write every row), or the answer for an empty
// vocab slice (max -inf, the sums 0).
Pieces4 new_pieces(int64_t T, const at::TensorOptions& opts, bool empty_slice) {
  if (empty_slice) {
    return {at::full({T}, -std::numeric_limits<double>::infinity(), opts), at::zeros({T}, opts),
            at::zeros({T}, opts), at::zeros({T}, opts)};
  }
  return {at::empty({T}, opts), at::empty({T}, opts), at::empty({T}, opts), at::empty({T}, opts)};
}

template <typename A>
cuda::Pieces<A> pieces_from(Pieces4& p, int64_t t0) {
  return {std::get<0>(p).mutable_data_ptr<A>() + t0, std::get<1>(p).mutable_data_ptr<A>() + t0,
          std::get<2>(p).mutable_data_ptr<A>() + t0, std::get<3>(p).mutable_data_ptr<A>() + t0};
}

// --- the linear variants -------------------------------------------------------------------------

// A: the accumulation type, float or double (the tiles of z are in A whatever the input dtype).
template <typename A>
void linear_forward_tiles(const char* op, const at::Tensor& hidden_TH, const at::Tensor& weight_VH,
                          const at::Tensor& targets_T, int64_t vocab_start, int64_t n_valid, double temperature,
                          int64_t chunk_tokens, int64_t chunk_vocab, Pieces4& pieces, cudaStream_t stream) {
  const int64_t T = hidden_TH.size(0);
  const int64_t ct = std::min(chunk_tokens, T), cv = std::min(chunk_vocab, n_valid);
  const A inv_t = inverse_temperature<A>(temperature);
  const int64_t* targets = targets_T.const_data_ptr<int64_t>();
  at::Tensor tile_buf = at::empty({ct * cv}, hidden_TH.options().dtype(c10::CppTypeToScalarType<A>::value));
  for (int64_t v0 = 0; v0 < n_valid; v0 += cv) {
    const int64_t vc = std::min(cv, n_valid - v0);
    const at::Tensor w_HC = weight_VH.narrow(0, v0, vc).t();
    for (int64_t t0 = 0; t0 < T; t0 += ct) {
      const int64_t tc = std::min(ct, T - t0);
      at::Tensor z_CC = tile_buf.narrow(0, 0, tc * vc).view({tc, vc});
      gemm_into(z_CC, hidden_TH.narrow(0, t0, tc), w_HC, /*accumulate=*/false);
      const cuda::TargetMap map{targets + t0, vocab_start + v0, vocab_start, vocab_start + n_valid};
      check_launch(op, cuda::launch_fold_softmax_pieces<A>(z_CC.const_data_ptr<A>(), vc, tc, vc, inv_t, map,
                                                          pieces_from<A>(pieces, t0), /*first=*/v0 == 0,
                                                          /*last=*/v0 + vc == n_valid, stream));
    }
  }
}

// in_t: the input type (CudaType of scalar_t); dz is written in in_t, in place in the tile for fp32/fp64.
template <typename in_t>
std::tuple<at::Tensor, at::Tensor> linear_backward_tiles(const char* op, const at::Tensor& hidden_TH,
                                                         const at::Tensor& weight_VH, const at::Tensor& targets_T,
                                                         const GradTensors& grads, int64_t vocab_start,
                                                         int64_t n_valid, double temperature, int64_t chunk_tokens,
                                                         int64_t chunk_vocab, cudaStream_t stream) {
  using A = typename cuda::AccOf<in_t>::type;
  constexpr bool kInPlace = std::is_same_v<in_t, A>;
  const int64_t num_tokens = hidden_TH.size(0), H = hidden_TH.size(1);
  const at::TensorOptions acc_opts = hidden_TH.options().dtype(c10::CppTypeToScalarType<A>::value);
  at::Tensor grad_weight_VH = at::zeros(weight_VH.sizes(), weight_VH.options());  // padding rows stay 0
  if (num_tokens == 0 || n_valid == 0 || !grads.any_grad()) {
    return {at::zeros({num_tokens, H}, hidden_TH.options()), grad_weight_VH};
  }
  const int64_t ct = std::min(chunk_tokens, num_tokens), cv = std::min(chunk_vocab, n_valid);
  const A inv_t = inverse_temperature<A>(temperature);
  const int64_t* targets = targets_T.const_data_ptr<int64_t>();
  at::Tensor grad_hidden_TH = at::empty({num_tokens, H}, acc_opts);  // summed over vocab chunks in A
  at::Tensor z_buf = at::empty({ct * cv}, acc_opts);
  at::Tensor dz_buf = kInPlace ? z_buf : at::empty({ct * cv}, hidden_TH.options());
  at::Tensor gw_buf_CH = kInPlace ? at::Tensor() : at::empty({cv, H}, acc_opts);
  for (int64_t v0 = 0; v0 < n_valid; v0 += cv) {
    const int64_t vc = std::min(cv, n_valid - v0);
    const at::Tensor w_CH = weight_VH.narrow(0, v0, vc);
    // This chunk's grad_weight rows, summed over token chunks in A (then cast once if 16-bit).
    at::Tensor gw_CH = kInPlace ? grad_weight_VH.narrow(0, v0, vc) : gw_buf_CH.narrow(0, 0, vc);
    for (int64_t t0 = 0; t0 < num_tokens; t0 += ct) {
      const int64_t tc = std::min(ct, num_tokens - t0);
      const at::Tensor h_CH = hidden_TH.narrow(0, t0, tc);
      at::Tensor z_CC = z_buf.narrow(0, 0, tc * vc).view({tc, vc});
      gemm_into(z_CC, h_CH, w_CH.t(), /*accumulate=*/false);
      at::Tensor dz_CC = dz_buf.narrow(0, 0, tc * vc).view({tc, vc});
      check_launch(op, cuda::launch_logprob_grad<A, in_t>(
                           z_CC.const_data_ptr<A>(), vc, static_cast<in_t*>(dz_CC.mutable_data_ptr()), vc, tc,
                           vc, vc, inv_t, targets + t0, vocab_start + v0, grads.rows_from<A>(t0), stream));
      at::Tensor gh_CH = grad_hidden_TH.narrow(0, t0, tc);
      gemm_into(gh_CH, dz_CC, w_CH, /*accumulate=*/v0 > 0);
      gemm_into(gw_CH, dz_CC.t(), h_CH, /*accumulate=*/t0 > 0);
    }
    if (!kInPlace) grad_weight_VH.narrow(0, v0, vc).copy_(gw_CH);
  }
  return {grad_hidden_TH.to(hidden_TH.scalar_type()), grad_weight_VH};
}

// --- the logits variants: rows of the given logits ----------------------------------------------------

// Logits whose columns are adjacent (rows may be strided: a slice of a wider buffer), and the
// row stride to use.
std::pair<at::Tensor, int64_t> rows_with_unit_columns(const at::Tensor& logits_TV) {
  const int64_t rows = logits_TV.size(0), cols = logits_TV.size(1);
  const bool ok = (cols <= 1 || logits_TV.stride(1) == 1) && (rows <= 1 || logits_TV.stride(0) >= cols);
  const at::Tensor x = ok ? logits_TV : logits_TV.contiguous();
  return {x, rows <= 1 ? std::max<int64_t>(cols, 1) : x.stride(0)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_logprob_forward_cuda(
    const at::Tensor& hidden_TH, const at::Tensor& weight_VH, const at::Tensor& targets_T, int64_t vocab_start,
    int64_t n_valid, double temperature, int64_t chunk_tokens, int64_t chunk_vocab) {
  constexpr const char* op = "slime_rl::linear_logprob_forward";
  checks::linear_args(op, hidden_TH, weight_VH, targets_T, vocab_start, n_valid, temperature, chunk_tokens, chunk_vocab,
                      c10::DeviceType::CUDA);
  check_rows(op, hidden_TH);
  const c10::cuda::CUDAGuard device_guard(hidden_TH.device());
  const at::Tensor hidden = hidden_TH.contiguous(), weight = weight_VH.contiguous();
  const at::Tensor targets = targets_T.to(at::kLong).contiguous();
  const int64_t num_tokens = hidden.size(0);
  const at::ScalarType acc_type = acc_type_of(hidden.scalar_type());
  Pieces4 pieces = new_pieces(num_tokens, hidden.options().dtype(acc_type), /*empty_slice=*/n_valid == 0);
  if (num_tokens == 0 || n_valid == 0) return pieces;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  if (acc_type == at::kDouble) {
    linear_forward_tiles<double>(op, hidden, weight, targets, vocab_start, n_valid, temperature, chunk_tokens,
                                 chunk_vocab, pieces, stream);
  } else {
    linear_forward_tiles<float>(op, hidden, weight, targets, vocab_start, n_valid, temperature, chunk_tokens,
                                chunk_vocab, pieces, stream);
  }
  return pieces;
}

std::tuple<at::Tensor, at::Tensor> linear_logprob_backward_cuda(
    const at::Tensor& hidden_TH, const at::Tensor& weight_VH, const at::Tensor& targets_T, const at::Tensor& lse_T,
    const std::optional<at::Tensor>& entropy_T, const std::optional<at::Tensor>& grad_logprob_T,
    const std::optional<at::Tensor>& grad_entropy_T, int64_t vocab_start, int64_t n_valid, double temperature,
    int64_t chunk_tokens, int64_t chunk_vocab) {
  constexpr const char* op = "slime_rl::linear_logprob_backward";
  checks::linear_args(op, hidden_TH, weight_VH, targets_T, vocab_start, n_valid, temperature, chunk_tokens, chunk_vocab,
                      c10::DeviceType::CUDA);
  check_rows(op, hidden_TH);
  const c10::cuda::CUDAGuard device_guard(hidden_TH.device());
  const at::Tensor hidden = hidden_TH.contiguous(), weight = weight_VH.contiguous();
  const at::Tensor targets = targets_T.to(at::kLong).contiguous();
  const GradTensors grads(op, lse_T, entropy_T, grad_logprob_T, grad_entropy_T, hidden.size(0),
                          acc_type_of(hidden.scalar_type()), hidden.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  std::tuple<at::Tensor, at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, hidden.scalar_type(), op, [&] {
    out = linear_backward_tiles<typename CudaType<scalar_t>::type>(
        op, hidden, weight, targets, grads, vocab_start, n_valid, temperature, chunk_tokens, chunk_vocab, stream);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> logits_logprob_forward_cuda(
    const at::Tensor& logits_TV, const at::Tensor& targets_T, int64_t vocab_start, int64_t n_valid,
    double temperature) {
  constexpr const char* op = "slime_rl::logits_logprob_forward";
  checks::logits_args(op, logits_TV, targets_T, vocab_start, n_valid, temperature, c10::DeviceType::CUDA);
  check_rows(op, logits_TV);
  const c10::cuda::CUDAGuard device_guard(logits_TV.device());
  const std::pair<at::Tensor, int64_t> rows = rows_with_unit_columns(logits_TV);
  const at::Tensor& logits = rows.first;
  const int64_t ld = rows.second;
  const at::Tensor targets = targets_T.to(at::kLong).contiguous();
  const int64_t num_tokens = logits.size(0);
  Pieces4 pieces = new_pieces(num_tokens, logits.options().dtype(acc_type_of(logits.scalar_type())), n_valid == 0);
  if (num_tokens == 0 || n_valid == 0) return pieces;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), op, [&] {
    using in_t = typename CudaType<scalar_t>::type;
    using A = typename cuda::AccOf<in_t>::type;
    const cuda::TargetMap map{targets.const_data_ptr<int64_t>(), vocab_start, vocab_start, vocab_start + n_valid};
    check_launch(op, cuda::launch_fold_softmax_pieces<in_t>(
                         reinterpret_cast<const in_t*>(logits.const_data_ptr<scalar_t>()), ld, num_tokens, n_valid,
                         inverse_temperature<A>(temperature), map, pieces_from<A>(pieces, 0), /*first=*/true,
                         /*last=*/true, stream));
  });
  return pieces;
}

at::Tensor logits_logprob_backward_cuda(const at::Tensor& logits_TV, const at::Tensor& targets_T,
                                        const at::Tensor& lse_T, const std::optional<at::Tensor>& entropy_T,
                                        const std::optional<at::Tensor>& grad_logprob_T,
                                        const std::optional<at::Tensor>& grad_entropy_T, int64_t vocab_start,
                                        int64_t n_valid, double temperature) {
  constexpr const char* op = "slime_rl::logits_logprob_backward";
  checks::logits_args(op, logits_TV, targets_T, vocab_start, n_valid, temperature, c10::DeviceType::CUDA);
  check_rows(op, logits_TV);
  const c10::cuda::CUDAGuard device_guard(logits_TV.device());
  const std::pair<at::Tensor, int64_t> rows = rows_with_unit_columns(logits_TV);
  const at::Tensor& logits = rows.first;
  const int64_t ld = rows.second;
  const at::Tensor targets = targets_T.to(at::kLong).contiguous();
  const int64_t num_tokens = logits.size(0), v_local = logits.size(1);
  const GradTensors grads(op, lse_T, entropy_T, grad_logprob_T, grad_entropy_T, num_tokens,
                          acc_type_of(logits.scalar_type()), logits.device());
  if (!grads.any_grad() || num_tokens == 0) return at::zeros({num_tokens, v_local}, logits.options());
  at::Tensor grad_TV = at::empty({num_tokens, v_local}, logits.options());  // every element is written
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), op, [&] {
    using in_t = typename CudaType<scalar_t>::type;
    using A = typename cuda::AccOf<in_t>::type;
    check_launch(op, cuda::launch_logprob_grad<in_t, in_t>(
                         reinterpret_cast<const in_t*>(logits.const_data_ptr<scalar_t>()), ld,
                         reinterpret_cast<in_t*>(grad_TV.mutable_data_ptr<scalar_t>()), v_local, num_tokens, n_valid,
                         v_local,
                         inverse_temperature<A>(temperature), targets.const_data_ptr<int64_t>(), vocab_start,
                         grads.rows_from<A>(0), stream));
  });
  return grad_TV;
}

}  // namespace

TORCH_LIBRARY_IMPL(slime_rl, CUDA, m) {
  m.impl("linear_logprob_forward", &linear_logprob_forward_cuda);
  m.impl("linear_logprob_backward", &linear_logprob_backward_cuda);
  m.impl("logits_logprob_forward", &logits_logprob_forward_cuda);
  m.impl("logits_logprob_backward", &logits_logprob_backward_cuda);
}

}  // namespace slime_rl
