// Weight-bucket copies: dsts[i].copy_(srcs[i]) for a whole list in one call
// (declarations for C++ callers, csrc/tests and the CUDA glue).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/DeviceType.h>

#include <cstdint>
#include <vector>

namespace slime_rl {

// dsts[i].copy_(srcs[i]) for every i, with the same result as that loop, bit
// for bit: dtype casts (fp32/fp64/fp16/bf16 round to nearest even, as torch),
// either side strided, shapes equal (no broadcasting), every pair on the CPU.
// Contiguous pairs of a same dtype or of two of fp32/fp64/fp16/bf16 are copied
// by one at::parallel_for over the whole list; everything else (strided
// views, other dtype pairs, a source overlapping its destination or another
// entry) by Tensor::copy_, in list order. NaN payloads are the one thing that
// may differ from copy_: a NaN stays a NaN, but torch's own vector and scalar
// paths already disagree on its bits (fp32 -> bf16 NaN is 0xFFFF in torch's
// AVX2 loop, 0x7FC0 in its scalar tail and here).
void copy_into_cpu(at::TensorList dsts, at::TensorList srcs);

namespace buckets {

// How copy_into will run a list, shared by the CPU kernel and the CUDA glue.
struct CopyPlan {
  // Entries the kernel copies: non-empty, both sides contiguous, same dtype or
  // both in {fp32, fp64, fp16, bf16}, and touching no memory another entry (or
  // its own other side) touches, so they may run in any order, concurrently.
  std::vector<int64_t> fast;
  // Everything else (strided, other dtype pairs, overlapping), in list order:
  // Tensor::copy_ after the fast entries. Fast entries overlap none of them, so
  // the result is the sequential loop's.
  std::vector<int64_t> slow;
};

// True for the dtypes the kernels cast between: fp32, fp64, fp16, bf16.
bool is_cast_dtype(at::ScalarType dtype);

// Checks the lists (equal lengths; every tensor defined, strided, on
// `device_type`; each pair on one device with equal shapes) with messages that
// name `op` and the bad index, then sorts the entries into a CopyPlan.
CopyPlan plan_copies(const char* op, at::TensorList dsts, at::TensorList srcs,
                     c10::DeviceType device_type);

}  // namespace buckets
}  // namespace slime_rl
