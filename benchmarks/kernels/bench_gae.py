"""Benchmark: GAE, discounted returns and RLOO on the CPU, C++ kernels vs torch loops, side by side.

    python benchmarks/kernels/bench_gae.py [--seqs 4096 --max-len 2048 --threads 1,2 --out PATH]

The batch is what a PPO step sees: --seqs sequences of ragged lengths drawn
uniformly from 1..--max-len (seeded), float32 rewards and values, and a mask
with 64-token runs masked out (tool/environment tokens inside responses).
Contenders, each timed in the same process on the same data, interleaved
round by round so machine noise hits them alike:

  cpp          slime_rl.ops.gae(..., impl="cpp") on the packed batch [N] + cu_seqlens
  cpp_padded   the same kernel on the padded [B, T] batch (it also scans the padding)
  torch_loop   the way PPO code usually writes it: padded [B, T], a Python loop over
               reversed time steps vectorized across the batch, float32, masked
               carries (next value and running advantage pass through masked tokens);
               the padded tensors are built before timing, so only the loop is timed
  torch_loop_time_major  the same loop after copying the inputs to contiguous [T, B]
               (copy timed), so each step reads rows, not strided columns: the stronger
               torch baseline
  reference    slime_rl.ops.reference (the spec: the same loop in float64 on a padded
               copy it gathers from the packed batch, then scatters back)

Ratios (speedup = contender / cpp time) are what to read; absolute times are in
the JSON for context only. Outputs are checked against each other before
timing. Runs once per thread count in --threads; the machine load
(os.getloadavg()) is recorded before and after. Writes JSON to --out (default
benchmarks/kernels/results/gae_cpu.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from slime_rl.ops import _backend, advantages, reference

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "gae_cpu.json"


def make_batch(num_seqs: int, max_len: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Packed and padded views of one random ragged batch (float32 rewards/values, bool mask)."""
    g = torch.Generator().manual_seed(seed)
    lengths_S = torch.randint(1, max_len + 1, (num_seqs,), generator=g)
    cu = torch.zeros(num_seqs + 1, dtype=torch.int64)
    cu[1:] = lengths_S.cumsum(0)
    n = int(cu[-1])
    rewards_N = torch.randn(n, generator=g) * 0.1
    values_N = torch.randn(n, generator=g)
    masked_runs = torch.rand(n // 64 + 1, generator=g) < 0.15
    mask_N = ~masked_runs.repeat_interleave(64)[:n]
    length = int(lengths_S.max())
    valid_BT = torch.arange(length) < lengths_S[:, None]

    def pad(x_N: torch.Tensor) -> torch.Tensor:
        return torch.zeros(num_seqs, length, dtype=x_N.dtype).masked_scatter(valid_BT, x_N)

    return {
        "rewards_N": rewards_N, "values_N": values_N, "mask_N": mask_N, "cu_seqlens": cu,
        "rewards_BT": pad(rewards_N), "values_BT": pad(values_N), "mask_BT": pad(mask_N), "valid_BT": valid_BT,
    }


def torch_loop_gae(rewards_BT, values_BT, mask_BT, gamma: float, lam: float, time_major: bool = False):
    """GAE as PPO code usually writes it: reversed time loop over a padded batch, masked carries.

    time_major=True first copies the inputs to contiguous [T, B] (timed too), so each
    step reads contiguous rows instead of strided columns: a stronger baseline.
    """
    batch, length = rewards_BT.shape
    m_BT = mask_BT.to(rewards_BT.dtype)
    r, v, m = rewards_BT, values_BT, m_BT
    if time_major:
        r, v, m = (x.t().contiguous() for x in (r, v, m))
    step = (lambda x, t: x[t]) if time_major else (lambda x, t: x[:, t])
    next_value_B = rewards_BT.new_zeros(batch)
    last_adv_B = rewards_BT.new_zeros(batch)
    adv_cols = []
    for t in reversed(range(length)):
        m_B, v_B = step(m, t), step(v, t)
        delta_B = step(r, t) + gamma * next_value_B - v_B
        adv_B = delta_B + gamma * lam * last_adv_B
        next_value_B = m_B * v_B + (1 - m_B) * next_value_B  # skip masked tokens
        last_adv_B = m_B * adv_B + (1 - m_B) * last_adv_B
        adv_cols.append(last_adv_B * m_B)
    adv_BT = torch.stack(adv_cols[::-1], dim=0 if time_major else 1)
    if time_major:
        adv_BT = adv_BT.t()
    return adv_BT, (adv_BT + values_BT) * m_BT


def torch_loop_returns(rewards_BT, mask_BT, gamma: float, time_major: bool = False):
    """Discounted returns, the same way."""
    r, m = rewards_BT, mask_BT.to(rewards_BT.dtype)
    if time_major:
        r, m = r.t().contiguous(), m.t().contiguous()
    step = (lambda x, t: x[t]) if time_major else (lambda x, t: x[:, t])
    ret_B = rewards_BT.new_zeros(rewards_BT.shape[0])
    cols = []
    for t in reversed(range(rewards_BT.shape[1])):
        m_B = step(m, t)
        ret_B = m_B * (step(r, t) + gamma * ret_B) + (1 - m_B) * ret_B
        cols.append(ret_B * m_B)
    out = torch.stack(cols[::-1], dim=0 if time_major else 1)
    return out.t() if time_major else out


def median_times(contenders: dict, rounds: int) -> dict[str, float]:
    samples: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, fn in contenders.items():
            t0 = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - t0)
    return {name: statistics.median(s) for name, s in samples.items()}


def _max_rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want.double()).abs() / (1 + want.double().abs())).max().item()


def check_agreement(b: dict, gamma: float, lam: float) -> dict[str, float]:
    """Max relative differences between the contenders (they must agree before being timed)."""
    cu, valid = b["cu_seqlens"], b["valid_BT"]
    adv, ret = advantages.gae(b["rewards_N"], b["values_N"], b["mask_N"], gamma, lam, cu_seqlens=cu, impl="cpp")
    ref_adv, ref_ret = reference.gae(b["rewards_N"], b["values_N"], b["mask_N"], cu, gamma, lam)
    pad_adv, pad_ret = advantages.gae(b["rewards_BT"], b["values_BT"], b["mask_BT"], gamma, lam, impl="cpp")
    loop_adv, loop_ret = torch_loop_gae(b["rewards_BT"], b["values_BT"], b["mask_BT"], gamma, lam)
    tm_adv, tm_ret = torch_loop_gae(b["rewards_BT"], b["values_BT"], b["mask_BT"], gamma, lam, time_major=True)
    g = advantages.discounted_returns(b["rewards_N"], b["mask_N"], gamma, cu_seqlens=cu, impl="cpp")
    loop_g = torch_loop_returns(b["rewards_BT"], b["mask_BT"], gamma)
    tm_g = torch_loop_returns(b["rewards_BT"], b["mask_BT"], gamma, time_major=True)
    errs = {
        "gae_cpp_vs_reference": max(_max_rel_err(adv, ref_adv), _max_rel_err(ret, ref_ret)),
        "gae_cpp_padded_vs_packed": max(_max_rel_err(pad_adv[valid], adv), _max_rel_err(pad_ret[valid], ret)),
        "gae_torch_loop_fp32_vs_reference": max(_max_rel_err(loop_adv[valid], ref_adv),
                                                _max_rel_err(loop_ret[valid], ref_ret)),
        "returns_cpp_vs_reference": _max_rel_err(
            g, reference.discounted_returns(b["rewards_N"], b["mask_N"], cu, gamma)
        ),
        "returns_torch_loop_fp32_vs_cpp": _max_rel_err(loop_g[valid], g),
        "torch_loop_time_major_vs_column": max(_max_rel_err(tm_adv, loop_adv), _max_rel_err(tm_ret, loop_ret),
                                               _max_rel_err(tm_g, loop_g)),
    }
    # cpp and the reference both compute in float64 and round once; the fp32 loop drifts further.
    assert errs["gae_cpp_vs_reference"] < 1e-6 and errs["returns_cpp_vs_reference"] < 1e-6, errs
    assert errs["gae_cpp_padded_vs_packed"] == 0.0, errs
    assert errs["gae_torch_loop_fp32_vs_reference"] < 1e-3 and errs["returns_torch_loop_fp32_vs_cpp"] < 1e-3, errs
    assert errs["torch_loop_time_major_vs_column"] == 0.0, errs
    return errs


def run(b: dict, gamma: float, lam: float, groups: torch.Tensor, rounds: int) -> dict:
    cu = b["cu_seqlens"]
    rN, vN, mN = b["rewards_N"], b["values_N"], b["mask_N"]
    rBT, vBT, mBT = b["rewards_BT"], b["values_BT"], b["mask_BT"]
    gae_t = median_times({
        "cpp": lambda: advantages.gae(rN, vN, mN, gamma, lam, cu_seqlens=cu, impl="cpp"),
        "cpp_padded": lambda: advantages.gae(rBT, vBT, mBT, gamma, lam, impl="cpp"),
        "torch_loop": lambda: torch_loop_gae(rBT, vBT, mBT, gamma, lam),
        "torch_loop_time_major": lambda: torch_loop_gae(rBT, vBT, mBT, gamma, lam, time_major=True),
        "reference": lambda: advantages.gae(rN, vN, mN, gamma, lam, cu_seqlens=cu, impl="reference"),
    }, rounds)
    ret_t = median_times({
        "cpp": lambda: advantages.discounted_returns(rN, mN, gamma, cu_seqlens=cu, impl="cpp"),
        "torch_loop": lambda: torch_loop_returns(rBT, mBT, gamma),
        "torch_loop_time_major": lambda: torch_loop_returns(rBT, mBT, gamma, time_major=True),
        "reference": lambda: advantages.discounted_returns(rN, mN, gamma, cu_seqlens=cu, impl="reference"),
    }, rounds)
    loo_t = median_times({
        "cpp": lambda: advantages.loo_advantages(groups, impl="cpp"),
        "reference": lambda: advantages.loo_advantages(groups, impl="reference"),
    }, rounds * 10)
    out = {}
    for op, times in (("gae", gae_t), ("discounted_returns", ret_t), ("loo_advantages", loo_t)):
        out[op] = {
            "median_s": times,
            "speedup_of_cpp": {name: t / times["cpp"] for name, t in times.items() if name != "cpp"},
        }
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seqs", type=int, default=4096, help="number of sequences")
    p.add_argument("--max-len", type=int, default=2048, help="lengths are uniform in 1..max-len")
    p.add_argument("--gamma", type=float, default=0.99)
    p.add_argument("--lam", type=float, default=0.95)
    p.add_argument("--groups", type=int, default=4096, help="RLOO: groups of --group-size samples")
    p.add_argument("--group-size", type=int, default=16)
    p.add_argument("--threads", default=f"1,{torch.get_num_threads()}", help="comma-separated thread counts")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds (each runs every contender once)")
    p.add_argument("--out", default=str(DEFAULT_OUT))
    args = p.parse_args(argv)

    ops_here = ("gae", "discounted_returns", "loo_advantages")
    missing = [op for op in ops_here if "cpp" not in _backend.available_impls(op)]
    if missing:
        raise SystemExit(f"no C++ kernel for {missing}: {_backend.describe()}")
    load_before = os.getloadavg()
    b = make_batch(args.seqs, args.max_len)
    groups = torch.randn(args.groups, args.group_size, generator=torch.Generator().manual_seed(1))
    errs = check_agreement(b, args.gamma, args.lam)
    n = b["rewards_N"].numel()
    print(f"{args.seqs} sequences, lengths 1..{args.max_len}: {n} tokens "
          f"({b['mask_N'].float().mean().item():.0%} unmasked), padded {tuple(b['rewards_BT'].shape)}, float32")

    default_threads = torch.get_num_threads()
    by_threads = {}
    try:
        for threads in [int(x) for x in args.threads.split(",")]:
            torch.set_num_threads(threads)
            res = run(b, args.gamma, args.lam, groups, args.rounds)
            by_threads[str(threads)] = res
            print(f"-- {threads} thread(s)")
            for op, r in res.items():
                ratios = ", ".join(f"{k} {v:.1f}x" for k, v in r["speedup_of_cpp"].items())
                print(f"  {op:>18}: cpp {r['median_s']['cpp'] * 1e3:8.2f} ms; cpp is faster than: {ratios}")
    finally:
        torch.set_num_threads(default_threads)

    result = {
        "benchmark": "bench_gae",
        "tokens": n,
        "seqs": args.seqs,
        "max_len": args.max_len,
        "padded_shape": list(b["rewards_BT"].shape),
        "unmasked_fraction": b["mask_N"].float().mean().item(),
        "dtype": "float32",
        "gamma": args.gamma,
        "lam": args.lam,
        "loo_shape": [args.groups, args.group_size],
        "rounds": args.rounds,
        "agreement_max_rel_err": errs,
        "results_by_threads": by_threads,
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "processor": platform.processor(),
        "describe": _backend.describe(),
    }
    print(f"load average before {load_before}, after {result['loadavg_after']}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
