// CUDA kernels of fused (linear +) logprob + entropy: torch-free launchers.
//
// The math (see csrc/cpu/fused_logprob.h and slime_rl/ops/fused_logprob.py): per token, over
// this rank's vocab slice of z = x / temperature, the softmax pieces
//   max m = max_j z_j,  sum s = sum_j e^(z_j - m),  sum_z u = sum_j e^(z_j - m) (z_j - m),
//   target_z = z_target - m where this rank owns the target, else 0,
// and for the backward, given the global lse and entropy H,
//   dz_j = [g_lp (onehot_j - p_j) - g_ent p_j (log p_j + H)] / temperature,  p_j = e^(z_j - lse).
//
// Two row kernels cover all four ops; the torch glue (fused_logprob_ops.cpp) runs them over
// the given logits, or over chunk_tokens x chunk_vocab tiles of logits it computes with cuBLAS:
//   fold_softmax_pieces   folds a [rows, cols] tile into running per-row pieces (online softmax)
//   logprob_grad          writes dz (or grad_logits) for a [rows, cols] tile
// No torch header here, so nvcc compiles this on any machine with a toolkit (see
// csrc/README.md). Reference: slime_rl/ops/fused_logprob.py; GPU tests:
// tests/test_fused_logprob_gpu.py.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace slime_rl {
namespace cuda {

// Accumulation type of an input type: fp32, or fp64 for fp64 (as torch's opmath).
template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};

// Running softmax pieces, one value per row ([rows] device arrays of the accumulation type).
template <typename A>
struct Pieces {
  A* max;
  A* sum;
  A* sum_z;
  A* target_z;
};

// Where each row's target falls: column targets[r] - col0 of the tile (a target outside
// [0, cols) is not in this tile); owned when owned_begin <= targets[r] < owned_end (the
// rank's real vocab, [vocab_start, vocab_start + n_valid)).
struct TargetMap {
  const int64_t* targets;  // [rows], int64, on the device
  int64_t col0;
  int64_t owned_begin;
  int64_t owned_end;
};

// Folds z = x * inv_t over columns [0, cols) of each row of x_RC (row r at x_RC + r * ld;
// rows and ld in elements, any alignment) into pieces, one thread block per row: 16-byte
// vector loads, an online softmax per thread, then a shuffle/shared-memory merge.
//   first: start from empty pieces (otherwise merge with the values in `pieces`);
//   last:  finish target_z (z_target - max if owned, else 0); target_z holds the raw z of
//          the target in between.
// T: float, double, __half or __nv_bfloat16; accumulation in AccOf<T>.
template <typename T>
cudaError_t launch_fold_softmax_pieces(const T* x_RC, int64_t ld, int64_t rows, int64_t cols,
                                       typename AccOf<T>::type inv_t, TargetMap targets,
                                       Pieces<typename AccOf<T>::type> pieces, bool first,
                                       bool last, cudaStream_t stream);

// Per-row inputs of the backward, [rows] device arrays of the accumulation type; entropy,
// grad_logprob and grad_entropy may be null (a null grad counts as zero; entropy is read
// only with grad_entropy).
template <typename A>
struct GradRows {
  const A* lse;
  const A* entropy;
  const A* grad_logprob;
  const A* grad_entropy;
};

// out_RC[r, j] = dz of z = x_RC[r, j] * inv_t for j < cols, and 0 for cols <= j < out_cols
// (vocab padding); the onehot term goes to column targets[r] - col0 when it lies in
// [0, cols). Rows whose two grads are 0 (masked tokens) are written as zeros without an exp.
// One thread block per row; 16-byte loads when every row of x and out is aligned for them.
// out_RC may alias x_RC when Tin == Tout and ldo == ldx (in place).
// (Tin, Tout): (T, T) for T in float, double, __half, __nv_bfloat16, and (float, __half),
// (float, __nv_bfloat16) for fp32 logits tiles written as a 16-bit GEMM operand.
template <typename Tin, typename Tout>
cudaError_t launch_logprob_grad(const Tin* x_RC, int64_t ldx, Tout* out_RC, int64_t ldo,
                                int64_t rows, int64_t cols, int64_t out_cols,
                                typename AccOf<Tin>::type inv_t, const int64_t* targets,
                                int64_t col0, GradRows<typename AccOf<Tin>::type> grads,
                                cudaStream_t stream);

}  // namespace cuda
}  // namespace slime_rl
