"""The `gpu` tests and the benchmarks' GPU paths, executed on the CPU (scripts/gpu_dry_run.sh).

The GPU code itself runs only on a GPU (scripts/gpu_check.sh), but the Python around it — the tests'
shapes, tolerances and parametrization, the benchmarks' GPU branches — runs here with `cuda` tensors
on the CPU and the C++ kernels standing in for the CUDA ones, so a mistake there is caught in CI
instead of costing scarce GPU time. It says nothing about the CUDA kernels.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_tests_and_benchmarks_run_on_fake_cuda():
    from slime_rl import ops

    if "cpp" not in ops.available_impls():
        pytest.skip("the dry run stands the C++ kernels in for CUDA: " + ops.describe())
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_dry_run.sh")], cwd=ROOT, capture_output=True,
                          text=True, timeout=900, env={**os.environ, "PYTHON": sys.executable})
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert " passed" in proc.stdout and "failed" not in proc.stdout, proc.stdout[-2000:]
    assert "both GPU benchmark paths ran" in proc.stdout
