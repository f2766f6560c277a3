"""slime_rl.ops: references by hand, kernels against references, and the path choice.

Copy this file's pattern for a new op: hand-computed cases for the reference,
the kernel against the reference over dtypes and odd shapes, then the shared
path tests at the bottom cover it through ops.describe()/force_impl().
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from slime_rl import ops
from slime_rl.ops import _backend, reference

ROOT = Path(__file__).resolve().parents[1]

CPP_MISSING = "cpp" not in ops.available_impls("group_normalize")
needs_cpp = pytest.mark.skipif(
    CPP_MISSING,
    reason="C++ extension not built (pip install -e . --no-build-isolation); " + ops.describe(),
)
# Tolerances against the float64 reference: every impl computes in float64 and
# rounds once, so these are a few ulps of the output dtype.
ATOL = {torch.float32: 1e-6, torch.float64: 1e-12, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
SHAPES = [(1, 1), (5, 1), (0, 4), (1, 2), (7, 13), (1000, 16), (3, 4097)]


@pytest.fixture(autouse=True)
def _fresh_choice():
    _backend.reset()
    yield
    _backend.reset()


def _run_python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True, timeout=600,
    )


# --- the reference, by hand ------------------------------------------------------------------------


def test_reference_by_hand():
    r = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    # mean [2, 0]; unbiased std [1, 0]
    eps = 1e-6
    want = torch.tensor([[-1 / (1 + eps), 0.0, 1 / (1 + eps)], [0.0, 0.0, 0.0]])
    torch.testing.assert_close(reference.group_normalize(r, eps, True), want)
    torch.testing.assert_close(reference.group_normalize(r, eps, False), torch.tensor([[-1.0, 0, 1], [0, 0, 0]]))
    # [1, 0, 0, 1]: mean 0.5, unbiased std sqrt(1/3)
    s = (1 / 3) ** 0.5
    got = reference.group_normalize(torch.tensor([[1.0, 0, 0, 1]], dtype=torch.float64), 0.0, True)
    torch.testing.assert_close(got, torch.tensor([[0.5 / s, -0.5 / s, -0.5 / s, 0.5 / s]], dtype=torch.float64))


def test_reference_single_sample_groups_are_zero():
    r = torch.tensor([[5.0], [-3.0]])
    assert torch.equal(reference.group_normalize(r, 1e-6, True), torch.zeros(2, 1))
    assert torch.equal(reference.group_normalize(r, 1e-6, False), torch.zeros(2, 1))


@pytest.mark.parametrize("value", [0.7, 0.1, 1 / 3])
@pytest.mark.parametrize("n", [3, 7, 16])
def test_constant_group_is_exactly_zero(value, n):
    # float32 sums would leave r - mean ~1 ulp and advantages ~0.05 (reference.py docstring).
    r = torch.full((2, n), value, dtype=torch.float32)
    for impl in ops.available_impls("group_normalize"):
        if impl == "cuda":
            continue  # covered by test_cuda_matches_reference
        assert torch.equal(ops.group_normalize(r, impl=impl), torch.zeros_like(r)), impl


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reference_low_precision(dtype):
    r64 = torch.randn(33, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    got = reference.group_normalize(r64.to(dtype), 1e-6, True)
    assert got.dtype == dtype
    want = reference.group_normalize(r64.to(dtype).double(), 1e-6, True)
    torch.testing.assert_close(got.double(), want, atol=ATOL[dtype], rtol=0)


# --- the C++ kernel against the reference ----------------------------------------------------------


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("scale_by_std", [True, False])
def test_cpp_matches_reference(dtype, shape, scale_by_std):
    g = torch.Generator().manual_seed(hash((shape, scale_by_std)) % 2**31)
    r = (torch.randn(shape, dtype=torch.float64, generator=g) * 3 + 1).to(dtype)
    got = ops.group_normalize(r, eps=1e-6, scale_by_std=scale_by_std, impl="cpp")
    want = reference.group_normalize(r, 1e-6, scale_by_std)
    assert got.dtype == dtype and got.shape == r.shape
    torch.testing.assert_close(got, want, atol=ATOL[dtype], rtol=0)


@needs_cpp
def test_cpp_binary_rewards_and_views():
    g = torch.Generator().manual_seed(1)
    r = torch.randint(0, 2, (256, 8), generator=g).float()
    torch.testing.assert_close(ops.group_normalize(r, impl="cpp"), reference.group_normalize(r), atol=1e-6, rtol=0)
    t = torch.randn(13, 7, dtype=torch.float64, generator=g).t()  # non-contiguous
    torch.testing.assert_close(ops.group_normalize(t, impl="cpp"), reference.group_normalize(t), atol=1e-12, rtol=0)


@needs_cpp
def test_cpp_is_the_default_on_cpu_and_thread_count_invariant():
    assert _backend.choose("group_normalize", torch.zeros(2, 2)) == "cpp"
    r = torch.randn(8192, 16, generator=torch.Generator().manual_seed(2))  # > one parallel chunk
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.group_normalize(r)
        torch.set_num_threads(max(2, threads))
        many = ops.group_normalize(r)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many)


@needs_cpp
def test_cpp_rejects_bad_input_with_a_message():
    with pytest.raises(RuntimeError, match="2-D"):
        torch.ops.slime_rl.group_normalize(torch.zeros(4), 1e-6, True)
    with pytest.raises(RuntimeError, match="at least one sample"):
        torch.ops.slime_rl.group_normalize(torch.zeros(4, 0), 1e-6, True)


def test_public_op_rejects_bad_input():
    with pytest.raises(ValueError, match="2-D"):
        ops.group_normalize(torch.zeros(4))
    with pytest.raises(ValueError, match="at least one sample"):
        ops.group_normalize(torch.zeros(3, 0))
    with pytest.raises(TypeError, match="floating"):
        ops.group_normalize(torch.zeros(3, 2, dtype=torch.int64))


def test_input_needing_grad_uses_the_differentiable_reference():
    r = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    assert _backend.choose("group_normalize", r) == "reference"
    (ops.group_normalize(r) * torch.arange(12.0, dtype=torch.float64).view(3, 4)).sum().backward()
    assert r.grad is not None and torch.isfinite(r.grad).all()
    # mean subtraction: each group's gradient sums to 0
    torch.testing.assert_close(r.grad.sum(-1), torch.zeros(3, dtype=torch.float64), atol=1e-9, rtol=0)


# --- torch.compile ---------------------------------------------------------------------------------


@needs_cpp
def test_torch_compile_traces_the_op():
    # aot_eager runs the fake (meta) implementation through tracing, without inductor codegen.
    def f(r):
        return ops.group_normalize(r, eps=1e-6, scale_by_std=True) * 2.0

    r = torch.randn(64, 8, generator=torch.Generator().manual_seed(3))
    with ops.force_impl("cpp"):
        torch._dynamo.reset()
        got = torch.compile(f, backend="aot_eager", fullgraph=True)(r)
    torch.testing.assert_close(got, reference.group_normalize(r) * 2.0, atol=2e-6, rtol=0)


def test_torch_compile_fullgraph_on_a_cold_process():
    # The first op call of a process happens inside the trace: the path choice (loading the
    # library, asking the dispatcher) must not break a fullgraph trace, with no eager warm-up.
    proc = _run_python(
        """
        import torch
        from slime_rl import ops
        from slime_rl.ops import _backend, reference

        def f(r):
            return ops.group_normalize(r, eps=1e-6, scale_by_std=True) * 2.0

        def g(h, w, t):
            logp, ent = ops.fused_linear_logprobs(h, w, t)
            return logp.sum() + ent.sum()

        assert _backend._state.loaded is None and not _backend._state.why_not  # cold
        r = torch.randn(6, 8, dtype=torch.float64)
        got = torch.compile(f, backend="aot_eager", fullgraph=True)(r)
        torch.testing.assert_close(got, reference.group_normalize(r) * 2.0)
        h, w, t = torch.randn(5, 16), torch.randn(40, 16), torch.randint(0, 40, (5,))
        torch.testing.assert_close(torch.compile(g, backend="aot_eager", fullgraph=True)(h, w, t), g(h, w, t))
        print("chosen:", _backend.choose("group_normalize", r))
        """
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"chosen: {'reference' if CPP_MISSING else 'cpp'}" in proc.stdout


@pytest.mark.slow
def test_torch_compile_inductor():
    def f(r):
        return ops.group_normalize(r) + 1.0

    r = torch.randn(64, 8, generator=torch.Generator().manual_seed(4))
    torch._dynamo.reset()
    got = torch.compile(f)(r)
    torch.testing.assert_close(got, reference.group_normalize(r) + 1.0, atol=2e-6, rtol=0)


# --- choosing and forcing a path -------------------------------------------------------------------


def test_force_reference():
    r = torch.randn(4, 5)
    with ops.force_impl("reference"):
        assert _backend.choose("group_normalize", r) == "reference"
        assert "forced=reference" in ops.describe()
        torch.testing.assert_close(ops.group_normalize(r), reference.group_normalize(r))
    assert _backend.choose("group_normalize", r) == ("reference" if CPP_MISSING else "cpp")
    assert _backend.choose("group_normalize", r, impl="reference") == "reference"


def test_env_forces_a_path(monkeypatch):
    monkeypatch.setenv("SLIME_RL_OPS_IMPL", "reference")
    _backend.reset()
    assert _backend.choose("group_normalize", torch.zeros(2, 2)) == "reference"
    monkeypatch.setenv("SLIME_RL_OPS_IMPL", "triton")
    _backend.reset()
    with pytest.raises(ValueError, match="SLIME_RL_OPS_IMPL.*allowed values: cuda, cpp, reference"):
        ops.group_normalize(torch.zeros(2, 2))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_forcing_cuda_without_a_gpu_says_why():
    with pytest.raises(ops.ImplUnavailableError, match="impl 'cuda' cannot run: torch has no CUDA|no CUDA device"):
        ops.force_impl("cuda")
    with pytest.raises(ops.ImplUnavailableError, match="Tried -> cuda: .*; cpp: .*; reference: available"):
        ops.group_normalize(torch.zeros(2, 2), impl="cuda")


def test_forcing_cpp_without_the_extension_says_what_was_tried():
    # A fresh interpreter in which `import slime_rl._C` fails, as on a pure-python install.
    proc = _run_python(
        """
        import sys
        sys.modules["slime_rl._C"] = None  # makes the import raise ImportError
        import torch
        from slime_rl import ops
        assert ops.available_impls() == ["reference"], ops.available_impls()
        ops.group_normalize(torch.ones(2, 3))  # falls back silently
        try:
            ops.force_impl("cpp")
        except ops.ImplUnavailableError as e:
            print(e)
        """,
        SLIME_RL_JIT="0",
    )
    assert proc.returncode == 0, proc.stderr
    assert "impl 'cpp' cannot run: slime_rl._C not importable" in proc.stdout
    assert "SLIME_RL_JIT=1" in proc.stdout


def test_forcing_a_cpu_impl_on_the_wrong_device_or_with_grad_errors():
    if not CPP_MISSING:
        with pytest.raises(ops.ImplUnavailableError, match="forward-only"):
            ops.group_normalize(torch.zeros(2, 2, requires_grad=True), impl="cpp")
    meta = torch.zeros(2, 2, device="meta")
    with pytest.raises(ops.ImplUnavailableError, match="tensor is on meta"):
        ops.group_normalize(meta, impl="cpp")


def test_import_compiles_and_loads_nothing():
    proc = _run_python(
        """
        import sys
        import slime_rl.ops as ops
        loaded = [m for m in ("slime_rl._C", "torch.utils.cpp_extension", "slime_rl_jit") if m in sys.modules]
        print("loaded:", loaded)
        print(ops.describe())
        """,
        SLIME_RL_JIT="1",  # even with JIT on, nothing may happen at import
    )
    assert proc.returncode == 0, proc.stderr
    assert "loaded: []" in proc.stdout


def test_describe_and_available_impls():
    line = ops.describe()
    assert "\n" not in line and "group_normalize[cpu=" in line and "cuda=" in line
    impls = ops.available_impls()
    assert impls[-1] == "reference" and set(impls) <= set(ops.IMPLS)


# --- the other build paths -------------------------------------------------------------------------


@pytest.mark.slow
def test_jit_build_matches_reference(tmp_path):
    # JIT-builds the same sources in a fresh interpreter (one copy of the library per process).
    proc = _run_python(
        f"""
        import sys
        sys.modules["slime_rl._C"] = None
        import torch
        from slime_rl import ops
        from slime_rl.ops import _backend, reference
        _backend.jit_load(build_directory={str(tmp_path)!r})
        r = torch.randn(7, 13, dtype=torch.float64)
        for scale in (True, False):
            torch.testing.assert_close(torch.ops.slime_rl.group_normalize(r, 1e-6, scale),
                                       reference.group_normalize(r, 1e-6, scale), atol=1e-12, rtol=0)
        print("JIT OK")
        """
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "JIT OK" in proc.stdout


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="no nvcc on PATH")
def test_cuda_kernel_compiles_with_nvcc(tmp_path):
    # The .cu files include no torch header, so this checks them even with a CPU-only torch.
    for cu in sorted((ROOT / "csrc" / "cuda").glob("*.cu")):
        proc = subprocess.run(
            ["nvcc", "-c", "-std=c++17", "-O3", "-gencode", "arch=compute_80,code=sm_80",
             "-Werror", "all-warnings", str(cu), "-o", str(tmp_path / (cu.stem + ".o"))],
            capture_output=True, text=True, timeout=300,
        )
        assert proc.returncode == 0, proc.stderr


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_cuda_matches_reference(dtype):
    if "cuda" not in ops.available_impls("group_normalize"):
        pytest.skip("CUDA kernel not built: " + ops.describe())
    for shape in SHAPES + [(4096, 16), (2, 1000)]:
        for scale in (True, False):
            r = (torch.randn(shape, dtype=torch.float64) * 3 + 1).to(dtype).cuda()
            got = ops.group_normalize(r, scale_by_std=scale, impl="cuda")
            torch.testing.assert_close(got.cpu(), reference.group_normalize(r.cpu(), 1e-6, scale),
                                       atol=ATOL[dtype], rtol=0)
    r = torch.full((4, 7), 0.7, device="cuda")
    assert torch.equal(ops.group_normalize(r, impl="cuda"), torch.zeros_like(r))
