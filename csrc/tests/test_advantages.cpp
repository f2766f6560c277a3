// C++ test of the CPU advantage kernel against a naive double-precision loop,
// called both directly and through the dispatcher (torch.ops.slime_rl.*).
// Built and run by CMakeLists.txt (`ctest`); returns nonzero on a mismatch.

#include "../cpu/advantages.h"

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

namespace {

int g_failures = 0;

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
  int checks = 0;
  for (const auto& dc : dtypes) {
    for (const auto& [G, n] : shapes) {
      for (bool scale : {true, false}) {
        const at::Tensor r = at::randn({G, n}, at::kDouble).to(dc.dtype);
        const std::string name = std::string(c10::toString(dc.dtype)) + " " + std::to_string(G) +
                                 "x" + std::to_string(n) + (scale ? " std" : " nostd");
        expect_close(name + " direct", slime_rl::group_normalize_cpu(r, 1e-6, scale), r, 1e-6,
                     scale, dc.tol);
        expect_close(name + " dispatcher", op.call(r, 1e-6, scale), r, 1e-6, scale, dc.tol);
        checks += 2;
      }
    }
  }
  // Non-contiguous input (a transposed view) and binary GRPO rewards.
  const at::Tensor t = at::randn({13, 7}, at::kDouble).t();
  expect_close("transposed", op.call(t, 1e-6, true), t, 1e-6, true, 1e-12);
  const at::Tensor binary = at::randint(0, 2, {64, 8}, at::kDouble);
  expect_close("binary", op.call(binary, 1e-6, true), binary, 1e-6, true, 1e-12);
  checks += 2;

  // Bad input must raise, not crash.
  try {
    op.call(at::randn({4}), 1e-6, true);
    std::printf("FAIL 1-D input did not raise\n");
    ++g_failures;
  } catch (const c10::Error&) {
  }
  ++checks;

  std::printf("%s: %d checks, %d failures\n", g_failures ? "FAILED" : "OK", checks, g_failures);
  return g_failures == 0 ? 0 : 1;
}
