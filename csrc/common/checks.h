// Argument checks shared by the CPU kernels (csrc/cpu) and the CUDA glue
// (csrc/cuda/*_ops.cpp), so both backends accept the same inputs and reject the
// rest with the same messages. Header-only; each op family adds its own file
// here (fused_logprob_args.h, advantages_args.h) on top of these helpers.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/DeviceType.h>
#include <c10/util/Exception.h>

namespace slime_rl::checks {

// "CPU kernel" / "CUDA kernel": which implementation rejected the call.
inline const char* kernel_label(c10::DeviceType kind) {
  return kind == c10::DeviceType::CUDA ? "CUDA kernel" : "CPU kernel";
}

// The op's leading tensor must live on a device of the kernel's kind; the others
// are then checked against its device with same_device.
inline void on_kind(const char* op, const char* name, const at::Tensor& x, c10::DeviceType kind) {
  TORCH_CHECK(x.device().type() == kind, op, " (", kernel_label(kind), "): ", name, " must be on ",
              kind == c10::DeviceType::CUDA ? "a CUDA device" : "the CPU", ", got ", x.device());
}

inline void same_device(const char* op, const char* name, const at::Tensor& t, const char* ref_name,
                        const at::Tensor& ref) {
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " must be on ", ref_name, "'s device ", ref.device(),
              ", got ", t.device());
}

inline void floating(const char* op, const char* name, const at::Tensor& x) {
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), op, ": ", name, " must be floating (fp32, fp64, fp16, bf16), got ",
              x.scalar_type());
}

}  // namespace slime_rl::checks
