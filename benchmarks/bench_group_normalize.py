"""Benchmark: group_normalize, compiled kernel vs the torch reference, side by side.

    python benchmarks/bench_group_normalize.py [--groups 4096 --n 16 --dtype float32 --out PATH]

Times every available implementation on the same input in the same process,
interleaved round by round so machine noise hits them alike, and reports each
one's median relative to the reference (speedup = reference / impl). Absolute
times are recorded in the JSON for context only; compare ratios, and only
between runs on the same machine. Writes JSON to --out
(default runs/bench/group_normalize.json).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from slime_rl import ops

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _time_once(fn, sync) -> float:
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--groups", type=int, default=4096, help="number of groups (prompts)")
    p.add_argument("--n", type=int, default=16, help="samples per group")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--rounds", type=int, default=30, help="timed rounds (each runs every impl once)")
    p.add_argument("--inner", type=int, default=20, help="calls per timed sample")
    p.add_argument("--out", default="runs/bench/group_normalize.json")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    rewards_GN = torch.randn(args.groups, args.n, generator=torch.Generator().manual_seed(0))
    rewards_GN = rewards_GN.to(device=device, dtype=DTYPES[args.dtype])
    compiled = "cuda" if device.type == "cuda" else "cpp"
    impls = [i for i in (compiled, "reference") if i in ops.available_impls("group_normalize")]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    want = ops.group_normalize(rewards_GN, impl="reference")
    for impl in impls:  # warm up and check before timing
        got = ops.group_normalize(rewards_GN, impl=impl)
        torch.testing.assert_close(got.double(), want.double(), atol=1e-2, rtol=0)

    samples: dict[str, list[float]] = {impl: [] for impl in impls}
    for _ in range(args.rounds):
        for impl in impls:
            def run(impl=impl):
                for _ in range(args.inner):
                    ops.group_normalize(rewards_GN, impl=impl)
            samples[impl].append(_time_once(run, sync) / args.inner)

    median = {impl: statistics.median(s) for impl, s in samples.items()}
    result = {
        "op": "group_normalize",
        "shape": [args.groups, args.n],
        "dtype": args.dtype,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "describe": ops.describe(),
        "median_s_per_call": median,
        "speedup_vs_reference": {impl: median["reference"] / t for impl, t in median.items()},
    }
    print(f"group_normalize {args.groups}x{args.n} {args.dtype} on {device} ({torch.get_num_threads()} threads)")
    for impl in impls:
        print(f"  {impl:>9}: {result['speedup_vs_reference'][impl]:6.2f}x the reference")
    if len(impls) == 1:
        print("  (no compiled kernel available: " + ops.describe() + ")")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
