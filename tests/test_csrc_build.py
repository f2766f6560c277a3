"""The standalone CMake build of csrc/ (CMakeLists.txt): the ops library, every C++ test under ctest, and
the C++ benchmark executable, against the installed torch's CMake config."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, **kw)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("cmake") is None, reason="no cmake on PATH")
def test_cmake_builds_the_ops_and_their_cpp_tests_pass(tmp_path):
    build = tmp_path / "cmake"
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    _run(["cmake", "-S", str(ROOT), "-B", str(build), *generator, "-DCMAKE_BUILD_TYPE=Release",
          f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}"])
    _run(["cmake", "--build", str(build), "-j", str(min(2, os.cpu_count() or 1))])
    tests = sorted(p.stem for p in (ROOT / "csrc" / "tests").glob("test_*.cpp"))
    out = _run(["ctest", "--test-dir", str(build), "--output-on-failure"]).stdout
    assert f"100% tests passed, 0 tests failed out of {len(tests)}" in out, out
    for name in tests:
        assert name in out, (name, out)
    bench = _run([str(build / "bench_ops"), "256", "64", "4096", "1"], env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert "linear_logprob_forward" in bench.stdout and "gae" in bench.stdout, bench.stdout


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-v"]))
