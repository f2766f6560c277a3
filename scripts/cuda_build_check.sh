#!/usr/bin/env bash
# Build the whole extension WITH its CUDA kernels on a machine that has nvcc but no GPU,
# then load it and check that every op in csrc/registration.cpp has a CPU and a CUDA kernel.
# This compiles and links the torch glue (csrc/cuda/*_ops.cpp) against a CUDA build of torch,
# which the project's CPU torch cannot do; running the kernels still needs a GPU
# (scripts/gpu_check.sh).
#
#   scripts/cuda_build_check.sh            # uses (and first creates) .cuda-venv: torch==2.14.1, a cu130 build, ~5.5 GB
#   PYTHON=/path/to/python scripts/cuda_build_check.sh   # any python whose torch has CUDA
#
# Environment: CUDA_HOME (default: the toolkit holding nvcc), SLIME_RL_CUDA_ARCHS (default "8.0;9.0"),
# MAX_JOBS (default: the CPU count). The build goes to build/cuda-check; the source tree is not touched.
# About 2 min of compiling on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-}
if [[ -z "$PY" ]]; then
  PY=.cuda-venv/bin/python
  if [[ ! -x "$PY" ]]; then
    echo "cuda_build_check: creating .cuda-venv with a CUDA build of torch (several GB, a few minutes)"
    python3 -m venv .cuda-venv
    .cuda-venv/bin/python -m pip install -q --disable-pip-version-check torch==2.14.1 numpy ninja setuptools \
      2>&1 | { grep -v "^WARNING: Location" || true; }
  fi
fi
"$PY" -c "import torch, sys; sys.exit(0 if torch.version.cuda else 'cuda_build_check: ' + torch.__version__ + ' has no CUDA: use a CUDA build of torch')"

if [[ -z "${CUDA_HOME:-}" ]]; then
  # The toolkit whose include/ holds cuda_runtime.h: next to nvcc (through links), else /usr/local/cuda.
  nvcc=$(command -v nvcc || true)
  for root in ${nvcc:+"$(dirname "$(dirname "$(readlink -f "$nvcc")")")"} /usr/local/cuda; do
    if [[ -f "$root/include/cuda_runtime.h" ]]; then CUDA_HOME=$root; break; fi
  done
  [[ -n "${CUDA_HOME:-}" ]] || { echo "cuda_build_check: no CUDA toolkit found (set CUDA_HOME)"; exit 1; }
fi
export CUDA_HOME
# The CUDA torch's headers include cuBLAS/cuSPARSE headers; a compile-only toolkit may lack them,
# but the wheels torch depends on (nvidia-cublas, nvidia-cusparse) ship them.
extra=$("$PY" - <<'PY'
import glob, os, site
dirs = set()
for sp in site.getsitepackages():
    for header in glob.glob(os.path.join(sp, "nvidia", "**", "include", "cublas_v2.h"), recursive=True) + \
                  glob.glob(os.path.join(sp, "nvidia", "**", "include", "cusparse.h"), recursive=True):
        dirs.add(os.path.dirname(header))
print(":".join(sorted(dirs)))
PY
)
export CPATH="${extra}${CPATH:+:$CPATH}"
export MAX_JOBS=${MAX_JOBS:-$(nproc)} SLIME_RL_REQUIRE_EXT=1

out=build/cuda-check
mkdir -p "$out"
echo "cuda_build_check: torch $("$PY" -c 'import torch; print(torch.__version__)'), CUDA_HOME=$CUDA_HOME, archs ${SLIME_RL_CUDA_ARCHS:-8.0;9.0}"
start=$SECONDS
if ! "$PY" setup.py -q build_ext --build-lib "$out/lib" --build-temp "$out/temp" > "$out/build.log" 2>&1; then
  grep -E "error|Error" -A3 "$out/build.log" | head -60
  echo "cuda_build_check: FAILED to build (full log: $out/build.log)"
  exit 1
fi
if grep -q "warning:" "$out/build.log"; then
  grep "warning:" -A3 "$out/build.log" | head -40
  echo "cuda_build_check: the build printed warnings (above)"
fi
so=$(ls "$out"/lib/slime_rl/_C*.so)
echo "cuda_build_check: built $so in $((SECONDS - start)) s"

# Load the library into the CUDA torch (no GPU needed) and check the registrations.
"$PY" - "$so" <<'PY'
import re, sys
import torch

so = sys.argv[1]
torch.ops.load_library(so)
ops = re.findall(r'm\.def\("(\w+)\(', open("csrc/registration.cpp").read())
missing = []
for op in ops:
    keys = [k for k in ("CPU", "CUDA") if torch._C._dispatch_has_kernel_for_dispatch_key(f"slime_rl::{op}", k)]
    print(f"  slime_rl::{op:26s} kernels: {', '.join(keys) or 'none'}")
    missing += [f"{op}[{k}]" for k in ("CPU", "CUDA") if k not in keys]
if missing:
    sys.exit(f"cuda_build_check: FAILED, no kernel for {', '.join(missing)}")
print(f"cuda_build_check: OK, {len(ops)} ops, each with a CPU and a CUDA kernel "
      f"(cuda available here: {torch.cuda.is_available()}; the kernels themselves run only on a GPU)")
PY
