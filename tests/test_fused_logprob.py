"""slime_rl.ops.fused_logprob: fused linear + logprob + entropy against plain torch through full logits.

Accuracy follows one rule (STYLE.md 6): against the truth — plain torch on the same inputs upcast
to float64 — an implementation's error may be at most 2x the error of plain torch computing in
the input dtype (full logits, log_softmax, autograd), plus a tiny floor of a few fp32 ulps.
Checked for forward values and both gradients, fp32 and bf16, odd shapes (T and V not multiples
of the chunks, V = 1, T = 0), temperature != 1, vocab padding, masked tokens, and either output
alone. Tensor parallelism: 2 and 3 gloo ranks holding uneven vocab shards must reproduce the
unsplit result. Kernel tests skip, with the reason, where the C++ kernels are not built.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from gloo_ranks import run_on_ranks
from slime_rl import ops
from slime_rl.ops import _backend
from slime_rl.ops import fused_logprob as fl
from slime_rl.ops.fused_logprob import fused_linear_logprobs

ROOT = Path(__file__).resolve().parents[1]
CPU_IMPLS = [i for i in ("cpp", "reference") if i in ops.available_impls(fl.FORWARD_OP)]
HAS_CPP = "cpp" in CPU_IMPLS
needs_cpp = pytest.mark.skipif(not HAS_CPP, reason=f"C++ kernel unavailable: {_backend._why_not('cpp', fl.FORWARD_OP)}")
# (T, H, V, padding rows, chunk_tokens, chunk_vocab): T and V not multiples of the chunks, padding,
# V = 1, no tokens, chunks larger than the problem (the defaults), and tiles wide enough to be split
# over threads (the kernel's parallel tasks take >= 64 tokens).
SHAPES = [(37, 24, 101, 0, 16, 32), (37, 24, 101, 3, 16, 32), (5, 8, 1, 0, 2, 2), (0, 8, 11, 0, 4, 4),
          (50, 32, 300, 0, None, None), (300, 16, 70, 2, 256, 32)]  # the last: several tasks per tile


@pytest.fixture(autouse=True)
def _fresh_choice():
    _backend.reset()
    yield
    _backend.reset()


# --- plain torch, the baseline of the tolerance rule ------------------------------------------------


def plain_logprobs(hidden_NH, weight_VH, targets_N, n_valid, temperature, with_entropy=True):
    """Full logits in the input dtype, then log_softmax in fp32 (as logprobs_from_logits always did)."""
    logits_NV = (hidden_NH @ weight_VH[:n_valid].T).float() if hidden_NH.dtype != torch.float64 else \
        hidden_NH @ weight_VH[:n_valid].T
    if temperature not in (0.0, 1.0):
        logits_NV = logits_NV / temperature
    logp_NV = torch.log_softmax(logits_NV, dim=-1)
    logp_N = logp_NV.gather(1, targets_N.long().unsqueeze(1)).squeeze(1)
    ent_N = -(logp_NV.exp() * logp_NV).sum(-1) if with_entropy else None
    return logp_N, ent_N


def make_case(T, H, V, pad, dtype, seed, temperature=0.7):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(T, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V + pad, H, generator=g, dtype=torch.float64) * (3.0 / H ** 0.5)
    weight[V:] += 5.0  # padding rows that would dominate if they were not excluded
    w_lp = torch.randn(T, generator=g, dtype=torch.float64)
    w_lp[::4] = 0.0  # masked tokens: no gradient from their logprob
    return dict(hidden=hidden.to(dtype), weight=weight.to(dtype), targets=torch.randint(0, V, (T,), generator=g),
                w_lp=w_lp, w_ent=torch.randn(T, generator=g, dtype=torch.float64), vocab_size=V,
                temperature=temperature)


def loss_of(logp, ent, case, use_lp=True, use_ent=True):
    loss = logp.sum() * 0.0
    if use_lp:
        loss = loss + (logp.double() * case["w_lp"]).sum()
    if use_ent and ent is not None:
        loss = loss + (ent.double() * case["w_ent"]).sum()
    return loss


def run(fn, case, dtype=None, use_lp=True, use_ent=True, with_entropy=True):
    """(logp, ent, grad_hidden, grad_weight) of fn(hidden, weight) on the case's tensors cast to dtype."""
    dtype = dtype or case["hidden"].dtype
    hidden = case["hidden"].to(dtype).requires_grad_()
    weight = case["weight"].to(dtype).requires_grad_()
    logp, ent = fn(hidden, weight, with_entropy)
    loss = loss_of(logp, ent, case, use_lp, use_ent)
    grads = torch.autograd.grad(loss, (hidden, weight), allow_unused=True)
    grads = [torch.zeros_like(x) if gx is None else gx for gx, x in zip(grads, (hidden, weight))]
    return logp.detach(), None if ent is None else ent.detach(), grads[0], grads[1]


def plain_fn(case):
    n_valid = case["vocab_size"]
    return lambda h, w, e: plain_logprobs(h, w, case["targets"], n_valid, case["temperature"], e)


def fused_fn(case, impl, **kw):
    return lambda h, w, e: fused_linear_logprobs(h, w, case["targets"], temperature=case["temperature"],
                                                 vocab_size=case["vocab_size"], with_entropy=e, impl=impl, **kw)


def max_err(x, truth):
    return 0.0 if truth.numel() == 0 else float((x.double() - truth).abs().max())


def amax(t):
    return float(t.detach().abs().max()) if t.numel() else 0.0


def assert_within_rule(name, got, plain, truth, scale=1.0):
    """err(got) <= 2 err(plain, same dtype) + a few fp32 ulps of the values' scale (at least `scale`: for a
    gradient, the size of the products it sums, which a kernel can leave as a rounding residual where the
    truth is exactly 0, e.g. a one-column vocabulary)."""
    floor = 8 * torch.finfo(torch.float32).eps * max(1.0, scale, amax(truth))
    err, plain_err = max_err(got, truth), max_err(plain, truth)
    assert err <= 2 * plain_err + floor, f"{name}: error {err:.3g} > 2 x plain torch's {plain_err:.3g} + {floor:.2g}"


def check_rule(case, impl, dtype, use_lp=True, use_ent=True, with_entropy=True, **kw):
    truth = run(plain_fn(case), case, torch.float64, use_lp, use_ent, with_entropy)
    plain = run(plain_fn(case), case, dtype, use_lp, use_ent, with_entropy)
    got = run(fused_fn(case, impl, **kw), case, dtype, use_lp, use_ent, with_entropy)
    assert got[0].dtype == torch.float32 and got[2].dtype == got[3].dtype == dtype
    # grad_hidden sums g * dz * W over the vocab, grad_weight g * dz * hidden over the tokens (|dz| <= 1)
    g_max = max(amax(case["w_lp"]), amax(case["w_ent"]))
    scales = (1.0, 1.0, g_max * amax(case["weight"]), g_max * amax(case["hidden"]))
    for name, g, p, t, scale in zip(("logprob", "entropy", "grad_hidden", "grad_weight"), got, plain, truth, scales):
        if t is None:
            assert g is None, f"{name}: expected None"
            continue
        assert g.shape == t.shape, f"{name}: shape {tuple(g.shape)} != {tuple(t.shape)}"
        assert_within_rule(f"{impl} {dtype} {name}", g, p, t, scale)
    return got


# --- the reference by hand --------------------------------------------------------------------------


def test_reference_pieces_by_hand():
    # z = [1, 2, 3] / 0.5 = [2, 4, 6]; target 1 -> z_t - m = -2.
    import math

    hidden, weight = torch.tensor([[1.0]], dtype=torch.float64), torch.tensor([[1.0], [2.0], [3.0], [9.0]],
                                                                             dtype=torch.float64)
    m, s, u, tz = fl.linear_logprob_forward_reference(hidden, weight, torch.tensor([1]), 0, 3, 0.5)
    d = [-4.0, -2.0, 0.0]
    assert float(m) == 6.0 and float(tz) == -2.0
    assert math.isclose(float(s), sum(math.exp(x) for x in d), rel_tol=1e-15)
    assert math.isclose(float(u), sum(math.exp(x) * x for x in d), rel_tol=1e-15)
    # a shard that does not own the target, and a shard of padding only
    _, _, _, tz = fl.linear_logprob_forward_reference(hidden, weight, torch.tensor([1]), 5, 3, 0.5)
    assert float(tz) == 0.0
    m, s, u, tz = fl.linear_logprob_forward_reference(hidden, weight, torch.tensor([1]), 0, 0, 0.5)
    assert float(m) == float("-inf") and float(s) == float(u) == float(tz) == 0.0


def test_reduce_pieces_gives_logprob_and_entropy():
    logits = torch.tensor([[0.5, -1.0, 2.0, 0.0]], dtype=torch.float64)
    pieces = fl.logits_logprob_forward_reference(logits, torch.tensor([2]), 0, 4, 1.0)
    logp, ent, lse = fl.reduce_softmax_pieces(*pieces, torch.tensor([True]), None, True)
    want = torch.log_softmax(logits, -1)
    torch.testing.assert_close(logp, want[:, 2], rtol=0, atol=1e-15)
    torch.testing.assert_close(ent, -(want.exp() * want).sum(-1), rtol=0, atol=1e-15)
    torch.testing.assert_close(lse, torch.logsumexp(logits, -1), rtol=0, atol=1e-15)


# --- forward and gradients against the truth ---------------------------------------------------------


@pytest.mark.parametrize("impl", CPU_IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_matches_truth_within_rule(impl, dtype, shape, temperature):
    T, H, V, pad, chunk_tokens, chunk_vocab = shape
    case = make_case(T, H, V, pad, dtype, seed=T + V + pad, temperature=temperature)
    _, _, _, grad_weight = check_rule(case, impl, dtype, chunk_tokens=chunk_tokens, chunk_vocab=chunk_vocab)
    assert grad_weight[V:].eq(0).all()  # padding rows


@pytest.mark.parametrize("impl", CPU_IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradient_from_one_output(impl, dtype):
    case = make_case(29, 16, 67, 2, dtype, seed=5)
    check_rule(case, impl, dtype, use_lp=False, chunk_tokens=8, chunk_vocab=16)  # entropy alone
    logp, ent, _, _ = check_rule(case, impl, dtype, with_entropy=False, use_ent=False, chunk_tokens=8,
                                 chunk_vocab=16)  # logprob alone, no entropy computed
    assert ent is None


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_masked_tokens_get_no_gradient(impl):
    case = make_case(16, 8, 21, 0, torch.float32, seed=6)
    w_lp = case["w_lp"].clone()
    w_lp[5:] = 0.0
    hidden = case["hidden"].clone().requires_grad_()
    logp, _ = fused_linear_logprobs(hidden, case["weight"], case["targets"], with_entropy=False, impl=impl,
                                    chunk_tokens=4, chunk_vocab=8)
    (logp.double() * w_lp).sum().backward()
    assert hidden.grad[5:].eq(0).all() and hidden.grad[:5].abs().sum() > 0


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_gradcheck_float64(impl):
    case = make_case(6, 5, 9, 2, torch.float64, seed=7)

    def fn(hidden, weight):
        return fused_linear_logprobs(hidden, weight, case["targets"], temperature=0.7, vocab_size=9,
                                     chunk_tokens=4, chunk_vocab=4, impl=impl)

    inputs = (case["hidden"].clone().requires_grad_(), case["weight"].clone().requires_grad_())
    assert fn(*inputs)[0].dtype == torch.float64
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7)


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_kernel_matches_reference_across_chunkings(dtype):
    """The kernel's pieces barely depend on the tiling, and agree with the (upcast) reference."""
    case = make_case(23, 16, 45, 2, dtype, seed=8)
    args = (case["hidden"], case["weight"], case["targets"], 3, 44, 0.7)
    want = fl.linear_logprob_forward_reference(*args)
    tol = dict(atol=1e-12, rtol=1e-12) if dtype == torch.float64 else dict(atol=2e-5, rtol=2e-5)
    for chunks in [(1, 1), (5, 7), (23, 45), (1024, 8192)]:
        got = torch.ops.slime_rl.linear_logprob_forward(*args, *chunks)
        for g, w in zip(got, want):
            assert g.dtype == w.dtype
            torch.testing.assert_close(g, w, **tol)


# --- tensor parallelism: uneven vocab shards over 2 and 3 gloo ranks --------------------------------


def _shard_result(case, impl, rank, bounds, group):
    start, end = bounds[rank], bounds[rank + 1]
    hidden = case["hidden"].clone().requires_grad_()
    weight = case["weight"][start:end].clone().requires_grad_()
    logp, ent = fused_linear_logprobs(hidden, weight, case["targets"], temperature=case["temperature"],
                                      vocab_start=start, vocab_size=case["vocab_size"], group=group, impl=impl,
                                      chunk_tokens=8, chunk_vocab=16)
    grad_hidden, grad_weight = torch.autograd.grad(loss_of(logp, ent, case), (hidden, weight))
    return logp.detach(), ent.detach(), grad_hidden, grad_weight


def _run_jobs(rank, world, jobs):
    groups = {world: dist.group.WORLD, 2: dist.new_group([0, 1])}  # every rank joins new_group
    return [_shard_result(case, impl, rank, bounds, groups[tp]) if rank < tp else None
            for case, impl, bounds, tp in jobs]


# (TP degree, shard boundaries over the padded vocab, real vocab size); 101 is prime, so no TP degree
# divides it. One spawn of 3 ranks runs them all (2-rank layouts on a subgroup of ranks 0 and 1).
TP_LAYOUTS = [
    (2, [0, 51, 102], 101),
    (2, [0, 51, 102], 45),  # rank 1 holds only padding
    (3, [0, 40, 70, 104], 101),  # uneven shard sizes
    (3, [0, 34, 68, 102], 101),  # even shards, padding in the last
]


def test_tensor_parallel_shards_match_unsplit(tmp_path):
    world = 3
    jobs = []
    for i, (tp, bounds, vocab_size) in enumerate(TP_LAYOUTS):
        case = make_case(21, 12, vocab_size, bounds[-1] - vocab_size, torch.float32, seed=10 + i)
        jobs += [(case, impl, bounds, tp) for impl in CPU_IMPLS]
    per_rank = run_on_ranks(_run_jobs, world, jobs, tmp_path)
    tol = dict(atol=2e-5, rtol=2e-5)
    for j, (case, impl, bounds, tp) in enumerate(jobs):
        logp, ent, grad_hidden, grad_weight = _shard_result(case, impl, 0, [0, bounds[-1]], None)
        for rank in range(tp):
            torch.testing.assert_close(per_rank[rank][j][0], logp, **tol)
            torch.testing.assert_close(per_rank[rank][j][1], ent, **tol)
        # grad_hidden: each rank's partial; their sum (the caller's all-reduce) is the full gradient.
        torch.testing.assert_close(sum(per_rank[rank][j][2] for rank in range(tp)), grad_hidden, **tol)
        torch.testing.assert_close(torch.cat([per_rank[rank][j][3] for rank in range(tp)]), grad_weight, **tol)
        assert grad_weight[case["vocab_size"]:].eq(0).all()


# --- torch.compile, path choice, bad input -----------------------------------------------------------


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_torch_compile_traces_forward_and_backward(impl):
    case = make_case(19, 8, 33, 3, torch.float32, seed=12)

    def f(hidden, weight, targets):
        logp, ent = fused_linear_logprobs(hidden, weight, targets, temperature=0.7, vocab_size=33, chunk_tokens=8,
                                          chunk_vocab=8, impl=impl)
        return logp * 2.0, ent

    def grads(fn):
        hidden, weight = case["hidden"].clone().requires_grad_(), case["weight"].clone().requires_grad_()
        logp, ent = fn(hidden, weight, case["targets"])
        return (logp, ent, *torch.autograd.grad(loss_of(logp, ent, case), (hidden, weight)))

    want = grads(f)  # eager first: _backend caches the path's availability outside the trace
    torch._dynamo.reset()
    got = grads(torch.compile(f, backend="aot_eager", fullgraph=True))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-6)


@needs_cpp
def test_kernel_is_chosen_on_cpu_even_when_grad_is_needed():
    case = make_case(8, 4, 10, 0, torch.float32, seed=13)
    hidden = case["hidden"].clone().requires_grad_()
    with torch.profiler.profile() as prof:
        logp, _ = fused_linear_logprobs(hidden, case["weight"], case["targets"])
        logp.sum().backward()
    names = {e.name for e in prof.events()}
    assert {"slime_rl::linear_logprob_forward", "slime_rl::linear_logprob_backward"} <= names, names
    with torch.profiler.profile() as prof:
        fused_linear_logprobs(hidden, case["weight"], case["targets"], impl="reference")
    assert not any(e.name.startswith("slime_rl::") for e in prof.events())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_forcing_cuda_on_cpu_says_why():
    with pytest.raises(ops.ImplUnavailableError, match="linear_logprob_forward: impl 'cuda' cannot run"):
        fused_linear_logprobs(torch.zeros(2, 3), torch.zeros(4, 3), torch.zeros(2, dtype=torch.long), impl="cuda")


@pytest.mark.parametrize("kwargs,error,needle", [
    (dict(hidden=torch.zeros(2, 3, 4)), ValueError, "hidden_NH must be 2-D"),
    (dict(weight=torch.zeros(5, 4)), ValueError, r"weight_VH must be 2-D \[V_local, H=3\]"),
    (dict(weight=torch.zeros(5, 3, dtype=torch.float64)), TypeError, "share one floating dtype"),
    (dict(targets=torch.tensor([0])), ValueError, "targets_N must have shape"),
    (dict(targets=torch.tensor([0.0, 1.0])), TypeError, "int64 or int32"),
    (dict(targets=torch.tensor([0, 5])), ValueError, r"targets must lie in \[0, vocab_size=5\)"),
    (dict(temperature=-1.0), ValueError, "temperature must be >= 0"),
    (dict(chunk_vocab=0), ValueError, "chunk_vocab must be >= 1"),
    (dict(vocab_size=0), ValueError, "vocab_size > 0"),
    (dict(impl="triton"), ValueError, "unknown impl 'triton'"),
])
def test_bad_input_fails_loudly(kwargs, error, needle):
    args = dict(hidden=torch.zeros(2, 3), weight=torch.zeros(5, 3), targets=torch.tensor([0, 1]))
    kwargs = dict(kwargs)
    args.update({k: kwargs.pop(k) for k in list(kwargs) if k in args})
    with pytest.raises(error, match=needle):
        fused_linear_logprobs(args["hidden"], args["weight"], args["targets"], **kwargs)


@needs_cpp
def test_kernel_rejects_bad_input_with_a_message():
    h, w, t = torch.zeros(2, 3), torch.zeros(5, 3), torch.tensor([0, 1])
    with pytest.raises(RuntimeError, match="linear_logprob_forward: n_valid must lie in"):
        torch.ops.slime_rl.linear_logprob_forward(h, w, t, 0, 6, 1.0, 4, 4)
    with pytest.raises(RuntimeError, match="linear_logprob_backward: grad_entropy needs the forward's entropy"):
        torch.ops.slime_rl.linear_logprob_backward(h, w, t, torch.zeros(2), None, None, torch.ones(2), 0, 5, 1.0, 4, 4)


# --- memory: the point of fusing ---------------------------------------------------------------------


_PEAK_RSS = """
import sys, torch
from slime_rl.ops.fused_logprob import fused_linear_logprobs
torch.set_num_threads(1)
mode, (T, H, V) = sys.argv[1], (1024, 64, 65536)
g = torch.Generator().manual_seed(0)
hidden = torch.randn(T, H, generator=g).requires_grad_()
weight = torch.randn(V, H, generator=g).mul_(0.1).requires_grad_()
targets = torch.randint(0, V, (T,), generator=g)

def step(n):  # forward + backward on the first n tokens
    if mode == "fused":
        logp, ent = fused_linear_logprobs(hidden[:n], weight, targets[:n], impl="cpp", chunk_tokens=64,
                                          chunk_vocab=2048)
    else:
        logp_NV = torch.log_softmax(hidden[:n] @ weight.T, -1)
        logp, ent = logp_NV.gather(1, targets[:n, None]).squeeze(1), -(logp_NV.exp() * logp_NV).sum(-1)
    (logp.sum() + ent.sum()).backward()
    hidden.grad = weight.grad = None

def peak_kib():  # this process's high-water RSS (VmHWM is per address space: ru_maxrss would carry the
    # parent's peak across fork + exec, which in a long pytest run exceeds anything measured here)
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))

step(2)  # warm-up: libraries loaded, weight-sized gradient buffers seen once
base = peak_kib()
step(T)
print("rss_kib", peak_kib() - base)
"""


@needs_cpp
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM from /proc (Linux)")
def test_peak_memory_far_below_full_logits():
    """Peak RSS growth of forward+backward over a warmed-up baseline, each path in its own fresh process.

    Logits are [1024, 65536] fp32 = 256 MiB: plain autograd holds two or more of them at once; the kernel
    holds one 64 x 2048 tile (512 KiB) besides the gradients both need.
    """
    peak = {}
    for mode in ("fused", "plain"):
        proc = subprocess.run([sys.executable, "-c", _PEAK_RSS, mode], cwd=ROOT, env=dict(os.environ),
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        peak[mode] = int(proc.stdout.split("rss_kib")[1])
    logits_kib = 1024 * 65536 * 4 // 1024
    assert peak["plain"] > 2 * logits_kib and peak["fused"] < peak["plain"] / 8, peak


# --- the logits kernels behind vocab_parallel_logprobs and logprobs_from_logits ----------------------


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_logits_kernels_match_reference(dtype):
    g = torch.Generator().manual_seed(14)
    logits = (torch.randn(31, 57, generator=g, dtype=torch.float64) * 2).to(dtype)
    logits[:, 53:] += 20.0  # padding columns
    targets = torch.randint(0, 53, (31,), generator=g)
    w_lp, w_ent = torch.randn(31, generator=g), torch.randn(31, generator=g)
    w_lp[::3] = 0.0

    def go(impl):
        x = logits.clone().requires_grad_()
        lp, ent = ops.vocab_parallel_logprobs(x, targets, vocab_start=0, vocab_size=53, temperature=0.7, impl=impl)
        (grad,) = torch.autograd.grad((lp * w_lp.to(lp.dtype)).sum() + (ent * w_ent.to(ent.dtype)).sum(), x)
        return lp, ent, grad

    tol = dict(atol=1e-12, rtol=1e-12) if dtype == torch.float64 else dict(atol=2e-6, rtol=2e-6)
    for got, want in zip(go("cpp"), go("reference")):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got.double(), want.double(), **(tol if got.dtype != torch.bfloat16 else
                                                                   dict(atol=8e-3, rtol=8e-3)))
    assert go("cpp")[2][:, 53:].eq(0).all()


def masked_vocab_case(dtype, device="cpu"):
    """Logits with -inf entries (a masked vocabulary): scattered, a whole 4096-column run (the CPU
    kernel's row chunk) at the start of some rows, and one row all -inf except its target."""
    g = torch.Generator().manual_seed(16)
    T, V = 6, 2 * 4096 + 37
    logits = torch.randn(T, V, generator=g, dtype=torch.float64) * 3
    logits[torch.rand(T, V, generator=g) < 0.3] = float("-inf")
    logits[1:3, :4096] = float("-inf")
    targets = torch.randint(4096, V, (T,), generator=g)
    logits[3] = float("-inf")
    logits[3, targets[3]] = 0.5
    logits[torch.arange(T), targets] = logits[torch.arange(T), targets].nan_to_num(neginf=1.0)  # targets unmasked
    return logits.to(dtype).to(device), targets.to(device)


@pytest.mark.parametrize("impl", CPU_IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_masked_vocabulary_minus_inf_logits(impl, dtype, device="cpu"):
    # A -inf logit has probability 0: it adds nothing to the sums, the entropy or the gradient
    # (no 0 * -inf = NaN anywhere). Truth: fp64 on the same logits with -inf -> -1e4 (exp underflows to 0).
    logits, targets = masked_vocab_case(dtype, device)
    w_lp = torch.randn(logits.shape[0], generator=torch.Generator().manual_seed(17), dtype=torch.float64).to(device)
    w_ent = w_lp.flip(0)

    def go(x, impl, temperature=0.7):
        x = x.clone().requires_grad_()
        lp, ent = ops.vocab_parallel_logprobs(x, targets, vocab_start=0, vocab_size=x.shape[1],
                                              temperature=temperature, impl=impl)
        (grad,) = torch.autograd.grad((lp.double() * w_lp).sum() + (ent.double() * w_ent).sum(), x)
        return lp.double(), ent.double(), grad.double()

    got = go(logits, impl)
    truth = go(logits.double().nan_to_num(neginf=-1e4), "reference")
    for name, g_, t_ in zip(("logprob", "entropy", "grad"), got, truth):
        assert torch.isfinite(g_).all(), f"{name}: {g_}"
        tol = 1e-10 if dtype == torch.float64 else 2e-5 if name != "grad" or dtype == torch.float32 else 1e-2
        torch.testing.assert_close(g_, t_, atol=tol, rtol=tol, msg=name)
    assert got[2][logits == float("-inf")].eq(0).all()
    # the pieces of a slice that is -inf throughout: the empty-slice answer (a TP shard masked whole)
    pieces = (fl.logits_logprob_forward_reference if impl == "reference" else torch.ops.slime_rl.logits_logprob_forward)(
        logits[1:3, :4096], targets[1:3] * 0 + 7, 0, 4096, 0.7)
    want = (float("-inf"), 0.0, 0.0, float("-inf"))  # the owned target's logit is -inf as well
    for piece, w in zip(pieces, want):
        assert piece.eq(w).all(), (pieces, want)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_cuda_masked_vocabulary_minus_inf_logits(dtype):
    if "cuda" not in ops.available_impls(fl.LOGITS_FORWARD_OP):
        pytest.skip("CUDA kernel not built: " + ops.describe())
    test_masked_vocabulary_minus_inf_logits("cuda", dtype, device="cuda")


@needs_cpp
def test_logprobs_from_logits_kernel_matches_reference():
    g = torch.Generator().manual_seed(15)
    logits = torch.randn(3, 9, 40, generator=g)[:, :-1]  # a strided [B, T, V] view, as the HF backend passes
    targets = torch.randint(0, 40, (3, 8), generator=g)
    got = ops.logprobs_from_logits(logits, targets, 0.7)
    with ops.force_impl("reference"):
        want = ops.logprobs_from_logits(logits, targets, 0.7)
    for gt, wt in zip(got, want):
        assert gt.shape == (3, 8) and gt.dtype == torch.float32
        torch.testing.assert_close(gt, wt, atol=2e-6, rtol=2e-6)


# --- CUDA ---------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES[:3] + [(300, 64, 5003, 5, 128, 1024)], ids=lambda s: "x".join(map(str, s)))
def test_cuda_matches_truth_within_rule(dtype, shape):
    if "cuda" not in ops.available_impls(fl.FORWARD_OP):
        pytest.skip("CUDA kernel not built: " + ops.describe())
    T, H, V, pad, chunk_tokens, chunk_vocab = shape
    case = make_case(T, H, V, pad, dtype, seed=T + V)
    case = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in case.items()}
    check_rule(case, "cuda", dtype, chunk_tokens=chunk_tokens, chunk_vocab=chunk_vocab)
