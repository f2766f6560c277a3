// Torch glue for the CUDA weight-bucket copy (kernel: buckets.cu): plans the
// list (shared with the CPU kernel, csrc/cpu/buckets.cpp), uploads the table
// of contiguous entries and launches once; strided or otherwise unsupported
// entries go through Tensor::copy_ after it, in list order, on the same stream.
// Compiled only in CUDA builds (setup.py CUDAExtension, the JIT loader with a
// CUDA torch, CMake with SLIME_RL_WITH_CUDA=ON).

#include "buckets.h"

#include "../cpu/buckets.h"

#include <c10/cuda/CUDAStream.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

namespace slime_rl {
namespace {

cuda::CopyKind float_kind(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat: return cuda::kCopyF32;
    case at::kDouble: return cuda::kCopyF64;
    case at::kHalf: return cuda::kCopyF16;
    case at::kBFloat16: return cuda::kCopyBF16;
    default: TORCH_INTERNAL_ASSERT(false, "slime_rl::copy_into: no CUDA cast for ", dtype);
  }
  return cuda::kCopyF32;  // unreachable
}

// The table entry for one contiguous pair the plan marked fast.
cuda::CopyEntry make_entry(const at::Tensor& dst, const at::Tensor& src) {
  cuda::CopyEntry e{src.const_data_ptr(), dst.mutable_data_ptr(), dst.numel(), 0, 0};
  if (dst.scalar_type() != src.scalar_type()) {
    e.src_kind = float_kind(src.scalar_type());
    e.dst_kind = float_kind(dst.scalar_type());
    return e;
  }
  // Same dtype: raw units, the widest that divides both addresses and the size.
  const auto nbytes = static_cast<uintptr_t>(dst.numel() * dst.element_size());
  const uintptr_t bits =
      reinterpret_cast<uintptr_t>(e.src) | reinterpret_cast<uintptr_t>(e.dst) | nbytes;
  int64_t unit = 16;
  int32_t kind = cuda::kCopyRaw16;
  while (bits % static_cast<uintptr_t>(unit) != 0) {
    unit /= 2;
    --kind;
  }
  e.numel = static_cast<int64_t>(nbytes) / unit;
  e.src_kind = e.dst_kind = kind;
  return e;
}

void copy_into_cuda(at::TensorList dsts, at::TensorList srcs) {
  constexpr const char* op = "slime_rl::copy_into";
  const buckets::CopyPlan plan = buckets::plan_copies(op, dsts, srcs, c10::DeviceType::CUDA);
  if (dsts.empty()) return;
  const c10::Device device = dsts[0].device();
  for (size_t i = 1; i < dsts.size(); ++i) {
    TORCH_CHECK(dsts[i].device() == device, op, ": entry ", i, " is on ", dsts[i].device(),
                " but entry 0 on ", device, "; one call copies on one GPU");
  }
  const c10::cuda::CUDAGuard device_guard(device);
  if (!plan.fast.empty()) {
    std::vector<cuda::CopyEntry> entries;
    std::vector<cuda::CopyChunk> chunks;
    entries.reserve(plan.fast.size());
    for (const int64_t i : plan.fast) {
      const auto k = static_cast<int64_t>(entries.size());
      entries.push_back(make_entry(dsts[i], srcs[i]));
      const int64_t n = entries.back().numel;
      for (int64_t b = 0; b < n; b += cuda::kCopyChunkElems) {
        chunks.push_back({k, b, std::min(n, b + cuda::kCopyChunkElems)});
      }
    }
    // Both tables in one pinned host buffer and one asynchronous upload on the
    // current stream; the caching host allocator keeps the buffer alive until
    // the upload is done, and the device copy is freed into this stream's pool,
    // so later work on the stream cannot overwrite it before the kernel ran.
    const size_t entry_bytes = entries.size() * sizeof(cuda::CopyEntry);
    const size_t chunk_bytes = chunks.size() * sizeof(cuda::CopyChunk);
    const auto total = static_cast<int64_t>(entry_bytes + chunk_bytes);
    at::Tensor host = at::empty({total}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
    auto* h = static_cast<char*>(host.mutable_data_ptr());
    std::memcpy(h, entries.data(), entry_bytes);
    std::memcpy(h + entry_bytes, chunks.data(), chunk_bytes);
    at::Tensor table = at::empty({total}, at::TensorOptions().dtype(at::kByte).device(device));
    table.copy_(host, /*non_blocking=*/true);
    const auto* d = static_cast<const char*>(table.const_data_ptr());
    const cudaError_t status = cuda::launch_copy_into(
        reinterpret_cast<const cuda::CopyEntry*>(d),
        reinterpret_cast<const cuda::CopyChunk*>(d + entry_bytes),
        static_cast<int64_t>(chunks.size()), c10::cuda::getCurrentCUDAStream());
    TORCH_CHECK(status == cudaSuccess, op, ": CUDA launch failed: ", cudaGetErrorString(status));
  }
  for (const int64_t i : plan.slow) dsts[i].copy_(srcs[i]);
}

}  // namespace

TORCH_LIBRARY_IMPL(slime_rl, CUDA, m) { m.impl("copy_into", &copy_into_cuda); }

}  // namespace slime_rl
