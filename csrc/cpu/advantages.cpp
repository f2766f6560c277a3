// Advantage kernels on the CPU: group_normalize (GRPO), loo_advantages (RLOO),
// and the reverse scans discounted_returns and gae over packed sequences.
//
// Reference: slime_rl/ops/reference.py (its comments state the masked-token
// semantics). Tests: tests/test_ops.py, tests/test_advantage_ops.py and
// csrc/tests/test_advantages.cpp.
//
// Parallel with at::parallel_for, which is torch's OpenMP pool (compiled with
// -fopenmp; the extension then shares torch's bundled libgomp and honours
// torch.set_num_threads): over groups for the group ops, over sequences for
// the scans (sequences are independent; the scan inside one is sequential).
// One thread handles a whole group or sequence, so results do not depend on
// the thread count. Everything accumulates in double, exactly as the
// reference computes (see its module docstring for why float32 rewards are not
// summed in float32), and rounds once to the output dtype.

#include "advantages.h"

#include "../common/advantages_args.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>

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

template <typename scalar_t>
void loo_rows(const scalar_t* in_GN, scalar_t* out_GN, int64_t num_groups, int64_t n) {
  const int64_t grain = std::max<int64_t>(1, kGrainElems / n);
  at::parallel_for(0, num_groups, grain, [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g) {
      const scalar_t* r = in_GN + g * n;
      scalar_t* adv = out_GN + g * n;
      if (n == 1) {  // no other sample to compare with
        adv[0] = static_cast<scalar_t>(0.0);
        continue;
      }
      double sum = 0.0;
      for (int64_t i = 0; i < n; ++i) sum += static_cast<double>(r[i]);
      const double others = static_cast<double>(n - 1);
      for (int64_t i = 0; i < n; ++i) {
        const double ri = static_cast<double>(r[i]);
        adv[i] = static_cast<scalar_t>(ri - (sum - ri) / others);
      }
    }
  });
}

// Sequences per parallel chunk: about kGrainElems tokens at the average length.
int64_t sequence_grain(int64_t num_tokens, int64_t num_seqs) {
  const int64_t mean_len = std::max<int64_t>(1, num_tokens / std::max<int64_t>(1, num_seqs));
  return std::max<int64_t>(1, kGrainElems / mean_len);
}

// The scans below run over one sequence [begin, end) from its last token back,
// skipping masked tokens (output 0, carries unchanged). The operations and
// their order are the reference's, in double. The loop is a chain of dependent
// multiply-adds; running 4 sequences in lockstep per thread to overlap the
// chains was tried and measured no faster here (~2 ns/token either way), so
// the plain loop stays.
template <typename scalar_t>
void returns_scan(const scalar_t* r, const bool* m, scalar_t* ret, int64_t begin, int64_t end,
                  double gamma) {
  double g = 0.0;
  for (int64_t t = end - 1; t >= begin; --t) {
    if (m[t]) {
      g = static_cast<double>(r[t]) + gamma * g;
      ret[t] = static_cast<scalar_t>(g);
    } else {
      ret[t] = static_cast<scalar_t>(0.0);
    }
  }
}

template <typename scalar_t>
void gae_scan(const scalar_t* r, const scalar_t* v, const bool* m, scalar_t* adv, scalar_t* ret,
              int64_t begin, int64_t end, double gamma, double gamma_lam) {
  double next_value = 0.0;  // value of the next unmasked token; 0 past the last one
  double a = 0.0;
  for (int64_t t = end - 1; t >= begin; --t) {
    if (m[t]) {
      const double value = static_cast<double>(v[t]);
      const double delta = static_cast<double>(r[t]) + gamma * next_value - value;
      a = delta + gamma_lam * a;
      next_value = value;
      adv[t] = static_cast<scalar_t>(a);
      ret[t] = static_cast<scalar_t>(a + value);
    } else {
      adv[t] = static_cast<scalar_t>(0.0);
      ret[t] = static_cast<scalar_t>(0.0);
    }
  }
}

// The packed layout's checks (csrc/common/advantages_args.h) plus its values, which the CPU
// reads for free: cu_seqlens starts at 0, ends at the token count and never decreases.
// Returns the mask as a contiguous bool tensor.
at::Tensor check_packed(const char* op, const at::Tensor& rewards_N, const at::Tensor& mask_N,
                        const at::Tensor& cu_seqlens) {
  at::Tensor mask = checks::packed(op, rewards_N, mask_N, cu_seqlens, c10::DeviceType::CPU);
  const at::Tensor cu = cu_seqlens.contiguous();
  const int64_t* c = cu.const_data_ptr<int64_t>();
  const int64_t num_seqs = cu.size(0) - 1;
  TORCH_CHECK_VALUE(c[0] == 0 && c[num_seqs] == rewards_N.size(0), op,
                    ": cu_seqlens must start at 0 and end at the number of tokens ", rewards_N.size(0), ", got ",
                    c[0], " ... ", c[num_seqs]);
  for (int64_t s = 0; s < num_seqs; ++s) {
    TORCH_CHECK_VALUE(c[s + 1] >= c[s], op, ": cu_seqlens must not decrease, got cu_seqlens[", s, "] = ", c[s],
                      " > cu_seqlens[", s + 1, "] = ", c[s + 1]);
  }
  return mask;
}

}  // namespace

at::Tensor group_normalize_cpu(const at::Tensor& rewards_GN, double eps, bool scale_by_std) {
  checks::groups("slime_rl::group_normalize", rewards_GN, c10::DeviceType::CPU);
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

at::Tensor loo_advantages_cpu(const at::Tensor& rewards_GN) {
  checks::groups("slime_rl::loo_advantages", rewards_GN, c10::DeviceType::CPU);
  const at::Tensor in_GN = rewards_GN.contiguous();
  at::Tensor out_GN = at::empty_like(in_GN);
  if (in_GN.size(0) == 0) return out_GN;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, in_GN.scalar_type(), "slime_rl::loo_advantages", [&] {
        loo_rows<scalar_t>(in_GN.const_data_ptr<scalar_t>(), out_GN.mutable_data_ptr<scalar_t>(),
                           in_GN.size(0), in_GN.size(1));
      });
  return out_GN;
}

at::Tensor discounted_returns_cpu(const at::Tensor& rewards_N, const at::Tensor& mask_N,
                                  const at::Tensor& cu_seqlens, double gamma) {
  constexpr const char* op = "slime_rl::discounted_returns";
  const at::Tensor mask = check_packed(op, rewards_N, mask_N, cu_seqlens);
  checks::discount(op, "gamma", gamma);
  const at::Tensor r_N = rewards_N.contiguous();
  const at::Tensor cu = cu_seqlens.contiguous();
  at::Tensor ret_N = at::empty_like(r_N);
  const int64_t num_seqs = cu.size(0) - 1;
  const int64_t* c = cu.const_data_ptr<int64_t>();
  const bool* m = mask.const_data_ptr<bool>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, r_N.scalar_type(), op, [&] {
    const scalar_t* r = r_N.const_data_ptr<scalar_t>();
    scalar_t* ret = ret_N.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, num_seqs, sequence_grain(r_N.size(0), num_seqs),
                     [&](int64_t begin, int64_t end) {
                       for (int64_t s = begin; s < end; ++s) {
                         returns_scan<scalar_t>(r, m, ret, c[s], c[s + 1], gamma);
                       }
                     });
  });
  return ret_N;
}

std::tuple<at::Tensor, at::Tensor> gae_cpu(const at::Tensor& rewards_N, const at::Tensor& values_N,
                                           const at::Tensor& mask_N, const at::Tensor& cu_seqlens,
                                           double gamma, double lam) {
  constexpr const char* op = "slime_rl::gae";
  const at::Tensor mask = check_packed(op, rewards_N, mask_N, cu_seqlens);
  checks::values_like(op, values_N, rewards_N);
  checks::discount(op, "gamma", gamma);
  checks::discount(op, "lam", lam);
  const at::Tensor r_N = rewards_N.contiguous();
  const at::Tensor v_N = values_N.contiguous();
  const at::Tensor cu = cu_seqlens.contiguous();
  at::Tensor adv_N = at::empty_like(r_N);
  at::Tensor ret_N = at::empty_like(r_N);
  const int64_t num_seqs = cu.size(0) - 1;
  const int64_t* c = cu.const_data_ptr<int64_t>();
  const bool* m = mask.const_data_ptr<bool>();
  const double gamma_lam = gamma * lam;  // as the reference: one product, in double
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, r_N.scalar_type(), op, [&] {
    const scalar_t* r = r_N.const_data_ptr<scalar_t>();
    const scalar_t* v = v_N.const_data_ptr<scalar_t>();
    scalar_t* adv = adv_N.mutable_data_ptr<scalar_t>();
    scalar_t* ret = ret_N.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, num_seqs, sequence_grain(r_N.size(0), num_seqs),
                     [&](int64_t begin, int64_t end) {
                       for (int64_t s = begin; s < end; ++s) {
                         gae_scan<scalar_t>(r, v, m, adv, ret, c[s], c[s + 1], gamma, gamma_lam);
                       }
                     });
  });
  return {adv_N, ret_N};
}

TORCH_LIBRARY_IMPL(slime_rl, CPU, m) {
  m.impl("group_normalize", &group_normalize_cpu);
  m.impl("loo_advantages", &loo_advantages_cpu);
  m.impl("discounted_returns", &discounted_returns_cpu);
  m.impl("gae", &gae_cpu);
}

}  // namespace slime_rl
