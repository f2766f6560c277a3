// C++ test of the CPU fused logprob kernels (linear and logits variants, forward and backward)
// against a naive double-precision loop, called directly and through the dispatcher.
// Built and run by CMakeLists.txt (`ctest`); returns nonzero on a mismatch.

#include "../cpu/fused_logprob.h"
#include "check.h"

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cmath>
#include <cstdio>
#include <limits>
#include <string>
#include <vector>

using namespace slime_rl_test;

namespace {

struct Case {
  int64_t T, H, V, n_valid, vocab_start, chunk_tokens, chunk_vocab;
  double temperature;
};

// The naive spec, in double, for one case: z = h W[:n_valid]^T / temperature, row by row.
struct Naive {
  std::vector<double> max, sum, sum_z, target_z;  // [T]
  std::vector<double> grad_z;                     // [T, V] (padding columns 0)
  std::vector<double> grad_hidden, grad_weight;   // [T, H], [V, H]
};

Naive naive(const Case& c, const at::Tensor& hidden_TH, const at::Tensor& weight_VH, const at::Tensor& targets_T,
            const std::vector<double>& g_lp, const std::vector<double>& g_ent) {
  const at::Tensor h = hidden_TH.to(at::kDouble).contiguous(), w = weight_VH.to(at::kDouble).contiguous();
  const double* hp = h.const_data_ptr<double>();
  const double* wp = w.const_data_ptr<double>();
  const int64_t* tp = targets_T.const_data_ptr<int64_t>();
  const double temp = (c.temperature == 0.0 || c.temperature == 1.0) ? 1.0 : c.temperature;
  Naive out;
  out.max.assign(c.T, -std::numeric_limits<double>::infinity());
  out.sum.assign(c.T, 0.0);
  out.sum_z.assign(c.T, 0.0);
  out.target_z.assign(c.T, 0.0);
  out.grad_z.assign(c.T * c.V, 0.0);
  out.grad_hidden.assign(c.T * c.H, 0.0);
  out.grad_weight.assign(c.V * c.H, 0.0);
  for (int64_t t = 0; t < c.T; ++t) {
    std::vector<double> z(c.n_valid);
    for (int64_t j = 0; j < c.n_valid; ++j) {
      double acc = 0.0;
      for (int64_t k = 0; k < c.H; ++k) acc += hp[t * c.H + k] * wp[j * c.H + k];
      z[j] = acc / temp;
      out.max[t] = std::max(out.max[t], z[j]);
    }
    for (int64_t j = 0; j < c.n_valid; ++j) {
      out.sum[t] += std::exp(z[j] - out.max[t]);
      out.sum_z[t] += std::exp(z[j] - out.max[t]) * (z[j] - out.max[t]);
    }
    const int64_t local = tp[t] - c.vocab_start;
    const bool owned = local >= 0 && local < c.n_valid;
    if (owned) out.target_z[t] = z[local] - out.max[t];
    if (c.n_valid == 0) continue;
    // Single rank: lse and entropy are the local ones.
    const double lse = out.max[t] + std::log(out.sum[t]);
    const double entropy = std::log(out.sum[t]) - out.sum_z[t] / out.sum[t];
    for (int64_t j = 0; j < c.n_valid; ++j) {
      const double logp = z[j] - lse, p = std::exp(logp);
      const double dz = g_lp[t] * ((owned && j == local ? 1.0 : 0.0) - p) - g_ent[t] * p * (logp + entropy);
      out.grad_z[t * c.V + j] = dz / temp;
    }
  }
  for (int64_t t = 0; t < c.T; ++t)
    for (int64_t j = 0; j < c.n_valid; ++j)
      for (int64_t k = 0; k < c.H; ++k) {
        out.grad_hidden[t * c.H + k] += out.grad_z[t * c.V + j] * wp[j * c.H + k];
        out.grad_weight[j * c.H + k] += out.grad_z[t * c.V + j] * hp[t * c.H + k];
      }
  return out;
}

// max |got - want| / (1 + |want|) <= tol, also failing on NaN or a size mismatch.
void expect_close(const std::string& what, const at::Tensor& got, const std::vector<double>& want, double tol) {
  ++g_checks;
  if (got.numel() != static_cast<int64_t>(want.size())) {
    std::printf("FAIL %s: %lld elements, want %zu\n", what.c_str(), static_cast<long long>(got.numel()),
                want.size());
    ++g_failures;
    return;
  }
  const at::Tensor g = got.to(at::kDouble).contiguous();
  const double* p = g.const_data_ptr<double>();
  double worst = 0.0;
  for (size_t i = 0; i < want.size(); ++i) {
    const double err =
        std::isinf(want[i]) && p[i] == want[i] ? 0.0 : std::abs(p[i] - want[i]) / (1.0 + std::abs(want[i]));
    if (!(err <= worst)) worst = err;  // NaN makes worst NaN
  }
  if (!(worst <= tol)) {
    std::printf("FAIL %s: max rel err %.3g > %.3g\n", what.c_str(), worst, tol);
    ++g_failures;
  }
}

std::vector<double> to_vector(const at::Tensor& t) {
  const at::Tensor d = t.to(at::kDouble).contiguous();
  return std::vector<double>(d.const_data_ptr<double>(), d.const_data_ptr<double>() + d.numel());
}

void run_case(const Case& c, at::ScalarType dtype, double tol_pieces, double tol_grad) {
  const std::string name = std::string(c10::toString(dtype)) + " T" + std::to_string(c.T) + " H" +
                           std::to_string(c.H) + " V" + std::to_string(c.V) + " n_valid" +
                           std::to_string(c.n_valid) + " start" + std::to_string(c.vocab_start) + " temp" +
                           std::to_string(c.temperature) + " chunks " + std::to_string(c.chunk_tokens) + "x" +
                           std::to_string(c.chunk_vocab);
  const at::Tensor hidden = (at::randn({c.T, c.H}, at::kDouble) * 0.5).to(dtype);
  const at::Tensor weight = (at::randn({c.V, c.H}, at::kDouble) * 0.5).to(dtype);
  // Targets around this rank's slice: some owned, some not.
  const at::Tensor targets = at::randint(std::max<int64_t>(0, c.vocab_start - 3), c.vocab_start + c.V + 3, {c.T},
                                         at::kLong);
  at::Tensor g_lp = at::randn({c.T}, at::kDouble), g_ent = at::randn({c.T}, at::kDouble);
  if (c.T > 1) g_lp.index_put_({1}, 0.0), g_ent.index_put_({1}, 0.0);  // a masked token
  const Naive want = naive(c, hidden, weight, targets, to_vector(g_lp), to_vector(g_ent));

  const auto forward = c10::Dispatcher::singleton()
                           .findSchemaOrThrow("slime_rl::linear_logprob_forward", "")
                           .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
                               const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, int64_t, double,
                               int64_t, int64_t)>();
  for (const bool dispatcher : {false, true}) {
    const auto [mx, s, u, tz] =
        dispatcher ? forward.call(hidden, weight, targets, c.vocab_start, c.n_valid, c.temperature, c.chunk_tokens,
                                  c.chunk_vocab)
                   : slime_rl::linear_logprob_forward_cpu(hidden, weight, targets, c.vocab_start, c.n_valid,
                                                          c.temperature, c.chunk_tokens, c.chunk_vocab);
    const std::string how = name + (dispatcher ? " dispatcher" : " direct");
    expect_close(how + " max", mx, want.max, tol_pieces);
    expect_close(how + " sum_exp", s, want.sum, tol_pieces);
    expect_close(how + " sum_z", u, want.sum_z, tol_pieces);
    expect_close(how + " target_z", tz, want.target_z, tol_pieces);
  }
  if (c.n_valid == 0) return;  // no distribution on a single rank: nothing to differentiate

  const at::Tensor lse = at::tensor(want.max, at::kDouble) + at::tensor(want.sum, at::kDouble).log();
  const at::Tensor entropy =
      at::tensor(want.sum, at::kDouble).log() - at::tensor(want.sum_z, at::kDouble) / at::tensor(want.sum, at::kDouble);
  const auto [grad_hidden, grad_weight] = slime_rl::linear_logprob_backward_cpu(
      hidden, weight, targets, lse, entropy, g_lp, g_ent, c.vocab_start, c.n_valid, c.temperature, c.chunk_tokens,
      c.chunk_vocab);
  if (grad_hidden.scalar_type() != dtype || grad_weight.scalar_type() != dtype) {
    std::printf("FAIL %s: gradient dtypes %s %s\n", name.c_str(), c10::toString(grad_hidden.scalar_type()),
                c10::toString(grad_weight.scalar_type()));
    ++g_failures;
  }
  expect_close(name + " grad_hidden", grad_hidden, want.grad_hidden, tol_grad);
  expect_close(name + " grad_weight", grad_weight, want.grad_weight, tol_grad);

  // The logits variants on the same logits (padding columns hold large values that must be ignored).
  const double temp = (c.temperature == 0.0 || c.temperature == 1.0) ? 1.0 : c.temperature;
  at::Tensor logits = at::matmul(hidden.to(at::kDouble), weight.to(at::kDouble).t());
  if (c.n_valid < c.V) logits.narrow(1, c.n_valid, c.V - c.n_valid).fill_(50.0);
  logits = logits.to(dtype);
  std::vector<double> z_max(c.T), z_sum(c.T), z_sum_z(c.T), z_target(c.T), dz(c.T * c.V, 0.0);
  {  // the naive spec again, on the rounded logits
    const at::Tensor l = logits.to(at::kDouble);
    const double* lp = l.const_data_ptr<double>();
    const int64_t* tp = targets.const_data_ptr<int64_t>();
    const std::vector<double> glp = to_vector(g_lp), gen = to_vector(g_ent);
    for (int64_t t = 0; t < c.T; ++t) {
      double m = -std::numeric_limits<double>::infinity(), s = 0, u = 0;
      for (int64_t j = 0; j < c.n_valid; ++j) m = std::max(m, lp[t * c.V + j] / temp);
      for (int64_t j = 0; j < c.n_valid; ++j) {
        const double d = lp[t * c.V + j] / temp - m;
        s += std::exp(d);
        u += std::exp(d) * d;
      }
      const int64_t local = tp[t] - c.vocab_start;
      const bool owned = local >= 0 && local < c.n_valid;
      z_max[t] = m, z_sum[t] = s, z_sum_z[t] = u, z_target[t] = owned ? lp[t * c.V + local] / temp - m : 0.0;
      const double lse_t = m + std::log(s), h_t = std::log(s) - u / s;
      for (int64_t j = 0; j < c.n_valid; ++j) {
        const double logp = lp[t * c.V + j] / temp - lse_t, p = std::exp(logp);
        dz[t * c.V + j] = (glp[t] * ((owned && j == local ? 1.0 : 0.0) - p) - gen[t] * p * (logp + h_t)) / temp;
      }
    }
  }
  const auto [lmx, ls, lu, ltz] =
      slime_rl::logits_logprob_forward_cpu(logits, targets, c.vocab_start, c.n_valid, c.temperature);
  expect_close(name + " logits max", lmx, z_max, tol_pieces);
  expect_close(name + " logits sum_exp", ls, z_sum, tol_pieces);
  expect_close(name + " logits sum_z", lu, z_sum_z, tol_pieces);
  expect_close(name + " logits target_z", ltz, z_target, tol_pieces);
  const at::Tensor llse = lmx.to(at::kDouble) + ls.to(at::kDouble).log();
  const at::Tensor lent = ls.to(at::kDouble).log() - lu.to(at::kDouble) / ls.to(at::kDouble);
  const at::Tensor grad_logits =
      slime_rl::logits_logprob_backward_cpu(logits, targets, llse, lent, g_lp, g_ent, c.vocab_start, c.n_valid,
                                            c.temperature);
  expect_close(name + " grad_logits", grad_logits, dz, tol_grad);
}

}  // namespace

int main() {
  at::manual_seed(0);
  const std::vector<Case> cases = {
      // T, H, V, n_valid, vocab_start, chunk_tokens, chunk_vocab, temperature
      {7, 16, 23, 23, 0, 3, 5, 1.0},      // T, V not multiples of the chunks
      {7, 16, 23, 20, 0, 4, 8, 0.7},      // padding rows, temperature
      {9, 12, 30, 25, 100, 4, 7, 1.3},    // a TP shard: targets partly outside
      {5, 8, 1, 1, 0, 2, 2, 0.0},         // V = 1, temperature 0 = none
      {0, 8, 5, 5, 0, 4, 4, 1.0},         // no tokens
      {4, 8, 6, 0, 12, 2, 2, 1.0},        // a shard of padding only
      {33, 40, 300, 297, 0, 1024, 8192, 0.9},  // chunks larger than the problem
      {300, 16, 70, 67, 0, 256, 32, 0.8},      // several parallel tasks per tile (with >1 thread)
  };
  for (const Case& c : cases) {
    run_case(c, at::kDouble, 1e-12, 1e-12);
    run_case(c, at::kFloat, 2e-5, 2e-5);
    run_case(c, at::kBFloat16, 2e-5, 1e-2);  // pieces in fp32 from bf16 inputs; grads rounded to bf16
  }

  const at::Tensor h = at::randn({3, 4}), w = at::randn({5, 4}), tgt = at::zeros({3}, at::kLong);
  expect_error("1-D hidden", "hidden must be 2-D",
               [&] { slime_rl::linear_logprob_forward_cpu(h[0], w, tgt, 0, 5, 1.0, 4, 4); });
  expect_error("H mismatch", "to match hidden",
               [&] { slime_rl::linear_logprob_forward_cpu(h, w.t(), tgt, 0, 4, 1.0, 4, 4); });
  expect_error("n_valid > V", "n_valid must lie in [0, 5]",
               [&] { slime_rl::linear_logprob_forward_cpu(h, w, tgt, 0, 6, 1.0, 4, 4); });
  expect_error("chunk 0", "chunk_tokens and chunk_vocab must be >= 1",
               [&] { slime_rl::linear_logprob_forward_cpu(h, w, tgt, 0, 5, 1.0, 0, 4); });
  expect_error("dtype mismatch", "hidden and weight must share one dtype",
               [&] { slime_rl::linear_logprob_forward_cpu(h, w.to(at::kDouble), tgt, 0, 5, 1.0, 4, 4); });
  expect_error("float targets", "targets must be int64 or int32",
               [&] { slime_rl::logits_logprob_forward_cpu(w, at::zeros({5}), 0, 4, 1.0); });
  expect_error("grad_entropy without entropy", "grad_entropy needs the forward's entropy", [&] {
    slime_rl::logits_logprob_backward_cpu(w, at::zeros({5}, at::kLong), at::zeros({5}), std::nullopt,
                                          std::nullopt, at::ones({5}), 0, 4, 1.0);
  });

  return finish("test_fused_logprob");
}
