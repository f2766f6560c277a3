"""Benchmark: fused linear + logprob + entropy vs plain torch through full logits, side by side.

    python benchmarks/kernels/bench_fused_logprob.py                # CPU: T=4096, H=1024, V=151936 fp32
    python benchmarks/kernels/bench_fused_logprob.py --gpu          # bf16, T=16384, H=4096 (+ logits bandwidth)
    python benchmarks/kernels/bench_fused_logprob.py --tokens 512 --vocab 32768   # a quick smoke run

The contenders compute the same thing — per-token log p(target) and entropy of
softmax(hidden @ weight^T / temperature), then the gradients of a weighted sum of both
w.r.t. hidden and weight:
  * fused:     slime_rl.ops.fused_linear_logprobs (the compiled kernel; the chosen impl is
               recorded), tiles of chunk_tokens x chunk_vocab, never [T, V];
  * reference: plain torch — full logits, log_softmax, gather, entropy, autograd.

CPU: each contender runs in its own fresh subprocess (the reference needs ~10 GB at the
default size and must not take the fused measurement down with it, and ru_maxrss, the peak
resident set, only grows). Peak memory = ru_maxrss after the run minus ru_maxrss after the
inputs were allocated and touched; forward-only runs first (its peak is read before
forward+backward raises it). Children alternate fused, reference, fused, reference, ...
(--rounds), each timing --repeats calls; the reported time is the median over all calls.
The children save their outputs and the parent checks that they agree before reporting.
Threads: --threads (default 2) in every child. The machine's load average is recorded
before and after, since other jobs skew the times (never the memory).

GPU (--gpu): the same comparison in one process with torch.cuda.max_memory_allocated, plus
the logits variant's forward (slime_rl::logits_logprob_forward on [T, V] bf16 logits) as
bandwidth: bytes of logits read / time, against a measured device copy (read + write) of
the same tensor; target >= 70% of the copy bandwidth.

Writes JSON to --out (default benchmarks/kernels/results/fused_logprob_{cpu,gpu}.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from slime_rl import ops  # noqa: E402
from slime_rl.ops import _backend  # noqa: E402
from slime_rl.ops.fused_logprob import FORWARD_OP, fused_linear_logprobs  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TEMPERATURE = 0.7


def make_inputs(tokens: int, hidden: int, vocab: int, dtype: torch.dtype, device: str, masked: float):
    """Inputs, built in place: a temporary here would raise ru_maxrss before the baseline is read."""
    g = torch.Generator().manual_seed(0)
    hidden_NH = torch.randn(tokens, hidden, generator=g).to(device=device, dtype=dtype)
    weight_VH = torch.randn(vocab, hidden, generator=g).mul_(hidden ** -0.5).to(device=device, dtype=dtype)
    targets_N = torch.randint(0, vocab, (tokens,), generator=g).to(device)
    w_lp_N = torch.randn(tokens, generator=g).to(device)
    w_ent_N = torch.randn(tokens, generator=g).mul_(0.01).to(device)
    n_masked = int(round(masked * tokens))  # prompt tokens: no gradient from either output
    w_lp_N[:n_masked] = 0.0
    w_ent_N[:n_masked] = 0.0
    return hidden_NH, weight_VH, targets_N, w_lp_N, w_ent_N


def reference_logprobs(hidden_NH, weight_VH, targets_N):
    """Plain torch: full logits in the input dtype, log_softmax in fp32."""
    logits_NV = (hidden_NH @ weight_VH.T).float() / TEMPERATURE
    logp_NV = torch.log_softmax(logits_NV, dim=-1)
    logp_N = logp_NV.gather(1, targets_N.unsqueeze(1)).squeeze(1)
    return logp_N, -(logp_NV.exp() * logp_NV).sum(-1)


def fused_logprobs(hidden_NH, weight_VH, targets_N, chunks):
    return fused_linear_logprobs(hidden_NH, weight_VH, targets_N, temperature=TEMPERATURE,
                                 chunk_tokens=chunks[0], chunk_vocab=chunks[1])


def step(fn, hidden_NH, weight_VH, targets_N, w_lp_N, w_ent_N):
    """Forward + backward of sum(w_lp logp + w_ent H); returns (logp, ent, grad_hidden, grad_weight)."""
    hidden = hidden_NH.detach().requires_grad_()
    weight = weight_VH.detach().requires_grad_()
    logp_N, ent_N = fn(hidden, weight, targets_N)
    ((logp_N * w_lp_N).sum() + (ent_N * w_ent_N).sum()).backward()
    return logp_N.detach(), ent_N.detach(), hidden.grad, weight.grad


def _maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


# --- CPU: one contender per subprocess -------------------------------------------------------------


def child(args) -> None:
    """Measure one contender; write a JSON line (and the outputs to --save) and exit."""
    torch.set_num_threads(args.threads)
    inputs = make_inputs(args.tokens, args.hidden, args.vocab, DTYPES[args.dtype], "cpu", args.masked)
    if args.child == "fused":
        fn = lambda h, w, t: fused_logprobs(h, w, t, (args.chunk_tokens, args.chunk_vocab))  # noqa: E731
        impl = _backend.choose(FORWARD_OP, inputs[0])
    else:
        fn, impl = reference_logprobs, "torch"
    base = _maxrss_bytes()
    t0 = time.perf_counter()
    with torch.no_grad():
        fn(*inputs[:3])
    forward_s = time.perf_counter() - t0
    forward_peak = _maxrss_bytes() - base
    times, out = [], None
    for _ in range(args.repeats):
        out = None  # free the previous gradients first
        t0 = time.perf_counter()
        out = step(fn, *inputs)
        times.append(time.perf_counter() - t0)
    peak = _maxrss_bytes() - base
    if args.save:
        logp, ent, grad_hidden, grad_weight = out
        torch.save({"logp": logp, "ent": ent, "grad_hidden": grad_hidden,
                    "grad_weight_rows": grad_weight[::97].clone()}, args.save)
    print(json.dumps({"contender": args.child, "impl": impl, "forward_s": forward_s, "step_s": times,
                      "forward_peak_bytes": forward_peak, "step_peak_bytes": peak}))


def run_child(args, contender: str, save: str | None) -> dict:
    cmd = [sys.executable, __file__, "--child", contender, "--tokens", str(args.tokens), "--hidden",
           str(args.hidden), "--vocab", str(args.vocab), "--dtype", args.dtype, "--threads", str(args.threads),
           "--repeats", str(args.repeats), "--chunk-tokens", str(args.chunk_tokens), "--chunk-vocab",
           str(args.chunk_vocab), "--masked", str(args.masked)] + (["--save", save] if save else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"{contender} child failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def max_diffs(a: dict, b: dict) -> dict:
    return {k: float((a[k].double() - b[k].double()).abs().max()) for k in a}


def cpu_main(args) -> dict:
    load_before = os.getloadavg()
    runs: dict[str, list[dict]] = {"fused": [], "reference": []}
    with tempfile.TemporaryDirectory() as tmp:
        saves = {c: f"{tmp}/{c}.pt" for c in runs}
        for r in range(args.rounds):
            for contender in runs:
                runs[contender].append(run_child(args, contender, saves[contender] if r == 0 else None))
                print(f"  round {r} {contender}: {runs[contender][-1]}", flush=True)
        diffs = max_diffs(torch.load(saves["fused"]), torch.load(saves["reference"]))
    load_after = os.getloadavg()
    summary = {}
    for contender, rs in runs.items():
        summary[contender] = {
            "impl": rs[0]["impl"],
            "step_s_median": statistics.median(t for r in rs for t in r["step_s"]),
            "forward_s_median": statistics.median(r["forward_s"] for r in rs),
            "step_peak_bytes": max(r["step_peak_bytes"] for r in rs),
            "forward_peak_bytes": max(r["forward_peak_bytes"] for r in rs),
        }
    f, ref = summary["fused"], summary["reference"]
    ratios = {
        "step_speedup": ref["step_s_median"] / f["step_s_median"],  # > 1: fused faster
        "forward_speedup": ref["forward_s_median"] / f["forward_s_median"],
        "step_peak_memory_fused_over_reference": f["step_peak_bytes"] / ref["step_peak_bytes"],
        "forward_peak_memory_fused_over_reference": f["forward_peak_bytes"] / ref["forward_peak_bytes"],
    }
    result = {
        "op": "fused_linear_logprobs", "device": "cpu", "tokens": args.tokens, "hidden": args.hidden,
        "vocab": args.vocab, "dtype": args.dtype, "temperature": TEMPERATURE, "masked_fraction": args.masked,
        "chunks": [args.chunk_tokens, args.chunk_vocab], "threads": args.threads, "rounds": args.rounds,
        "repeats": args.repeats, "torch": torch.__version__, "machine": platform.machine(),
        "cpus": os.cpu_count(), "loadavg_before": load_before, "loadavg_after": load_after,
        "describe": ops.describe(), "summary": summary, "ratios": ratios,
        "max_abs_diff_fused_vs_reference": diffs, "runs": runs,
        "targets": {"step_peak_memory_fused_over_reference": "<= 0.125", "step_speedup": ">= 1"},
    }
    gib = 2 ** 30
    print(f"fused_linear_logprobs T={args.tokens} H={args.hidden} V={args.vocab} {args.dtype}, "
          f"masked {args.masked:.0%}, {args.threads} threads, fused impl={f['impl']}, "
          f"load {load_before[0]:.2f} -> {load_after[0]:.2f}")
    print(f"  forward+backward: fused {f['step_s_median']:.2f} s, reference {ref['step_s_median']:.2f} s "
          f"-> speedup {ratios['step_speedup']:.2f}x")
    print(f"  forward only:     fused {f['forward_s_median']:.2f} s, reference {ref['forward_s_median']:.2f} s "
          f"-> speedup {ratios['forward_speedup']:.2f}x")
    print(f"  peak memory fwd+bwd: fused {f['step_peak_bytes'] / gib:.2f} GiB, reference "
          f"{ref['step_peak_bytes'] / gib:.2f} GiB -> ratio {ratios['step_peak_memory_fused_over_reference']:.3f}")
    print(f"  max |fused - reference|: {diffs}")
    return result


# --- GPU: one process -------------------------------------------------------------------------------


def _cuda_time(fn, repeats: int) -> float:
    fn()  # warm-up
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def _cuda_peak(fn) -> int:
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def gpu_main(args) -> dict:
    inputs = make_inputs(args.tokens, args.hidden, args.vocab, DTYPES[args.dtype], "cuda", args.masked)
    chunks = (args.chunk_tokens, args.chunk_vocab)
    impl = _backend.choose(FORWARD_OP, inputs[0])
    contenders = {"fused": lambda h, w, t: fused_logprobs(h, w, t, chunks), "reference": reference_logprobs}
    outs = {c: step(fn, *inputs) for c, fn in contenders.items()}  # warm-up and agreement check
    diffs = max_diffs(dict(zip(("logp", "ent", "grad_hidden", "grad_weight"), outs["fused"])),
                      dict(zip(("logp", "ent", "grad_hidden", "grad_weight"), outs["reference"])))
    del outs
    summary = {}
    for c, fn in contenders.items():
        summary[c] = {"step_peak_bytes": _cuda_peak(lambda: step(fn, *inputs))}
        with torch.no_grad():
            summary[c]["forward_peak_bytes"] = _cuda_peak(lambda: fn(*inputs[:3]))
    step_times: dict[str, list[float]] = {c: [] for c in contenders}
    fwd_times: dict[str, list[float]] = {c: [] for c in contenders}
    for _ in range(args.rounds):  # interleaved round by round
        for c, fn in contenders.items():
            step_times[c].append(_cuda_time(lambda: step(fn, *inputs), args.repeats))
            with torch.no_grad():
                fwd_times[c].append(_cuda_time(lambda: fn(*inputs[:3]), args.repeats))
    for c in contenders:
        summary[c]["step_s_median"] = statistics.median(step_times[c])
        summary[c]["forward_s_median"] = statistics.median(fwd_times[c])
    summary["fused"]["impl"] = impl

    # The logits variant as bandwidth: it reads [T, V] once (the pieces are [T] each).
    logits_NV = (inputs[0][:, :256] @ inputs[1][:, :256].T).to(DTYPES[args.dtype])
    inputs = None  # the linear case's tensors are freed before the logits case
    logits_impl = _backend.choose("logits_logprob_forward", logits_NV)
    targets_N = torch.randint(0, args.vocab, (args.tokens,), device="cuda")
    nbytes = logits_NV.numel() * logits_NV.element_size()
    copy_dst = torch.empty_like(logits_NV)
    copy_s = _cuda_time(lambda: copy_dst.copy_(logits_NV), args.repeats)
    if logits_impl == "cuda":
        op = torch.ops.slime_rl.logits_logprob_forward
        logits_s = _cuda_time(lambda: op(logits_NV, targets_N, 0, args.vocab, TEMPERATURE), args.repeats)
    else:
        logits_s = float("nan")
    bandwidth = {"logits_impl": logits_impl, "logits_bytes": nbytes, "copy_s": copy_s, "logits_forward_s": logits_s,
                 "copy_gbps": 2 * nbytes / copy_s / 1e9, "logits_forward_gbps": nbytes / logits_s / 1e9}
    bandwidth["fraction_of_copy"] = bandwidth["logits_forward_gbps"] / bandwidth["copy_gbps"]

    f, ref = summary["fused"], summary["reference"]
    ratios = {
        "step_speedup": ref["step_s_median"] / f["step_s_median"],
        "forward_speedup": ref["forward_s_median"] / f["forward_s_median"],
        "step_peak_memory_fused_over_reference": f["step_peak_bytes"] / ref["step_peak_bytes"],
        "forward_peak_memory_fused_over_reference": f["forward_peak_bytes"] / ref["forward_peak_bytes"],
        "logits_forward_fraction_of_copy_bandwidth": bandwidth["fraction_of_copy"],
    }
    print(f"fused_linear_logprobs T={args.tokens} H={args.hidden} V={args.vocab} {args.dtype} on "
          f"{torch.cuda.get_device_name()}, fused impl={impl}")
    for k, v in ratios.items():
        print(f"  {k}: {v:.3f}")
    print(f"  max |fused - reference|: {diffs}")
    return {
        "op": "fused_linear_logprobs", "device": torch.cuda.get_device_name(), "tokens": args.tokens,
        "hidden": args.hidden, "vocab": args.vocab, "dtype": args.dtype, "temperature": TEMPERATURE,
        "masked_fraction": args.masked, "chunks": list(chunks), "rounds": args.rounds, "repeats": args.repeats,
        "torch": torch.__version__,
        "describe": ops.describe(), "summary": summary, "ratios": ratios, "bandwidth": bandwidth,
        "max_abs_diff_fused_vs_reference": diffs,
        "targets": {"step_peak_memory_fused_over_reference": "<= 0.125", "step_speedup": ">= 1",
                    "logits_forward_fraction_of_copy_bandwidth": ">= 0.7"},
    }


def main(argv: list[str] | None = None) -> dict | None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gpu", action="store_true", help="GPU mode: bf16, T=16384, H=4096 unless given")
    p.add_argument("--tokens", type=int)
    p.add_argument("--hidden", type=int)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--dtype", choices=sorted(DTYPES))
    p.add_argument("--threads", type=int, default=2, help="CPU threads per child")
    p.add_argument("--rounds", type=int, default=2, help="children (CPU) or timed rounds (GPU) per contender")
    p.add_argument("--repeats", type=int, default=1, help="timed forward+backward calls per child / round")
    p.add_argument("--chunk-tokens", type=int, help="default: the op's default for the device")
    p.add_argument("--chunk-vocab", type=int)
    p.add_argument("--masked", type=float, default=0.0,
                   help="fraction of tokens with no gradient (prompt/padding; the fused backward skips them)")
    p.add_argument("--out")
    p.add_argument("--child", choices=["fused", "reference"], help=argparse.SUPPRESS)
    p.add_argument("--save", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    from slime_rl.ops.fused_logprob import DEFAULT_CHUNKS

    device = "cuda" if args.gpu else "cpu"
    args.tokens = args.tokens or (16384 if args.gpu else 4096)
    args.hidden = args.hidden or (4096 if args.gpu else 1024)
    args.dtype = args.dtype or ("bfloat16" if args.gpu else "float32")
    args.chunk_tokens = args.chunk_tokens or DEFAULT_CHUNKS[device][0]
    args.chunk_vocab = args.chunk_vocab or DEFAULT_CHUNKS[device][1]
    if args.child:
        child(args)
        return None
    result = gpu_main(args) if args.gpu else cpu_main(args)
    out = Path(args.out or ROOT / "benchmarks" / "kernels" / "results" / f"fused_logprob_{device}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
