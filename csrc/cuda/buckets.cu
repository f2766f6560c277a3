// Weight-bucket copies on the GPU: every contiguous entry of a copy_into list
// in one launch. Torch glue (planning, strided entries via copy_): buckets_ops.cpp.
// This file includes no torch header (see buckets.h).
//
// The host splits entries into chunks of kCopyChunkElems elements; each block
// takes chunks grid-stride and its threads stride over the chunk's elements,
// so loads and stores are coalesced and one huge tensor spreads over the whole
// GPU as well as many small ones. The kind pair is uniform within a chunk, so
// the switch below does not diverge. Same-dtype entries move in the widest
// unit their alignment allows (up to 16 bytes per thread).

#include "buckets.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>

namespace slime_rl {
namespace cuda {
namespace {

constexpr int kThreads = 256;

// S -> fp32 -> D, as c10 converts (fp32 <-> fp64 directly).
__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(double x) { return static_cast<float>(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename D>
__device__ __forceinline__ D from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ double from_float<double>(float x) { return static_cast<double>(x); }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

template <typename S, typename D>
__device__ __forceinline__ D cast(S x) {
  return from_float<D>(to_float(x));
}
template <>
__device__ __forceinline__ double cast<float, double>(float x) { return static_cast<double>(x); }
template <>
__device__ __forceinline__ float cast<double, float>(double x) { return static_cast<float>(x); }

template <typename S, typename D>
__device__ __forceinline__ void cast_range(const CopyEntry& e, int64_t begin, int64_t end) {
  const S* s = static_cast<const S*>(e.src);
  D* d = static_cast<D*>(e.dst);
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) d[i] = cast<S, D>(s[i]);
}

template <typename U>
__device__ __forceinline__ void raw_range(const CopyEntry& e, int64_t begin, int64_t end) {
  const U* s = static_cast<const U*>(e.src);
  U* d = static_cast<U*>(e.dst);
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) d[i] = s[i];
}

template <typename S>
__device__ __forceinline__ void cast_from(const CopyEntry& e, int64_t begin, int64_t end) {
  switch (e.dst_kind) {
    case kCopyF32: return cast_range<S, float>(e, begin, end);
    case kCopyF64: return cast_range<S, double>(e, begin, end);
    case kCopyF16: return cast_range<S, __half>(e, begin, end);
    case kCopyBF16: return cast_range<S, __nv_bfloat16>(e, begin, end);
    default: return;  // the glue never builds other pairs
  }
}

__device__ __forceinline__ void copy_chunk(const CopyEntry& e, int64_t begin, int64_t end) {
  switch (e.src_kind) {
    case kCopyF32: return cast_from<float>(e, begin, end);
    case kCopyF64: return cast_from<double>(e, begin, end);
    case kCopyF16: return cast_from<__half>(e, begin, end);
    case kCopyBF16: return cast_from<__nv_bfloat16>(e, begin, end);
    case kCopyRaw1: return raw_range<uint8_t>(e, begin, end);
    case kCopyRaw2: return raw_range<uint16_t>(e, begin, end);
    case kCopyRaw4: return raw_range<uint32_t>(e, begin, end);
    case kCopyRaw8: return raw_range<unsigned long long>(e, begin, end);
    case kCopyRaw16: return raw_range<uint4>(e, begin, end);
    default: return;
  }
}

__global__ void __launch_bounds__(kThreads)
    copy_into_kernel(const CopyEntry* entries, const CopyChunk* chunks, int64_t num_chunks) {
  for (int64_t c = blockIdx.x; c < num_chunks; c += gridDim.x) {
    const CopyChunk chunk = chunks[c];
    const CopyEntry entry = entries[chunk.entry];
    copy_chunk(entry, chunk.begin, chunk.end);
  }
}

}  // namespace

cudaError_t launch_copy_into(const CopyEntry* entries, const CopyChunk* chunks, int64_t num_chunks,
                             cudaStream_t stream) {
  if (num_chunks <= 0) return cudaSuccess;
  int device = 0;
  int sms = 0;
  cudaError_t status = cudaGetDevice(&device);
  if (status == cudaSuccess) {
    status = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  }
  if (status != cudaSuccess) return status;
  // Enough blocks to fill every SM several times over; more chunks are strided.
  const int64_t blocks = std::min<int64_t>(num_chunks, static_cast<int64_t>(sms) * 8);
  copy_into_kernel<<<static_cast<unsigned int>(blocks), kThreads, 0, stream>>>(entries, chunks,
                                                                              num_chunks);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace slime_rl
