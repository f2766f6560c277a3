// C++ benchmark of the CPU kernels against plain ATen, side by side in one process (no Python).
// Built by CMakeLists.txt as `bench_ops` (not a ctest test):
//
//   ./build/cmake/bench_ops [T H V rounds]      # default 1024 512 32768 3
//
// Prints, per op, the median seconds of each contender and the ratio (ATen / kernel), after a
// check that both give the same per-token logprobs. The Python benchmarks (benchmarks/kernels/)
// are the reference numbers; this one is for C++ users and for profiling a kernel in isolation.

#include "../cpu/advantages.h"
#include "../cpu/fused_logprob.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <vector>

namespace {

double median_seconds(const std::function<void()>& fn, int rounds) {
  std::vector<double> times;
  for (int r = 0; r < rounds; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    fn();
    times.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  std::sort(times.begin(), times.end());
  return times[times.size() / 2];
}

void report(const char* op, double kernel_s, double aten_s) {
  std::printf("%-34s kernel %8.4f s   aten %8.4f s   aten/kernel %5.2fx\n", op, kernel_s, aten_s,
              aten_s / kernel_s);
}

}  // namespace

int main(int argc, char** argv) {
  const int64_t T = argc > 1 ? std::atoll(argv[1]) : 1024;
  const int64_t H = argc > 2 ? std::atoll(argv[2]) : 512;
  const int64_t V = argc > 3 ? std::atoll(argv[3]) : 32768;
  const int rounds = argc > 4 ? std::atoi(argv[4]) : 3;
  std::printf("T=%lld H=%lld V=%lld fp32, %d threads, median of %d rounds\n", (long long)T, (long long)H,
              (long long)V, at::get_num_threads(), rounds);
  at::manual_seed(0);
  const at::Tensor hidden = at::randn({T, H});
  const at::Tensor weight = at::randn({V, H}) * 0.05;
  const at::Tensor targets = at::randint(V, {T}, at::kLong);

  // Fused forward pieces -> logprob, against log_softmax over the full [T, V] logits.
  at::Tensor logp_kernel, logp_aten;
  const double kernel_s = median_seconds([&] {
    auto [m, s, u, tz] = slime_rl::linear_logprob_forward_cpu(hidden, weight, targets, 0, V, 1.0, 1024, 8192);
    logp_kernel = tz - s.log();
  }, rounds);
  const double aten_s = median_seconds([&] {
    logp_aten = at::log_softmax(at::mm(hidden, weight.t()), -1).gather(1, targets.unsqueeze(1)).squeeze(1);
  }, rounds);
  const double diff = (logp_kernel - logp_aten).abs().max().item<double>();
  if (!(diff < 1e-3)) {
    std::printf("MISMATCH: max |logprob difference| %g\n", diff);
    return 1;
  }
  report("linear_logprob_forward", kernel_s, aten_s);

  // GAE over B padded rows of length L, against the per-time-step ATen loop peers write.
  const int64_t B = 512, L = 1024;
  const at::Tensor rewards = at::randn({B * L}), values = at::randn({B * L});
  const at::Tensor mask = at::ones({B * L}, at::kBool);
  const at::Tensor cu = at::arange(0, B * L + 1, L, at::kLong);
  const double gae_kernel_s = median_seconds([&] {
    slime_rl::gae_cpu(rewards, values, mask, cu, 1.0, 0.95);
  }, rounds);
  const double gae_aten_s = median_seconds([&] {
    const at::Tensor r = rewards.view({B, L}), v = values.view({B, L});
    at::Tensor adv = at::zeros({B, L}), last = at::zeros({B}), next_v = at::zeros({B});
    for (int64_t t = L - 1; t >= 0; --t) {
      const at::Tensor delta = r.select(1, t) + next_v - v.select(1, t);
      last = delta + 0.95 * last;
      adv.select(1, t).copy_(last);
      next_v = v.select(1, t);
    }
  }, rounds);
  report("gae (512 x 1024 tokens)", gae_kernel_s, gae_aten_s);
  return 0;
}
