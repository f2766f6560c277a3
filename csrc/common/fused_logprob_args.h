// Argument checks and per-token backward inputs of the fused logprob ops, shared
// by csrc/cpu/fused_logprob.cpp and csrc/cuda/fused_logprob_ops.cpp (schemas:
// csrc/registration.cpp). `kind` is the backend calling (CPU or CUDA).
#pragma once

#include "checks.h"

#include <ATen/ATen.h>

#include <optional>

namespace slime_rl::checks {

// 1 / temperature; 0 (greedy) and 1 mean no division, as in slime_rl/ops/logprob.py.
template <typename A>
A inverse_temperature(double temperature) {
  return (temperature == 0.0 || temperature == 1.0) ? A(1) : static_cast<A>(1.0 / temperature);
}

// x [T, X] (hidden or logits) and targets [T]; n_valid of the v_local vocab rows are real.
inline void logprob_common(const char* op, const at::Tensor& x_TX, const char* x_name, const at::Tensor& targets_T,
                           int64_t v_local, int64_t vocab_start, int64_t n_valid, double temperature,
                           c10::DeviceType kind) {
  TORCH_CHECK(x_TX.dim() == 2, op, ": ", x_name, " must be 2-D, got shape ", x_TX.sizes());
  floating(op, x_name, x_TX);
  on_kind(op, x_name, x_TX, kind);
  TORCH_CHECK(targets_T.dim() == 1 && targets_T.size(0) == x_TX.size(0), op, ": targets must be 1-D [",
              x_TX.size(0), "] (one per ", x_name, " row), got shape ", targets_T.sizes());
  TORCH_CHECK(targets_T.scalar_type() == at::kLong || targets_T.scalar_type() == at::kInt, op,
              ": targets must be int64 or int32, got ", targets_T.scalar_type());
  same_device(op, "targets", targets_T, x_name, x_TX);
  TORCH_CHECK(vocab_start >= 0, op, ": vocab_start must be >= 0, got ", vocab_start);
  TORCH_CHECK(n_valid >= 0 && n_valid <= v_local, op, ": n_valid must lie in [0, ", v_local,
              "] (the local vocab rows), got ", n_valid);
  TORCH_CHECK(temperature >= 0, op, ": temperature must be >= 0, got ", temperature);
}

// The logits variants: logits [T, V_local].
inline void logits_args(const char* op, const at::Tensor& logits_TV, const at::Tensor& targets_T, int64_t vocab_start,
                        int64_t n_valid, double temperature, c10::DeviceType kind) {
  logprob_common(op, logits_TV, "logits", targets_T, logits_TV.dim() == 2 ? logits_TV.size(1) : 0, vocab_start,
                 n_valid, temperature, kind);
}

// The linear variants: hidden [T, H], weight [V_local, H].
inline void linear_args(const char* op, const at::Tensor& hidden_TH, const at::Tensor& weight_VH,
                        const at::Tensor& targets_T, int64_t vocab_start, int64_t n_valid, double temperature,
                        int64_t chunk_tokens, int64_t chunk_vocab, c10::DeviceType kind) {
  TORCH_CHECK(weight_VH.dim() == 2, op, ": weight must be 2-D [V_local, H], got shape ", weight_VH.sizes());
  logprob_common(op, hidden_TH, "hidden", targets_T, weight_VH.size(0), vocab_start, n_valid, temperature, kind);
  TORCH_CHECK(weight_VH.size(1) == hidden_TH.size(1), op, ": weight must be [V_local, H = ", hidden_TH.size(1),
              "] to match hidden, got shape ", weight_VH.sizes());
  TORCH_CHECK(weight_VH.scalar_type() == hidden_TH.scalar_type(), op, ": hidden and weight must share one dtype, got ",
              hidden_TH.scalar_type(), " and ", weight_VH.scalar_type());
  same_device(op, "weight", weight_VH, "hidden", hidden_TH);
  TORCH_CHECK(chunk_tokens >= 1 && chunk_vocab >= 1, op, ": chunk_tokens and chunk_vocab must be >= 1, got ",
              chunk_tokens, " and ", chunk_vocab);
}

// A per-token [T] input of the backward as a contiguous acc_type tensor on `device`
// (undefined if absent).
inline at::Tensor per_token(const char* op, const char* name, const std::optional<at::Tensor>& t_T, int64_t T,
                            at::ScalarType acc_type, const at::Device& device) {
  if (!t_T.has_value() || !t_T->defined()) return at::Tensor();
  TORCH_CHECK(t_T->dim() == 1 && t_T->size(0) == T, op, ": ", name, " must be 1-D [", T, "], got shape ",
              t_T->sizes());
  floating(op, name, *t_T);
  TORCH_CHECK(t_T->device() == device, op, ": ", name, " must be on ", device, ", got ", t_T->device());
  return t_T->to(acc_type).contiguous();
}

// The checked, converted per-token inputs of a backward (lse required, the rest optional),
// kept alive while the kernels read them. Each backend adds its own accessors.
struct GradArgs {
  at::Tensor lse, entropy, g_lp, g_ent;

  GradArgs() = default;
  GradArgs(const char* op, const at::Tensor& lse_T, const std::optional<at::Tensor>& entropy_T,
           const std::optional<at::Tensor>& grad_logprob_T, const std::optional<at::Tensor>& grad_entropy_T, int64_t T,
           at::ScalarType acc_type, const at::Device& device) {
    TORCH_CHECK(lse_T.defined(), op, ": lse is required");
    lse = per_token(op, "lse", lse_T, T, acc_type, device);
    entropy = per_token(op, "entropy", entropy_T, T, acc_type, device);
    g_lp = per_token(op, "grad_logprob", grad_logprob_T, T, acc_type, device);
    g_ent = per_token(op, "grad_entropy", grad_entropy_T, T, acc_type, device);
    TORCH_CHECK(!g_ent.defined() || entropy.defined(), op, ": grad_entropy needs the forward's entropy");
  }

  bool any_grad() const { return g_lp.defined() || g_ent.defined(); }
};

}  // namespace slime_rl::checks
