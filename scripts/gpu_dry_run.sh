#!/usr/bin/env bash
# Dry run of the GPU tests and the benchmarks' GPU paths on the CPU (scripts/fake_cuda/fake_cuda.py):
# executes their Python so that a mistake in a test costs no GPU time. It checks no CUDA kernel.
# Run it after editing a `gpu` test or a benchmark's GPU path, before scripts/gpu_check.sh on a GPU.
#   scripts/gpu_dry_run.sh            # uses .venv/bin/python; about 1 min on 2 cores
# The deselected tests need a real device (see fake_cuda.py's docstring).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
export PYTHONPATH="$PWD/scripts/fake_cuda:$PWD${PYTHONPATH:+:$PYTHONPATH}" OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
"$PY" -m pytest -q -p fake_cuda -p no:cacheprovider -m gpu \
  tests/test_fused_logprob_gpu.py tests/test_fused_logprob.py tests/test_ops.py tests/test_advantage_ops.py \
  tests/test_bucket_ops.py \
  --deselect tests/test_fused_logprob_gpu.py::test_kernels_reject_bad_input_with_a_message \
  --deselect tests/test_fused_logprob_gpu.py::test_logits_forward_reads_at_a_good_fraction_of_copy_bandwidth \
  --deselect tests/test_bucket_ops.py::test_cuda_kernel_is_bit_identical_to_copy
bench() {  # bench SCRIPT ARGS...: run a benchmark script with fake_cuda imported first
  "$PY" -c "import fake_cuda, runpy, sys; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')" \
    "$@" > /dev/null
}
out=$(mktemp -d)
bench benchmarks/kernels/bench_fused_logprob.py --gpu --tokens 256 --hidden 64 --vocab 5000 --rounds 1 --repeats 1 \
  --out "$out/fused.json"
bench benchmarks/kernels/bench_buckets.py --device cuda --layers 1 --vocab 1000 --rounds 1 --out "$out/buckets.json"
rm -rf "$out"
echo "gpu_dry_run: the gpu tests and both GPU benchmark paths ran on the CPU (no CUDA kernel was checked)"
