"""Benchmark: packing and unpacking weight buckets, the copy_into kernel vs the copy_ loop, side by side.

    python benchmarks/kernels/bench_buckets.py [--layers 24 --vocab 151936 --threads 1,2 --rounds 5 --out PATH]
    python benchmarks/kernels/bench_buckets.py --device cuda     # the CUDA kernel on GPU tensors

The parameter list is Qwen2-0.5B's shapes (hidden 896, MLP 4864, 14 query / 2 KV heads of 64,
vocab 151936, 24 layers: 290 tensors, 494M parameters; --layers/--vocab shrink it), fp32 as a
trainer holds them. Cases, each timed for both contenders on the same tensors:

  pack_fp32_to_bf16     pack_bucket: the 290 fp32 parameters -> one bf16 bucket (the weight-sync hot path)
  unpack_bf16_to_fp32   unpack_bucket: that bucket -> 290 fp32 tensors
  pack_bf16_to_bf16     the same list already in bf16 (no cast: memcpy)
  pack_small_tensors    4096 fp32 tensors of 1000 elements -> bf16 (per-call overhead dominates)
  pack_transposed       the 2-D weights as transposed views (Megatron-style layouts): strided, so the
                        kernel leaves them to copy_ as well; shows the fallback costs nothing extra

Contenders: the kernel = slime_rl.ops.buckets.pack_bucket / unpack_bucket with impl="cpp" (or
"cuda" with --device cuda; one torch.ops.slime_rl.copy_into call), "reference" = the same with
impl="reference" (one copy_ per tensor). On the GPU every timed call is bracketed by
torch.cuda.synchronize() and --threads does not apply. Both build the same bucket views, so the
ratio is the copy itself. Rounds interleave the
contenders (order alternating) and the median is reported (every round is in the JSON); results
are checked byte for byte before timing. GB/s counts bytes read + written. Runs once per thread
count in --threads; the machine load (os.getloadavg()) is recorded before and after. Writes JSON
to --out (default benchmarks/kernels/results/buckets_{cpu,cuda}.json).

Reading the ratios: with more than one thread on a machine shared with other jobs, the reference
suffers most, because each of its ~290 copy_ calls opens its own OpenMP region and waits there for
any thread the OS has descheduled, where copy_into opens one region for the whole list. Multi-thread
ratios measured under load (see loadavg in the JSON) therefore show that effect more than the copy;
on an idle machine both are bound by memory bandwidth and the ratio is close to 1.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

from slime_rl.ops import _backend
from slime_rl.ops import buckets as bk

RESULTS = Path(__file__).resolve().parent / "results"
ALIGN = 64  # slime_rl.buckets.ALIGN: every entry starts on a 64-byte boundary


def qwen2_shapes(layers: int, vocab: int, hidden: int = 896, mlp: int = 4864, heads: int = 14,
                 kv_heads: int = 2) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of Qwen2-0.5B's parameters (tied embeddings: no separate lm_head)."""
    head_dim = hidden // heads
    kv = kv_heads * head_dim
    shapes = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes += [
            (p + "self_attn.q_proj.weight", (hidden, hidden)), (p + "self_attn.q_proj.bias", (hidden,)),
            (p + "self_attn.k_proj.weight", (kv, hidden)), (p + "self_attn.k_proj.bias", (kv,)),
            (p + "self_attn.v_proj.weight", (kv, hidden)), (p + "self_attn.v_proj.bias", (kv,)),
            (p + "self_attn.o_proj.weight", (hidden, hidden)),
            (p + "mlp.gate_proj.weight", (mlp, hidden)), (p + "mlp.up_proj.weight", (mlp, hidden)),
            (p + "mlp.down_proj.weight", (hidden, mlp)),
            (p + "input_layernorm.weight", (hidden,)), (p + "post_attention_layernorm.weight", (hidden,)),
        ]
    return shapes + [("model.norm.weight", (hidden,))]


def layout(tensors: list[torch.Tensor], dtype: torch.dtype) -> tuple[list[int], int]:
    """Byte offsets of each tensor as `dtype` in one bucket (64-byte aligned), and the bucket size."""
    offsets, at = [], 0
    for t in tensors:
        offsets.append(at)
        at = -(-(at + t.numel() * dtype.itemsize) // ALIGN) * ALIGN
    return offsets, at


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def round_times(fns: dict[str, Callable[[], None]], rounds: int) -> dict[str, list[float]]:
    """Seconds of every round per contender; each round runs every contender once, order alternating."""
    for fn in fns.values():
        fn()  # warm-up (page faults of fresh buffers, thread pool start)
    names, times = list(fns), {name: [] for name in fns}
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            _sync()
            t0 = time.perf_counter()
            fns[name]()
            _sync()
            times[name].append(time.perf_counter() - t0)
    return times


def pack_case(srcs: list[torch.Tensor], dtype: torch.dtype, kernel: str) -> dict:
    """Timing closures for packing srcs into a `dtype` bucket, after checking both give the same bytes."""
    offsets, nbytes = layout(srcs, dtype)
    dtypes = [dtype] * len(srcs)
    buffers = {impl: torch.zeros(nbytes, dtype=torch.uint8, device=srcs[0].device) for impl in (kernel, "reference")}
    for impl, buffer in buffers.items():
        bk.pack_bucket(srcs, offsets, dtypes, buffer, impl=impl)
    assert torch.equal(buffers[kernel], buffers["reference"]), f"{kernel} and reference packed different bytes"
    moved = sum(t.numel() * (t.element_size() + dtype.itemsize) for t in srcs)
    fns = {impl: (lambda b=buffer, i=impl: bk.pack_bucket(srcs, offsets, dtypes, b, impl=i))
           for impl, buffer in buffers.items()}
    return {"fns": fns, "bytes_moved": moved, "tensors": len(srcs), "bucket_bytes": nbytes}


def unpack_case(srcs: list[torch.Tensor], dtype: torch.dtype, kernel: str) -> dict:
    """Timing closures for unpacking a `dtype` bucket of srcs into fresh tensors like srcs."""
    offsets, nbytes = layout(srcs, dtype)
    dtypes = [dtype] * len(srcs)
    buffer = torch.empty(nbytes, dtype=torch.uint8, device=srcs[0].device)
    bk.pack_bucket(srcs, offsets, dtypes, buffer, impl="reference")
    dsts = {impl: [torch.empty_like(t) for t in srcs] for impl in (kernel, "reference")}
    for impl, d in dsts.items():
        bk.unpack_bucket(buffer, offsets, d, dtypes, impl=impl)
    assert all(torch.equal(a.view(torch.uint8), b.view(torch.uint8)) for a, b in zip(dsts[kernel], dsts["reference"]))
    moved = sum(t.numel() * (t.element_size() + dtype.itemsize) for t in srcs)
    fns = {impl: (lambda d=d, i=impl: bk.unpack_bucket(buffer, offsets, d, dtypes, impl=i)) for impl, d in dsts.items()}
    return {"fns": fns, "bytes_moved": moved, "tensors": len(srcs), "bucket_bytes": nbytes}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=24, help="decoder layers (Qwen2-0.5B: 24)")
    p.add_argument("--vocab", type=int, default=151936, help="vocabulary rows of the embedding")
    p.add_argument("--threads", default=f"1,{torch.get_num_threads()}", help="comma-separated thread counts")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds (each runs every contender once)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--out", help="default: benchmarks/kernels/results/buckets_<device>.json")
    args = p.parse_args(argv)

    kernel = "cpp" if args.device == "cpu" else "cuda"
    if kernel not in _backend.available_impls("copy_into"):
        raise SystemExit(f"no {kernel} copy_into kernel: {_backend.describe()}")
    load_before = os.getloadavg()
    g = torch.Generator().manual_seed(0)
    shapes = qwen2_shapes(args.layers, args.vocab)
    params = [(torch.randn(shape, generator=g) * 0.02).to(args.device) for _, shape in shapes]
    n_params = sum(t.numel() for t in params)
    print(f"Qwen2-0.5B-like list: {len(params)} tensors, {n_params / 1e6:.0f}M parameters "
          f"(fp32 {n_params * 4 / 1e9:.2f} GB)")

    default_threads = torch.get_num_threads()
    results: dict[str, dict] = {}
    try:
        thread_counts = [int(x) for x in args.threads.split(",")] if args.device == "cpu" else [default_threads]
        for threads in thread_counts:
            torch.set_num_threads(threads)
            cases = {
                "pack_fp32_to_bf16": lambda: pack_case(params, torch.bfloat16, kernel),
                "unpack_bf16_to_fp32": lambda: unpack_case(params, torch.bfloat16, kernel),
                "pack_bf16_to_bf16": lambda: pack_case([t.to(torch.bfloat16) for t in params], torch.bfloat16, kernel),
                "pack_small_tensors": lambda: pack_case(
                    [torch.randn(1000, generator=g).to(args.device) for _ in range(4096)], torch.bfloat16, kernel),
                "pack_transposed": lambda: pack_case([t.t() if t.dim() == 2 else t for t in params[1:]],
                                                     torch.bfloat16, kernel),
            }
            per_case = {}
            print(f"-- {threads} thread(s)" if args.device == "cpu" else f"-- {torch.cuda.get_device_name()}")
            for name, build in cases.items():
                case = build()
                rounds_s = round_times(case.pop("fns"), args.rounds)
                times = {impl: statistics.median(ts) for impl, ts in rounds_s.items()}
                gbps = {impl: case["bytes_moved"] / t / 1e9 for impl, t in times.items()}
                per_case[name] = {**case, "median_s": times, "rounds_s": rounds_s, "GB_per_s": gbps,
                                  f"speedup_{kernel}_over_reference": times["reference"] / times[kernel]}
                print(f"  {name:>20}: {kernel} {times[kernel] * 1e3:8.2f} ms ({gbps[kernel]:5.1f} GB/s), reference "
                      f"{times['reference'] * 1e3:8.2f} ms ({gbps['reference']:5.1f} GB/s): "
                      f"{kernel} {times['reference'] / times[kernel]:.2f}x")
                del case
            results[str(threads)] = per_case
    finally:
        torch.set_num_threads(default_threads)

    result = {
        "benchmark": "bench_buckets",
        "model_like": "Qwen2-0.5B",
        "layers": args.layers,
        "vocab": args.vocab,
        "tensors": len(params),
        "parameters": n_params,
        "rounds": args.rounds,
        "device": args.device if args.device == "cpu" else torch.cuda.get_device_name(),
        "results_by_threads": results,
        "impl_source": _backend.describe(),
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
    }
    out = Path(args.out or RESULTS / f"buckets_{args.device}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
