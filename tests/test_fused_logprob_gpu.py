"""The CUDA kernels of the fused (linear +) logprob + entropy ops against their torch references.

Every test is @pytest.mark.gpu: it runs only where CUDA is available and the extension was built
with the CUDA kernels (csrc/cuda/fused_logprob.cu, fused_logprob_ops.cpp), and skips with the
reason otherwise. The four ops are called directly (torch.ops.slime_rl.*) and compared with the
references in slime_rl/ops/fused_logprob.py computed on the same GPU tensors:

  * linear forward: the softmax pieces (max, sum_exp, sum_z, target_z), and the logprob,
    entropy and lse derived from them, over fp32/bf16/fp16/fp64, shapes that are not multiples
    of the tiles (V = 1, T = 1, T = 0), chunkings from 1 x 1 to larger than the problem,
    temperature 1, 0.7 and 0 (= none), vocab padding and a shard at vocab_start > 0 whose
    targets partly lie elsewhere;
  * linear backward: grad_hidden and grad_weight, padding rows exactly 0, masked tokens exactly
    0, either output's gradient alone;
  * logits forward/backward: the same checks on given logits, including rows that are a strided,
    unaligned slice of a wider buffer (the kernels' scalar head/tail and non-vector paths).

Tolerances. Pieces: the kernel and the reference both keep z in fp32 (fp64 for fp64); they
differ in summation order and exp (__expf), so fp32 agrees to ~1e-5 relative. Gradients of
bf16/fp16 inputs: the kernel rounds dz to the input dtype before its GEMMs (as plain torch
autograd does with grad_logits), the reference does not, so they agree to a few units of the
dtype's last place of the largest gradient. The accuracy rule against fp64 truth (the
kernel's error at most 2x plain torch's own) is checked through the public op in
tests/test_fused_logprob.py::test_cuda_matches_truth_within_rule.

The checks are functions of (kernels, device) so that the same code can drive another
build of the ops (e.g. a host emulation of the CUDA kernels) in development.
"""

from __future__ import annotations

import pytest
import torch

from slime_rl import ops
from slime_rl.ops import fused_logprob as fl

pytestmark = pytest.mark.gpu

# (T, H, V_local, padding rows, vocab_start, chunk_tokens, chunk_vocab): T and V not multiples of
# the chunks; a shard at vocab_start 40 with padding; V = 1; T = 1; T = 0; one tile of everything.
LINEAR_SHAPES = [
    (37, 24, 101, 0, 0, 16, 32),
    (37, 24, 101, 3, 40, 16, 32),
    (5, 8, 1, 0, 0, 2, 2),
    (1, 16, 77, 2, 0, 1, 1),
    (0, 8, 11, 0, 0, 4, 4),
    (300, 64, 5003, 5, 0, 128, 1024),
    (64, 32, 515, 0, 7, 4096, 16384),
]
TOLERANCE = {  # pieces and fp32/fp64 gradients: (rtol, atol relative to the largest value)
    torch.float32: (2e-5, 2e-5),
    torch.float64: (1e-12, 1e-12),
    torch.bfloat16: (2e-5, 2e-5),
    torch.float16: (2e-5, 2e-5),
}
GRAD_TOLERANCE = {torch.bfloat16: 2 ** -6, torch.float16: 2 ** -9}  # x the largest gradient


def kernels_available() -> bool:
    return torch.cuda.is_available() and "cuda" in ops.available_impls(fl.FORWARD_OP)


@pytest.fixture
def cuda_kernels():
    if not kernels_available():
        pytest.skip("CUDA kernels not built: " + ops.describe())
    return torch.ops.slime_rl


def make_linear_case(T, H, V_local, pad, vocab_start, dtype, device, seed, temperature=0.7):
    """Inputs of one shard: weight rows [V_local - pad, V_local) are padding; targets span the whole vocab."""
    g = torch.Generator().manual_seed(seed)
    n_valid = V_local - pad
    vocab_size = vocab_start + n_valid + 13  # other ranks hold vocab before and after this shard
    hidden = torch.randn(T, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V_local, H, generator=g, dtype=torch.float64) * (3.0 / max(H, 1) ** 0.5)
    weight[n_valid:] += 5.0  # padding rows that would dominate if they were not excluded
    targets = torch.randint(0, vocab_size, (T,), generator=g)
    if T:
        targets[0] = vocab_start + n_valid - 1  # at least one owned target, in the last column
    grad_lp = torch.randn(T, generator=g)
    grad_lp[::4] = 0.0
    grad_ent = torch.randn(T, generator=g)
    grad_ent[::4] = 0.0  # every 4th token is masked: no gradient at all
    to = dict(device=device)
    return dict(hidden=hidden.to(dtype).to(**to), weight=weight.to(dtype).to(**to), targets=targets.to(**to),
                grad_lp=grad_lp.to(**to), grad_ent=grad_ent.to(**to), vocab_start=vocab_start, n_valid=n_valid,
                temperature=temperature)


def derived(pieces):
    """(logprob, entropy, lse) of one shard's pieces (no TP reduction)."""
    m, s, u, tz = (p.double() for p in pieces)
    log_s = s.log()
    return tz - log_s, log_s - u / s, m + log_s


def assert_close_scaled(name, got, want, rtol, atol_scale, min_scale=0.0):
    """|got - want| <= rtol |want| + atol_scale * max(max|want|, min_scale) (elementwise), same dtype and shape.

    min_scale: the size of the quantities the values are computed from, for values that can be exactly 0
    (sum_z and the entropy of a one-column vocabulary: a kernel leaves a rounding residual there)."""
    assert got.dtype == want.dtype and got.shape == want.shape, (name, got.dtype, want.dtype, got.shape, want.shape)
    if want.numel() == 0:
        return
    g, w = got.double().cpu(), want.double().cpu()
    finite = torch.isfinite(w)
    assert torch.equal(torch.isfinite(g), finite) and torch.equal(g[~finite], w[~finite]), f"{name}: non-finite differ"
    scale = max(float(w[finite].abs().max()) if finite.any() else 0.0, min_scale)
    err = (g - w)[finite].abs()
    bound = rtol * w[finite].abs() + atol_scale * max(scale, 1e-30)
    worst = float((err - bound).max()) if err.numel() else 0.0
    assert worst <= 0, f"{name}: max error {float(err.max()):.3g} exceeds tolerance (scale {scale:.3g})"


def check_linear_forward(kernels, case, chunk_tokens, chunk_vocab):
    args = (case["hidden"], case["weight"], case["targets"], case["vocab_start"], case["n_valid"],
            case["temperature"])
    got = kernels.linear_logprob_forward(*args, chunk_tokens, chunk_vocab)
    want = fl.linear_logprob_forward_reference(*args)
    rtol, atol = TOLERANCE[case["hidden"].dtype]
    for name, g, w in zip(("max", "sum_exp", "sum_z", "target_z"), got, want):
        assert_close_scaled(name, g, w, rtol, atol, min_scale=1.0)
    for name, g, w in zip(("logprob", "entropy", "lse"), derived(got), derived(want)):
        assert_close_scaled(name, g, w, rtol, atol, min_scale=1.0)
    return got


def backward_inputs(case, pieces, use_lp=True, use_ent=True):
    _, entropy, lse = derived(pieces)
    dtype = pieces[0].dtype
    return (lse.to(dtype), entropy.to(dtype), case["grad_lp"].to(dtype) if use_lp else None,
            case["grad_ent"].to(dtype) if use_ent else None)


def check_linear_backward(kernels, case, chunk_tokens, chunk_vocab, use_lp=True, use_ent=True):
    pieces = fl.linear_logprob_forward_reference(case["hidden"], case["weight"], case["targets"],
                                                 case["vocab_start"], case["n_valid"], case["temperature"])
    lse, entropy, g_lp, g_ent = backward_inputs(case, pieces, use_lp, use_ent)
    args = (case["hidden"], case["weight"], case["targets"], lse, entropy, g_lp, g_ent, case["vocab_start"],
            case["n_valid"], case["temperature"])
    grad_hidden, grad_weight = kernels.linear_logprob_backward(*args, chunk_tokens, chunk_vocab)
    want_hidden, want_weight = fl.linear_logprob_backward_reference(*args)
    dtype = case["hidden"].dtype
    rtol, atol = TOLERANCE[dtype]
    if dtype in GRAD_TOLERANCE:
        rtol, atol = 0.0, GRAD_TOLERANCE[dtype]
    assert_close_scaled("grad_hidden", grad_hidden, want_hidden, rtol, atol)
    assert_close_scaled("grad_weight", grad_weight, want_weight, rtol, atol)
    assert grad_weight[case["n_valid"]:].eq(0).all(), "padding rows must get no gradient"
    masked = torch.zeros_like(case["grad_lp"], dtype=torch.bool)
    masked |= (case["grad_lp"] == 0) if use_lp else True
    masked &= (case["grad_ent"] == 0) if use_ent else True
    assert grad_hidden[masked].eq(0).all(), "masked tokens must get no gradient"
    return grad_hidden, grad_weight


def make_logits_case(T, V_local, pad, vocab_start, dtype, device, seed, strided, temperature=0.7):
    """Logits of one shard; strided: a [T, V_local] view starting at column 3 of a [T, V_local + 8] buffer."""
    g = torch.Generator().manual_seed(seed)
    n_valid = V_local - pad
    wide = torch.randn(T, V_local + 8, generator=g, dtype=torch.float64) * 3
    off = 3 if strided else 0
    wide[:, off + n_valid:off + V_local] += 20.0  # padding columns, in the buffer the logits are cut from
    targets = torch.randint(0, vocab_start + n_valid + 9, (T,), generator=g)
    grad_lp = torch.randn(T, generator=g)
    grad_lp[::3] = 0.0
    grad_ent = torch.randn(T, generator=g)
    grad_ent[::3] = 0.0
    buf = wide.to(dtype).to(device)  # keep the view's strides and offset on the device
    logits = buf[:, 3:3 + V_local] if strided else buf[:, :V_local].contiguous()
    return dict(logits=logits, targets=targets.to(device), grad_lp=grad_lp.to(device), grad_ent=grad_ent.to(device),
                vocab_start=vocab_start, n_valid=n_valid, temperature=temperature)


def check_logits(kernels, case):
    args = (case["logits"], case["targets"], case["vocab_start"], case["n_valid"], case["temperature"])
    got = kernels.logits_logprob_forward(*args)
    want = fl.logits_logprob_forward_reference(*args)
    dtype = case["logits"].dtype
    rtol, atol = TOLERANCE[dtype]
    for name, g, w in zip(("max", "sum_exp", "sum_z", "target_z"), got, want):
        assert_close_scaled(name, g, w, rtol, atol, min_scale=1.0)
    lse, entropy, g_lp, g_ent = backward_inputs(case, want)
    bargs = (case["logits"], case["targets"], lse, entropy, g_lp, g_ent, case["vocab_start"], case["n_valid"],
             case["temperature"])
    grad = kernels.logits_logprob_backward(*bargs)
    want_grad = fl.logits_logprob_backward_reference(*bargs)
    # Both compute in fp32 and round once to the logits dtype: one unit of its last place.
    ulp = {torch.bfloat16: 2 ** -7, torch.float16: 2 ** -10}.get(dtype)
    if ulp is None:
        assert_close_scaled("grad_logits", grad, want_grad, rtol, atol)
    else:
        assert_close_scaled("grad_logits", grad, want_grad, ulp, ulp * 2 ** -6)
    assert grad.is_contiguous() and grad[:, case["n_valid"]:].eq(0).all()
    masked = (case["grad_lp"] == 0) & (case["grad_ent"] == 0)
    assert grad[masked].eq(0).all()


# --- tests -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("shape", LINEAR_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("temperature", [1.0, 0.7, 0.0])
def test_linear_kernels_match_reference(cuda_kernels, dtype, shape, temperature):
    T, H, V_local, pad, vocab_start, chunk_tokens, chunk_vocab = shape
    case = make_linear_case(T, H, V_local, pad, vocab_start, dtype, "cuda", seed=T + V_local, temperature=temperature)
    check_linear_forward(cuda_kernels, case, chunk_tokens, chunk_vocab)
    check_linear_backward(cuda_kernels, case, chunk_tokens, chunk_vocab)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_backward_from_one_output(cuda_kernels, dtype):
    case = make_linear_case(29, 16, 67, 2, 0, dtype, "cuda", seed=5)
    check_linear_backward(cuda_kernels, case, 8, 16, use_lp=False)
    check_linear_backward(cuda_kernels, case, 8, 16, use_ent=False)
    hidden_grad, weight_grad = cuda_kernels.linear_logprob_backward(
        case["hidden"], case["weight"], case["targets"], torch.zeros(29, device="cuda"), None, None, None, 0, 65,
        1.0, 8, 16)
    assert hidden_grad.eq(0).all() and weight_grad.eq(0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunking_barely_changes_the_pieces(cuda_kernels, dtype):
    case = make_linear_case(23, 16, 45, 2, 3, dtype, "cuda", seed=8)
    chunkings = [(1, 1), (5, 7), (23, 45), (4096, 16384)]
    results = [check_linear_forward(cuda_kernels, case, *chunks) for chunks in chunkings]
    for other in results[1:]:
        for a, b in zip(results[0], other):
            torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "strided"])
@pytest.mark.parametrize("shape", [(31, 57, 4, 0), (17, 1, 0, 0), (9, 203, 3, 50), (64, 4099, 0, 0)],
                         ids=lambda s: "x".join(map(str, s)))
def test_logits_kernels_match_reference(cuda_kernels, dtype, strided, shape):
    T, V_local, pad, vocab_start = shape
    check_logits(cuda_kernels, make_logits_case(T, V_local, pad, vocab_start, dtype, "cuda", seed=T + V_local,
                                                strided=strided))


def test_public_ops_choose_the_cuda_kernels(cuda_kernels):
    """fused_linear_logprobs and vocab_parallel_logprobs run the CUDA kernels and agree with the references."""
    case = make_linear_case(40, 32, 333, 0, 0, torch.float32, "cuda", seed=11)
    hidden = case["hidden"].clone().requires_grad_()
    with torch.profiler.profile() as prof:
        logp, ent = fl.fused_linear_logprobs(hidden, case["weight"], case["targets"] % 333, temperature=0.7)
        (logp.sum() + ent.sum()).backward()
    names = {e.name for e in prof.events()}
    assert {"slime_rl::linear_logprob_forward", "slime_rl::linear_logprob_backward"} <= names, names
    ref_hidden = case["hidden"].clone().requires_grad_()
    ref_logp, ref_ent = fl.fused_linear_logprobs(ref_hidden, case["weight"], case["targets"] % 333, temperature=0.7,
                                                 impl="reference")
    (ref_logp.sum() + ref_ent.sum()).backward()
    for got, want in ((logp, ref_logp), (ent, ref_ent), (hidden.grad, ref_hidden.grad)):
        torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)

    logits = torch.randn(40, 333, device="cuda") * 2  # the last 3 columns are vocab padding
    targets = case["targets"] % 330

    def logits_path(impl):
        x = logits.clone().requires_grad_()
        lp, ent = ops.vocab_parallel_logprobs(x, targets, vocab_start=0, vocab_size=330, temperature=0.7, impl=impl)
        (lp * case["grad_lp"]).sum().add((ent * case["grad_ent"]).sum()).backward()
        return lp, ent, x.grad

    for got, want in zip(logits_path("cuda"), logits_path("reference")):
        torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


def test_kernels_reject_bad_input_with_a_message(cuda_kernels):
    h, w, t = torch.zeros(2, 3, device="cuda"), torch.zeros(5, 3, device="cuda"), torch.tensor([0, 1], device="cuda")
    with pytest.raises(RuntimeError, match="linear_logprob_forward: n_valid must lie in"):
        cuda_kernels.linear_logprob_forward(h, w, t, 0, 6, 1.0, 4, 4)
    with pytest.raises(RuntimeError, match="linear_logprob_forward: targets must be on hidden's device"):
        cuda_kernels.linear_logprob_forward(h, w, t.cpu(), 0, 5, 1.0, 4, 4)
    with pytest.raises(RuntimeError, match="linear_logprob_forward: hidden and weight must share one dtype"):
        cuda_kernels.linear_logprob_forward(h, w.double(), t, 0, 5, 1.0, 4, 4)
    with pytest.raises(RuntimeError, match="linear_logprob_backward: grad_entropy needs the forward's entropy"):
        cuda_kernels.linear_logprob_backward(h, w, t, torch.zeros(2, device="cuda"), None, None,
                                             torch.ones(2, device="cuda"), 0, 5, 1.0, 4, 4)
    with pytest.raises(RuntimeError, match="logits_logprob_forward: temperature must be >= 0"):
        cuda_kernels.logits_logprob_forward(w, torch.zeros(5, dtype=torch.long, device="cuda"), 0, 3, -1.0)


def test_logits_forward_reads_at_a_good_fraction_of_copy_bandwidth(cuda_kernels):
    """One pass over bf16 logits; generous bound here (the benchmark reports the real ratio, target 0.7)."""
    T, V = 2048, 151936
    logits = torch.randn(T, V, device="cuda", dtype=torch.bfloat16)
    targets = torch.randint(0, V, (T,), device="cuda")

    def best_ms(fn, reps=10):
        fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return min(times)

    copy = torch.empty_like(logits)
    copy_gbps = 2 * logits.numel() * 2 / best_ms(lambda: copy.copy_(logits)) / 1e6  # read + write
    kernel_gbps = logits.numel() * 2 / best_ms(lambda: cuda_kernels.logits_logprob_forward(logits, targets, 0, V,
                                                                                           0.7)) / 1e6
    assert kernel_gbps >= 0.5 * copy_gbps, (kernel_gbps, copy_gbps)
