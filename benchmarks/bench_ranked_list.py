"""RL over its SFT warm-up on the synthetic ranked-list task: validation top-1 / top-5 / top-max before and after.

    python benchmarks/bench_ranked_list.py                           # the preset: rules 1234 5678 x RL seeds 0 1
    python benchmarks/bench_ranked_list.py --seeds 0 --task-seeds 1234 5678
    python benchmarks/bench_ranked_list.py -- --train.num_steps 100  # flags after -- go to every slime-rl command

For each hidden rule (`--task-seeds`, i.e. `data.task_seed`) one SFT warm-up (`slime-rl sft --task ranked_list`,
the task's preset: 200 labelled cases, 30 epochs) writes a checkpoint; RL (`slime-rl train --sft.enabled false
--model.path CKPT`, GRPO by default) then runs from it once per RL seed (`--seeds`: `seed` and `rollout.seed`),
one run after the other, in child processes. Every run evaluates the same validation cases (the task's val
split for that rule) at step 0 (= after SFT) and after its last step; the sampled validation (4 samples per
case at temperature 1.0) is the headline, greedy top-1 is reported beside it.

Results: `--out` (JSON: per run before / after / gain of top-1, top-5, top-max and greedy top-1, the RL wall
seconds, the curves) and `--png` (validation top-1 and the rollout top-1 of each step, against the RL step).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

from bench_algorithms import slime_rl  # runs `python -m slime_rl ARGS` with its output in a log

ROOT = Path(__file__).resolve().parents[1]
METRICS = ("top1", "top5", "topmax")


def summarize(task_seed: int, seed: int, run_dir: Path, seconds: float) -> dict:
    """Before (step 0) / after (last evaluation) of one RL run, from its metrics.jsonl."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "rollout/reward_mean" in r]
    before = next(r for r in records if r.get("step") == 0 and "val/top1" in r)
    after = [r for r in steps if "val/top1" in r][-1]
    greedy = [r["val/greedy_accuracy"] for r in records if "val/greedy_accuracy" in r]
    out = {"task_seed": task_seed, "seed": seed, "steps": len(steps), "job_wall_s": seconds,
           "rl_loop_s": sum(r["time/step_s"] for r in steps)}
    for m in METRICS:
        out[f"{m}_before"], out[f"{m}_after"] = before[f"val/{m}"], after[f"val/{m}"]
        out[f"{m}_gain_points"] = 100 * (after[f"val/{m}"] - before[f"val/{m}"])
    out["greedy_top1_before"], out["greedy_top1_after"] = (greedy[0], greedy[-1]) if len(greedy) >= 2 else (None, None)
    out["curves"] = {"val/top1": [(r["step"], r["val/top1"]) for r in [before] + [r for r in steps if "val/top1" in r
                                                                                 and r["step"]]],
                     "rollout/top1": [(r["step"], r["rollout/top1"]) for r in steps]}
    return out


def table(results: list[dict]) -> str:
    lines = [f"{'rule':>6s} {'seed':>4s} {'top1 SFT':>8s} {'top1 RL':>8s} {'gain':>6s} {'top5 SFT':>8s} "
             f"{'top5 RL':>8s} {'greedy SFT':>10s} {'greedy RL':>9s} {'RL s':>6s}"]
    for r in results:
        g0, g1 = r["greedy_top1_before"], r["greedy_top1_after"]
        lines.append(f"{r['task_seed']:6d} {r['seed']:4d} {100 * r['top1_before']:7.1f}% {100 * r['top1_after']:7.1f}% "
                     f"{r['top1_gain_points']:+6.1f} {100 * r['top5_before']:7.1f}% {100 * r['top5_after']:7.1f}% "
                     f"{100 * (g0 or 0):9.1f}% {100 * (g1 or 0):8.1f}% {r['rl_loop_s']:6.0f}")
    n = len(results)
    mean = {k: sum(r[k] for r in results) / n for k in ("top1_before", "top1_after", "top1_gain_points")}
    lines.append(f"{'mean':>11s} {100 * mean['top1_before']:7.1f}% {100 * mean['top1_after']:7.1f}% "
                 f"{mean['top1_gain_points']:+6.1f}   (over {n} runs)")
    return "\n".join(lines)


def plot(results: list[dict], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_val, ax_roll) = plt.subplots(1, 2, figsize=(10, 3.6))
    for i, r in enumerate(results):
        label = f"rule {r['task_seed']}, seed {r['seed']}"
        xs, ys = zip(*r["curves"]["val/top1"])
        ax_val.plot(xs, [100 * y for y in ys], marker="o", ms=3, color=f"C{i}", label=label)
        xs, ys = zip(*r["curves"]["rollout/top1"])
        k = 9  # a centred moving average over 9 steps
        smooth = [sum(ys[max(0, j - k // 2): j + k // 2 + 1]) / len(ys[max(0, j - k // 2): j + k // 2 + 1])
                  for j in range(len(ys))]
        ax_roll.plot(xs, [100 * y for y in ys], alpha=0.2, lw=0.7, color=f"C{i}")
        ax_roll.plot(xs, [100 * y for y in smooth], lw=1.3, color=f"C{i}", label=label)
    ax_val.set_title("validation top-1 (step 0 = after SFT)", fontsize=9)
    ax_roll.set_title("rollout top-1 (train prompts, 9-step mean)", fontsize=9)
    for ax in (ax_val, ax_roll):
        ax.set_xlabel("RL step", fontsize=8)
        ax.set_ylabel("top-1 %", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    ax_val.legend(fontsize=7)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=80)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="RL seeds (seed, rollout.seed)")
    p.add_argument("--task-seeds", type=int, nargs="+", default=[1234, 5678], help="hidden rules (data.task_seed)")
    p.add_argument("--work", default="runs/bench_ranked_list", help="run directories")
    p.add_argument("--out", default="benchmarks/results/ranked_list.json")
    p.add_argument("--png", default="benchmarks/results/ranked_list.png")
    p.add_argument("train_args", nargs="*", help="after --: flags for every slime-rl command")
    args = p.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    results = []
    for task_seed in args.task_seeds:
        common = ["--task", "ranked_list", "--data.task_seed", str(task_seed), *args.train_args,
                  "--log.progress", "false"]
        sft_dir = work / f"rule{task_seed}_sft"
        seconds = slime_rl(["sft", *common, "--log.output_dir", str(sft_dir)], work / f"rule{task_seed}_sft.log")
        print(f"[bench] rule {task_seed}: SFT warm-up {seconds:.0f}s -> {sft_dir / 'checkpoint'}", flush=True)
        for seed in args.seeds:
            run_dir = work / f"rule{task_seed}_seed{seed}"
            seconds = slime_rl(["train", *common, "--sft.enabled", "false", "--model.path", str(sft_dir / "checkpoint"),
                                "--seed", str(seed), "--rollout.seed", str(seed), "--log.output_dir", str(run_dir)],
                               work / f"rule{task_seed}_seed{seed}.log")
            r = summarize(task_seed, seed, run_dir, seconds)
            results.append(r)
            print(f"[bench] rule {task_seed} seed {seed}: val top-1 {100 * r['top1_before']:.1f}% -> "
                  f"{100 * r['top1_after']:.1f}% ({r['top1_gain_points']:+.1f} points), {seconds:.0f}s", flush=True)
    print(table(results))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"argv": sys.argv[1:], "train_args": args.train_args, "python": platform.python_version(),
            "machine": platform.machine(), "cpus": os.cpu_count()}
    out.write_text(json.dumps({"meta": meta, "table": table(results).splitlines(),
                               "results": [{k: v for k, v in r.items() if k != "curves"} for r in results],
                               "curves": {f"rule{r['task_seed']}_seed{r['seed']}": r["curves"] for r in results}},
                              indent=1))
    plot(results, Path(args.png))
    print(f"[bench] results: {out}  plot: {args.png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
