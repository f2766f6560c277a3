"""Install slime_rl and build its kernels as the extension `slime_rl._C`.

    pip install -e . --no-build-isolation   # always: build isolation would pull a CUDA torch

The extension is a CppExtension (csrc/registration.cpp + csrc/cpu/*.cpp), or a
CUDAExtension that adds csrc/cuda/* when torch was built with CUDA and a CUDA
toolkit is found (CUDA_HOME). It is optional: when it cannot be built the
package installs without it and slime_rl.ops falls back to the torch reference.

Environment:
    SLIME_RL_NO_EXT=1       skip the extension (pure-python install)
    SLIME_RL_REQUIRE_EXT=1  make a failed extension build fail the install (CI)
    SLIME_RL_CUDA_ARCHS     CUDA archs, e.g. "8.0;9.0" (the default) -> TORCH_CUDA_ARCH_LIST
                            (an explicit TORCH_CUDA_ARCH_LIST is used when this is unset)
    MAX_JOBS                parallel compile jobs (torch's ninja build)

See csrc/README.md for the build paths (setup.py, JIT, CMake) and how to add a kernel.
"""

from __future__ import annotations

import glob
import os
import re
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
EXT_NAME = "slime_rl._C"


def _version() -> str:
    with open(os.path.join(ROOT, "slime_rl", "__init__.py")) as f:
        return re.search(r'^__version__ = "([^"]+)"', f.read(), re.M).group(1)


def _warn(msg: str) -> None:
    print(f"\n*** slime_rl setup.py: {msg}\n", file=sys.stderr, flush=True)


def _sources(pattern: str) -> list[str]:
    # setuptools wants paths relative to setup.py.
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _extension():
    """(ext_modules, cmdclass) for the kernels, or ([], {}) without them."""
    if os.environ.get("SLIME_RL_NO_EXT") == "1":
        _warn("SLIME_RL_NO_EXT=1: not building the C++/CUDA extension")
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as e:
        _warn(f"torch is not importable ({e}); installing without the C++ extension. "
              "Install torch first and use --no-build-isolation to build it.")
        return [], {}

    sources = ["csrc/registration.cpp"] + _sources("csrc/cpu/*.cpp")
    cxx_flags = ["-O3", "-fopenmp"]
    # rpath to torch's libs, so `import slime_rl._C` works before `import torch`
    # (torch's own extensions need torch imported first, or they miss libc10.so).
    link_flags = ["-fopenmp", f"-Wl,-rpath,{os.path.join(os.path.dirname(torch.__file__), 'lib')}"]
    # CUDA needs both: a torch built with CUDA (its headers, libs) and a toolkit (nvcc).
    use_cuda = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if use_cuda:
        archs = os.environ.get("SLIME_RL_CUDA_ARCHS") or os.environ.get("TORCH_CUDA_ARCH_LIST") or "8.0;9.0"
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs
        sources += _sources("csrc/cuda/*.cu") + _sources("csrc/cuda/*.cpp")
        ext = cpp_extension.CUDAExtension(
            EXT_NAME,
            sources,
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-lineinfo"]},
            extra_link_args=link_flags,
        )
        print(f"slime_rl setup.py: building {EXT_NAME} with CUDA {torch.version.cuda} for archs {archs}")
    else:
        ext = cpp_extension.CppExtension(EXT_NAME, sources, extra_compile_args=cxx_flags, extra_link_args=link_flags)
        why = "torch has no CUDA" if torch.version.cuda is None else "no CUDA toolkit (CUDA_HOME)"
        print(f"slime_rl setup.py: building {EXT_NAME} for the CPU only ({why})")

    class OptionalBuildExt(cpp_extension.BuildExtension):
        """torch's BuildExtension, but a failed build warns instead of failing the install."""

        def run(self):
            try:
                super().run()
            except Exception as e:  # compiler missing, compile error, ABI trouble, ...
                if os.environ.get("SLIME_RL_REQUIRE_EXT") == "1":
                    raise
                self.extensions = []  # nothing to copy or list as an output
                _warn(f"building {EXT_NAME} failed ({type(e).__name__}: {e}); installing without it. "
                      "slime_rl.ops falls back to the torch reference (slime_rl.ops.describe() says which "
                      "path each op takes). Set SLIME_RL_REQUIRE_EXT=1 to make this an error.")

    return [ext], {"build_ext": OptionalBuildExt.with_options(use_ninja=True)}


ext_modules, cmdclass = _extension()

setup(
    name="slime_rl",
    version=_version(),
    description="High-throughput reinforcement-learning post-training for LLMs",
    python_requires=">=3.10",
    packages=find_packages(
        include=["slime_rl", "slime_rl.*", "rollout", "rollout.*", "training", "training.*",
                 "weight_sync", "weight_sync.*"]
    ),
    # Runtime dependencies are pinned in requirements.txt (installed by the Makefile);
    # torch is deliberately not listed: pip could replace the CPU build with a CUDA one.
    package_data={"slime_rl.service": ["static/*"]},  # the web UI's files
    install_requires=[],
    entry_points={"console_scripts": ["slime-rl = slime_rl.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
