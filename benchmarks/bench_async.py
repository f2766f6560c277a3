"""Async RL on a long-tail workload: trained samples/s and time to an accuracy, sync vs one-step-off vs fully async.

    python benchmarks/bench_async.py                               # ~15 min on 2 CPUs: SFT once, then 4 modes
    python benchmarks/bench_async.py --steps 90 --repeats 2        # longer; every mode twice, in ABBA order
    python benchmarks/bench_async.py --modes sync fully_async_s2 --sft-checkpoint DIR   # DIR outside --work
    python benchmarks/bench_async.py --lr 2e-4 --steps 30          # the higher learning rate (see README)

Workload. Copy a 4-digit number: "6311=" -> `\\boxed{6311}` (`--task reverse`: `\\boxed{1136}`), followed by a
countdown filler ("c....b....a....") whose length is heavy-tailed over prompts: Pareto(xm 8, alpha 1.2)
quantiles by the answer's first digit (1 to 22 blocks of 5 characters), clipped to `--max-new-tokens`. The
reward (`countdown_reward`) needs the right answer AND the exact filler, so RL cannot cut the tail. A short
SFT (tiny Llama, char tokenizer) teaches the format; sampled at temperature 1 the model then generates the
heavy-tailed lengths itself (reported per mode: p50/p90/max of the trained responses, from the recorded
rollouts) and GRPO raises its accuracy. Two designs that did not work on this 0.4M-parameter model: the filler
*before* the answer (the model could not find the operands again), and a Pareto length drawn per sample
(RL cut the tail within 7 steps); tying the length to the answer's first digit keeps the tail under RL.

Runs. One `sft` writes an HF checkpoint; every mode then runs `python -m slime_rl train --sft.enabled false
--model.path CKPT` from it with the same seed, prompts, steps and sampling seeds, each in a child process
(`--child`: sets `--threads` torch threads in the driver, and reports `--threads` CPUs to the Megatron backend,
which gives its rank os.cpu_count() // ranks threads). Driver = the embedded engine + RL loop; trainer = one
spawned Megatron TP1 rank (CPU, fp32); default 1 thread each, i.e. one core each on a 2-core machine: sync
leaves one of them idle while the other works, which is what async RL is meant to recover.

- sync:            wave s generated with the weights of step s, then trained
- one_step_off:    a producer one step ahead; a weight push waits for in-flight groups
- fully_async_s1:  the push interrupts generation, samples resume under the new weights (partial rollouts)
- fully_async_s2:  the same, up to two versions stale

Measured per mode, from its records (the child stamps every metrics record with the wall clock). The
headline is samples/s over the WALL CLOCK from RL start to the last step, validation included: every mode runs
the same validations, and in the async modes the producer keeps generating during them, so leaving them out
would credit async with work done in time that sync spends only on validation. The RL-only figure (sum of the
loop's `time/step_s`) is printed beside it as an upper bound. tokens/s = trained response tokens / RL seconds
(samples differ in length between modes); the wall seconds to the first validation at or above a threshold
(the sync run's accuracy at the eval nearest 2/3 of its steps, unless `--threshold`); the final accuracy of the
mode's last checkpoint on a separate held-out set (`slime_rl eval`, sampled, same seeds for every mode);
max staleness, resumed samples, CPU seconds and the load average around each run. Ratios are against the
sync run of the same round. Results: `--out` (JSON), `--png` (reward, val accuracy and mean response length
vs wall seconds).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODES = {  # name: CLI flags
    "sync": ["--async", "sync"],
    "one_step_off": ["--async", "one_step_off", "--async_rl.max_staleness", "1"],
    "fully_async_s1": ["--async", "fully_async", "--async_rl.max_staleness", "1", "--async_rl.partial_rollout", "true"],
    "fully_async_s2": ["--async", "fully_async", "--async_rl.max_staleness", "2", "--async_rl.partial_rollout", "true"],
}
STAMP = "bench/t"  # perf_counter seconds, stamped by the child on every record


# --------------------------------------------------------------------------- the child: one `slime_rl` command
def child_main(threads: int, cli_args: list[str]) -> int:
    """`python -m slime_rl ...` with `threads` torch threads in this process and in the trainer rank it spawns,
    each metrics record stamped with the wall clock (`bench/t`)."""
    os.environ["OMP_NUM_THREADS"] = str(threads)
    os.cpu_count = lambda: threads  # the Megatron backend gives each rank os.cpu_count() // ranks threads
    import torch

    torch.set_num_threads(threads)
    from slime_rl import metrics

    log = metrics.MetricsLogger.log

    def stamped(self, record):
        return log(self, {**record, STAMP: time.perf_counter()})

    metrics.MetricsLogger.log = stamped
    from slime_rl.cli import main

    return main(cli_args)


# --------------------------------------------------------------------------- the workload
BLOCK = 5  # filler block: a countdown letter + 4 dots


def filler_table(xm: float, alpha: float, cap: int) -> list[int]:
    """Filler blocks per leading answer digit 0-9: the Pareto(xm, alpha) quantiles at 5%, 15%, ..., 95%, in
    blocks of BLOCK characters (at least 1, at most 26 and cap // BLOCK)."""
    return [max(1, min(26, cap // BLOCK, round(xm * (1.0 - (d + 0.5) / 10) ** (-1.0 / alpha) / BLOCK)))
            for d in range(10)]


def filler(blocks: int) -> str:
    """A countdown, e.g. 3 blocks: "c....b....a....": every stop decision is determined by the text so far."""
    return "".join(chr(ord("a") + m) + "." * (BLOCK - 1) for m in reversed(range(blocks)))


def make_task(out: Path, args) -> dict:
    """Reverse a 4-digit number: "6311=" -> `\\boxed{1136}`, then a countdown filler whose length is
    heavy-tailed over prompts (set by the answer's first digit). Disjoint splits: SFT, RL prompts, a validation
    set for the curve and a larger held-out set for the final accuracy."""
    from slime_rl.data import write_jsonl

    rng = random.Random(args.seed)
    sizes = {"sft": args.num_sft, "val_curve": args.num_val, "val_final": args.final_val, "train": args.num_train}
    numbers = rng.sample(range(10_000), sum(sizes.values()))
    table = filler_table(args.filler_xm, args.filler_alpha, args.max_new_tokens - len("\\boxed{0000}") - 1)
    paths, lengths, i = {}, [], 0
    for split, n in sizes.items():
        rows = []
        for x in numbers[i:i + n]:
            answer = f"{x:04d}"[::-1] if args.task == "reverse" else f"{x:04d}"
            row = {"prompt": f"{x:04d}=", "label": str(int(answer)), "filler": filler(table[int(answer[0])])}
            if split == "sft":
                row["response"] = "\\boxed{" + answer + "}" + row["filler"]
                lengths.append(len(row["response"]) + 1)  # + EOS
            rows.append(row)
        i += n
        paths[split] = str(write_jsonl(out / f"{split}.jsonl", rows))
    return {"sft": paths["sft"], "train": paths["train"], "val": paths["val_curve"], "final_val": paths["val_final"],
            "sft_lengths": lengths, "filler_table": table}


def countdown_reward(sample) -> dict[str, float]:
    """The `math` reward's answer check, and the countdown filler must follow the answer exactly (the filler is
    in each prompt's metadata): a reward that ignores the tail leaves it to drift under RL (it did: p50 28 -> 68
    tokens and p90 -> 128 within 30 steps), so the length profile would not stay the workload's."""
    from slime_rl.rewards.math import math_reward

    out = math_reward(sample)
    text = sample.response_text
    close = text.find("}")
    filler_ok = close >= 0 and text[close + 1:] == sample.metadata["filler"]
    correct = out["answer_correct"] * float(filler_ok)
    return {"reward": correct, "answer_correct": correct, "format_correct": float(filler_ok),
            "answer_only_correct": out["answer_correct"]}


def percentiles(xs: list[int]) -> dict[str, float]:
    s = sorted(xs)
    if not s:
        return {}
    q = lambda p: s[min(len(s) - 1, int(p * len(s)))]  # noqa: E731
    return {"n": len(s), "mean": sum(s) / len(s), "p50": q(0.5), "p90": q(0.9), "p99": q(0.99), "max": s[-1],
            "frac_ge_64": sum(x >= 64 for x in s) / len(s)}


# --------------------------------------------------------------------------- running the commands
def run_child(args, cli: list[str], log_path: Path) -> dict:
    """Run one `slime_rl` command in a child process; its wall seconds, CPU seconds (the child and the trainer
    rank it spawns) and the load average around it."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(args.threads), "--", *cli]
    t0, c0, load0 = time.perf_counter(), os.times(), os.getloadavg()[0]
    with log_path.open("w") as f:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"}, timeout=args.child_timeout)
    c1 = os.times()
    if proc.returncode != 0:
        tail = "".join(log_path.read_text().splitlines(keepends=True)[-30:])
        raise SystemExit(f"command failed (rc {proc.returncode}): {' '.join(cmd)}\n--- {log_path} ---\n{tail}")
    return {"process_s": time.perf_counter() - t0,
            "cpu_s": c1.children_user + c1.children_system - c0.children_user - c0.children_system,
            "load1_before": load0, "load1_after": os.getloadavg()[0]}


def common_flags(args, task: dict) -> list[str]:
    return ["-b", "megatron", "--tp", "1", "--seed", str(args.seed), "--train.seed", str(args.seed),
            "--data.train_path", task["train"], "--data.val_path", task["val"], "--data.sft_path", task["sft"],
            "--rollout.max_new_tokens", str(args.max_new_tokens), "--rollout.prompts_per_step", str(args.prompts),
            "--rollout.n_samples_per_prompt", str(args.samples), "--rollout.seed", str(args.seed),
            "--model.hidden_size", str(args.hidden), "--model.num_layers", str(args.layers),
            "--model.max_position_embeddings", str(args.max_new_tokens + 32),
            "--data.metadata_keys", "filler", "--reward.name", "bench_async:countdown_reward",
            "--eval.greedy", "false", "--eval.n_samples", str(args.eval_samples), "--eval.temperature", "1.0",
            "--log.progress", "false", "--log.plot", "false", "--ckpt.save_every", "0"]


def sft(args, task: dict, work: Path) -> dict:
    out = work / "sft"
    proc = run_child(args, ["sft", *common_flags(args, task), "--sft.epochs", str(args.sft_epochs),
                            "--sft.lr", str(args.sft_lr), "--log.output_dir", str(out)], work / "sft.log")
    return {"seconds": proc["process_s"], "checkpoint": str(out / "checkpoint")}


def rl(args, task: dict, ckpt: str, mode: str, out: Path, log: Path) -> dict:
    return run_child(args, ["train", *common_flags(args, task), *MODES[mode], "--sft.enabled", "false",
                            "--model.path", ckpt, "--model.tokenizer", ckpt, "--train.num_steps", str(args.steps),
                            "--train.lr", str(args.lr), "--train.warmup_steps", str(args.warmup),
                            "--eval.every_n_steps", str(args.eval_every), "--log.output_dir", str(out),
                            "--log.save_checkpoint", "true", "--debug.save_rollouts", str(out / "rollouts"), *args.extra], log)


def final_eval(args, task: dict, ckpt: str, out: Path) -> float:
    run_child(args, ["eval", *common_flags(args, task), "-b", "hf", "--data.val_path", task["final_val"],
                     "--eval.n_samples", str(args.final_samples),
                     "--model.path", ckpt, "--model.tokenizer", ckpt, "--log.output_dir", str(out)],
              out.with_suffix(".log"))
    rec = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    return rec["val/accuracy"]


# --------------------------------------------------------------------------- reading a run
def read_run(out: Path) -> dict:
    from slime_rl.producer import load_groups

    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    start = next(r for r in recs if r.get("step") == 0 and STAMP in r)
    steps = [r for r in recs if "time/step_s" in r]
    t_step, t_wall = 0.0, []
    for r in steps:
        t_step += r["time/step_s"]
        t_wall.append((r["step"], t_step, r[STAMP] - start[STAMP]))
    ledger = [json.loads(line) for line in (out / "trained_groups.jsonl").read_text().splitlines()]
    samples = sum(g["n"] for rec in ledger for g in rec["groups"])
    lengths = []
    for path in sorted((out / "rollouts").glob("step_*.pt")):
        lengths += [len(s.response_ids) for g in load_groups(path) for s in g]
    return {
        "records": steps, "step0_accuracy": start.get("val/accuracy"),
        "steps": len(steps), "samples": samples, "rl_s": t_step, "wall_incl_eval_s": t_wall[-1][2],
        "time_at_step": {s: (a, b) for s, a, b in t_wall},
        "curve": [(r["step"], r["val/accuracy"]) for r in steps if "val/accuracy" in r],
        "lengths": percentiles(lengths), "tokens": sum(lengths),
        "truncated_frac": statistics.fmean(r.get("rollout/truncated_frac", 0.0) for r in steps),
        "max_staleness": max(r.get("rollout/max_staleness", 0) for r in steps),
        "resumed_samples": steps[-1].get("rollout/resumed_samples", 0),
        "regenerated_groups": steps[-1].get("rollout/regenerated_groups", 0),
        "rollout_wait_s": sum(r.get("time/rollout_s", 0.0) for r in steps),
    }


def time_to(run: dict, threshold: float) -> tuple[float | None, float | None, int | None]:
    """(RL seconds, wall seconds incl. eval, step) at the first evaluation with accuracy >= threshold."""
    for step, acc in run["curve"]:
        if acc >= threshold - 1e-9:
            a, b = run["time_at_step"][step]
            return a, b, step
    return None, None, None


# --------------------------------------------------------------------------- the benchmark
def machine() -> dict:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                   if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "python": platform.python_version(),
            "platform": platform.platform(), "torch": torch.__version__,
            "loadavg_start": os.getloadavg()}


def run_bench(args) -> None:
    work = Path(args.work)
    if args.sft_checkpoint and Path(args.sft_checkpoint).resolve().is_relative_to(work.resolve()):
        raise SystemExit(f"--sft-checkpoint {args.sft_checkpoint} lies under --work {work}, which is wiped first")
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    t_start = time.perf_counter()
    env = machine()
    print(f"machine: {env['cpu']}, {env['cpu_count']} CPUs, torch {env['torch']}, load {env['loadavg_start']}")
    print(f"processes: driver (embedded engine + loop) and 1 Megatron TP1 trainer rank, {args.threads} torch "
          f"thread(s) each")
    task = make_task(work / "data", args)
    sft_len = {**percentiles(task.pop("sft_lengths")), "filler_table": task.pop("filler_table")}
    print(f"task: {args.num_sft} SFT / {args.num_train} RL / {args.num_val} val (curve) / {args.final_val} val "
          f"(final); SFT response lengths p50 {sft_len['p50']} p90 {sft_len['p90']} max {sft_len['max']}")
    if args.sft_checkpoint:
        sft_res = {"checkpoint": args.sft_checkpoint, "seconds": 0.0}
    else:
        sft_res = sft(args, task, work)
    sft_final = final_eval(args, task, sft_res["checkpoint"], work / "final_eval_sft")
    print(f"SFT: {sft_res['seconds']:.0f}s; final-eval accuracy after SFT {sft_final:.3f}", flush=True)
    order = []
    for r in range(args.repeats):  # repeats in ABBA order, so drifts in the machine's load even out
        order += [(m, r) for m in (args.modes if r % 2 == 0 else list(reversed(args.modes)))]
    runs: dict[str, list[dict]] = {m: [] for m in args.modes}
    for mode, rep in order:
        out = work / f"{mode}_{rep}"
        proc = rl(args, task, sft_res["checkpoint"], mode, out, work / f"{mode}_{rep}.log")
        res = {**read_run(out), **proc, "rep": rep}
        res["cores_used"] = proc["cpu_s"] / proc["process_s"]
        res["final_accuracy"] = final_eval(args, task, str(out / "checkpoint"), work / f"final_eval_{mode}_{rep}")
        runs[mode].append(res)
        L = res["lengths"]
        print(f"  {mode:15s} #{rep}: {res['steps']} steps, {res['samples'] / res['rl_s']:.2f} samples/s "
              f"(RL {res['rl_s']:.0f}s, wall incl. eval {res['wall_incl_eval_s']:.0f}s; process {proc['process_s']:.0f}s "
              f"using {res['cores_used']:.2f} cores, load {proc['load1_before']:.1f}->{proc['load1_after']:.1f}), "
              f"final accuracy {res['final_accuracy']:.3f}, lengths p50/p90/max {L['p50']}/{L['p90']}/{L['max']}",
              flush=True)
    report(args, env, sft_res, sft_final, sft_len, runs, time.perf_counter() - t_start)


def pick_threshold(sync_run: dict, steps: int) -> float:
    """The sync run's validation accuracy at the evaluation nearest 2/3 of its steps."""
    return min(sync_run["curve"], key=lambda sa: abs(sa[0] - 2 * steps / 3))[1]


def fmt_time(t: float | None, step: int | None) -> str:
    return f"{t:.0f}s (step {step})" if t is not None else "not reached"


def report(args, env, sft_res, sft_final, sft_len, runs, total_s) -> None:
    base = "sync" if "sync" in runs else next(iter(runs))
    threshold = args.threshold if args.threshold is not None else pick_threshold(runs[base][0], args.steps)
    rows = []
    for mode, reps in runs.items():
        for r in reps:
            ref = runs[base][min(r["rep"], len(runs[base]) - 1)]  # the sync run of the same round
            t_rl, t_wall, t_step = time_to(r, threshold)
            rows.append({
                "mode": mode, "rep": r["rep"], "steps": r["steps"], "samples": r["samples"],
                "samples_per_s": r["samples"] / r["rl_s"], "ratio_vs_sync": ref["rl_s"] / r["rl_s"] * r["samples"] / ref["samples"],
                "samples_per_s_wall_incl_eval": r["samples"] / r["wall_incl_eval_s"],
                "response_tokens": r["tokens"], "tokens_per_s": r["tokens"] / r["rl_s"],
                "tokens_ratio_vs_sync": r["tokens"] / r["rl_s"] / (ref["tokens"] / ref["rl_s"]),
                "ratio_vs_sync_wall_incl_eval": ref["wall_incl_eval_s"] / r["wall_incl_eval_s"] * r["samples"] / ref["samples"],
                "rl_s": r["rl_s"], "wall_incl_eval_s": r["wall_incl_eval_s"], "rollout_wait_s": r["rollout_wait_s"],
                "time_to_threshold_s": t_rl, "wall_to_threshold_s": t_wall, "step_to_threshold": t_step,
                "final_accuracy": r["final_accuracy"], "accuracy_delta_vs_sync": r["final_accuracy"] - ref["final_accuracy"],
                "curve": r["curve"], "step0_accuracy": r["step0_accuracy"],
                "max_staleness": r["max_staleness"], "resumed_samples": r["resumed_samples"],
                "regenerated_groups": r["regenerated_groups"], "lengths": r["lengths"],
                "truncated_frac": r["truncated_frac"], "process_s": r["process_s"], "cpu_s": r["cpu_s"],
                "cores_used": r["cores_used"], "load1_before": r["load1_before"], "load1_after": r["load1_after"]})
    print(f"\nthreshold: validation accuracy >= {threshold:.3f} "
          f"({'given' if args.threshold is not None else 'the sync run at the eval nearest 2/3 of its steps'}; "
          f"{args.num_val} prompts x {args.eval_samples} samples at temperature 1, every {args.eval_every} steps)")
    print(f"final accuracy: {args.final_val} held-out prompts x {args.final_samples} samples at temperature 1 "
          f"(after SFT: {sft_final:.3f})")
    print("samples/s = trained samples / wall seconds from RL start to the last step, validation included (the "
          "headline); 'RL only': / the sum of time/step_s, validation excluded (an upper bound for the async modes, "
          "whose producer works during validation); tokens/s: trained response tokens / RL seconds\n")
    hdr = ("mode", "steps", "samples/s", "x sync", "x sync (RL only)", "tokens/s x sync", "wall time to threshold",
           "final acc", "vs sync", "staleness max", "resumed samples", "length p50/p90/max")
    print("| " + " | ".join(hdr) + " |")
    print("|" + "---|" * len(hdr))
    for x in rows:
        L = x["lengths"]
        name = x["mode"] + (f" #{x['rep']}" if args.repeats > 1 else "")
        print(f"| {name} | {x['steps']} | {x['samples_per_s_wall_incl_eval']:.1f} | "
              f"{x['ratio_vs_sync_wall_incl_eval']:.2f} | {x['ratio_vs_sync']:.2f} | {x['tokens_ratio_vs_sync']:.2f} | "
              f"{fmt_time(x['wall_to_threshold_s'], x['step_to_threshold'])} | "
              f"{x['final_accuracy']:.3f} | {x['accuracy_delta_vs_sync'] * 100:+.1f} pts | {x['max_staleness']} | "
              f"{int(x['resumed_samples'])} | {L['p50']}/{L['p90']}/{L['max']} |")
    verdict = target_verdict(rows, args.repeats)
    print("\n" + verdict["text"])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {"benchmark": "async", "machine": env, "args": vars(args),
              "processes": f"driver (embedded engine, RL loop) + 1 Megatron TP1 trainer rank, {args.threads} torch "
                           f"thread(s) each, on {env['cpu_count']} CPUs",
              "threshold": threshold,
              "sft": {**sft_res, "final_accuracy": sft_final, "sft_response_lengths": sft_len},
              "results": rows, "target": verdict, "total_s": total_s, "loadavg_end": os.getloadavg()}
    out.write_text(json.dumps(result, indent=2))
    plot(runs, threshold, args.png, env, args)
    print(f"wrote {out} and {args.png} ({total_s:.0f}s in all)")


def target_verdict(rows: list[dict], repeats: int) -> dict:
    """Issue target: fully async >= 1.5x sync's throughput (wall clock, validation included) at the same final
    accuracy +- 3 points (medians over repeats)."""
    out = {"rule": "fully_async samples/s (wall clock incl. validation) >= 1.5 x sync and |final accuracy - sync| "
                   "<= 3 points", "modes": {}}
    lines = []
    for mode in dict.fromkeys(x["mode"] for x in rows if x["mode"].startswith("fully_async")):
        mine = [x for x in rows if x["mode"] == mode]
        ratio = statistics.median(x["ratio_vs_sync_wall_incl_eval"] for x in mine)
        delta = statistics.median(x["accuracy_delta_vs_sync"] for x in mine)
        met = ratio >= 1.5 and abs(delta) <= 0.03
        out["modes"][mode] = {"ratio": ratio, "accuracy_delta": delta, "met": met,
                              "throughput_met": ratio >= 1.5, "accuracy_met": abs(delta) <= 0.03}
        lines.append(f"{mode}: {ratio:.2f}x sync's samples/s, final accuracy {delta * 100:+.1f} points vs sync"
                     f"{' (medians of ' + str(len(mine)) + ')' if len(mine) > 1 else ''} -> "
                     f"{'MET' if met else 'NOT met'}")
    out["text"] = ("target (fully async >= 1.5x sync's throughput at the same final accuracy +-3 points):\n  "
                   + "\n  ".join(lines))
    return out


def plot(runs: dict, threshold: float, png: str, env: dict, args) -> None:
    """Reward and validation accuracy vs RL seconds for every mode (plus the mean response length)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(17, 4.8), gridspec_kw={"width_ratios": [1, 1, 0.7]})
    colors = dict(zip(runs, ["black", "tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple"]))
    for mode, reps in runs.items():
        for r in reps:
            ls, label = ("-", mode) if r["rep"] == 0 else ("--", None)
            t = [r["time_at_step"][x["step"]][1] for x in r["records"]]
            a1.plot(t, [x["rollout/reward_mean"] for x in r["records"]], ls, color=colors[mode], label=label, lw=1.2)
            a2.plot([0.0] + [r["time_at_step"][s][1] for s, _ in r["curve"]],
                    [r["step0_accuracy"]] + [a for _, a in r["curve"]], ls, marker="o", ms=3, color=colors[mode],
                    label=label)
            a3.plot(t, [x["rollout/response_length"] for x in r["records"]], ls, color=colors[mode], label=label,
                    lw=1.2)
    a2.axhline(threshold, color="gray", lw=0.8, ls=":", label=f"threshold {threshold:.3f}")
    xlabel = "wall seconds from RL start (validation included)"
    a1.set(title="rollout reward (mean of each trained batch)", xlabel=xlabel, ylabel="reward")
    a2.set(title=f"validation accuracy ({args.num_val} prompts x {args.eval_samples}, T=1)", xlabel=xlabel,
           ylabel="accuracy")
    a3.set(title="mean response length of each trained batch", xlabel=xlabel, ylabel="tokens")
    for a in (a1, a2, a3):
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    fig.suptitle(f"async RL, long-tail workload: {args.steps} steps x {args.prompts} prompts x {args.samples} samples; "
                 f"1 engine + 1 Megatron TP1 trainer, {args.threads} thread each, {env['cpu_count']} CPUs "
                 f"({env['cpu']})", fontsize=10)
    fig.tight_layout()
    Path(png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=90)
    plt.close(fig)


# --------------------------------------------------------------------------- main
def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        sys.exit(child_main(int(sys.argv[2]), sys.argv[4:]))
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    p.add_argument("--steps", type=int, default=60, help="RL steps per mode")
    p.add_argument("--prompts", type=int, default=16, help="prompts per step")
    p.add_argument("--samples", type=int, default=8, help="samples per prompt")
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--repeats", type=int, default=1, help="run every mode this many times (ABBA order)")
    p.add_argument("--threshold", type=float, default=None, help="val accuracy; default from the sync curve")
    p.add_argument("--task", choices=["copy", "reverse"], default="copy", help="what the answer does to the prompt")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--filler-xm", type=float, default=8.0, help="Pareto scale of the SFT filler lengths")
    p.add_argument("--filler-alpha", type=float, default=1.2, help="Pareto shape (smaller = heavier tail)")
    p.add_argument("--eval-samples", type=int, default=2, help="samples per validation prompt (temperature 1)")
    p.add_argument("--final-samples", type=int, default=2, help="samples per prompt of the final evaluation")
    p.add_argument("--num-sft", type=int, default=600)
    p.add_argument("--num-train", type=int, default=2000)
    p.add_argument("--num-val", type=int, default=128, help="validation prompts for the curve")
    p.add_argument("--final-val", type=int, default=400, help="held-out prompts for the final accuracy")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--sft-epochs", type=int, default=10)
    p.add_argument("--sft-lr", type=float, default=1e-3)
    p.add_argument("--lr", type=float, default=5e-5, help="RL learning rate (2e-4 and 1e-4: the async modes lose accuracy, see the README)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch threads of the driver and of the trainer rank")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--extra", nargs="*", action="extend", default=[], help="more `slime_rl train` flags for every RL run, e.g. "
                   "--extra=--algorithm.off_policy=tis; repeat it for several")
    p.add_argument("--sft-checkpoint", default=None, help="reuse an SFT checkpoint (skip SFT)")
    p.add_argument("--work", default="runs/bench/async")
    p.add_argument("--child-timeout", type=int, default=3600)
    p.add_argument("--out", default="benchmarks/results/async.json")
    p.add_argument("--png", default="benchmarks/results/async_reward_vs_time.png")
    args = p.parse_args()
    run_bench(args)


if __name__ == "__main__":
    main()
