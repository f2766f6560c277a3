#!/usr/bin/env bash
# Every check that needs a GPU, in one run, for a machine lent for a short time (the device
# tool: one call, e.g. `bash scripts/gpu_check.sh`, timeout_s 600). Uses that machine's own
# python3 and torch (no installs: nothing can be fetched there). Steps, each with its own
# time limit, going on after a failure. $OUT (default ./gpu_out) gets five files (the device tool
# returns at most 8): env.txt, steps.log (every step's output), summary.txt (one line per step)
# and the two benchmark JSONs. Steps:
#   1. build the extension in place with its CUDA kernels, for this GPU's arch only (~1 min);
#   2. the kernel tests marked gpu (CUDA vs reference, fp32/bf16, odd shapes, vocab-parallel);
#   3. the GPU benchmarks: fused logprob (bf16, T=16384, H=4096, V=151936), bucket copy_into;
#   4. the GPU weight-sync tests (CUDA IPC staging), if time is left.
# Exit status: 0 when every step that ran passed. Step limits add up to 580 s.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
summary="$OUT/summary.txt"
: > "$summary"
: > "$OUT/steps.log"
status=0

step() {  # step NAME LIMIT_S COMMAND...: run, append its output to $OUT/steps.log, record the outcome
  local name=$1 limit=$2
  shift 2
  local start=$SECONDS rc log
  log=$(mktemp)
  echo "=== $name (limit ${limit}s): $*"
  timeout "$limit" "$@" > "$log" 2>&1
  rc=$?
  tail -n 25 "$log"
  { echo "===== $name rc=$rc $((SECONDS - start))s: $*"; cat "$log"; } >> "$OUT/steps.log"
  rm -f "$log"
  echo "$name rc=$rc $((SECONDS - start))s" | tee -a "$summary"
  [[ $rc -eq 0 ]] || status=1
  return $rc
}

{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  "$PY" -c "import sys, torch; print('python', sys.version.split()[0], '| torch', torch.__version__, \
'| cuda', torch.version.cuda, '|', torch.cuda.get_device_name(), torch.cuda.get_device_capability())"
  nvcc --version | tail -1
  "$PY" -c "import aiohttp, numpy, pytest, safetensors, transformers; print('test deps importable')"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

arch=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())" 2>/dev/null || echo "9.0")
if ! step build 180 env SLIME_RL_CUDA_ARCHS="$arch" MAX_JOBS="$(nproc)" SLIME_RL_REQUIRE_EXT=1 \
    "$PY" setup.py -q build_ext --inplace; then
  echo "build failed: the remaining steps would only test the references"
  exit 1
fi
"$PY" -c "from slime_rl import ops; print(ops.describe())" | tee -a "$OUT/env.txt"
# A build without CUDA (no toolkit found) succeeds too, and every kernel test would then skip: stop here.
if ! "$PY" -c "from slime_rl import ops; import sys; sys.exit(0 if 'cuda' in ops.available_impls() else 1)"; then
  echo "the build has no CUDA kernels (see env.txt and the build in steps.log)" | tee -a "$summary"
  exit 1
fi

step kernel_tests 160 "$PY" -m pytest -q -rs -m gpu -p no:cacheprovider \
  tests/test_fused_logprob_gpu.py tests/test_fused_logprob.py tests/test_ops.py tests/test_advantage_ops.py \
  tests/test_bucket_ops.py
step bench_fused_logprob 120 "$PY" benchmarks/kernels/bench_fused_logprob.py --gpu --rounds 3 --repeats 3 \
  --out "$OUT/fused_logprob_gpu.json"
step bench_buckets 60 "$PY" benchmarks/kernels/bench_buckets.py --device cuda --rounds 5 --out "$OUT/buckets_cuda.json"
step weight_sync_tests 60 "$PY" -m pytest -q -rs -m gpu -p no:cacheprovider tests/test_weight_staging.py
exit $status
