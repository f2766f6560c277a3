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
  // ---- advantages (cpu/advantages.cpp, cuda/advantages.cu) ----
  // adv_GN = (r - mean_g) / (std_g + eps) if scale_by_std else (r - mean_g);
  // std is unbiased (correction = 1), and 0 for groups of one sample.
  m.def("group_normalize(Tensor rewards, float eps, bool scale_by_std) -> Tensor");
  // adv_GN[g, i] = r[g, i] - mean_{j != i} r[g, j] (RLOO); 0 for groups of one sample.
  m.def("loo_advantages(Tensor rewards) -> Tensor");
  // Reverse scans over packed sequences: sequence s is tokens [cu_seqlens[s], cu_seqlens[s+1])
  // of the 1-D rewards/values/mask; masked tokens (mask == 0) get 0 and are skipped by the scan.
  m.def("discounted_returns(Tensor rewards, Tensor mask, Tensor cu_seqlens, float gamma) -> Tensor");
  // -> (advantages, returns = advantages + values)
  m.def("gae(Tensor rewards, Tensor values, Tensor mask, Tensor cu_seqlens, float gamma, float lam) -> (Tensor, Tensor)");

  // ---- fused logprob + entropy (cpu/fused_logprob.cpp, cuda/fused_logprob.cu) ----
  // Softmax pieces over this rank's vocab slice of z = (hidden @ weight[:n_valid]^T) / temperature,
  // computed in chunk_tokens x chunk_vocab tiles with an online softmax (never [T, V]); per token,
  // fp32: (max m, sum_exp s = sum_j exp(z_j - m), sum_exp_z u = sum_j exp(z_j - m) (z_j - m),
  // target_z = z[target - vocab_start] - m where this rank owns the target, else 0).
  m.def("linear_logprob_forward(Tensor hidden, Tensor weight, Tensor targets, int vocab_start, int n_valid, float temperature, int chunk_tokens, int chunk_vocab) -> (Tensor, Tensor, Tensor, Tensor)");
  // (grad_hidden [T, H], grad_weight [V_local, H]) of sum_t g_lp[t] logp[t] + g_ent[t] H[t],
  // given the global (all-reduced) lse and entropy per token.
  m.def("linear_logprob_backward(Tensor hidden, Tensor weight, Tensor targets, Tensor lse, Tensor? entropy, Tensor? grad_logprob, Tensor? grad_entropy, int vocab_start, int n_valid, float temperature, int chunk_tokens, int chunk_vocab) -> (Tensor, Tensor)");
  // The same, starting from given logits [T, V_local].
  m.def("logits_logprob_forward(Tensor logits, Tensor targets, int vocab_start, int n_valid, float temperature) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("logits_logprob_backward(Tensor logits, Tensor targets, Tensor lse, Tensor? entropy, Tensor? grad_logprob, Tensor? grad_entropy, int vocab_start, int n_valid, float temperature) -> Tensor");

  // ---- weight buckets (cpu/buckets.cpp, cuda/buckets.cu) ----
  // dsts[i].copy_(srcs[i]) for every i in one call: dtype cast, any strides, same shapes.
  // Packing a bucket = copy_into(views of the flat buffer, tensors); unpacking the reverse.
  m.def("copy_into(Tensor(a!)[] dsts, Tensor[] srcs) -> ()");
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
