// Torch glue for the CUDA advantage kernels (kernels: advantages.cu): checks,
// device guard, current stream, dtype dispatch, registration.
// Compiled only in CUDA builds (setup.py CUDAExtension, the JIT loader with a
// CUDA torch, CMake with SLIME_RL_WITH_CUDA=ON).

#include "advantages.h"
#include "glue.h"

#include "../common/advantages_args.h"

#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <tuple>
#include <type_traits>

namespace slime_rl {
namespace {

using cuda_glue::check_launch;
using cuda_glue::CudaType;

// The group ops: checks, guard, a contiguous input and an output of its shape, then one launch
// per dtype; launch(in, out, num_groups, n, stream) with the CUDA element type.
template <typename Launch>
at::Tensor over_groups(const char* op, const at::Tensor& rewards_GN, const Launch& launch) {
  checks::groups(op, rewards_GN, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard device_guard(rewards_GN.device());
  const at::Tensor in_GN = rewards_GN.contiguous();
  at::Tensor out_GN = at::empty_like(in_GN);
  if (in_GN.size(0) == 0) return out_GN;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  // (the dispatch name must be a literal; checks::groups rejected every other dtype already)
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in_GN.scalar_type(), "slime_rl::over_groups", [&] {
    using T = typename CudaType<scalar_t>::type;
    check_launch(op, launch(reinterpret_cast<const T*>(in_GN.const_data_ptr<scalar_t>()),
                            reinterpret_cast<T*>(out_GN.mutable_data_ptr<scalar_t>()), in_GN.size(0), in_GN.size(1),
                            stream));
  });
  return out_GN;
}

at::Tensor group_normalize_cuda(const at::Tensor& rewards_GN, double eps, bool scale_by_std) {
  return over_groups("slime_rl::group_normalize", rewards_GN,
                     [&](const auto* in, auto* out, int64_t num_groups, int64_t n, cudaStream_t stream) {
                       using T = std::remove_pointer_t<decltype(out)>;
                       return cuda::launch_group_normalize<T>(in, out, num_groups, n, eps, scale_by_std, stream);
                     });
}

at::Tensor loo_advantages_cuda(const at::Tensor& rewards_GN) {
  return over_groups("slime_rl::loo_advantages", rewards_GN,
                     [](const auto* in, auto* out, int64_t num_groups, int64_t n, cudaStream_t stream) {
                       using T = std::remove_pointer_t<decltype(out)>;
                       return cuda::launch_loo_advantages<T>(in, out, num_groups, n, stream);
                     });
}

at::Tensor discounted_returns_cuda(const at::Tensor& rewards_N, const at::Tensor& mask_N,
                                   const at::Tensor& cu_seqlens, double gamma) {
  constexpr const char* op = "slime_rl::discounted_returns";
  // The values of cu_seqlens are not checked: that would need a host sync.
  const at::Tensor mask = checks::packed(op, rewards_N, mask_N, cu_seqlens, c10::DeviceType::CUDA);
  checks::discount(op, "gamma", gamma);
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
    check_launch(op, status);
  });
  return ret_N;
}

std::tuple<at::Tensor, at::Tensor> gae_cuda(const at::Tensor& rewards_N, const at::Tensor& values_N,
                                            const at::Tensor& mask_N, const at::Tensor& cu_seqlens,
                                            double gamma, double lam) {
  constexpr const char* op = "slime_rl::gae";
  // The values of cu_seqlens are not checked: that would need a host sync.
  const at::Tensor mask = checks::packed(op, rewards_N, mask_N, cu_seqlens, c10::DeviceType::CUDA);
  checks::values_like(op, values_N, rewards_N);
  checks::discount(op, "gamma", gamma);
  checks::discount(op, "lam", lam);
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
    check_launch(op, status);
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
