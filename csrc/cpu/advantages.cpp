// Group-normalized advantages (GRPO) on the CPU.
//
// Reference: slime_rl/ops/reference.py::group_normalize. Test:
// tests/test_ops.py and csrc/tests/test_advantages.cpp.
//
// Parallel over groups with at::parallel_for, which is torch's OpenMP pool
// (compiled with -fopenmp; the extension then shares torch's bundled libgomp
// and honours torch.set_num_threads). Each group is a short contiguous row, so
// one thread handles whole groups: two passes (mean, then squared deviations)
// accumulated in double, exactly as the reference computes (see its module
// docstring for why float32 rewards are not summed in float32).

#include "advantages.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>

namespace slime_rl {
namespace {

// Elements per parallel chunk (the value ATen uses, at::internal::GRAIN_SIZE).
constexpr int64_t kGrainElems = 32768;

template <typename scalar_t>
void group_normalize_rows(const scalar_t* in_GN, scalar_t* out_GN, int64_t num_groups, int64_t n,
                          double eps, bool scale_by_std) {
  // Small inputs run on the calling thread: at::parallel_for only forks when
  // the range exceeds the grain, measured here in groups of ~32k elements.
  const int64_t grain = std::max<int64_t>(1, kGrainElems / n);
  at::parallel_for(0, num_groups, grain, [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g) {
      const scalar_t* r = in_GN + g * n;
      scalar_t* adv = out_GN + g * n;
      double sum = 0.0;
      for (int64_t i = 0; i < n; ++i) sum += static_cast<double>(r[i]);
      const double mean = sum / static_cast<double>(n);
      double denom = 1.0;
      if (scale_by_std) {
        double sq = 0.0;
        for (int64_t i = 0; i < n; ++i) {
          const double d = static_cast<double>(r[i]) - mean;
          sq += d * d;
        }
        // Unbiased (n - 1); a single sample has no spread: std = 0.
        const double std_g = n > 1 ? std::sqrt(sq / static_cast<double>(n - 1)) : 0.0;
        denom = std_g + eps;
      }
      for (int64_t i = 0; i < n; ++i) {
        adv[i] = static_cast<scalar_t>((static_cast<double>(r[i]) - mean) / denom);
      }
    }
  });
}

}  // namespace

at::Tensor group_normalize_cpu(const at::Tensor& rewards_GN, double eps, bool scale_by_std) {
  TORCH_CHECK(rewards_GN.dim() == 2,
              "slime_rl::group_normalize: rewards must be 2-D [num_groups, n], got shape ",
              rewards_GN.sizes());
  TORCH_CHECK(rewards_GN.size(1) >= 1,
              "slime_rl::group_normalize: groups must hold at least one sample, got shape ",
              rewards_GN.sizes());
  TORCH_CHECK(rewards_GN.device().is_cpu(),
              "slime_rl::group_normalize (CPU kernel): rewards must be on the CPU, got ",
              rewards_GN.device());
  const at::Tensor in_GN = rewards_GN.contiguous();
  at::Tensor out_GN = at::empty_like(in_GN);
  const int64_t num_groups = in_GN.size(0);
  const int64_t n = in_GN.size(1);
  if (num_groups == 0) return out_GN;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, in_GN.scalar_type(), "slime_rl::group_normalize", [&] {
        group_normalize_rows<scalar_t>(in_GN.const_data_ptr<scalar_t>(),
                                       out_GN.mutable_data_ptr<scalar_t>(), num_groups, n, eps,
                                       scale_by_std);
      });
  return out_GN;
}

TORCH_LIBRARY_IMPL(slime_rl, CPU, m) {
  m.impl("group_normalize", &group_normalize_cpu);
}

}  // namespace slime_rl
