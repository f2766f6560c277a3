// The slime_rl operator library: every op's schema, and the Python module.
//
// Schemas live here, in one place, because `TORCH_LIBRARY(slime_rl, ...)` may
// appear only once per process; kernels for each backend register themselves
// beside their implementation with `TORCH_LIBRARY_IMPL(slime_rl, <Key>, ...)`
// (csrc/cpu/*.cpp, csrc/cuda/*_ops.cpp). Adding an op = one `m.def` line here.
//
// The same file is compiled by setup.py (Python extension `slime_rl._C`), by
// the JIT loader (slime_rl/ops/_backend.py) and by CMakeLists.txt (a plain
// shared library for C++ users and csrc/tests). Only the first two define
// TORCH_EXTENSION_NAME, so only they get the Python module init.

#include <torch/library.h>

TORCH_LIBRARY(slime_rl, m) {
  // adv_GN = (r - mean_g) / (std_g + eps) if scale_by_std else (r - mean_g);
  // std is unbiased (correction = 1), and 0 for groups of one sample.
  m.def("group_normalize(Tensor rewards, float eps, bool scale_by_std) -> Tensor");
}

#ifdef TORCH_EXTENSION_NAME
#include <torch/extension.h>

// Importing the module loads the shared object, whose static initializers
// (TORCH_LIBRARY / TORCH_LIBRARY_IMPL above and in the kernel files) register
// the ops; the ops are then called as torch.ops.slime_rl.<name>.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.doc() = "slime_rl kernels; importing registers torch.ops.slime_rl.*";
}
#endif
