"""Every `--algo` on the default job: validation accuracy after SFT and after RL, wall time, samples/s, curves.

    python benchmarks/bench_algorithms.py                          # all algorithms, the default job
    python benchmarks/bench_algorithms.py --algos GRPO PPO         # a subset
    python benchmarks/bench_algorithms.py -- --backend hf          # flags after -- go to every `slime-rl train`

One SFT warm-up (`slime-rl sft`, the default job's: 30 epochs on the synthetic arithmetic task) writes a
checkpoint; every algorithm then runs `slime-rl train --algo NAME --sft.enabled false --model.path CKPT` from
it in a child process, with the same seed, prompts, steps and sampling seeds (the default job's budget: 300
steps of 32 prompts x 8 samples), one after the other. So every algorithm starts from the same policy and
"after SFT" is the same number for all; each run's step-0 validation measures it again.

Reported per algorithm (from its metrics.jsonl): validation accuracy after SFT and after RL (sampled, the
job's headline, and greedy), the gain in points, the RL wall seconds and trained samples/s (every sample of
each step's batch; DAPO's extra generated samples are reported apart), each as a ratio to GRPO's run in the
same invocation (the runs are sequential: compare ratios only between runs on the same quiet machine).
Results: `--out` (JSON) and `--png`: for each algorithm the four curves ColossalChat reports (reward,
response length, format accuracy, answer accuracy) plus validation accuracy, against the RL step.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ALGOS = ["GRPO", "DR_GRPO", "DAPO", "RLOO", "REINFORCE_PP", "REINFORCE_PPB", "PPO", "GSPO", "CISPO"]
CURVES = [("rollout/reward_mean", "reward"), ("rollout/response_length", "response length"),
          ("rollout/format_accuracy", "format accuracy"), ("rollout/answer_accuracy", "answer accuracy"),
          ("val/accuracy", "val accuracy")]


def slime_rl(args: list[str], log: Path) -> float:
    """Run `python -m slime_rl ARGS`, output to `log`; returns wall seconds; raises on failure."""
    t0 = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.call([sys.executable, "-m", "slime_rl", *args], stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
    if rc != 0:
        tail = log.read_text().splitlines()[-15:]
        raise RuntimeError(f"slime_rl {' '.join(args[:3])}... failed (exit {rc}); last lines of {log}:\n" + "\n".join(tail))
    return time.perf_counter() - t0


def summarize(name: str, run_dir: Path, seconds: float) -> dict:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "rollout/reward_mean" in r]
    before = next(r for r in records if r.get("step") == 0 and "val/accuracy" in r)
    evals = [r for r in steps if "val/accuracy" in r]
    greedy_after = [r["val/greedy_accuracy"] for r in records if "val/greedy_accuracy" in r and r.get("step")]
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    per_step = cfg["rollout"]["prompts_per_step"] * cfg["rollout"]["n_samples_per_prompt"]
    rl_seconds = sum(r["time/step_s"] for r in steps)
    return {
        "algo": name, "steps": len(steps),
        "val_after_sft": before["val/accuracy"], "val_greedy_after_sft": before.get("val/greedy_accuracy"),
        "val_after_rl": evals[-1]["val/accuracy"] if evals else None,
        "val_greedy_after_rl": greedy_after[-1] if greedy_after else None,
        "gain_points": 100 * (evals[-1]["val/accuracy"] - before["val/accuracy"]) if evals else None,
        "job_wall_s": seconds, "rl_loop_s": rl_seconds,
        "samples_per_s": len(steps) * per_step / rl_seconds if rl_seconds else None,
        "extra_samples": sum(r.get("rollout/extra_samples", 0.0) for r in steps),
        "filtered_groups_frac": (sum(r["rollout/filtered_groups_frac"] for r in steps) / len(steps)
                                 if steps and "rollout/filtered_groups_frac" in steps[0] else None),
        "curves": {key: [(r["step"], r[key]) for r in steps if key in r and r[key] == r[key]] for key, _ in CURVES},
    }


def plot(results: list[dict], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(results), len(CURVES), figsize=(3.2 * len(CURVES), 2.1 * len(results)),
                             squeeze=False)
    for row, res in zip(axes, results):
        for ax, (key, label) in zip(row, CURVES):
            pts = res["curves"][key]
            if key == "val/accuracy":  # from the SFT checkpoint's accuracy at step 0
                pts = [(0, res["val_after_sft"])] + [p for p in pts if p[0] != 0]
            if pts:
                xs, ys = zip(*pts)
                k = 1 if key == "val/accuracy" else 9  # a centred moving average over 9 steps
                smooth = [sum(ys[max(0, i - k // 2): i + k // 2 + 1]) / len(ys[max(0, i - k // 2): i + k // 2 + 1])
                          for i in range(len(ys))]
                ax.plot(xs, ys, alpha=0.25, lw=0.8, color="C0")
                ax.plot(xs, smooth, lw=1.4, color="C0", marker="o" if k == 1 else None, ms=3)
            ax.set_title(f"{res['algo']}: {label}", fontsize=8)
            ax.tick_params(labelsize=7)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=70)


def table(results: list[dict]) -> str:
    base = next((r for r in results if r["algo"] == "GRPO"), results[0])
    lines = [f"{'algo':14s} {'val SFT':>8s} {'val RL':>8s} {'gain':>7s} {'greedy RL':>9s} {'job s':>7s} "
             f"{'samples/s':>9s} {'x GRPO':>7s}"]
    for r in results:
        ratio = r["samples_per_s"] / base["samples_per_s"] if r["samples_per_s"] and base["samples_per_s"] else float("nan")
        lines.append(f"{r['algo']:14s} {100 * r['val_after_sft']:7.1f}% {100 * (r['val_after_rl'] or 0):7.1f}% "
                     f"{r['gain_points'] or 0:+6.1f} {100 * (r['val_greedy_after_rl'] or 0):8.1f}% "
                     f"{r['job_wall_s']:7.0f} {r['samples_per_s'] or 0:9.1f} {ratio:7.2f}")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--algos", nargs="+", default=ALGOS)
    p.add_argument("--work", default="runs/bench_algorithms", help="run directories")
    p.add_argument("--out", default="benchmarks/results/algorithms.json")
    p.add_argument("--png", default="benchmarks/results/algorithms.png")
    p.add_argument("--sft-checkpoint", default=None, help="reuse this SFT checkpoint (default: run the SFT)")
    p.add_argument("--update", action="store_true",
                   help="replace these algorithms' rows in an existing --out (same SFT checkpoint, same flags) and "
                        "keep the others, e.g. to rerun one whose run shared the machine with other work")
    p.add_argument("train_args", nargs="*", help="after --: flags for every slime-rl command")
    args = p.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    common = [*args.train_args, "--log.progress", "false"]
    sft = args.sft_checkpoint
    if sft is None:
        seconds = slime_rl(["sft", *common, "--log.output_dir", str(work / "sft")], work / "sft.log")
        sft = str(work / "sft" / "checkpoint")
        print(f"[bench] SFT warm-up: {seconds:.0f}s -> {sft}", flush=True)
    results = []
    for name in args.algos:
        run_dir = work / name
        seconds = slime_rl(["train", *common, "--algo", name, "--sft.enabled", "false", "--model.path", sft,
                            "--log.output_dir", str(run_dir)], work / f"{name}.log")
        results.append(summarize(name, run_dir, seconds))
        r = results[-1]
        print(f"[bench] {name}: val {100 * r['val_after_sft']:.1f}% -> {100 * (r['val_after_rl'] or 0):.1f}% "
              f"({r['gain_points'] or 0:+.1f} points), {seconds:.0f}s", flush=True)
    out = Path(args.out)
    if args.update and out.exists():
        old = json.loads(out.read_text())
        fresh = {r["algo"]: r for r in results}
        kept = [{**r, "curves": old["curves"][r["algo"]]} for r in old["results"] if r["algo"] not in fresh]
        order = {name: i for i, name in enumerate(ALGOS)}
        results = sorted(kept + results, key=lambda r: order.get(r["algo"], len(order)))
    print(table(results))
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"argv": sys.argv[1:], "train_args": common, "python": platform.python_version(),
            "machine": platform.machine(), "cpus": os.cpu_count()}
    out.write_text(json.dumps({"meta": meta, "table": table(results).splitlines(),
                               "results": [{k: v for k, v in r.items() if k != "curves"} for r in results],
                               "curves": {r["algo"]: r["curves"] for r in results}}, indent=1))
    plot(results, Path(args.png))
    print(f"[bench] results: {out}  plot: {args.png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
