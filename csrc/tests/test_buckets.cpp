// C++ test of the CPU weight-bucket copy (copy_into): every result is compared,
// bit for bit, with Tensor::copy_ entry by entry and, for the float casts, with
// a naive loop of c10 scalar conversions; called both directly and through the
// dispatcher (torch.ops.slime_rl.copy_into). NaNs only need to stay NaNs: their
// payload bits are not part of the contract (torch's own paths disagree).
// Built and run by CMakeLists.txt (`ctest`); returns nonzero on a mismatch.

#include "../cpu/buckets.h"
#include "check.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/TypeCast.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

using namespace slime_rl_test;

namespace {

// got == want bit for bit, except that NaNs compare by NaN-ness.
void expect_same(const std::string& what, const at::Tensor& got, const at::Tensor& want) {
  if (got.scalar_type() != want.scalar_type() || got.sizes() != want.sizes()) {
    fail(what, "wrong dtype or shape");
    return;
  }
  const at::Tensor g = got.contiguous();
  const at::Tensor w = want.contiguous();
  const int64_t item = static_cast<int64_t>(g.element_size());
  const auto* gb = static_cast<const unsigned char*>(g.const_data_ptr());
  const auto* wb = static_cast<const unsigned char*>(w.const_data_ptr());
  const at::Tensor g_nan = g.is_floating_point() ? g.isnan() : at::zeros(g.sizes(), at::kBool);
  const at::Tensor w_nan = w.is_floating_point() ? w.isnan() : at::zeros(w.sizes(), at::kBool);
  const bool* gn = g_nan.const_data_ptr<bool>();
  const bool* wn = w_nan.const_data_ptr<bool>();
  for (int64_t i = 0; i < g.numel(); ++i) {
    if (gn[i] != wn[i]) {
      fail(what, "NaN at element " + std::to_string(i) + " in one result only");
      return;
    }
    if (!wn[i] && std::memcmp(gb + i * item, wb + i * item, static_cast<size_t>(item)) != 0) {
      fail(what, "element " + std::to_string(i) + " differs from copy_");
      return;
    }
  }
}

// Values for every rounding case: random over all exponents, ties, subnormals, inf, NaN.
at::Tensor special_values(int64_t n) {
  const at::Tensor wide =
      at::randn({n}, at::kDouble) * at::exp2(at::randint(-150, 130, {n}, at::kLong).to(at::kDouble));
  const double inf = std::numeric_limits<double>::infinity();
  const std::vector<double> fixed = {0.0, -0.0, inf, -inf, std::nan(""),
                                     1.0 + std::ldexp(1.0, -8),   // bf16 tie, even: down
                                     1.0 + 3 * std::ldexp(1.0, -8),  // bf16 tie, odd: up
                                     1.0 + std::ldexp(1.0, -11),  // fp16 tie
                                     1.0 + std::ldexp(1.0, -8) + std::ldexp(1.0, -40),  // double rounding
                                     65504.0, 65520.0, std::ldexp(1.0, -25), std::ldexp(1.0, -149),
                                     1e-310, 1e300};
  return at::cat({at::tensor(fixed, at::kDouble), wide});
}

// The naive spec of a float cast: one c10 scalar conversion per element.
template <typename S, typename D>
at::Tensor naive_cast(const at::Tensor& src, at::ScalarType dst_dtype) {
  at::Tensor out = at::empty(src.sizes(), src.options().dtype(dst_dtype));
  const S* s = src.const_data_ptr<S>();
  D* d = out.mutable_data_ptr<D>();
  for (int64_t i = 0; i < src.numel(); ++i) d[i] = c10::convert<D>(s[i]);
  return out;
}

template <typename S>
at::Tensor naive_cast_from(const at::Tensor& src, at::ScalarType dst_dtype) {
  switch (dst_dtype) {
    case at::kFloat: return naive_cast<S, float>(src, dst_dtype);
    case at::kDouble: return naive_cast<S, double>(src, dst_dtype);
    case at::kHalf: return naive_cast<S, c10::Half>(src, dst_dtype);
    default: return naive_cast<S, c10::BFloat16>(src, dst_dtype);
  }
}

at::Tensor naive(const at::Tensor& src, at::ScalarType dst_dtype) {
  switch (src.scalar_type()) {
    case at::kFloat: return naive_cast_from<float>(src, dst_dtype);
    case at::kDouble: return naive_cast_from<double>(src, dst_dtype);
    case at::kHalf: return naive_cast_from<c10::Half>(src, dst_dtype);
    default: return naive_cast_from<c10::BFloat16>(src, dst_dtype);
  }
}

// Runs copy_into (directly or through the dispatcher) and the copy_ loop on
// fresh destinations from make(); compares entry by entry.
template <typename Make>
void check_list(const std::string& what, Make make, const std::vector<at::Tensor>& srcs, bool dispatch) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("slime_rl::copy_into", "")
                             .typed<void(at::TensorList, at::TensorList)>();
  std::vector<at::Tensor> got = make();
  std::vector<at::Tensor> want = make();
  if (dispatch) {
    op.call(got, srcs);
  } else {
    slime_rl::copy_into_cpu(got, srcs);
  }
  for (size_t i = 0; i < want.size(); ++i) want[i].copy_(srcs[i]);
  for (size_t i = 0; i < got.size(); ++i) {
    expect_same(what + " entry " + std::to_string(i), got[i], want[i]);
  }
}

}  // namespace

int main() {
  at::manual_seed(0);
  at::set_num_threads(2);  // so the parallel split runs even where the default is one thread
  const std::vector<at::ScalarType> floats = {at::kFloat, at::kDouble, at::kHalf, at::kBFloat16};
  const at::Tensor values = special_values(20000);

  // Every float pair, many sizes in one list, against copy_ and the naive loop.
  for (const auto s_dt : floats) {
    for (const auto d_dt : floats) {
      const std::string what = std::string(c10::toString(s_dt)) + "->" + c10::toString(d_dt);
      const at::Tensor src_all = values.to(s_dt);
      std::vector<at::Tensor> srcs;
      for (const int64_t n : {0L, 1L, 7L, 33L, 1000L, src_all.numel()}) srcs.push_back(src_all.slice(0, 0, n));
      auto make = [&] {
        std::vector<at::Tensor> d;
        for (const auto& s : srcs) d.push_back(at::full(s.sizes(), 3.0, s.options().dtype(d_dt)));
        return d;
      };
      check_list(what, make, srcs, false);
      check_list(what + " (dispatcher)", make, srcs, true);
      at::Tensor out = at::empty(src_all.sizes(), src_all.options().dtype(d_dt));
      slime_rl::copy_into_cpu({out}, {src_all});
      expect_same(what + " vs naive loop", out, naive(src_all, d_dt));
    }
  }

  // A 3M-element entry between small ones, split over the threads.
  {
    const at::Tensor big = at::randn({3000001});
    const std::vector<at::Tensor> srcs = {at::randn({5}), big, at::randn({129}).to(at::kHalf)};
    auto make = [] {
      return std::vector<at::Tensor>{at::zeros({5}, at::kBFloat16), at::zeros({3000001}, at::kBFloat16),
                                     at::zeros({129}, at::kFloat)};
    };
    check_list("big", make, srcs, false);
  }

  // Strided sides, other dtypes and overlapping entries: the loop's result.
  {
    const at::Tensor w = at::randn({48, 40});
    const at::Tensor src_i = at::arange(12, at::kLong);
    const std::vector<at::Tensor> srcs = {w.t(), w.slice(1, 0, 40, 2), w.select(1, 3), src_i, w.slice(0, 0, 1)};
    auto make = [] {
      return std::vector<at::Tensor>{at::zeros({40, 48}, at::kBFloat16), at::zeros({20, 48}, at::kHalf).t(),
                                     at::zeros({48}, at::kFloat), at::zeros({12}, at::kFloat),
                                     at::zeros({1, 40}, at::kDouble)};
    };
    check_list("strided and other dtypes", make, srcs, false);

    // Entry 1 reads what entry 0 wrote; entries 2 and 3 write the same bytes (the later wins).
    const at::Tensor base = at::arange(16, at::kFloat);
    at::Tensor x_got = at::zeros({16}), y_got = at::zeros({16}, at::kBFloat16);
    at::Tensor x_want = at::zeros({16}), y_want = at::zeros({16}, at::kBFloat16);
    slime_rl::copy_into_cpu({x_got.slice(0, 0, 8), y_got.slice(0, 0, 8), x_got.slice(0, 8), x_got.slice(0, 8)},
                            {base.slice(0, 0, 8), x_got.slice(0, 0, 8), base.slice(0, 8), base.slice(0, 0, 8)});
    x_want.slice(0, 0, 8).copy_(base.slice(0, 0, 8));
    y_want.slice(0, 0, 8).copy_(x_want.slice(0, 0, 8));
    x_want.slice(0, 8).copy_(base.slice(0, 8));
    x_want.slice(0, 8).copy_(base.slice(0, 0, 8));
    expect_same("overlap fp32", x_got, x_want);
    expect_same("overlap bf16", y_got, y_want);
  }

  // Errors name the entry.
  expect_error("shape mismatch", "entry 1 destination shape [2] != source shape [3]", [] {
    slime_rl::copy_into_cpu({at::zeros({3}), at::zeros({2})}, {at::zeros({3}), at::zeros({3})});
  });
  expect_error("length mismatch", "2 destinations but 1 sources",
               [] { slime_rl::copy_into_cpu({at::zeros({3}), at::zeros({3})}, {at::zeros({3})}); });
  expect_error("device mismatch", "entry 0 copies from meta to cpu", [] {
    slime_rl::copy_into_cpu({at::zeros({3})}, {at::empty({3}, at::TensorOptions().device(at::kMeta))});
  });

  return finish("test_buckets");
}
