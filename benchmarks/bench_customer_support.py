"""The customer-support agent on CPU: the SFT warm-up on the scripted oracle's dialogues, then RL, compared on
held-out scenarios.

    python benchmarks/bench_customer_support.py                      # warm-up, then RL (the task's defaults)
    python benchmarks/bench_customer_support.py --warmup CKPT        # RL from a warm-up checkpoint
    python benchmarks/bench_customer_support.py -- --algo DAPO       # flags after -- go to `slime-rl train`
    python benchmarks/bench_customer_support.py --logged-team 0.5 -- --train.lr 3e-4 --train.num_steps 30 \
        --rollout.n_samples_per_prompt 8 --eval.every_n_steps 15 --data.num_val 128   # the README's RL gain

The warm-up is `slime-rl sft --task customer_support` (the scripted oracle's dialogues; its checkpoint is
written under --work), skipped with `--warmup`; RL is `slime-rl train --task customer_support --sft.enabled
false --model.path <warm-up checkpoint>`. `--logged-team SHARE` adds a second warm-up stage on logged
dialogues of a team where SHARE of the agents hedge before acting (`data.warmup_hedging`). Its validation
(the `data.num_val` held-out scenarios, seeds no training row uses, `eval.n_samples` episodes each at the rollout temperature) is measured right
after the warm-up (step 0) and after RL; both are read from the run's metrics.jsonl. Reported: mean episode
reward, resolution rate (with its 95% Wilson interval), tool-call accuracy, complaint / transfer / evasive
rates, mean turns and simulated minutes, each after SFT, after RL and the difference; greedy resolution
rate beside. Results: `--out` (JSON) and `--png` (reward, resolution and tool-call accuracy per RL step).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

KEYS = ["mean_reward", "resolution_rate", "tool_call_accuracy", "complaint_rate", "transfer_rate",
        "human_request_rate", "evasive_rate", "mean_turns", "mean_minutes", "tool_call_validity"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default=str(ROOT / "runs" / "bench_customer_support"))
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "customer_support.json"))
    p.add_argument("--png", default=str(ROOT / "benchmarks" / "results" / "customer_support.png"))
    p.add_argument("--warmup", default=None, help="a warm-up checkpoint: skip the SFT stage")
    p.add_argument("--logged-team", type=float, default=None, metavar="SHARE",
                   help="a second warm-up stage from the first's checkpoint: 1,600 logged dialogues, SHARE of them "
                        "from the hedging agent (data.warmup_hedging), 1 epoch at lr 1e-3")
    p.add_argument("train_flags", nargs="*", help="after --: passed to slime-rl train")
    args = p.parse_args()
    from slime_rl.gate import wilson_interval

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    warmup, warmup_s = args.warmup, None
    if warmup is None:
        warmup_s = _run(["sft", "--task", "customer_support", "--log.output_dir", str(work / "warmup"),
                         "--log.progress", "false"], work / "warmup.log")
        warmup = str(work / "warmup" / "checkpoint")
    if args.logged_team is not None:
        warmup_s = (warmup_s or 0.0) + _run(
            ["sft", "--task", "customer_support", "--model.path", warmup,
             "--data.warmup_hedging", str(args.logged_team), "--data.num_sft", "1600", "--sft.epochs", "1",
             "--sft.lr", "1e-3", "--log.output_dir", str(work / "team"), "--log.progress", "false"], work / "team.log")
        warmup = str(work / "team" / "checkpoint")
    cmd = ["train", "--task", "customer_support", "--sft.enabled", "false", "--model.path", warmup,
           "--log.output_dir", str(work / "rl"), "--log.progress", "false", *args.train_flags]
    seconds = _run(cmd, work / "rl.log")
    work = work / "rl"
    records = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    before = next(r for r in records if r.get("step") == 0 and "val/mean_reward" in r)
    after = [r for r in records if r.get("step", 0) > 0 and "val/mean_reward" in r][-1]
    greedy = [r["val/greedy_accuracy"] for r in records if "val/greedy_accuracy" in r]
    n = int(before["val/num_samples"])
    table = {k: {"after_sft": before[f"val/{k}"], "after_rl": after[f"val/{k}"],
                 "delta": after[f"val/{k}"] - before[f"val/{k}"]} for k in KEYS}
    for key, rec in (("after_sft", before), ("after_rl", after)):
        table["resolution_rate"][f"{key}_ci95"] = wilson_interval(rec["val/resolution_rate"], n)
    command = "slime-rl " + " ".join(cmd).replace(str(work), "<work>/rl").replace(str(ROOT) + "/", "")
    if args.warmup:
        command = command.replace(args.warmup, "<warm-up checkpoint>")  # no machine paths in the results
    command = command.replace(str(work.parent / "team" / "checkpoint"), "<warm-up checkpoint>")
    stages = ["given (--warmup)" if args.warmup else "slime-rl sft --task customer_support"]
    if args.logged_team is not None:
        stages.append(f"then 1,600 logged dialogues ({args.logged_team:.0%} from the hedging agent), 1 epoch, lr 1e-3")
    result = {"command": command, "warmup": "; ".join(stages),
              "episodes_per_eval": n, "rl_steps": after["step"], "rl_seconds": round(seconds, 1),
              "warmup_seconds": warmup_s and round(warmup_s, 1), "greedy_resolution_rate": {"after_sft": greedy[0], "after_rl": greedy[-1]},
              "metrics": table, "machine": f"{platform.machine()} {platform.processor() or ''}".strip()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"held-out scenarios: {n} episodes per evaluation; RL {seconds:.0f}s")
    print(f"{'metric':22s} {'after SFT':>10s} {'after RL':>10s} {'delta':>10s}")
    for k in KEYS:
        row = table[k]
        print(f"{k:22s} {row['after_sft']:10.3f} {row['after_rl']:10.3f} {row['delta']:+10.3f}")
    print(f"results: {args.out}")
    _plot(records, args.png)
    return 0


def _run(args: list[str], log: Path) -> float:
    """`python -m slime_rl ARGS` with its output in `log`; wall seconds; SystemExit with the log's tail on failure."""
    print("$ slime-rl " + " ".join(args), flush=True)
    t0 = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.call([sys.executable, "-m", "slime_rl", *args], stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
    if rc != 0:
        raise SystemExit(f"failed (exit {rc}):\n" + log.read_text()[-3000:])
    return time.perf_counter() - t0


def _plot(records: list[dict], png: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, key, title in zip(axes, ("mean_reward", "resolution_rate", "tool_call_accuracy"),
                              ("mean episode reward", "resolution rate", "tool-call accuracy")):
        roll = [(r["step"], r[f"rollout/{key}"]) for r in records if f"rollout/{key}" in r]
        val = [(r["step"], r[f"val/{key}"]) for r in records if f"val/{key}" in r]
        if roll:
            ax.plot(*zip(*roll), lw=0.8, alpha=0.6, label="rollout")
        if val:
            ax.plot(*zip(*val), "o-", label="held-out")
        ax.set_title(title)
        ax.set_xlabel("RL step (0 = after SFT)")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    print(f"plot: {png}")


if __name__ == "__main__":
    sys.exit(main())
