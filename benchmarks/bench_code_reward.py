"""Benchmark: the `code` reward's sandbox pool vs one run at a time, in test cases scored per second.

    .venv/bin/python benchmarks/bench_code_reward.py [--problems 32 --rounds 5 --parallel 2 4 --out PATH]

The workload is the same every time: `--problems` problems of the synthetic code task (`--task code`, three
test cases each, assert and stdin/stdout styles) answered by hand-written solutions, a quarter of them wrong,
crashing or not compiling, so the mix holds the paths a rollout meets. Each sample costs one compile check plus
one sandboxed run per case (bubblewrap, a fresh interpreter, a throwaway uid as root).

Contenders, on the same samples, interleaved round by round (the order flips every round) so machine noise hits
them alike: `one_at_a_time` (sandbox.max_parallel 1, one reward worker: every run waits for the one before) and
`pool_N` (sandbox.max_parallel N, four reward worker threads, as a job scores a batch). Before timing, every
contender must give the same rewards. Reported: the median cases/s per contender and its ratio to one at a time.
Compare ratios, and only between runs on the same machine: a run is mostly interpreter start-up, CPU-bound, so
the ratio is bounded by the cores free (the machine's load average is recorded).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

from slime_rl.rewards import score_samples
from slime_rl.rewards.code import CodeReward
from slime_rl.rewards.config import CodeRewardConfig, SandboxConfig
from slime_rl.sandbox import find_bwrap
from slime_rl.tasks.code import FAMILIES, make_problem
from slime_rl.types import Sample

_BROKEN = (
    "def f(x): return None",  # wrong
    "def f(x): raise ValueError(x)",  # crashing
    "def f(x) return x",  # not compiling
)


def workload(num_problems: int, seed: int) -> list[Sample]:
    """Problems cycling through every family; every fourth answered by a broken solution."""
    rng = random.Random(seed)
    samples = []
    for i in range(num_problems):
        problem = make_problem(rng, FAMILIES[i % len(FAMILIES)])
        response = _BROKEN[(i // 4) % len(_BROKEN)] if i % 4 == 3 else problem["response"]
        samples.append(Sample(prompt_ids=[], response_text=response, label=problem["label"], index=i))
    return samples


def score(reward: CodeReward, samples: list[Sample], workers: int) -> tuple[float, list[float]]:
    """Seconds to score every sample, and the rewards."""
    for s in samples:
        s.reward = None
    start = time.perf_counter()
    stats = score_samples(samples, reward, timeout_s=600, max_workers=workers)
    elapsed = time.perf_counter() - start
    if stats.errors or stats.timeouts:
        raise RuntimeError(f"scoring failed on {stats.failed_ids}")
    return elapsed, [s.scalar_reward for s in samples]


def machine() -> dict:
    bwrap = find_bwrap()
    version = subprocess.run([bwrap, "--version"], capture_output=True, text=True).stdout.strip() if bwrap else None
    return {"machine": platform.machine(), "processor": platform.processor() or None, "cpus": os.cpu_count(),
            "kernel": platform.release(), "python": platform.python_version(), "bubblewrap": version,
            "as_root": os.geteuid() == 0, "loadavg_start": [round(x, 2) for x in os.getloadavg()]}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--problems", type=int, default=32, help="samples scored per timed round (3 cases each)")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds (each scores with every contender once)")
    p.add_argument("--parallel", type=int, nargs="+", default=[os.cpu_count() or 1],
                   help="sandbox.max_parallel of the pool contenders (default: the CPU count)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results/code_reward.json")
    args = p.parse_args(argv)

    samples = workload(args.problems, args.seed)
    num_cases = sum(len(s.label.get("tests", [])) + len(s.label.get("asserts", [])) for s in samples)
    sandbox = SandboxConfig(cpu_s=2, wall_s=10)
    contenders = {"one_at_a_time": (1, 1), **{f"pool_{n}": (n, 4) for n in args.parallel}}
    rewards = {name: CodeReward(CodeRewardConfig(sandbox=SandboxConfig(**{**sandbox.__dict__, "max_parallel": n})))
               for name, (n, _) in contenders.items()}
    env = machine()
    print(f"machine: {env['machine']}, {env['cpus']} CPUs, kernel {env['kernel']}, {env['bubblewrap']}, "
          f"load {env['loadavg_start']}; {len(samples)} samples, {num_cases} cases per round")
    try:
        want = None
        for name, reward in rewards.items():  # warm up, and every contender must agree
            _, got = score(reward, samples, contenders[name][1])
            if want is not None and got != want:
                raise RuntimeError(f"{name} scored differently from one_at_a_time: {got} vs {want}")
            want = got
        seconds: dict[str, list[float]] = {name: [] for name in contenders}
        for r in range(args.rounds):
            order = list(contenders) if r % 2 == 0 else list(reversed(contenders))
            for name in order:
                seconds[name].append(score(rewards[name], samples, contenders[name][1])[0])
    finally:
        for reward in rewards.values():
            reward.close()

    base = num_cases / statistics.median(seconds["one_at_a_time"])
    results = {}
    for name, times in seconds.items():
        cases_per_s = num_cases / statistics.median(times)
        median = statistics.median(times)
        results[name] = {"max_parallel": contenders[name][0], "reward_workers": contenders[name][1],
                         "median_s": median, "seconds": times, "cases_per_s": cases_per_s,
                         "samples_per_s": len(samples) / median, "vs_one_at_a_time": cases_per_s / base}
        print(f"{name:>14}: {cases_per_s:7.1f} cases/s  {len(samples) / median:6.1f} samples/s  "
              f"x{cases_per_s / base:.2f} vs one at a time")
    out = {"meta": {"argv": argv if argv is not None else sys.argv[1:], **env,
                    "loadavg_end": [round(x, 2) for x in os.getloadavg()]},
           "workload": {"samples": len(samples), "cases": num_cases, "runs_per_round": num_cases + len(samples),
                        "sandbox": {**sandbox.__dict__}},
           "results": results}
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {path}")
    return out


if __name__ == "__main__":
    main()
