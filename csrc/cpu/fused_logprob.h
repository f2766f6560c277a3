// CPU kernels for fused (linear +) logprob + entropy (declarations for C++ callers and csrc/tests).
//
// z = hidden_TH @ weight_VH[:n_valid]^T / temperature (temperature 0 or 1: no division), or
// z = logits_TV[:, :n_valid] / temperature for the logits variants; rows/columns >= n_valid are
// vocab padding and take no part. Per token, over this (TP) rank's vocab slice, the forward
// returns the softmax pieces, in fp32 (fp64 for fp64 inputs):
//   max      m = max_j z_j                          (-inf when n_valid == 0)
//   sum_exp  s = sum_j exp(z_j - m)
//   sum_z    u = sum_j exp(z_j - m) (z_j - m)
//   target_z z[target - vocab_start] - m if vocab_start <= target < vocab_start + n_valid, else 0
// and the backward, given the GLOBAL lse = m + log s and entropy H per token, the gradient of
// sum_t g_lp[t] logp[t] + g_ent[t] H[t] (absent grads count as zero):
//   dz_j = g_lp (onehot_j - p_j) - g_ent p_j (log p_j + H),  p_j = exp(z_j - lse),
// divided by temperature, then grad_hidden = dz @ W and grad_weight[:n_valid] = dz^T @ hidden.
// Reference: slime_rl/ops/fused_logprob.py (*_reference). Tests: tests/test_fused_logprob.py,
// csrc/tests/test_fused_logprob.cpp.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace slime_rl {

// hidden_TH [T, H], weight_VH [V_local, H] (same floating dtype), targets_T [T] int64/int32.
// Tiles of chunk_tokens x chunk_vocab logits; extra memory O(chunk_tokens * chunk_vocab)
// (+ T*H and chunk_vocab*H fp32 copies for bf16/fp16 inputs). -> (max, sum_exp, sum_z, target_z).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_logprob_forward_cpu(
    const at::Tensor& hidden_TH, const at::Tensor& weight_VH, const at::Tensor& targets_T,
    int64_t vocab_start, int64_t n_valid, double temperature, int64_t chunk_tokens,
    int64_t chunk_vocab);

// -> (grad_hidden [T, H] in hidden's dtype, grad_weight [V_local, H] in weight's dtype, rows >=
// n_valid zero). Recomputes the logits tile by tile; accumulates in fp32 (fp64 for fp64).
std::tuple<at::Tensor, at::Tensor> linear_logprob_backward_cpu(
    const at::Tensor& hidden_TH, const at::Tensor& weight_VH, const at::Tensor& targets_T,
    const at::Tensor& lse_T, const std::optional<at::Tensor>& entropy_T,
    const std::optional<at::Tensor>& grad_logprob_T, const std::optional<at::Tensor>& grad_entropy_T,
    int64_t vocab_start, int64_t n_valid, double temperature, int64_t chunk_tokens,
    int64_t chunk_vocab);

// logits_TV [T, V_local], any floating dtype; rows may be strided (column stride 1 avoids a copy).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> logits_logprob_forward_cpu(
    const at::Tensor& logits_TV, const at::Tensor& targets_T, int64_t vocab_start, int64_t n_valid,
    double temperature);

// -> grad_logits [T, V_local] in logits' dtype, columns >= n_valid zero.
at::Tensor logits_logprob_backward_cpu(const at::Tensor& logits_TV, const at::Tensor& targets_T,
                                       const at::Tensor& lse_T,
                                       const std::optional<at::Tensor>& entropy_T,
                                       const std::optional<at::Tensor>& grad_logprob_T,
                                       const std::optional<at::Tensor>& grad_entropy_T,
                                       int64_t vocab_start, int64_t n_valid, double temperature);

}  // namespace slime_rl
