"""loo_advantages, discounted_returns and gae: references by hand and against a naive loop, kernels vs references.

The scans' masked-token semantics are stated in slime_rl/ops/reference.py.
Kernel tolerances follow the rule: the kernel's error against the float64
truth is at most twice the reference's own error in the same dtype (both
compute in float64 and round once, so this is about an ulp of the output).
group_normalize and the shared path tests live in tests/test_ops.py.
"""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from slime_rl.ops import _backend, reference
from slime_rl.ops import advantages as ops  # the public entries (exported from slime_rl.ops by the package)

SCAN_OPS = ("loo_advantages", "discounted_returns", "gae")


def _missing(impl: str) -> str:
    """'' if every op here has an `impl` kernel, else why the first one that lacks it does."""
    for op in SCAN_OPS:
        reason = _backend._why_not(impl, op)
        if reason is not None:
            return f"no {impl} kernel for {op}: {reason}"
    return ""


needs_cpp = pytest.mark.skipif(bool(_missing("cpp")), reason=_missing("cpp"))
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# Odd lengths on purpose: empty, 1, around the CUDA kernel's 128-token chunk, long.
LENGTHS = [0, 1, 2, 5, 31, 127, 128, 129, 0, 300, 1, 1000, 33, 257]


@pytest.fixture(autouse=True)
def _fresh_choice():
    _backend.reset()
    yield
    _backend.reset()


def _t(values, dtype=torch.float64):
    return torch.tensor(values, dtype=dtype)


def _cu(lengths) -> torch.Tensor:
    return torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int64)


def _ragged(lengths, seed: int, dtype=torch.float64, p_masked: float = 0.3):
    """Random packed batch: rewards, values, a mask with isolated tokens and runs masked, cu_seqlens."""
    g = torch.Generator().manual_seed(seed)
    n = sum(lengths)
    r = (torch.randn(n, generator=g, dtype=torch.float64) * 2).to(dtype)
    v = torch.randn(n, generator=g, dtype=torch.float64).to(dtype)
    m = torch.rand(n, generator=g) >= p_masked
    if n > 20:  # a run of masked tokens, like a tool response inside a turn
        m[n // 3 : n // 3 + 15] = False
    return r, v, m, _cu(lengths)


def _naive(r, v, m, cu, gamma, lam):
    """Per-token Python loop in float64: (returns, advantages, gae returns), the semantics written out."""
    r, v, m, cu = r.double().tolist(), v.double().tolist(), m.tolist(), cu.tolist()
    ret, adv, gret = [0.0] * len(r), [0.0] * len(r), [0.0] * len(r)
    for s in range(len(cu) - 1):
        g = next_value = a = 0.0
        for t in range(cu[s + 1] - 1, cu[s] - 1, -1):
            if not m[t]:
                continue  # skipped: output 0, carries unchanged
            g = r[t] + gamma * g
            delta = r[t] + gamma * next_value - v[t]
            a = delta + gamma * lam * a
            next_value = v[t]
            ret[t], adv[t], gret[t] = g, a, a + v[t]
    return _t(ret), _t(adv), _t(gret)


def _check_rule(got: torch.Tensor, ref: torch.Tensor, truth: torch.Tensor, what: str) -> None:
    """Kernel error vs the float64 truth <= 2x the reference's own error (plus a float64 floor)."""
    assert got.shape == ref.shape == truth.shape and got.dtype == ref.dtype, what
    if truth.numel() == 0:
        return
    err_got = (got.double() - truth).abs().max().item()
    err_ref = (ref.double() - truth).abs().max().item()
    floor = 1e-12 * (1.0 + truth.abs().max().item())
    assert err_got <= 2 * err_ref + floor, f"{what}: kernel error {err_got:.3g} > 2 x reference error {err_ref:.3g}"


# --- the references, by hand -----------------------------------------------------------------------


def test_loo_reference_by_hand():
    r = _t([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    # [1, 2, 3]: 1 - 2.5, 2 - 2, 3 - 1.5;  [4, 0, 0]: 4 - 0, 0 - 2, 0 - 2
    want = _t([[-1.5, 0.0, 1.5], [4.0, -2.0, -2.0]])
    torch.testing.assert_close(reference.loo_advantages(r), want, rtol=0, atol=1e-15)
    assert torch.equal(reference.loo_advantages(_t([[5.0], [-3.0]])), torch.zeros(2, 1, dtype=torch.float64))
    assert reference.loo_advantages(torch.zeros(0, 4)).shape == (0, 4)


@pytest.mark.parametrize("value", [0.7, 0.1, 1 / 3])
def test_loo_constant_group_is_exactly_zero(value):
    r = torch.full((3, 7), value, dtype=torch.float32)
    for impl in _backend.available_impls("loo_advantages"):
        if impl != "cuda":  # covered by test_cuda_matches_reference
            assert torch.equal(ops.loo_advantages(r, impl=impl), torch.zeros_like(r)), impl


def test_returns_reference_by_hand():
    gamma = 0.5
    # seq 0: all counted, 3 -> 2 + 0.5*3 = 3.5 -> 1 + 0.5*3.5 = 2.75
    # seq 1: empty; seq 2: a masked token in the middle is skipped: 3, 0, 1 + 0.5*3
    # seq 3: masked at the end: 0, 2, 1 + 0.5*2;  seq 4: length 1
    r = _t([1, 2, 3, 1, 100, 3, 1, 2, 100, 7])
    m = torch.tensor([1, 1, 1, 1, 0, 1, 1, 1, 0, 1], dtype=torch.bool)
    cu = _cu([3, 0, 3, 3, 1])
    want = _t([2.75, 3.5, 3, 2.5, 0, 3, 2, 2, 0, 7])
    torch.testing.assert_close(reference.discounted_returns(r, m, cu, gamma), want, rtol=0, atol=1e-15)
    # gamma = 0: the reward itself; gamma = 1: the reverse cumulative sum of counted rewards
    torch.testing.assert_close(reference.discounted_returns(r, m, cu, 0.0), torch.where(m, r, 0.0))
    torch.testing.assert_close(
        reference.discounted_returns(r, m, cu, 1.0), _t([6, 5, 3, 4, 0, 3, 3, 2, 0, 7]), rtol=0, atol=1e-15
    )


def test_gae_reference_by_hand():
    gamma, lam = 0.9, 0.8  # gamma * lam = 0.72
    # delta = [0 + .9*.2 - .5, 0 + .9*.4 - .2, 1 - .4] = [-.32, .16, .6]
    # A = [-.32 + .72*.592, .16 + .72*.6, .6] = [.10624, .592, .6]
    r, v = _t([0, 0, 1]), _t([0.5, 0.2, 0.4])
    adv, ret = reference.gae(r, v, torch.ones(3, dtype=torch.bool), _cu([3]), gamma, lam)
    torch.testing.assert_close(adv, _t([0.10624, 0.592, 0.6]), rtol=0, atol=1e-15)
    torch.testing.assert_close(ret, _t([0.60624, 0.792, 1.0]), rtol=0, atol=1e-15)
    # A masked middle token: its reward and value are ignored and the scan bootstraps from
    # the next *counted* token: delta_0 = 0 + .9*.4 - .5 = -.14, A_0 = -.14 + .72*.6 = .292
    adv, ret = reference.gae(_t([0, 5, 1]), _t([0.5, 9, 0.4]), _t([1, 0, 1]), _cu([3]), gamma, lam)
    torch.testing.assert_close(adv, _t([0.292, 0, 0.6]), rtol=0, atol=1e-15)
    torch.testing.assert_close(ret, _t([0.792, 0, 1.0]), rtol=0, atol=1e-15)
    # Masked at the end: the last counted token is terminal (next value 0).
    adv, _ = reference.gae(_t([0, 1, 5]), _t([0.5, 0.4, 9]), _t([1, 1, 0]), _cu([3]), gamma, lam)
    torch.testing.assert_close(adv, _t([0.36 - 0.5 + 0.72 * 0.6, 0.6, 0]), rtol=0, atol=1e-15)
    # Length 1, and sequences do not leak into each other: A = r - V at each sequence's end.
    adv, ret = reference.gae(_t([1, 2, 3]), _t([0.25, 0.5, 1]), _t([1, 1, 1]), _cu([1, 0, 2]), gamma, lam)
    torch.testing.assert_close(adv, _t([0.75, 2 + 0.9 - 0.5 + 0.72 * 2, 2]), rtol=0, atol=1e-15)
    torch.testing.assert_close(ret, adv + _t([0.25, 0.5, 1]))


def test_gae_limits():
    r, v, m, cu = _ragged([7, 0, 1, 40, 13], seed=1)
    for gamma in (0.0, 0.6, 1.0):
        # lam = 1: advantages are discounted returns minus values (the deltas telescope)
        adv, ret = reference.gae(r, v, m, cu, gamma, 1.0)
        g = reference.discounted_returns(r, m, cu, gamma)
        torch.testing.assert_close(adv, torch.where(m, g - v, 0.0), rtol=0, atol=1e-12)
        torch.testing.assert_close(ret, g, rtol=0, atol=1e-12)
        # lam = 0: the one-step TD error, bootstrapping from the next counted token (0 at the end)
        adv0, _ = reference.gae(r, v, m, cu, gamma, 0.0)
        next_value = torch.zeros_like(v)
        for s in range(len(cu) - 1):
            following = 0.0
            for t in range(int(cu[s + 1]) - 1, int(cu[s]) - 1, -1):
                next_value[t] = following
                if m[t]:
                    following = float(v[t])
        torch.testing.assert_close(adv0, torch.where(m, r + gamma * next_value - v, 0.0), rtol=0, atol=1e-12)
    # gamma = 0: A = r - V whatever lam is
    adv, _ = reference.gae(r, v, m, cu, 0.0, 0.7)
    torch.testing.assert_close(adv, torch.where(m, r - v, 0.0), rtol=0, atol=0)


def test_references_on_empty_input():
    empty, cu = torch.zeros(0), _cu([0, 0])
    assert reference.discounted_returns(empty, empty.bool(), cu, 0.9).shape == (0,)
    adv, ret = reference.gae(empty, empty, empty.bool(), cu, 0.9, 0.9)
    assert adv.shape == ret.shape == (0,)
    assert reference.discounted_returns(empty, empty.bool(), _cu([]), 0.9).shape == (0,)


@pytest.mark.parametrize("seed", range(4))
def test_references_match_a_naive_loop(seed):
    rng = random.Random(seed)
    lengths = [rng.choice([0, 1, 2, rng.randint(3, 60), rng.randint(100, 400)]) for _ in range(25)]
    gamma, lam = rng.choice([0.0, 1.0, rng.random()]), rng.choice([0.0, 1.0, rng.random()])
    r, v, m, cu = _ragged(lengths, seed, p_masked=rng.choice([0.0, 0.3, 0.9]))
    want_ret, want_adv, want_gret = _naive(r, v, m, cu, gamma, lam)
    torch.testing.assert_close(reference.discounted_returns(r, m, cu, gamma), want_ret, rtol=1e-12, atol=1e-12)
    adv, ret = reference.gae(r, v, m, cu, gamma, lam)
    torch.testing.assert_close(adv, want_adv, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ret, want_gret, rtol=1e-12, atol=1e-12)


# --- the public entries: layouts, mask types, input checks, gradients ------------------------------


@pytest.mark.parametrize("impl", ["reference", "cpp"])
def test_padded_and_packed_layouts_agree(impl):
    if impl == "cpp" and _missing("cpp"):
        pytest.skip(_missing("cpp"))
    lengths = [5, 0, 17, 1, 9]
    r, v, m, cu = _ragged(lengths, seed=3, dtype=torch.float32)
    adv_N, ret_N = ops.gae(r, v, m, 0.95, 0.9, cu_seqlens=cu, impl=impl)
    g_N = ops.discounted_returns(r, m, 0.95, cu_seqlens=cu, impl=impl)
    # The same batch right-padded to [B, T]: padding is masked, hence absent.
    b, t = len(lengths), max(lengths)
    valid_BT = torch.arange(t) < torch.tensor(lengths)[:, None]
    pad = lambda x: torch.zeros(b, t, dtype=x.dtype).masked_scatter(valid_BT, x)  # noqa: E731
    adv_BT, ret_BT = ops.gae(pad(r), pad(v), pad(m), 0.95, 0.9, impl=impl)
    g_BT = ops.discounted_returns(pad(r), pad(m), 0.95, impl=impl)
    assert adv_BT.shape == ret_BT.shape == g_BT.shape == (b, t)
    assert torch.equal(adv_BT[valid_BT], adv_N) and torch.equal(ret_BT[valid_BT], ret_N)
    assert torch.equal(g_BT[valid_BT], g_N)
    assert not adv_BT[~valid_BT].any() and not g_BT[~valid_BT].any()


@pytest.mark.parametrize("impl", ["reference", "cpp"])
def test_mask_dtypes_and_non_contiguous_inputs(impl):
    if impl == "cpp" and _missing("cpp"):
        pytest.skip(_missing("cpp"))
    g = torch.Generator().manual_seed(4)
    r_TB, v_TB = torch.randn(12, 6, generator=g), torch.randn(12, 6, generator=g)
    m_TB = torch.rand(12, 6, generator=g) > 0.3
    r, v, m = r_TB.t(), v_TB.t(), m_TB.t()  # non-contiguous [B, T] views
    want_adv, want_ret = ops.gae(r.contiguous(), v.contiguous(), m.contiguous(), 0.9, 0.95, impl=impl)
    for mask in (m, m.to(torch.int64), m.to(torch.float32), m.to(torch.uint8)):
        adv, ret = ops.gae(r, v, mask, 0.9, 0.95, impl=impl)
        assert torch.equal(adv, want_adv) and torch.equal(ret, want_ret), mask.dtype
        returns = ops.discounted_returns(r, mask, 0.9, impl=impl)
        assert torch.equal(returns, ops.discounted_returns(r, m, 0.9, impl=impl)), mask.dtype
    t_GN = torch.randn(5, 3, generator=g).t()
    assert torch.equal(ops.loo_advantages(t_GN, impl=impl), reference.loo_advantages(t_GN.contiguous()))
    # int32 cu_seqlens (as flash-attention packers make them) are accepted
    cu32 = torch.tensor([0, 2, 5], dtype=torch.int32)
    x = torch.randn(5, generator=g)
    assert torch.equal(ops.discounted_returns(x, torch.ones(5), 0.9, cu_seqlens=cu32, impl=impl),
                       reference.discounted_returns(x, torch.ones(5), cu32.long(), 0.9))


def test_empty_inputs_keep_their_layout():
    for shape in [(0, 5), (3, 0), (0, 0)]:
        z = torch.zeros(shape)
        assert ops.discounted_returns(z, z, 0.9).shape == shape
        adv, ret = ops.gae(z, z, z, 0.9, 0.9)
        assert adv.shape == ret.shape == shape
    assert ops.loo_advantages(torch.zeros(0, 3)).shape == (0, 3)


@pytest.mark.parametrize("impl", ["reference", "cpp"])
def test_bad_input_is_rejected_with_a_message(impl):
    if impl == "cpp" and _missing("cpp"):
        pytest.skip(_missing("cpp"))
    r, m, cu = torch.zeros(5), torch.ones(5, dtype=torch.bool), _cu([2, 3])
    with pytest.raises(ValueError, match="gamma must be in"):
        ops.discounted_returns(r, m, 1.5, cu_seqlens=cu, impl=impl)
    with pytest.raises(ValueError, match="lam must be in"):
        ops.gae(r, r, m, 0.9, -0.1, cu_seqlens=cu, impl=impl)
    with pytest.raises(ValueError, match="mask must have rewards' shape"):
        ops.discounted_returns(r, m[:4], 0.9, cu_seqlens=cu, impl=impl)
    with pytest.raises(TypeError, match="values must have rewards' dtype"):
        ops.gae(r, r.double(), m, 0.9, 0.9, cu_seqlens=cu, impl=impl)
    with pytest.raises(TypeError, match="rewards must be a floating"):
        ops.discounted_returns(r.long(), m, 0.9, cu_seqlens=cu, impl=impl)
    with pytest.raises(ValueError, match="padded .B, T. when cu_seqlens is None"):
        ops.discounted_returns(r, m, 0.9, impl=impl)
    with pytest.raises(ValueError, match="packed 1-D"):
        ops.discounted_returns(r.view(1, 5), m.view(1, 5), 0.9, cu_seqlens=cu, impl=impl)
    with pytest.raises(TypeError, match="cu_seqlens must be an integer"):
        ops.discounted_returns(r, m, 0.9, cu_seqlens=cu.float(), impl=impl)
    # The values of cu_seqlens are checked by the C++ kernel and by the reference.
    for bad in ([1, 2, 5], [0, 2, 4], [0, 3, 2, 5]):
        with pytest.raises(ValueError, match="cu_seqlens must"):
            ops.gae(r, r, m, 0.9, 0.9, cu_seqlens=torch.tensor(bad), impl=impl)
        with pytest.raises(ValueError, match="cu_seqlens must"):
            ops.discounted_returns(r, m, 0.9, cu_seqlens=torch.tensor(bad), impl=impl)
    with pytest.raises(ValueError, match="loo_advantages: rewards_GN must be 2-D"):
        ops.loo_advantages(torch.zeros(3), impl=impl)
    with pytest.raises(ValueError, match="at least one sample"):
        ops.loo_advantages(torch.zeros(3, 0), impl=impl)


def test_inputs_needing_grad_take_the_differentiable_reference():
    r, v, m, cu = _ragged([6, 1, 9], seed=5)
    v.requires_grad_(True)
    assert _backend.choose("gae", v) == "reference"
    w = torch.randn(v.shape, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    adv, _ = ops.gae(r, v, m, 0.9, 1.0, cu_seqlens=cu)
    (adv * w).sum().backward()
    # lam = 1: A = G - V on counted tokens, so d(sum w A)/dV = -w there and 0 on masked tokens.
    torch.testing.assert_close(v.grad, torch.where(m, -w, 0.0), rtol=0, atol=1e-12)


# --- the C++ kernels against the references --------------------------------------------------------


@needs_cpp
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (0.99, 0.95), (0.0, 0.5), (0.7, 0.0)])
def test_cpp_scans_match_reference(dtype, gamma, lam):
    r, v, m, cu = _ragged(LENGTHS, seed=int(gamma * 100 + lam * 10), dtype=dtype)
    truth_adv, truth_ret = reference.gae(r.double(), v.double(), m, cu, gamma, lam)
    ref_adv, ref_ret = reference.gae(r, v, m, cu, gamma, lam)
    adv, ret = ops.gae(r, v, m, gamma, lam, cu_seqlens=cu, impl="cpp")
    _check_rule(adv, ref_adv, truth_adv, f"gae advantages {dtype}")
    _check_rule(ret, ref_ret, truth_ret, f"gae returns {dtype}")
    assert not adv[~m].any() and not ret[~m].any()
    truth_g = reference.discounted_returns(r.double(), m, cu, gamma)
    got_g = ops.discounted_returns(r, m, gamma, cu_seqlens=cu, impl="cpp")
    _check_rule(got_g, reference.discounted_returns(r, m, cu, gamma), truth_g, f"returns {dtype}")


@needs_cpp
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (5, 1), (0, 4), (1, 2), (7, 13), (1000, 16), (3, 4097)])
def test_cpp_loo_matches_reference(dtype, shape):
    g = torch.Generator().manual_seed(shape[0] * 31 + shape[1])
    r = (torch.randn(shape, dtype=torch.float64, generator=g) * 3 + 1).to(dtype)
    got = ops.loo_advantages(r, impl="cpp")
    _check_rule(got, reference.loo_advantages(r), reference.loo_advantages(r.double()), f"loo {dtype} {shape}")


@needs_cpp
def test_cpp_is_the_default_and_thread_count_invariant():
    r, v, m, cu = _ragged([random.Random(7).randint(0, 400) for _ in range(2000)], seed=7, dtype=torch.float32)
    assert _backend.choose("gae", r) == "cpp"
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.gae(r, v, m, 0.99, 0.95, cu_seqlens=cu)
        torch.set_num_threads(max(2, threads))
        many = ops.gae(r, v, m, 0.99, 0.95, cu_seqlens=cu)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one[0], many[0]) and torch.equal(one[1], many[1])


@needs_cpp
def test_torch_compile_traces_the_ops():
    # aot_eager runs the fake (meta) implementations through tracing, without inductor codegen.
    def f(r_BT, v_BT, m_BT, r_GN):
        adv, ret = ops.gae(r_BT, v_BT, m_BT, 0.99, 0.95, impl="cpp")
        g = ops.discounted_returns(r_BT, m_BT, 0.99, impl="cpp")
        return adv * 2.0, ret + g, ops.loo_advantages(r_GN, impl="cpp") - 1.0

    gen = torch.Generator().manual_seed(8)
    args = (torch.randn(4, 9, generator=gen), torch.randn(4, 9, generator=gen),
            torch.rand(4, 9, generator=gen) > 0.2, torch.randn(3, 5, generator=gen))
    want = f(*args)  # eager first: the path choice is worked out (and cached) outside tracing
    torch._dynamo.reset()
    got = torch.compile(f, backend="aot_eager", fullgraph=True)(*args)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# --- CUDA ------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_matches_reference(dtype):
    if _missing("cuda"):
        pytest.skip(_missing("cuda"))
    rng = random.Random(9)
    long_batch = [rng.randint(0, 2048) for _ in range(300)]
    for lengths in (LENGTHS, long_batch, [5000], [0, 0]):
        for gamma, lam in [(1.0, 1.0), (0.99, 0.95), (0.0, 0.5), (0.7, 0.0)]:
            r, v, m, cu = _ragged(lengths, seed=len(lengths), dtype=dtype)
            truth_adv, truth_ret = reference.gae(r.double(), v.double(), m, cu, gamma, lam)
            ref_adv, ref_ret = reference.gae(r, v, m, cu, gamma, lam)
            adv, ret = ops.gae(r.cuda(), v.cuda(), m.cuda(), gamma, lam, cu_seqlens=cu.cuda(), impl="cuda")
            _check_rule(adv.cpu(), ref_adv, truth_adv, f"cuda gae advantages {dtype} {gamma} {lam}")
            _check_rule(ret.cpu(), ref_ret, truth_ret, f"cuda gae returns {dtype} {gamma} {lam}")
            got_g = ops.discounted_returns(r.cuda(), m.cuda().float(), gamma, cu_seqlens=cu.cuda(), impl="cuda")
            _check_rule(got_g.cpu(), reference.discounted_returns(r, m, cu, gamma),
                        reference.discounted_returns(r.double(), m, cu, gamma), f"cuda returns {dtype} {gamma}")
    for shape in [(1, 1), (5, 1), (0, 4), (7, 13), (4096, 16), (3, 4097)]:
        r = (torch.randn(shape, dtype=torch.float64) * 3 + 1).to(dtype)
        got = ops.loo_advantages(r.cuda(), impl="cuda").cpu()
        _check_rule(got, reference.loo_advantages(r), reference.loo_advantages(r.double()), f"cuda loo {shape}")
    r = torch.full((4, 7), 0.7, device="cuda")
    assert torch.equal(ops.loo_advantages(r, impl="cuda"), torch.zeros_like(r))
    # padded layout on the GPU
    r_BT = torch.randn(8, 300, device="cuda", dtype=dtype)
    m_BT = torch.rand(8, 300, device="cuda") > 0.2
    got = ops.discounted_returns(r_BT, m_BT, 0.9, impl="cuda").cpu()
    _check_rule(got, ops.discounted_returns(r_BT.cpu(), m_BT.cpu(), 0.9, impl="reference"),
                ops.discounted_returns(r_BT.cpu().double(), m_BT.cpu(), 0.9, impl="reference"), "cuda padded")
