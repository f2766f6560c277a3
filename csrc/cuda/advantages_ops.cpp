// Torch glue for the CUDA advantage kernels (kernels: advantages.cu): checks,
// device guard, current stream, dtype dispatch, registration.
// Compiled only in CUDA builds (setup.py CUDAExtension, the JIT loader with a
// CUDA torch, CMake with SLIME_RL_WITH_CUDA=ON).

#include "advantages.h"

#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <tuple>

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

at::Tensor loo_advantages_cuda(const at::Tensor& rewards_GN) {
  TORCH_CHECK(rewards_GN.dim() == 2,
              "slime_rl::loo_advantages: rewards must be 2-D [num_groups, n], got shape ",
              rewards_GN.sizes());
  TORCH_CHECK(rewards_GN.size(1) >= 1,
              "slime_rl::loo_advantages: groups must hold at least one sample, got shape ",
              rewards_GN.sizes());
  TORCH_CHECK(rewards_GN.is_cuda(),
              "slime_rl::loo_advantages (CUDA kernel): rewards must be on a CUDA device, got ",
              rewards_GN.device());
  const c10::cuda::CUDAGuard device_guard(rewards_GN.device());
  const at::Tensor in_GN = rewards_GN.contiguous();
  at::Tensor out_GN = at::empty_like(in_GN);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, in_GN.scalar_type(), "slime_rl::loo_advantages_cuda", [&] {
        using T = typename CudaType<scalar_t>::type;
        const cudaError_t status = cuda::launch_loo_advantages<T>(
            reinterpret_cast<const T*>(in_GN.const_data_ptr<scalar_t>()),
            reinterpret_cast<T*>(out_GN.mutable_data_ptr<scalar_t>()), in_GN.size(0),
            in_GN.size(1), stream);
        TORCH_CHECK(status == cudaSuccess, "slime_rl::loo_advantages: CUDA launch failed: ",
                    cudaGetErrorString(status));
      });
  return out_GN;
}

// Checks the packed layout (shapes, dtypes, devices; the values of cu_seqlens
// are not read, that would need a host sync) and returns the mask as a
// contiguous bool tensor (nonzero = the token counts).
at::Tensor check_packed_cuda(const char* op, const at::Tensor& rewards_N, const at::Tensor& mask_N,
                             const at::Tensor& cu_seqlens) {
  TORCH_CHECK(rewards_N.dim() == 1, op, ": rewards must be 1-D [num_tokens] (packed), got shape ",
              rewards_N.sizes());
  TORCH_CHECK(rewards_N.is_cuda(), op, " (CUDA kernel): rewards must be on a CUDA device, got ",
              rewards_N.device());
  TORCH_CHECK(at::isFloatingType(rewards_N.scalar_type()), op,
              ": rewards must be floating (fp32, fp64, fp16, bf16), got ", rewards_N.scalar_type());
  TORCH_CHECK(mask_N.dim() == 1 && mask_N.size(0) == rewards_N.size(0), op,
              ": mask must have rewards' shape ", rewards_N.sizes(), ", got ", mask_N.sizes());
  TORCH_CHECK(cu_seqlens.dim() == 1 && cu_seqlens.size(0) >= 1, op,
              ": cu_seqlens must be 1-D [num_seqs + 1], got shape ", cu_seqlens.sizes());
  TORCH_CHECK(cu_seqlens.scalar_type() == at::kLong, op, ": cu_seqlens must be int64, got ",
              cu_seqlens.scalar_type());
  TORCH_CHECK(mask_N.device() == rewards_N.device() && cu_seqlens.device() == rewards_N.device(),
              op, ": mask and cu_seqlens must be on rewards' device ", rewards_N.device(), ", got ",
              mask_N.device(), " and ", cu_seqlens.device());
  return (mask_N.scalar_type() == at::kBool ? mask_N : mask_N.ne(0)).contiguous();
}

void check_discount_cuda(const char* op, const char* name, double x) {
  TORCH_CHECK_VALUE(x >= 0.0 && x <= 1.0, op, ": ", name, " must be in [0, 1], got ", x);
}

at::Tensor discounted_returns_cuda(const at::Tensor& rewards_N, const at::Tensor& mask_N,
                                   const at::Tensor& cu_seqlens, double gamma) {
  constexpr const char* op = "slime_rl::discounted_returns";
  const at::Tensor mask = check_packed_cuda(op, rewards_N, mask_N, cu_seqlens);
  check_discount_cuda(op, "gamma", gamma);
  const c10::cuda::CUDAGuard device_guard(rewards_N.device());
  const at::Tensor r_N = rewards_N.contiguous();
  const at::Tensor cu = cu_seqlens.contiguous();
  at::Tensor ret_N = at::zeros_like(r_N);  // tokens outside every sequence stay 0
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, r_N.scalar_type(), op, [&] {
    using T = typename CudaType<scalar_t>::type;
    const cudaError_t status = cuda::launch_discounted_returns<T>(
        reinterpret_cast<const T*>(r_N.const_data_ptr<scalar_t>()), mask.const_data_ptr<bool>(),
        cu.const_data_ptr<int64_t>(), reinterpret_cast<T*>(ret_N.mutable_data_ptr<scalar_t>()),
        cu.size(0) - 1, r_N.size(0), gamma, stream);
    TORCH_CHECK(status == cudaSuccess, op, ": CUDA launch failed: ", cudaGetErrorString(status));
  });
  return ret_N;
}

std::tuple<at::Tensor, at::Tensor> gae_cuda(const at::Tensor& rewards_N, const at::Tensor& values_N,
                                            const at::Tensor& mask_N, const at::Tensor& cu_seqlens,
                                            double gamma, double lam) {
  constexpr const char* op = "slime_rl::gae";
  const at::Tensor mask = check_packed_cuda(op, rewards_N, mask_N, cu_seqlens);
  TORCH_CHECK(values_N.sizes() == rewards_N.sizes(), op, ": values must have rewards' shape ",
              rewards_N.sizes(), ", got ", values_N.sizes());
  TORCH_CHECK(values_N.scalar_type() == rewards_N.scalar_type(), op,
              ": values must have rewards' dtype ", rewards_N.scalar_type(), ", got ",
              values_N.scalar_type());
  TORCH_CHECK(values_N.device() == rewards_N.device(), op, ": values must be on rewards' device ",
              rewards_N.device(), ", got ", values_N.device());
  check_discount_cuda(op, "gamma", gamma);
  check_discount_cuda(op, "lam", lam);
  const c10::cuda::CUDAGuard device_guard(rewards_N.device());
  const at::Tensor r_N = rewards_N.contiguous();
  const at::Tensor v_N = values_N.contiguous();
  const at::Tensor cu = cu_seqlens.contiguous();
  at::Tensor adv_N = at::zeros_like(r_N);  // tokens outside every sequence stay 0
  at::Tensor ret_N = at::zeros_like(r_N);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, r_N.scalar_type(), op, [&] {
    using T = typename CudaType<scalar_t>::type;
    const cudaError_t status = cuda::launch_gae<T>(
        reinterpret_cast<const T*>(r_N.const_data_ptr<scalar_t>()),
        reinterpret_cast<const T*>(v_N.const_data_ptr<scalar_t>()), mask.const_data_ptr<bool>(),
        cu.const_data_ptr<int64_t>(), reinterpret_cast<T*>(adv_N.mutable_data_ptr<scalar_t>()),
        reinterpret_cast<T*>(ret_N.mutable_data_ptr<scalar_t>()), cu.size(0) - 1, r_N.size(0),
        gamma, lam, stream);
    TORCH_CHECK(status == cudaSuccess, op, ": CUDA launch failed: ", cudaGetErrorString(status));
  });
  return {adv_N, ret_N};
}

}  // namespace

TORCH_LIBRARY_IMPL(slime_rl, CUDA, m) {
  m.impl("group_normalize", &group_normalize_cuda);
  m.impl("loo_advantages", &loo_advantages_cuda);
  m.impl("discounted_returns", &discounted_returns_cuda);
  m.impl("gae", &gae_cuda);
}

}  // namespace slime_rl
