// C++ test of the CPU advantage kernels (group_normalize, loo_advantages,
// discounted_returns, gae) against naive double-precision loops, called both
// directly and through the dispatcher (torch.ops.slime_rl.*).
// Built and run by CMakeLists.txt (`ctest`); returns nonzero on a mismatch.

#include "../cpu/advantages.h"
#include "check.h"

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cmath>
#include <cstdio>
#include <string>
#include <tuple>
#include <vector>

using namespace slime_rl_test;

namespace {

// Naive loop over a [G, n] tensor, in double; the spec the kernel must meet.
std::vector<double> naive_group_normalize(const at::Tensor& rewards_GN, double eps, bool scale) {
  const at::Tensor r = rewards_GN.to(at::kDouble).contiguous();
  const double* p = r.const_data_ptr<double>();
  const int64_t G = r.size(0), n = r.size(1);
  std::vector<double> out(static_cast<size_t>(G * n));
  for (int64_t g = 0; g < G; ++g) {
    double mean = 0.0;
    for (int64_t i = 0; i < n; ++i) mean += p[g * n + i];
    mean /= static_cast<double>(n);
    double denom = 1.0;
    if (scale) {
      double var = 0.0;
      for (int64_t i = 0; i < n; ++i) var += (p[g * n + i] - mean) * (p[g * n + i] - mean);
      denom = (n > 1 ? std::sqrt(var / static_cast<double>(n - 1)) : 0.0) + eps;
    }
    for (int64_t i = 0; i < n; ++i) out[g * n + i] = (p[g * n + i] - mean) / denom;
  }
  return out;
}

void expect_close(const std::string& what, const at::Tensor& got_GN, const at::Tensor& rewards_GN,
                  double eps, bool scale, double tol) {
  if (got_GN.sizes() != rewards_GN.sizes() || got_GN.scalar_type() != rewards_GN.scalar_type()) {
    std::printf("FAIL %s: wrong shape or dtype\n", what.c_str());
    ++g_failures;
    return;
  }
  const std::vector<double> want = naive_group_normalize(rewards_GN, eps, scale);
  const at::Tensor got = got_GN.to(at::kDouble).contiguous();
  const double* p = got.const_data_ptr<double>();
  double worst = 0.0;
  for (size_t i = 0; i < want.size(); ++i) {
    const double err = std::abs(p[i] - want[i]) / (1.0 + std::abs(want[i]));
    if (!(err <= worst)) worst = err;  // also catches NaN
  }
  if (!(worst <= tol)) {
    std::printf("FAIL %s: max rel err %.3g > %.3g\n", what.c_str(), worst, tol);
    ++g_failures;
  }
}

// Naive RLOO loop: r_i - mean of the others; 0 for a group of one.
std::vector<double> naive_loo(const at::Tensor& rewards_GN) {
  const at::Tensor r = rewards_GN.to(at::kDouble).contiguous();
  const double* p = r.const_data_ptr<double>();
  const int64_t G = r.size(0), n = r.size(1);
  std::vector<double> out(static_cast<size_t>(G * n), 0.0);
  for (int64_t g = 0; g < G; ++g) {
    for (int64_t i = 0; i < n && n > 1; ++i) {
      double others = 0.0;
      for (int64_t j = 0; j < n; ++j) others += j == i ? 0.0 : p[g * n + j];
      out[g * n + i] = p[g * n + i] - others / static_cast<double>(n - 1);
    }
  }
  return out;
}

// Naive scans over packed sequences (masked tokens skipped; reference.py's
// semantics): returns {discounted returns, gae advantages, gae returns}.
std::vector<std::vector<double>> naive_scans(const at::Tensor& rewards, const at::Tensor& values,
                                             const at::Tensor& mask, const at::Tensor& cu_seqlens,
                                             double gamma, double lam) {
  const at::Tensor r = rewards.to(at::kDouble).contiguous();
  const at::Tensor v = values.to(at::kDouble).contiguous();
  const at::Tensor m = mask.to(at::kBool).contiguous();
  const double* pr = r.const_data_ptr<double>();
  const double* pv = v.const_data_ptr<double>();
  const bool* pm = m.const_data_ptr<bool>();
  const int64_t* cu = cu_seqlens.const_data_ptr<int64_t>();
  const size_t n = static_cast<size_t>(r.numel());
  std::vector<std::vector<double>> out(3, std::vector<double>(n, 0.0));
  for (int64_t s = 0; s + 1 < cu_seqlens.numel(); ++s) {
    double g = 0.0, next_value = 0.0, a = 0.0;
    for (int64_t t = cu[s + 1] - 1; t >= cu[s]; --t) {
      if (!pm[t]) continue;
      g = pr[t] + gamma * g;
      a = pr[t] + gamma * next_value - pv[t] + gamma * lam * a;
      next_value = pv[t];
      out[0][t] = g;
      out[1][t] = a;
      out[2][t] = a + pv[t];
    }
  }
  return out;
}

// |got - want| / (1 + |want|) <= tol elementwise, and the dtype is the input's.
void expect_close_to(const std::string& what, const at::Tensor& got, at::ScalarType dtype,
                     const std::vector<double>& want, double tol) {
  if (got.scalar_type() != dtype || got.numel() != static_cast<int64_t>(want.size())) {
    std::printf("FAIL %s: wrong dtype or size\n", what.c_str());
    ++g_failures;
    return;
  }
  const at::Tensor d = got.to(at::kDouble).contiguous();
  const double* p = d.const_data_ptr<double>();
  double worst = 0.0;
  for (size_t i = 0; i < want.size(); ++i) {
    const double err = std::abs(p[i] - want[i]) / (1.0 + std::abs(want[i]));
    if (!(err <= worst)) worst = err;  // also catches NaN
  }
  if (!(worst <= tol)) {
    std::printf("FAIL %s: max rel err %.3g > %.3g\n", what.c_str(), worst, tol);
    ++g_failures;
  }
}

}  // namespace

int main() {
  at::manual_seed(0);
  const auto op = c10::Dispatcher::singleton()
                      .findSchemaOrThrow("slime_rl::group_normalize", "")
                      .typed<at::Tensor(const at::Tensor&, double, bool)>();

  struct DtypeCase {
    at::ScalarType dtype;
    double tol;  // against the double loop: a few ulps of the dtype
  };
  const std::vector<DtypeCase> dtypes = {
      {at::kFloat, 1e-6}, {at::kDouble, 1e-12}, {at::kHalf, 1e-3}, {at::kBFloat16, 4e-3}};
  const std::vector<std::pair<int64_t, int64_t>> shapes = {
      {1, 1}, {5, 1}, {0, 4}, {1, 2}, {7, 13}, {1000, 16}, {3, 4097}};
  for (const auto& dc : dtypes) {
    for (const auto& [G, n] : shapes) {
      for (bool scale : {true, false}) {
        const at::Tensor r = at::randn({G, n}, at::kDouble).to(dc.dtype);
        const std::string name = std::string(c10::toString(dc.dtype)) + " " + std::to_string(G) +
                                 "x" + std::to_string(n) + (scale ? " std" : " nostd");
        expect_close(name + " direct", slime_rl::group_normalize_cpu(r, 1e-6, scale), r, 1e-6,
                     scale, dc.tol);
        expect_close(name + " dispatcher", op.call(r, 1e-6, scale), r, 1e-6, scale, dc.tol);
        g_checks += 2;
      }
    }
  }
  // Non-contiguous input (a transposed view) and binary GRPO rewards.
  const at::Tensor t = at::randn({13, 7}, at::kDouble).t();
  expect_close("transposed", op.call(t, 1e-6, true), t, 1e-6, true, 1e-12);
  const at::Tensor binary = at::randint(0, 2, {64, 8}, at::kDouble);
  expect_close("binary", op.call(binary, 1e-6, true), binary, 1e-6, true, 1e-12);
  g_checks += 2;

  // Bad input must raise, not crash.
  try {
    op.call(at::randn({4}), 1e-6, true);
    std::printf("FAIL 1-D input did not raise\n");
    ++g_failures;
  } catch (const c10::Error&) {
  }
  ++g_checks;

  // ---- loo_advantages ----
  const auto loo = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("slime_rl::loo_advantages", "")
                       .typed<at::Tensor(const at::Tensor&)>();
  for (const auto& dc : dtypes) {
    for (const auto& [G, n] : shapes) {
      const at::Tensor r = at::randn({G, n}, at::kDouble).to(dc.dtype);
      const std::string name = "loo " + std::string(c10::toString(dc.dtype)) + " " +
                               std::to_string(G) + "x" + std::to_string(n);
      expect_close_to(name + " direct", slime_rl::loo_advantages_cpu(r), dc.dtype, naive_loo(r),
                      dc.tol);
      expect_close_to(name + " dispatcher", loo.call(r), dc.dtype, naive_loo(r), dc.tol);
      g_checks += 2;
    }
  }

  // ---- discounted_returns and gae over ragged packed batches ----
  const auto returns_op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("slime_rl::discounted_returns", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, double)>();
  const auto gae_op = c10::Dispatcher::singleton()
                          .findSchemaOrThrow("slime_rl::gae", "")
                          .typed<std::tuple<at::Tensor, at::Tensor>(
                              const at::Tensor&, const at::Tensor&, const at::Tensor&,
                              const at::Tensor&, double, double)>();
  // Empty sequences, length 1, and lengths around typical block sizes.
  const std::vector<int64_t> lengths = {0, 1, 2, 7, 127, 128, 129, 0, 1000, 1, 33};
  std::vector<int64_t> cu_values = {0};
  for (int64_t len : lengths) cu_values.push_back(cu_values.back() + len);
  const at::Tensor cu = at::tensor(cu_values, at::kLong);
  const int64_t num_tokens = cu_values.back();
  const std::vector<std::pair<double, double>> discounts = {
      {1.0, 1.0}, {0.99, 0.95}, {0.0, 0.5}, {0.7, 0.0}};
  for (const auto& dc : dtypes) {
    for (const auto& [gamma, lam] : discounts) {
      const at::Tensor r = at::randn({num_tokens}, at::kDouble).to(dc.dtype);
      const at::Tensor v = at::randn({num_tokens}, at::kDouble).to(dc.dtype);
      const at::Tensor m = at::rand({num_tokens}, at::kDouble).gt(0.3);
      const auto want = naive_scans(r, v, m, cu, gamma, lam);
      const std::string name = std::string(c10::toString(dc.dtype)) + " gamma " +
                               std::to_string(gamma) + " lam " + std::to_string(lam);
      // Returns with gamma = 1 sum up to ~1000 rewards: the tolerance is relative to
      // each output, a few ulps of the dtype times the magnitude of the terms summed.
      const double tol = dc.tol * 8;
      expect_close_to("returns " + name, returns_op.call(r, m, cu, gamma), dc.dtype, want[0], tol);
      expect_close_to("returns (float mask) " + name,
                      slime_rl::discounted_returns_cpu(r, m.to(at::kFloat), cu, gamma), dc.dtype,
                      want[0], tol);
      const auto [adv, ret] = gae_op.call(r, v, m, cu, gamma, lam);
      expect_close_to("gae advantages " + name, adv, dc.dtype, want[1], tol);
      expect_close_to("gae returns " + name, ret, dc.dtype, want[2], tol);
      g_checks += 4;
    }
  }
  {
    const at::Tensor r = at::randn({num_tokens}, at::kDouble);
    const at::Tensor m = at::ones({num_tokens}, at::kBool);
    expect_error("cu_seqlens not starting at 0", "cu_seqlens must start at 0", [&] {
      returns_op.call(r, m, at::tensor(std::vector<int64_t>{1, num_tokens}, at::kLong), 0.9);
    });
    expect_error("cu_seqlens not ending at N", "and end at the number of tokens", [&] {
      returns_op.call(r, m, at::tensor(std::vector<int64_t>{0, num_tokens - 1}, at::kLong), 0.9);
    });
    expect_error("decreasing cu_seqlens", "cu_seqlens must not decrease", [&] {
      returns_op.call(r, m, at::tensor(std::vector<int64_t>{0, 5, 3, num_tokens}, at::kLong), 0.9);
    });
    expect_error("gamma > 1", "gamma must be in [0, 1]", [&] { returns_op.call(r, m, cu, 1.5); });
    expect_error("values of another dtype", "values must have rewards' dtype",
                 [&] { gae_op.call(r, r.to(at::kFloat), m, cu, 0.9, 0.9); });
    expect_error("int32 cu_seqlens", "cu_seqlens must be int64", [&] { returns_op.call(r, m, cu.to(at::kInt), 0.9); });
  }

  return finish("test_advantages");
}
