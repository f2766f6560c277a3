// CUDA weight-bucket copy kernel: torch-free launcher (see advantages.h for why
// the .cu files include no torch header). Torch glue: buckets_ops.cpp.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace slime_rl {
namespace cuda {

// What one side of an entry holds. Casts run between the four float kinds;
// same-dtype entries are raw copies in units of 1, 2, 4, 8 or 16 bytes (the
// widest unit dividing both addresses and the size; src_kind == dst_kind).
enum CopyKind : int32_t {
  kCopyF32 = 0,
  kCopyF64 = 1,
  kCopyF16 = 2,
  kCopyBF16 = 3,
  kCopyRaw1 = 4,
  kCopyRaw2 = 5,
  kCopyRaw4 = 6,
  kCopyRaw8 = 7,
  kCopyRaw16 = 8,
};

// One contiguous entry: numel elements (raw: units) from src to dst, device pointers.
struct CopyEntry {
  const void* src;
  void* dst;
  int64_t numel;
  int32_t src_kind;
  int32_t dst_kind;
};

// Elements [begin, end) of entries[entry]: the unit of work of one block.
struct CopyChunk {
  int64_t entry;
  int64_t begin;
  int64_t end;
};

// How many elements (copy units) the host puts in one chunk: 256 threads x 32. Small enough that a
// single large tensor becomes many blocks (a 100 MB bf16 tensor: ~6,400 chunks, every SM busy;
// 64K-element chunks left most of an H100's SMs idle on such a tensor), large enough that the
// chunk table stays ~0.3% of the bytes it describes at worst (24 bytes per 8K elements).
constexpr int64_t kCopyChunkElems = 8 * 1024;

// One launch for the whole list: blocks stride over the chunks. entries and
// chunks are device arrays; the entries must not overlap each other (the glue
// only passes entries that touch disjoint memory). Casts round as torch's
// CUDA copy_ does (c10::Half / c10::BFloat16 use the same intrinsics): S -> fp32
// -> D, with fp32 <-> fp64 direct. Returns the launch status.
cudaError_t launch_copy_into(const CopyEntry* entries, const CopyChunk* chunks, int64_t num_chunks,
                             cudaStream_t stream);

}  // namespace cuda
}  // namespace slime_rl
