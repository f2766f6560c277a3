"""Per-token logprob and entropy when the vocabulary is split across tensor-parallel ranks (torch reference).

Under tensor parallelism the Megatron output layer leaves each TP rank the
logits of one contiguous slice of the padded vocabulary: rank r holds global
columns [vocab_start, vocab_start + V_local). Columns at or past the real
vocab size are padding and take no part in the distribution, so the result
equals `logprobs_from_logits` on the unpadded, gathered logits. Nothing of
size V is ever communicated: forward does two all-reduces of size N (a MAX,
then one SUM over a stacked [3, N] tensor), backward is local.

Forward, with z = logits / temperature and m the global row max:

    s   = sum_j exp(z_j - m)                 (all-reduce SUM)
    u   = sum_j exp(z_j - m) * (z_j - m)     (same all-reduce)
    z_t = z_target - m, from the owning rank, 0 elsewhere (same all-reduce)
    log p(target) = z_t - log s
    H = lse - E_p[z] = log s - u / s

The brief's H = lse - E_p[z] is computed on shifted logits: log s >= 0 and
-u/s >= 0, so nothing cancels, and u needs no second reduction round.

Backward (local): d logp/dz_j = onehot_j - p_j, dH/dz_j = -p_j (log p_j + H),
then divided by temperature; padding columns get 0.

The local math is slime_rl::logits_logprob_forward/backward: a kernel
(csrc/cpu/fused_logprob.cpp, csrc/cuda/) or its torch reference
(logits_logprob_*_reference in slime_rl/ops/fused_logprob.py, with full [N, V]
fp32 intermediates); both give this rank's pieces, reduced here by
reduce_softmax_pieces, and the backward re-reads the logits. The path is chosen
per call (CUDA -> C++ -> reference; `impl=` forces one). A -inf logit (a masked
vocabulary entry) has probability 0 and contributes nothing, not NaN.
"""

from __future__ import annotations

import torch

from slime_rl.ops import _backend
from slime_rl.ops.fused_logprob import (
    LOGITS_FORWARD_OP,
    logits_logprob_backward_reference,
    logits_logprob_forward_reference,
    owned_targets,
    reduce_softmax_pieces,
)


class _VocabParallelLogprob(torch.autograd.Function):
    """autograd Function behind `vocab_parallel_logprobs`; see the module docstring for the math."""

    @staticmethod
    def forward(ctx, logits_NV, targets_N, vocab_start, vocab_size, group, temperature, with_entropy, impl):
        ctx.set_materialize_grads(False)
        n_rows, v_local = logits_NV.shape
        n_valid = max(0, min(v_local, vocab_size - vocab_start))  # columns of this rank that are real vocab
        # Both paths compute this rank's pieces (the kernel, or its torch reference: full fp32
        # intermediates) and share the reduction over the TP group and the local backward.
        pieces_fn = (logits_logprob_forward_reference if impl == "reference"
                     else torch.ops.slime_rl.logits_logprob_forward)
        pieces = pieces_fn(logits_NV, targets_N, vocab_start, n_valid, temperature)
        owned_N = owned_targets(targets_N, vocab_start, n_valid)
        logprobs_N, entropy_N, lse_N = reduce_softmax_pieces(*pieces, owned_N, group, with_entropy)
        ctx.save_for_backward(logits_NV, targets_N, lse_N, entropy_N)
        ctx.impl, ctx.args = impl, (vocab_start, n_valid, temperature)
        return logprobs_N, entropy_N

    @staticmethod
    def backward(ctx, grad_logprobs_N, grad_entropy_N):
        logits_NV, targets_N, lse_N, entropy_N = ctx.saved_tensors
        backward_fn = logits_logprob_backward_reference if ctx.impl == "reference" else \
            torch.ops.slime_rl.logits_logprob_backward
        grad_logits_NV = backward_fn(logits_NV, targets_N, lse_N, entropy_N, grad_logprobs_N, grad_entropy_N, *ctx.args)
        return grad_logits_NV, None, None, None, None, None, None, None


def _check_args(logits_NV, targets_N, vocab_start, vocab_size, temperature) -> None:
    if logits_NV.dim() != 2:
        raise ValueError(f"vocab_parallel_logprobs: logits_NV must be 2-D [N, V_local], got {tuple(logits_NV.shape)}")
    if not logits_NV.is_floating_point():
        raise TypeError(f"vocab_parallel_logprobs: logits_NV must be floating, got {logits_NV.dtype}")
    if targets_N.shape != logits_NV.shape[:1]:
        raise ValueError(f"vocab_parallel_logprobs: targets_N must have shape [{logits_NV.shape[0]}] "
                         f"(one per logits row), got {tuple(targets_N.shape)}")
    if targets_N.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"vocab_parallel_logprobs: targets_N must be int64 or int32, got {targets_N.dtype}")
    if vocab_size <= 0 or vocab_start < 0:
        raise ValueError(f"vocab_parallel_logprobs: need vocab_size > 0 and vocab_start >= 0, "
                         f"got vocab_size={vocab_size}, vocab_start={vocab_start}")
    if temperature < 0:
        raise ValueError(f"vocab_parallel_logprobs: temperature must be >= 0, got {temperature}")
    if targets_N.numel() and (int(targets_N.min()) < 0 or int(targets_N.max()) >= vocab_size):
        raise ValueError(f"vocab_parallel_logprobs: targets must lie in [0, vocab_size={vocab_size}), got "
                         f"min {int(targets_N.min())}, max {int(targets_N.max())}")


def vocab_parallel_logprobs(
    logits_NV: torch.Tensor,
    targets_N: torch.Tensor,
    *,
    vocab_start: int,
    vocab_size: int,
    group=None,
    temperature: float = 1.0,
    with_entropy: bool = True,
    impl: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log p(target) and the entropy per row, from this TP rank's slice of the vocabulary.

    logits_NV: [N, V_local] logits of global vocab columns [vocab_start, vocab_start + V_local),
        any float dtype; columns at or past vocab_size (padding) are excluded. Callers flatten [B, T] to N.
    targets_N: [N] global token ids (the same on every rank), each in [0, vocab_size); a target
        outside this rank's slice is normal. The range check is local (every rank holds all targets)
        but costs one host sync on CUDA.
    group: the torch.distributed process group of the TP ranks. None (NOT the default group) or a
        group of size 1 means the slice is the whole vocabulary and nothing is communicated.
    temperature: logits are divided by it unless it is 0 or 1, as in `logprobs_from_logits`.

    Returns (logprobs_N, entropy_N or None), fp32 (float64 for float64 input), identical on every
    rank; gradients flow to logits_NV from either or both outputs, computed locally.
    Every rank must call it with the same N, temperature and with_entropy.
    impl: force "cuda", "cpp" or "reference" for this call (default: chosen per call, see
        slime_rl.ops._backend); a kernel serves inputs that need grad too.
    """
    _check_args(logits_NV, targets_N, vocab_start, vocab_size, temperature)
    chosen = _backend.choose(LOGITS_FORWARD_OP, logits_NV.detach(), impl)
    return _VocabParallelLogprob.apply(
        logits_NV, targets_N, int(vocab_start), int(vocab_size), group, float(temperature), bool(with_entropy), chosen
    )
