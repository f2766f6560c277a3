// Weight-bucket copies on the CPU: copy_into(dsts, srcs) = dsts[i].copy_(srcs[i])
// for a whole list in one call. Packing a bucket is copy_into(views of the flat
// buffer, parameters), unpacking the reverse (slime_rl/ops/buckets.py).
//
// Why a kernel: weight sync packs a few hundred tensors per bucket, usually
// casting fp32 -> bf16. A Python loop of copy_ pays a dispatch and a
// TensorIterator per tensor, and parallelizes each tensor on its own: small ones
// run on one thread, each large one forks the pool again. Here the list is
// planned once (plan_copies),
// and the contiguous entries are flattened into one byte range split into
// ~256 KiB units: one at::parallel_for over the units gives each thread a
// contiguous run of the list, so one huge tensor and many small ones both
// spread over the threads. Same-dtype entries are memcpy; casts are plain
// loops the compiler vectorizes (compiled twice: portable, and AVX2 + F16C
// picked at run time), rounding exactly as torch does (below). Strided
// entries, other dtype pairs and entries that overlap fall back to
// Tensor::copy_, in list order.
//
// Reference: slime_rl/ops/buckets.py (the copy_ loop). Tests:
// tests/test_bucket_ops.py, csrc/tests/test_buckets.cpp (bit-identical to copy_).

#include "buckets.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define SLIME_RL_X86 1
#include <immintrin.h>
#else
#define SLIME_RL_X86 0
#endif

// The conversion helpers are inlined into each ISA variant of the copy loop
// (copy_elements_portable / _avx2), so each is compiled for that ISA.
#define SLIME_RL_INLINE inline __attribute__((always_inline))

namespace slime_rl {
namespace buckets {

bool is_cast_dtype(at::ScalarType dtype) {
  return dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf ||
         dtype == at::kBFloat16;
}

namespace {

// The bytes [lo, hi) a tensor may touch: its whole span when strided.
struct Span {
  uintptr_t lo;
  uintptr_t hi;
  int64_t entry;
  bool is_dst;
};

Span span_of(const at::Tensor& t, int64_t entry, bool is_dst) {
  int64_t last = 0;  // element offset of the last element (strides are never negative in torch)
  for (int64_t d = 0; d < t.dim(); ++d) last += (t.size(d) - 1) * t.stride(d);
  const auto lo = reinterpret_cast<uintptr_t>(t.const_data_ptr());
  return {lo, lo + static_cast<uintptr_t>((last + 1) * t.element_size()), entry, is_dst};
}

// A pair the kernels copy themselves: both sides dense in the same order,
// plain values (no lazy conj/neg bit, not quantized) and a dtype pair they know.
bool kernel_can_copy(const at::Tensor& dst, const at::Tensor& src) {
  if (dst.is_quantized() || src.is_quantized() || dst.is_conj() || src.is_conj() ||
      dst.is_neg() || src.is_neg()) {
    return false;
  }
  if (!dst.is_contiguous() || !src.is_contiguous()) return false;
  return dst.scalar_type() == src.scalar_type() ||
         (is_cast_dtype(dst.scalar_type()) && is_cast_dtype(src.scalar_type()));
}

}  // namespace

CopyPlan plan_copies(const char* op, at::TensorList dsts, at::TensorList srcs,
                     c10::DeviceType device_type) {
  TORCH_CHECK(dsts.size() == srcs.size(), op, ": ", dsts.size(), " destinations but ", srcs.size(),
              " sources");
  const auto n = static_cast<int64_t>(dsts.size());
  std::vector<char> fast(n, 0);
  std::vector<Span> spans;
  for (int64_t i = 0; i < n; ++i) {
    const at::Tensor& dst = dsts[i];
    const at::Tensor& src = srcs[i];
    TORCH_CHECK(dst.defined() && src.defined(), op, ": entry ", i, " holds an undefined tensor");
    TORCH_CHECK(dst.layout() == at::kStrided && src.layout() == at::kStrided, op, ": entry ", i,
                " must be dense (strided) tensors, got ", dst.layout(), " <- ", src.layout());
    TORCH_CHECK(dst.device() == src.device(), op, ": entry ", i, " copies from ", src.device(),
                " to ", dst.device(), "; the kernel copies within one device "
                "(slime_rl.ops.copy_into moves devices with copy_)");
    TORCH_CHECK(dst.device().type() == device_type, op, ": entry ", i, " is on ", dst.device(),
                ", this kernel takes ", device_type, " tensors");
    TORCH_CHECK(dst.sizes() == src.sizes(), op, ": entry ", i, " destination shape ", dst.sizes(),
                " != source shape ", src.sizes());
    if (dst.numel() == 0) continue;  // nothing to copy; copy_ would do nothing either
    fast[i] = kernel_can_copy(dst, src) ? 1 : 0;
    spans.push_back(span_of(dst, i, true));
    spans.push_back(span_of(src, i, false));
  }
  // A fast entry must share no byte with another entry's destination, nor its
  // destination with any other source (nor its own source): then the fast
  // entries may run concurrently and before the rest, and the result is still
  // the sequential loop's. Sorted by start, each span is compared with the
  // spans that begin inside it; both entries of a clash leave the fast set.
  // Spans are conservative for strided tensors, which are slow anyway.
  std::sort(spans.begin(), spans.end(), [](const Span& a, const Span& b) { return a.lo < b.lo; });
  for (size_t a = 0; a < spans.size(); ++a) {
    for (size_t b = a + 1; b < spans.size() && spans[b].lo < spans[a].hi; ++b) {
      if (spans[a].is_dst || spans[b].is_dst) fast[spans[a].entry] = fast[spans[b].entry] = 0;
    }
  }
  CopyPlan plan;
  for (int64_t i = 0; i < n; ++i) {
    if (dsts[i].numel() == 0) continue;
    (fast[i] ? plan.fast : plan.slow).push_back(i);
  }
  return plan;
}

}  // namespace buckets

namespace {

// Bytes moved (read + written) per parallel unit: large enough that the fork
// and the bookkeeping are noise, small enough that a bucket of ~100 MB splits
// into hundreds of units.
constexpr int64_t kUnitBytes = 256 * 1024;
// Casts with neither side fp32 go through an fp32 block of this many elements
// on the stack.
constexpr int64_t kStageElems = 512;

// ---- conversions, each rounding exactly as torch's copy_ does -------------
//
// Every cast is S -> fp32 -> D, which is what c10 does: fp16/bf16 -> fp32 is
// exact, fp64 -> fp16/bf16 converts to fp32 first (c10::Half and
// c10::BFloat16 are constructed from float), and fp32 <-> fp64 is one
// static_cast. fp32 -> bf16 is round to nearest even on the bits, as
// c10::BFloat16; fp32 <-> fp16 is c10::Half's conversion, or the F16C
// instructions where the CPU has them (IEEE round to nearest even, like
// c10's; torch's own AVX2 kernels use the same instructions).

// c10::BFloat16(float) written on bits so the loops vectorize with integer
// ops: round to nearest even; every NaN becomes 0x7FC0.
SLIME_RL_INLINE uint16_t bf16_bits_from_float(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  const auto rounded = static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
  return (u & 0x7FFFFFFFu) > 0x7F800000u ? static_cast<uint16_t>(0x7FC0) : rounded;
}

SLIME_RL_INLINE float float_from_bf16_bits(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

// fp16 <-> fp32 loops, portable: c10::Half's own conversions.
struct PortableHalf {
  static void from_float(const float* s, c10::Half* d, int64_t n) {
    for (int64_t i = 0; i < n; ++i) d[i] = c10::Half(s[i]);
  }
  static void to_float(const c10::Half* s, float* d, int64_t n) {
    for (int64_t i = 0; i < n; ++i) d[i] = static_cast<float>(s[i]);
  }
};

#if SLIME_RL_X86
// fp16 <-> fp32 with the F16C instructions, 8 lanes at a time.
struct F16cHalf {
  __attribute__((target("avx,f16c"))) static void from_float(const float* s, c10::Half* d,
                                                             int64_t n) {
    auto* out = reinterpret_cast<uint16_t*>(d);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
      const __m128i h = _mm256_cvtps_ph(_mm256_loadu_ps(s + i), _MM_FROUND_TO_NEAREST_INT);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i), h);
    }
    for (; i < n; ++i) out[i] = _cvtss_sh(s[i], _MM_FROUND_TO_NEAREST_INT);
  }
  __attribute__((target("avx,f16c"))) static void to_float(const c10::Half* s, float* d,
                                                           int64_t n) {
    const auto* in = reinterpret_cast<const uint16_t*>(s);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
      const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(in + i));
      _mm256_storeu_ps(d + i, _mm256_cvtph_ps(h));
    }
    for (; i < n; ++i) d[i] = _cvtsh_ss(in[i]);
  }
};
#endif

// S -> fp32 and fp32 -> D, for S, D in {fp32, fp64, fp16, bf16}; H does fp16.
template <typename H>
SLIME_RL_INLINE void to_float(const float* s, float* d, int64_t n) {
  std::memcpy(d, s, static_cast<size_t>(n) * sizeof(float));
}
template <typename H>
SLIME_RL_INLINE void to_float(const double* s, float* d, int64_t n) {
  for (int64_t i = 0; i < n; ++i) d[i] = static_cast<float>(s[i]);
}
template <typename H>
SLIME_RL_INLINE void to_float(const c10::BFloat16* s, float* d, int64_t n) {
  const auto* in = reinterpret_cast<const uint16_t*>(s);
  for (int64_t i = 0; i < n; ++i) d[i] = float_from_bf16_bits(in[i]);
}
template <typename H>
SLIME_RL_INLINE void to_float(const c10::Half* s, float* d, int64_t n) {
  H::to_float(s, d, n);
}
template <typename H>
SLIME_RL_INLINE void from_float(const float* s, float* d, int64_t n) {
  std::memcpy(d, s, static_cast<size_t>(n) * sizeof(float));
}
template <typename H>
SLIME_RL_INLINE void from_float(const float* s, double* d, int64_t n) {
  for (int64_t i = 0; i < n; ++i) d[i] = static_cast<double>(s[i]);
}
template <typename H>
SLIME_RL_INLINE void from_float(const float* s, c10::BFloat16* d, int64_t n) {
  auto* out = reinterpret_cast<uint16_t*>(d);
  for (int64_t i = 0; i < n; ++i) out[i] = bf16_bits_from_float(s[i]);
}
template <typename H>
SLIME_RL_INLINE void from_float(const float* s, c10::Half* d, int64_t n) {
  H::from_float(s, d, n);
}

// d[i] = s[i] for n elements, as torch casts (see above).
template <typename H, typename S, typename D>
SLIME_RL_INLINE void cast(const S* s, D* d, int64_t n) {
  if constexpr (std::is_same_v<S, D>) {
    std::memcpy(d, s, static_cast<size_t>(n) * sizeof(S));
  } else if constexpr (std::is_same_v<S, float>) {
    from_float<H>(s, d, n);
  } else if constexpr (std::is_same_v<D, float>) {
    to_float<H>(s, d, n);
  } else {
    float stage[kStageElems];
    for (int64_t i = 0; i < n; i += kStageElems) {
      const int64_t m = std::min(kStageElems, n - i);
      to_float<H>(s + i, stage, m);
      from_float<H>(stage, d + i, m);
    }
  }
}

// One contiguous entry the parallel loop copies.
struct FastEntry {
  const char* src;
  char* dst;
  at::ScalarType src_dtype;
  at::ScalarType dst_dtype;
  int64_t src_item;
  int64_t dst_item;
};

template <typename H, typename D>
SLIME_RL_INLINE void cast_to(const FastEntry& e, int64_t begin, int64_t count) {
  D* d = reinterpret_cast<D*>(e.dst) + begin;
  switch (e.src_dtype) {
    case at::kFloat: return cast<H>(reinterpret_cast<const float*>(e.src) + begin, d, count);
    case at::kDouble: return cast<H>(reinterpret_cast<const double*>(e.src) + begin, d, count);
    case at::kHalf: return cast<H>(reinterpret_cast<const c10::Half*>(e.src) + begin, d, count);
    case at::kBFloat16:
      return cast<H>(reinterpret_cast<const c10::BFloat16*>(e.src) + begin, d, count);
    default: TORCH_INTERNAL_ASSERT(false, "slime_rl::copy_into: no cast from ", e.src_dtype);
  }
}

// Elements [begin, end) of one entry.
template <typename H>
SLIME_RL_INLINE void copy_elements(const FastEntry& e, int64_t begin, int64_t end) {
  if (e.src_dtype == e.dst_dtype) {
    std::memcpy(e.dst + begin * e.dst_item, e.src + begin * e.src_item,
                static_cast<size_t>((end - begin) * e.dst_item));
    return;
  }
  switch (e.dst_dtype) {
    case at::kFloat: return cast_to<H, float>(e, begin, end - begin);
    case at::kDouble: return cast_to<H, double>(e, begin, end - begin);
    case at::kHalf: return cast_to<H, c10::Half>(e, begin, end - begin);
    case at::kBFloat16: return cast_to<H, c10::BFloat16>(e, begin, end - begin);
    default: TORCH_INTERNAL_ASSERT(false, "slime_rl::copy_into: no cast to ", e.dst_dtype);
  }
}

// The same loops compiled twice: for any x86-64 / other CPU, and with AVX2 +
// F16C (wider vectors for the bf16 and fp64 loops, hardware fp16), picked once
// at run time.
using CopyElementsFn = void (*)(const FastEntry&, int64_t, int64_t);

void copy_elements_portable(const FastEntry& e, int64_t begin, int64_t end) {
  copy_elements<PortableHalf>(e, begin, end);
}

#if SLIME_RL_X86
__attribute__((target("avx2,fma,f16c"))) void copy_elements_avx2(const FastEntry& e,
                                                                 int64_t begin, int64_t end) {
  copy_elements<F16cHalf>(e, begin, end);
}
#endif

CopyElementsFn pick_copy_elements() {
#if SLIME_RL_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
      __builtin_cpu_supports("f16c")) {
    return &copy_elements_avx2;
  }
#endif
  return &copy_elements_portable;
}

// The fast entries laid end to end as one range of bytes moved (read +
// written; start[k] is where entry k begins, start[n] the total). Each thread
// takes a contiguous run of ~256 KiB units and copies the element ranges of
// the entries its run covers. An element belongs to the unit holding its first
// byte, so neighbouring runs split an entry without gap or overlap.
void copy_fast(const std::vector<FastEntry>& entries, const std::vector<int64_t>& start) {
  const auto n = static_cast<int64_t>(entries.size());
  const int64_t total = start[n];
  const int64_t units = (total + kUnitBytes - 1) / kUnitBytes;
  static const CopyElementsFn copy = pick_copy_elements();
  at::parallel_for(0, units, 1, [&](int64_t unit_begin, int64_t unit_end) {
    const int64_t lo = unit_begin * kUnitBytes;
    const int64_t hi = std::min(total, unit_end * kUnitBytes);
    // The last entry starting at or before lo, then every entry starting before hi.
    int64_t k = std::upper_bound(start.begin(), start.end(), lo) - start.begin() - 1;
    for (; k < n && start[k] < hi; ++k) {
      const int64_t width = entries[k].src_item + entries[k].dst_item;
      const int64_t begin = (std::max(lo, start[k]) - start[k] + width - 1) / width;
      const int64_t end = (std::min(hi, start[k + 1]) - start[k] + width - 1) / width;
      if (end > begin) copy(entries[k], begin, end);
    }
  });
}

}  // namespace

void copy_into_cpu(at::TensorList dsts, at::TensorList srcs) {
  constexpr const char* op = "slime_rl::copy_into";
  const buckets::CopyPlan plan = buckets::plan_copies(op, dsts, srcs, c10::DeviceType::CPU);

  const auto n_fast = static_cast<int64_t>(plan.fast.size());
  std::vector<FastEntry> entries;
  std::vector<int64_t> start(n_fast + 1, 0);  // start[k]: first byte of fast entry k, end to end
  entries.reserve(n_fast);
  for (int64_t k = 0; k < n_fast; ++k) {
    const at::Tensor& dst = dsts[plan.fast[k]];
    const at::Tensor& src = srcs[plan.fast[k]];
    entries.push_back({static_cast<const char*>(src.const_data_ptr()),
                       static_cast<char*>(dst.mutable_data_ptr()), src.scalar_type(),
                       dst.scalar_type(), static_cast<int64_t>(src.element_size()),
                       static_cast<int64_t>(dst.element_size())});
    start[k + 1] = start[k] + dst.numel() * (entries[k].src_item + entries[k].dst_item);
  }
  copy_fast(entries, start);
  for (const int64_t i : plan.slow) dsts[i].copy_(srcs[i]);
}

TORCH_LIBRARY_IMPL(slime_rl, CPU, m) { m.impl("copy_into", &copy_into_cpu); }

}  // namespace slime_rl
