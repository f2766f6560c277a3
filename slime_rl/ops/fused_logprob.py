"""Fused linear + logprob + entropy: per-token log p(target) and entropy without the [T, V] logits.

The output layer of an LLM turns hidden states hidden_NH into logits
z = hidden_NH @ weight_VH^T / temperature, and RL losses need only two numbers
per token from them: log p(target) and the entropy. Materializing z (and its
log_softmax, and their gradients) costs several N x V buffers — ~10 GB for
N = 4096 tokens and a 152k vocabulary in fp32. The kernels here walk over
chunk_tokens x chunk_vocab tiles of z with an online softmax, so the extra
memory is one tile (plus the gradients themselves), never N x V.

Per token, over this rank's vocab slice, a kernel returns four "softmax pieces":

    m   = max_j z_j
    s   = sum_j exp(z_j - m)
    u   = sum_j exp(z_j - m) (z_j - m)
    z_t = z_target - m   where this rank owns the target, else 0

Across vocab tiles (and across tensor-parallel ranks) the pieces combine: with
a new max M >= m, s' = s e^(m - M) and u' = e^(m - M) (u + s (m - M)). Then

    log p(target) = z_t - log s,   H = log s - u / s,   lse = m + log s

(the same math as slime_rl/ops/vocab_parallel.py, which starts from logits).
The backward recomputes z tile by tile from hidden and weight:
dz_j = g_lp (onehot_j - p_j) - g_ent p_j (log p_j + H), p_j = exp(z_j - lse),
divided by temperature; grad_hidden = dz @ W, grad_weight = dz^T @ hidden.
That is one GEMM more than autograd through full logits (4 instead of 3),
the price of not storing them.

Tensor parallelism (vocab-parallel output layer): each rank holds rows
[vocab_start, vocab_start + V_local) of the padded vocabulary; rows at or past
vocab_size are padding and excluded. The forward reduces the pieces over the
TP group (a MAX all-reduce of m, then one SUM all-reduce of a stacked [3, N]);
nothing of size V is communicated. The backward is local: grad_weight is this
rank's shard, and grad_hidden is this rank's PARTIAL sum over its vocab slice —
the caller's layer must all-reduce it over the TP group in backward (Megatron's
copy_to_tensor_model_parallel_region, which feeds the output layer, does).

Implementations (chosen per call by slime_rl.ops._backend: CUDA -> C++ ->
reference): csrc/cpu/fused_logprob.cpp, csrc/cuda/fused_logprob.cu, and the
pure-torch references below (full logits: the spec, not memory-efficient).
Tests: tests/test_fused_logprob.py; benchmark: benchmarks/kernels/bench_fused_logprob.py.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from slime_rl.ops import _backend

# Default tile sizes per device type (tokens, vocab rows). CPU: a 1024 x 8192 fp32
# tile is 32 MB, and each tile GEMM (2 x 1024 x 8192 x H flops) is big enough for
# BLAS to run near full speed; 512 x 16384 and 2048 x 4096 timed the same within
# noise on the 2-core dev machine. CUDA: the kernel picks its own thread-block
# tiles; these bound its scratch memory.
DEFAULT_CHUNKS = {"cpu": (1024, 8192), "cuda": (4096, 16384)}

FORWARD_OP = "linear_logprob_forward"
LOGITS_FORWARD_OP = "logits_logprob_forward"


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the pieces, logprobs and entropy are computed in: fp32, or fp64 for fp64 inputs."""
    return torch.promote_types(dtype, torch.float32)


def _real_temperature(temperature: float) -> bool:
    # 0 (greedy) and 1 mean "no division", as in logprobs_from_logits and the engine.
    return temperature not in (0.0, 1.0)


# --- pure-torch references of the four kernels (the spec) ----------------------------------------


def logits_logprob_forward_reference(
    logits_TV: torch.Tensor, targets_T: torch.Tensor, vocab_start: int, n_valid: int, temperature: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Softmax pieces (max_T, sum_exp_T, sum_exp_z_T, target_z_T) of z = logits_TV[:, :n_valid] / temperature.

    See the module docstring for their definitions. Columns >= n_valid are padding.
    A rank with n_valid == 0 returns max -inf, sums 0 and target_z 0. Computed in
    compute_dtype(logits dtype).
    """
    dtype = compute_dtype(logits_TV.dtype)
    n_rows = logits_TV.shape[0]
    if n_valid == 0:
        zeros = logits_TV.new_zeros(n_rows, dtype=dtype)
        return logits_TV.new_full((n_rows,), float("-inf"), dtype=dtype), zeros, zeros.clone(), zeros.clone()
    z_TV = logits_TV[:, :n_valid].to(dtype)
    if _real_temperature(temperature):
        z_TV = z_TV / temperature
    max_T = z_TV.amax(dim=1)
    # A -inf logit (a masked vocabulary entry) has probability 0 and adds 0 to both sums; a row of
    # them only gives the empty-slice pieces (max -inf, sums 0), e.g. a TP shard masked whole.
    zs_TV = z_TV - torch.where(max_T == float("-inf"), 0.0, max_T).unsqueeze(1)
    exp_TV = zs_TV.exp()
    local_T = targets_T.long() - vocab_start
    owned_T = (local_T >= 0) & (local_T < n_valid)
    target_T = zs_TV.gather(1, torch.where(owned_T, local_T, 0).unsqueeze(1)).squeeze(1)
    target_T = torch.where(owned_T, target_T, 0.0)
    return max_T, exp_TV.sum(1), torch.where(exp_TV > 0, exp_TV * zs_TV, 0.0).sum(1), target_T


def logits_logprob_backward_reference(
    logits_TV: torch.Tensor,
    targets_T: torch.Tensor,
    lse_T: torch.Tensor,
    entropy_T: torch.Tensor | None,
    grad_logprob_T: torch.Tensor | None,
    grad_entropy_T: torch.Tensor | None,
    vocab_start: int,
    n_valid: int,
    temperature: float,
) -> torch.Tensor:
    """grad_logits_TV (logits dtype, padding columns 0) of sum_t g_lp[t] logp[t] + g_ent[t] H[t].

    lse_T and entropy_T are the global per-token values (after any TP reduction);
    entropy_T is needed only with grad_entropy_T. None grads count as zero.
    """
    dtype = compute_dtype(logits_TV.dtype)
    n_rows, v_local = logits_TV.shape
    grad_TV = logits_TV.new_zeros(n_rows, v_local, dtype=dtype)
    z_TV = logits_TV[:, :n_valid].to(dtype)
    if _real_temperature(temperature):
        z_TV = z_TV / temperature
    logp_TV = z_TV - lse_T.to(dtype).unsqueeze(1)
    p_TV = logp_TV.exp()
    dz_TV = grad_TV[:, :n_valid]
    if grad_logprob_T is not None:
        g_T = grad_logprob_T.to(dtype)
        dz_TV -= p_TV * g_T.unsqueeze(1)
        local_T = targets_T.long() - vocab_start
        owned_T = (local_T >= 0) & (local_T < n_valid)
        if n_valid > 0:
            dz_TV.scatter_add_(1, torch.where(owned_T, local_T, 0).unsqueeze(1),
                               torch.where(owned_T, g_T, 0.0).unsqueeze(1))
    if grad_entropy_T is not None:
        if entropy_T is None:
            raise ValueError("logits_logprob_backward: grad_entropy needs the forward's entropy")
        g_T = grad_entropy_T.to(dtype)
        # p log p -> 0 as p -> 0: a -inf logit gets no entropy gradient (not 0 * -inf)
        logp_TV = torch.where(p_TV > 0, logp_TV, 0.0)
        dz_TV -= p_TV * (logp_TV + entropy_T.to(dtype).unsqueeze(1)) * g_T.unsqueeze(1)
    if _real_temperature(temperature):
        dz_TV /= temperature
    return grad_TV.to(logits_TV.dtype)


def _reference_logits(hidden_TH: torch.Tensor, weight_VH: torch.Tensor, n_valid: int) -> torch.Tensor:
    # Inputs upcast first, as the kernels do: their tile GEMMs accumulate and keep z in fp32.
    dtype = compute_dtype(hidden_TH.dtype)
    return hidden_TH.to(dtype) @ weight_VH[:n_valid].to(dtype).T


def linear_logprob_forward_reference(
    hidden_TH: torch.Tensor, weight_VH: torch.Tensor, targets_T: torch.Tensor, vocab_start: int, n_valid: int,
    temperature: float, chunk_tokens: int = 0, chunk_vocab: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Softmax pieces of z = hidden_TH @ weight_VH[:n_valid]^T / temperature, via full logits (chunks unused)."""
    logits_TV = _reference_logits(hidden_TH, weight_VH, n_valid)
    return logits_logprob_forward_reference(logits_TV, targets_T, vocab_start, n_valid, temperature)


def linear_logprob_backward_reference(
    hidden_TH: torch.Tensor, weight_VH: torch.Tensor, targets_T: torch.Tensor, lse_T: torch.Tensor,
    entropy_T: torch.Tensor | None, grad_logprob_T: torch.Tensor | None, grad_entropy_T: torch.Tensor | None,
    vocab_start: int, n_valid: int, temperature: float, chunk_tokens: int = 0, chunk_vocab: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_hidden_TH, grad_weight_VH) in the input dtypes; weight rows >= n_valid get 0."""
    dtype = compute_dtype(hidden_TH.dtype)
    logits_TV = _reference_logits(hidden_TH, weight_VH, n_valid)
    dz_TV = logits_logprob_backward_reference(logits_TV, targets_T, lse_T, entropy_T, grad_logprob_T,
                                              grad_entropy_T, vocab_start, n_valid, temperature)
    grad_hidden_TH = dz_TV @ weight_VH[:n_valid].to(dtype)
    grad_weight_VH = weight_VH.new_zeros(weight_VH.shape, dtype=dtype)
    grad_weight_VH[:n_valid] = dz_TV.T @ hidden_TH.to(dtype)
    return grad_hidden_TH.to(hidden_TH.dtype), grad_weight_VH.to(weight_VH.dtype)


# --- fake (shape) functions, for torch.compile -----------------------------------------------------


def _pieces_fake(x_TX: torch.Tensor) -> tuple[torch.Tensor, ...]:
    dtype = compute_dtype(x_TX.dtype)
    return tuple(x_TX.new_empty(x_TX.shape[0], dtype=dtype) for _ in range(4))


@_backend.fake("linear_logprob_forward")
def _linear_forward_fake(hidden, weight, targets, vocab_start, n_valid, temperature, chunk_tokens, chunk_vocab):
    return _pieces_fake(hidden)


@_backend.fake("linear_logprob_backward")
def _linear_backward_fake(hidden, weight, targets, lse, entropy, grad_logprob, grad_entropy, vocab_start, n_valid,
                          temperature, chunk_tokens, chunk_vocab):
    return (torch.empty_like(hidden, memory_format=torch.contiguous_format),
            torch.empty_like(weight, memory_format=torch.contiguous_format))


@_backend.fake("logits_logprob_forward")
def _logits_forward_fake(logits, targets, vocab_start, n_valid, temperature):
    return _pieces_fake(logits)


@_backend.fake("logits_logprob_backward")
def _logits_backward_fake(logits, targets, lse, entropy, grad_logprob, grad_entropy, vocab_start, n_valid,
                          temperature):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


# --- combining the pieces across tensor-parallel ranks ---------------------------------------------


def _tp_world(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def reduce_softmax_pieces(
    max_N: torch.Tensor, sum_N: torch.Tensor, sum_z_N: torch.Tensor, target_z_N: torch.Tensor,
    owned_N: torch.Tensor, group, with_entropy: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(logprobs_N, entropy_N or None, lse_N) from this rank's pieces, reduced over the TP group.

    owned_N marks the tokens whose target lies in this rank's slice (its target_z
    is shifted to the global max; the others stay 0). group None or of size 1:
    no communication. Two all-reduces otherwise: MAX over [N], SUM over [3, N].
    """
    if _tp_world(group) > 1:
        global_max_N = max_N.clone()
        dist.all_reduce(global_max_N, op=dist.ReduceOp.MAX, group=group)
        shift_N = max_N - global_max_N  # <= 0; -inf on a rank without real vocab
        has_N = sum_N > 0
        scale_N = torch.where(has_N, shift_N.exp(), 0.0)
        safe_shift_N = torch.where(has_N, shift_N, 0.0)  # avoids 0 * -inf
        pieces_3N = torch.stack([
            sum_N * scale_N,
            torch.where(owned_N, target_z_N + safe_shift_N, 0.0),
            scale_N * (sum_z_N + sum_N * safe_shift_N),
        ])
        dist.all_reduce(pieces_3N, op=dist.ReduceOp.SUM, group=group)
        max_N, (sum_N, target_z_N, sum_z_N) = global_max_N, pieces_3N.unbind(0)
    log_sum_N = sum_N.log()
    logprobs_N = target_z_N - log_sum_N
    entropy_N = log_sum_N - sum_z_N / sum_N if with_entropy else None
    return logprobs_N, entropy_N, max_N + log_sum_N


def owned_targets(targets_N: torch.Tensor, vocab_start: int, n_valid: int) -> torch.Tensor:
    """Bool [N]: the target is a real vocab row of this rank's slice."""
    local_N = targets_N - vocab_start
    return (local_N >= 0) & (local_N < n_valid)


# --- the autograd Function and the public op -------------------------------------------------------


class _FusedLinearLogprob(torch.autograd.Function):
    """Forward: pieces by the chosen impl, reduced over the TP group. Backward: the fused backward kernel."""

    @staticmethod
    def forward(ctx, hidden_NH, weight_VH, targets_N, vocab_start, n_valid, temperature, with_entropy, group,
                chunk_tokens, chunk_vocab, impl):
        ctx.set_materialize_grads(False)
        args = (vocab_start, n_valid, temperature, chunk_tokens, chunk_vocab)
        if impl == "reference":
            pieces = linear_logprob_forward_reference(hidden_NH, weight_VH, targets_N, *args)
        else:
            pieces = torch.ops.slime_rl.linear_logprob_forward(hidden_NH, weight_VH, targets_N, *args)
        owned_N = owned_targets(targets_N, vocab_start, n_valid)
        logprobs_N, entropy_N, lse_N = reduce_softmax_pieces(*pieces, owned_N, group, with_entropy)
        ctx.save_for_backward(hidden_NH, weight_VH, targets_N, lse_N, entropy_N)
        ctx.args, ctx.impl = args, impl
        return logprobs_N, entropy_N

    @staticmethod
    def backward(ctx, grad_logprobs_N, grad_entropy_N):
        hidden_NH, weight_VH, targets_N, lse_N, entropy_N = ctx.saved_tensors
        if grad_logprobs_N is None and grad_entropy_N is None:
            return (None,) * 11
        vocab_start, n_valid, temperature, chunk_tokens, chunk_vocab = ctx.args
        args = (hidden_NH, weight_VH, targets_N, lse_N, entropy_N, grad_logprobs_N, grad_entropy_N,
                vocab_start, n_valid, temperature, chunk_tokens, chunk_vocab)
        if ctx.impl == "reference":
            grad_hidden_NH, grad_weight_VH = linear_logprob_backward_reference(*args)
        else:
            grad_hidden_NH, grad_weight_VH = torch.ops.slime_rl.linear_logprob_backward(*args)
        return (grad_hidden_NH if ctx.needs_input_grad[0] else None,
                grad_weight_VH if ctx.needs_input_grad[1] else None) + (None,) * 9


def _check_linear_args(hidden_NH, weight_VH, targets_N, temperature, vocab_start, vocab_size, chunk_tokens,
                       chunk_vocab) -> None:
    name = "fused_linear_logprobs"
    if hidden_NH.dim() != 2:
        raise ValueError(f"{name}: hidden_NH must be 2-D [N, H], got shape {tuple(hidden_NH.shape)}")
    if weight_VH.dim() != 2 or weight_VH.shape[1] != hidden_NH.shape[1]:
        raise ValueError(f"{name}: weight_VH must be 2-D [V_local, H={hidden_NH.shape[1]}], "
                         f"got shape {tuple(weight_VH.shape)}")
    if not hidden_NH.is_floating_point() or hidden_NH.dtype != weight_VH.dtype:
        raise TypeError(f"{name}: hidden_NH and weight_VH must share one floating dtype, "
                        f"got {hidden_NH.dtype} and {weight_VH.dtype}")
    if hidden_NH.device != weight_VH.device or targets_N.device != hidden_NH.device:
        raise ValueError(f"{name}: hidden_NH, weight_VH and targets_N must be on one device, got "
                         f"{hidden_NH.device}, {weight_VH.device}, {targets_N.device}")
    if targets_N.shape != hidden_NH.shape[:1]:
        raise ValueError(f"{name}: targets_N must have shape [{hidden_NH.shape[0]}] (one per hidden row), "
                         f"got {tuple(targets_N.shape)}")
    if targets_N.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name}: targets_N must be int64 or int32, got {targets_N.dtype}")
    if temperature < 0:
        raise ValueError(f"{name}: temperature must be >= 0, got {temperature}")
    if vocab_start < 0 or vocab_size <= 0:
        raise ValueError(f"{name}: need vocab_start >= 0 and vocab_size > 0, "
                         f"got vocab_start={vocab_start}, vocab_size={vocab_size}")
    for arg, value in (("chunk_tokens", chunk_tokens), ("chunk_vocab", chunk_vocab)):
        if value < 1:
            raise ValueError(f"{name}: {arg} must be >= 1, got {value}")
    # The range check reads the targets on the host (a sync on CUDA); skipped while torch.compile traces.
    if targets_N.numel() and not torch.compiler.is_compiling():
        lo, hi = int(targets_N.min()), int(targets_N.max())
        if lo < 0 or hi >= vocab_size:
            raise ValueError(f"{name}: targets must lie in [0, vocab_size={vocab_size}), got min {lo}, max {hi}")


def fused_linear_logprobs(
    hidden_NH: torch.Tensor,
    weight_VH: torch.Tensor,
    targets_N: torch.Tensor,
    *,
    temperature: float = 1.0,
    with_entropy: bool = True,
    vocab_start: int = 0,
    vocab_size: int | None = None,
    group=None,
    chunk_tokens: int | None = None,
    chunk_vocab: int | None = None,
    impl: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log p(target) and the entropy per token of softmax(hidden_NH @ weight_VH^T / temperature), never forming [N, V].

    hidden_NH: [N, H] final hidden states (callers flatten [B, T]); weight_VH: [V_local, H]
        output-layer weight, this rank's rows [vocab_start, vocab_start + V_local) of the padded
        vocabulary; same floating dtype (fp32, bf16, fp16, fp64).
    targets_N: [N] int64/int32 global token ids in [0, vocab_size), the same on every TP rank.
    temperature: logits are divided by it unless it is 0 or 1 (as in logprobs_from_logits).
    vocab_size: the real (unpadded) global vocab size; None = vocab_start + V_local (no padding).
        Weight rows at or past it are padding: excluded, their gradient 0.
    group: the TP process group; None or size 1 = this weight is the whole vocabulary.
    chunk_tokens, chunk_vocab: tile sizes; None = DEFAULT_CHUNKS for the device. Peak extra
        memory is ~chunk_tokens x chunk_vocab fp32 plus the gradients.
    impl: force "cuda", "cpp" or "reference" for this call (see slime_rl.ops._backend).

    Returns (logprobs_N, entropy_N or None) in fp32 (fp64 for fp64 inputs), identical on every
    TP rank. Differentiable w.r.t. hidden_NH and weight_VH (from either or both outputs).
    Under TP, the gradient returned for hidden_NH is this rank's partial sum: the caller
    all-reduces it over the group in backward (see the module docstring).
    """
    v_local = weight_VH.shape[0] if weight_VH.dim() == 2 else 0
    vocab_size = vocab_start + v_local if vocab_size is None else vocab_size
    default_tokens, default_vocab = DEFAULT_CHUNKS.get(hidden_NH.device.type, DEFAULT_CHUNKS["cpu"])
    chunk_tokens = default_tokens if chunk_tokens is None else chunk_tokens
    chunk_vocab = default_vocab if chunk_vocab is None else chunk_vocab
    _check_linear_args(hidden_NH, weight_VH, targets_N, temperature, vocab_start, vocab_size, chunk_tokens,
                       chunk_vocab)
    n_valid = max(0, min(v_local, vocab_size - vocab_start))
    if n_valid == 0 and _tp_world(group) == 1:
        raise ValueError(f"fused_linear_logprobs: no real vocab rows (vocab_start={vocab_start}, "
                         f"vocab_size={vocab_size}, weight rows {v_local}) and no TP group to get them from")
    # The Function's inner ops see detached tensors, so a kernel serves inputs that need grad too.
    chosen = _backend.choose(FORWARD_OP, hidden_NH.detach(), impl)
    return _FusedLinearLogprob.apply(hidden_NH, weight_VH, targets_N, int(vocab_start), int(n_valid),
                                     float(temperature), bool(with_entropy), group, int(chunk_tokens),
                                     int(chunk_vocab), chosen)
