// Torch glue for the CUDA advantage kernels (kernels: advantages.cu).
// Compiled only in CUDA builds (setup.py CUDAExtension, the JIT loader with a
// CUDA torch, CMake with SLIME_RL_WITH_CUDA=ON).

#include "advantages.h"

#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace slime_rl {
namespace {

// at::Half / at::BFloat16 share their bit layout with __half / __nv_bfloat16.
template <typename scalar_t>
struct CudaType {
  using type = scalar_t;
};
template <>
struct CudaType<at::Half> {
  using type = __half;
};
template <>
struct CudaType<at::BFloat16> {
  using type = __nv_bfloat16;
};

at::Tensor group_normalize_cuda(const at::Tensor& rewards_GN, double eps, bool scale_by_std) {
  TORCH_CHECK(rewards_GN.dim() == 2,
              "slime_rl::group_normalize: rewards must be 2-D [num_groups, n], got shape ",
              rewards_GN.sizes());
  TORCH_CHECK(rewards_GN.size(1) >= 1,
              "slime_rl::group_normalize: groups must hold at least one sample, got shape ",
              rewards_GN.sizes());
  TORCH_CHECK(rewards_GN.is_cuda(),
              "slime_rl::group_normalize (CUDA kernel): rewards must be on a CUDA device, got ",
              rewards_GN.device());
  const c10::cuda::CUDAGuard device_guard(rewards_GN.device());
  const at::Tensor in_GN = rewards_GN.contiguous();
  at::Tensor out_GN = at::empty_like(in_GN);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, in_GN.scalar_type(), "slime_rl::group_normalize_cuda", [&] {
        using T = typename CudaType<scalar_t>::type;
        const cudaError_t status = cuda::launch_group_normalize<T>(
            reinterpret_cast<const T*>(in_GN.const_data_ptr<scalar_t>()),
            reinterpret_cast<T*>(out_GN.mutable_data_ptr<scalar_t>()), in_GN.size(0),
            in_GN.size(1), eps, scale_by_std, stream);
        TORCH_CHECK(status == cudaSuccess, "slime_rl::group_normalize: CUDA launch failed: ",
                    cudaGetErrorString(status));
      });
  return out_GN;
}

}  // namespace

TORCH_LIBRARY_IMPL(slime_rl, CUDA, m) {
  m.impl("group_normalize", &group_normalize_cuda);
}

}  // namespace slime_rl
