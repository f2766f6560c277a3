"""Async RL vs sync on the default job: accuracy over seeds, throughput against the ideal-overlap bound.

    python benchmarks/bench_async.py                                  # lr 5e-5, 3 seeds x 5 modes (~60 min, 2 CPUs)
    python benchmarks/bench_async.py --lr 1e-4 --out benchmarks/results/async_lr1e-4.json
    python benchmarks/bench_async.py --reward-delay-s 1.5 --inflight-waves 4 --modes sync fully_async_s4 \\
        --out benchmarks/results/async_waiting.json                   # the waiting workload
    python benchmarks/bench_async.py --sft-checkpoint DIR --seeds 0   # reuse an SFT checkpoint; one seed

Workload (`--task arithmetic`, the default): the default job's synthetic arithmetic task (`37+08=` ->
`\\boxed{045}`, 2,500 RL prompts, 200 validation problems), its 0.4M-parameter Llama and its SFT warm-up
(`slime-rl sft`, run once; validation accuracy ~31% after it). Every run then trains from that checkpoint with
`slime-rl train --sft.enabled false --model.path CKPT`, Megatron TP1 (one trainer rank, CPU, fp32) beside the
embedded engine, `--steps` steps of `--prompts` x `--samples`, one torch thread per process (`--threads`): on
a 2-core machine the engine and the trainer each have a core, so sync leaves one idle while the other works.
`--task copy` / `reverse` is the long-tail workload of earlier rounds (a heavy-tailed countdown after a copied
4-digit number; `--max-new-tokens 128`).

The waiting workload (`--reward-delay-s D`): the same job, but scoring a rollout sample waits D seconds first
(a remote grader's, a sandbox's or a tool's latency: it holds no core), with `--reward.max_workers` =
samples per prompt so a group waits D once. Validation is scored without the wait (it is not part of a
training step). `--inflight-waves K` lets the async producers keep K steps' worth of groups in flight
(`--async_rl.max_inflight_groups`, at most staleness + 1 waves), so that waits overlap each other.

Modes (each with its `max_staleness`):
- sync:            wave s generated with the weights of step s, then trained
- one_step_off:    a producer one step ahead; a weight push waits for in-flight groups (staleness 1)
- fully_async_sK:  the push interrupts generation, samples resume under the new weights (partial rollouts),
                   groups at most K versions old (K = 1, 2, 4)
The async modes use the default correction for async (`--algorithm.off_policy auto` = coupled);
`one_step_off_decoupled` and `fully_async_s2_decoupled` (not run by default) use decoupled PPO instead.

Measured per run, from its records (the child stamps each metrics record with the wall clock and samples the
CPU time of its process tree every 0.1 s):
- final validation accuracy: the job's own validation at the last step (200 problems x 4 samples at
  temperature 1), i.e. at the same number of trained samples for every mode;
- samples/s = trained samples / the sum of the steps' wall seconds (validation excluded: sync idles through
  it while async producers keep working); the wall clock with validation included is reported beside it;
- the steady samples/s: the same over the steps after the first WARMUP_STEPS (2), whose first step holds an
  async pipeline's fill (the first wave's whole latency, 1.5-2 s on the waiting workload) and the first
  steps' warm-up in every mode;
- the phase times of sync: rollout R (generation + reward) and train T (train + weight push) per step, and the
  cores the process tree kept busy in each (c_R, c_T), from the CPU samples, on steps without validation.

The ideal-overlap bound of a mode (its best samples/s over sync's, from sync's measured phases of the same
seed): an async step cannot be shorter than the trainer's T, than the rollout's latency over the waves in
flight R / k (k = 1 for one_step_off, min(--inflight-waves, K + 1) for fully_async_sK), than the engine's own
compute R c_R / max(1, c_R) (one engine process: at most one busy core per thread), nor than all the CPU work
spread over the machine's cores (R c_R + T c_T) / cores. A fully_async_sK producer also may not start wave w
before the weights of step w - K are pushed, which comes after that step's training: the K + 1 steps from then
to the start of step w must hold the wave's latency and a train step, so a step is at least (R + T) / (K + 1)
(its staleness window). So bound = (R + T) / max(T, R / k, (R + T) / (K + 1), R c_R / max(1, c_R),
(R c_R + T c_T) / cores): overlapping two compute phases on 2 cores gains at most 2x and less when either
needs more than one core; overlapping a phase that waits gains as much as the waves in flight and the
staleness window allow.

That bound takes sync's phase times as the speed of each phase while the other runs beside it: it assumes the
machine runs both cores at full speed at once. A VM may not (measured here: a 1-thread matmul on each of the two
vCPUs at once ran one of them at 0.6x of its speed alone at times, with no process of ours running, and as fast
at others). So each run also reports its trainer's speed: the seconds the trainer rank spent in its train step,
measured inside the rank (`time/rank_s`; the rank is alone on its pinned core), over sync's of the same seed,
and the bound at that speed: the same formula with T longer (or shorter) by the difference of the rank's
seconds. Its fraction isolates what the async machinery loses (waiting, pushes, the driver's share) from what
the machine's speed gave or took. `--rereport FILE` recomputes the ratios, bounds and table of a results file
from the runs' measured rows, without running anything.

The bound is a steady-state one (sync's median phases, warm-up steps left out), so the fraction of it reached
compares it with the steady ratio to sync; the ratio over all steps is reported beside it (on a 60-step run
of the waiting workload the fill is 7% of a fully_async_s4 run's seconds).

Reported per mode: medians over seeds with min-max of final accuracy, its difference to sync (same seed),
samples/s, the ratio to sync (same seed), the bound and the fraction of it reached; max staleness. Runs go
seed by seed, the mode order reversed every other seed (ABBA), so drifts in the machine's load even out.
Results: `--out` (JSON, with "seeds" and every mode's "max_staleness") and `--png` (validation accuracy vs
wall seconds per mode, median line with the min-max band over seeds; mean reward per step beside it).
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
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

STALENESS = {"sync": 0, "one_step_off": 1, "fully_async_s1": 1, "fully_async_s2": 2, "fully_async_s4": 4}
DEFAULT_MODES = list(STALENESS)
for _mode in ("one_step_off", "fully_async_s2"):  # the same, corrected with decoupled PPO instead of coupled
    STALENESS[_mode + "_decoupled"] = STALENESS[_mode]
STAMP = "bench/t"  # perf_counter seconds, stamped by the child on every record
CPU_TRACE = "cpu_trace.json"  # the child's samples of its process tree's CPU seconds, in the run's directory
DELAY_ENV = "BENCH_REWARD_DELAY_S"


def mode_flags(mode: str, prompts: int, inflight_waves: int) -> list[str]:
    """`slime-rl train` flags of a mode (see the module docstring)."""
    k = STALENESS[mode]
    correction = ["--algorithm.off_policy", "decoupled"] if mode.endswith("_decoupled") else []
    if mode == "sync":
        return ["--async", "sync"]
    if mode.startswith("one_step_off"):
        return ["--async", "one_step_off", "--async_rl.max_staleness", "1", *correction]
    return ["--async", "fully_async", "--async_rl.max_staleness", str(k), "--async_rl.partial_rollout", "true",
            "--async_rl.max_inflight_groups", str(prompts * waves_in_flight(mode, inflight_waves)), *correction]


def waves_in_flight(mode: str, inflight_waves: int) -> int:
    """Steps' worth of groups a mode's producer may have in flight at once."""
    return min(inflight_waves, STALENESS[mode] + 1) if mode.startswith("fully_async") else 1


# --------------------------------------------------------------------------- the child: one `slime_rl` command
def child_main(threads: int, cli_args: list[str]) -> int:
    """`python -m slime_rl ...` with `threads` torch threads in this process and in the trainer rank it spawns,
    each metrics record stamped with the wall clock (`bench/t`), the CPU seconds of the process tree sampled
    every 0.1 s into <log.output_dir>/cpu_trace.json."""
    os.environ["OMP_NUM_THREADS"] = str(threads)  # the job sets them again from --rollout/--train.num_threads
    import psutil
    import torch

    torch.set_num_threads(threads)
    from slime_rl import metrics

    log = metrics.MetricsLogger.log

    def stamped(self, record):
        return log(self, {**record, STAMP: time.perf_counter()})

    metrics.MetricsLogger.log = stamped
    trace, stop = [], threading.Event()

    def sample() -> None:
        me = psutil.Process()
        while not stop.wait(0.1):
            total = 0.0
            for proc in [me, *me.children(recursive=True)]:
                try:
                    t = proc.cpu_times()
                    total += t.user + t.system
                except psutil.Error:
                    pass  # gone between listing and reading
            trace.append((time.perf_counter(), total))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    from slime_rl.cli import main

    try:
        return main(cli_args)
    finally:
        stop.set()
        sampler.join()
        out = cli_args[cli_args.index("--log.output_dir") + 1] if "--log.output_dir" in cli_args else None
        if out:
            Path(out, CPU_TRACE).write_text(json.dumps(trace))


def delayed_reward(sample) -> dict[str, float]:
    """The default task's reward (math), after waiting $BENCH_REWARD_DELAY_S seconds for a training rollout's
    sample (it has a group uid); validation samples are scored at once."""
    from slime_rl.rewards.math import math_reward

    if "uid" in sample.metadata:
        time.sleep(float(os.environ.get(DELAY_ENV, "0")))
    return math_reward(sample)


# --------------------------------------------------------------------------- the long-tail workload (copy/reverse)
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
    """Copy (or reverse) a 4-digit number: "6311=" -> `\\boxed{6311}`, then a countdown filler whose length is
    heavy-tailed over prompts (set by the answer's first digit). Disjoint splits: SFT, RL prompts, the
    validation set, and a larger held-out set (written, kept so the other splits draw the numbers they drew
    in earlier rounds)."""
    from slime_rl.data import write_jsonl

    rng = random.Random(args.seed)
    sizes = {"sft": args.num_sft, "val_curve": args.num_val, "val_final": args.final_val, "train": args.num_train}
    numbers = rng.sample(range(10_000), sum(sizes.values()))
    table = filler_table(args.filler_xm, args.filler_alpha, args.max_new_tokens - len("\\boxed{0000}") - 1)
    paths, i = {}, 0
    for split, n in sizes.items():
        rows = []
        for x in numbers[i:i + n]:
            answer = f"{x:04d}"[::-1] if args.task == "reverse" else f"{x:04d}"
            row = {"prompt": f"{x:04d}=", "label": str(int(answer)), "filler": filler(table[int(answer[0])])}
            if split == "sft":
                row["response"] = "\\boxed{" + answer + "}" + row["filler"]
            rows.append(row)
        i += n
        paths[split] = str(write_jsonl(out / f"{split}.jsonl", rows))
    return {"sft": paths["sft"], "train": paths["train"], "val": paths["val_curve"]}


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
    return {"n": len(s), "mean": sum(s) / len(s), "p50": q(0.5), "p90": q(0.9), "max": s[-1]}


# --------------------------------------------------------------------------- running the commands
def run_child(args, cli: list[str], log_path: Path, env: dict | None = None) -> dict:
    """Run one `slime_rl` command in a child process; its wall seconds, CPU seconds and the load around it."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(args.threads), "--", *cli]
    t0, c0, load0 = time.perf_counter(), os.times(), os.getloadavg()[0]
    with log_path.open("w") as f:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, timeout=args.child_timeout,
                              env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    c1 = os.times()
    if proc.returncode != 0:
        tail = "".join(log_path.read_text().splitlines(keepends=True)[-30:])
        raise SystemExit(f"command failed (rc {proc.returncode}): {' '.join(cmd)}\n--- {log_path} ---\n{tail}")
    return {"process_s": time.perf_counter() - t0,
            "cpu_s": c1.children_user + c1.children_system - c0.children_user - c0.children_system,
            "load1_before": load0, "load1_after": os.getloadavg()[0]}


def common_flags(args, task: dict) -> list[str]:
    flags = ["-b", "megatron", "--tp", "1", "--rollout.prompts_per_step", str(args.prompts),
             "--rollout.n_samples_per_prompt", str(args.samples), "--eval.n_samples", str(args.eval_samples),
             "--eval.greedy", "false", "--eval.temperature", "1.0", "--log.progress", "false", "--log.plot", "false",
             "--ckpt.save_every", "0", "--rollout.num_threads", str(args.threads),
             "--train.num_threads", str(args.threads)]
    if args.task != "arithmetic":
        flags += ["--data.train_path", task["train"], "--data.val_path", task["val"], "--data.sft_path", task["sft"],
                  "--rollout.max_new_tokens", str(args.max_new_tokens),
                  "--model.hidden_size", str(args.hidden), "--model.num_layers", str(args.layers),
                  "--model.max_position_embeddings", str(args.max_new_tokens + 32),
                  "--data.metadata_keys", "filler", "--reward.name", "bench_async:countdown_reward"]
    elif args.reward_delay_s:
        flags += ["--reward.name", "bench_async:delayed_reward", "--reward.max_workers", str(args.samples),
                  "--reward.timeout_s", str(max(10.0, 4 * args.reward_delay_s))]
    return flags


def sft(args, task: dict, work: Path) -> str:
    out = work / "sft"
    flags = [] if args.task == "arithmetic" else ["--sft.epochs", str(args.sft_epochs), "--sft.lr", str(args.sft_lr)]
    proc = run_child(args, ["sft", *common_flags(args, task), *flags, "--log.output_dir", str(out)],
                     work / "sft.log")
    print(f"SFT: {proc['process_s']:.0f}s -> {out / 'checkpoint'}", flush=True)
    return str(out / "checkpoint")


def rl(args, task: dict, ckpt: str, mode: str, seed: int, out: Path, log: Path) -> dict:
    flags = ["train", *common_flags(args, task), *mode_flags(mode, args.prompts, args.inflight_waves),
             "--seed", str(seed), "--train.seed", str(seed), "--rollout.seed", str(seed),
             "--sft.enabled", "false", "--model.path", ckpt, "--model.tokenizer", ckpt,
             "--train.num_steps", str(args.steps), "--train.lr", str(args.lr), "--eval.every_n_steps",
             str(args.eval_every), "--log.output_dir", str(out),
             *args.extra]
    return run_child(args, flags, log, env={DELAY_ENV: str(args.reward_delay_s)})


# --------------------------------------------------------------------------- reading a run
def cores_between(trace: list, t0: float, t1: float) -> float | None:
    """Mean busy cores of the process tree between t0 and t1 (perf_counter), from the CPU samples."""
    inside = [(t, c) for t, c in trace if t0 <= t <= t1]
    if len(inside) < 2 or inside[-1][0] - inside[0][0] <= 0:
        return None
    return (inside[-1][1] - inside[0][1]) / (inside[-1][0] - inside[0][0])


WARMUP_STEPS = 2  # left out of the phases and of the steady samples/s: warm-up, and an async pipeline's fill


def read_run(out: Path) -> dict:
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    start = next(r for r in recs if r.get("step") == 0 and STAMP in r)
    steps = [r for r in recs if "time/step_s" in r]
    trace = json.loads((out / CPU_TRACE).read_text())
    ledger = [json.loads(line) for line in (out / "trained_groups.jsonl").read_text().splitlines()]
    lengths = [n for rec in ledger for g in rec["groups"] for n in g["response_lengths"]]
    # phases of the steps without validation: [end - step_s, + rollout_s] rolls out, the rest trains and pushes
    phases = {"rollout_s": [], "train_s": [], "rollout_cores": [], "train_cores": [], "rank_s": []}
    for r in steps:
        if "val/accuracy" in r or r["step"] <= WARMUP_STEPS:
            continue
        t_end = r[STAMP]
        t_start = t_end - r["time/step_s"]
        t_mid = t_start + r["time/rollout_s"]
        phases["rollout_s"].append(r["time/rollout_s"])
        phases["train_s"].append(r["time/step_s"] - r["time/rollout_s"])
        if "time/rank_s" in r:
            phases["rank_s"].append(r["time/rank_s"])
        for key, (a, b) in (("rollout_cores", (t_start, t_mid)), ("train_cores", (t_mid, t_end))):
            if (c := cores_between(trace, a, b)) is not None:
                phases[key].append(c)
    return {
        "records": steps, "step0_accuracy": start.get("val/accuracy"), "steps": len(steps),
        "samples": sum(g["n"] for rec in ledger for g in rec["groups"]),
        "rl_s": sum(r["time/step_s"] for r in steps), "wall_incl_eval_s": steps[-1][STAMP] - start[STAMP],
        "steady_samples": sum(g["n"] for rec in ledger if rec["step"] > WARMUP_STEPS for g in rec["groups"]),
        "steady_s": sum(r["time/step_s"] for r in steps if r["step"] > WARMUP_STEPS),
        "first_step_s": steps[0]["time/step_s"],
        "curve": [(0, 0.0, start.get("val/accuracy"))]
                 + [(r["step"], r[STAMP] - start[STAMP], r["val/accuracy"]) for r in steps if "val/accuracy" in r],
        "final_accuracy": steps[-1]["val/accuracy"],
        "lengths": percentiles(lengths),
        "max_staleness": max(r.get("rollout/max_staleness", 0) for r in steps),
        "resumed_samples": steps[-1].get("rollout/resumed_samples", 0),
        "regenerated_groups": steps[-1].get("rollout/regenerated_groups", 0),
        "phases": {k: statistics.median(v) if v else None for k, v in phases.items()},
    }


def ideal_bound(sync_phases: dict, mode: str, inflight_waves: int, cores: int, extra_train_s: float = 0.0) -> dict:
    """The best samples/s ratio over sync a mode can reach, from sync's phases (module docstring); with
    `extra_train_s`, at a trainer that takes that much longer (negative: shorter) per step than in sync (the
    speed measured in the mode's own run)."""
    R, T = sync_phases["rollout_s"], sync_phases["train_s"]
    T2 = T + extra_train_s
    cR, cT = sync_phases["rollout_cores"], sync_phases["train_cores"]
    k = waves_in_flight(mode, inflight_waves)
    if mode == "sync":
        return {"bound": 1.0, "limit": "sync", "waves_in_flight": 1}
    limits = {"train": T2, "rollout latency / waves in flight": R / k, "engine compute": R * cR / max(1.0, cR),
              f"CPU work / {cores} cores": (R * cR + T2 * cT) / cores}
    if mode.startswith("fully_async"):  # wave w starts once step w - K's weights are pushed, ends by step w
        limits["staleness window"] = (R + T2) / (STALENESS[mode] + 1)
    limit = max(limits, key=limits.get)
    return {"bound": (R + T) / limits[limit], "limit": limit, "waves_in_flight": k,
            "step_s_limits": limits}


# --------------------------------------------------------------------------- the benchmark
def machine() -> dict:
    import torch

    from benchmarks.machine_info import cpu_model

    cpu = cpu_model()
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "python": platform.python_version(),
            "platform": platform.platform(), "torch": torch.__version__, "loadavg_start": os.getloadavg()}


def git_commit() -> str | None:
    """The repository's commit (with "+dirty" when files other than benchmark results differ from it: another
    benchmark's fresh results are not a change of the code), recorded with the results."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":(exclude)benchmarks/results"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+dirty" if dirty else "")


def run_bench(args) -> None:
    work = Path(args.work or f"runs/bench/{Path(args.out).stem}")  # one per result: a second run keeps the first's
    if args.sft_checkpoint and Path(args.sft_checkpoint).resolve().is_relative_to(work.resolve()):
        raise SystemExit(f"--sft-checkpoint {args.sft_checkpoint} lies under --work {work}, which is wiped first")
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    t_start = time.perf_counter()
    env = machine()
    print(f"machine: {env['cpu']}, {env['cpu_count']} CPUs, torch {env['torch']}, load {env['loadavg_start']}")
    print(f"processes: driver (embedded engine + loop) and 1 Megatron TP1 trainer rank, {args.threads} torch "
          f"thread(s) each; task {args.task}, lr {args.lr}, {args.steps} steps x {args.prompts} x {args.samples}, "
          f"seeds {args.seeds}, reward delay {args.reward_delay_s} s, waves in flight <= {args.inflight_waves}")
    task = make_task(work / "data", args) if args.task != "arithmetic" else {}
    ckpt = args.sft_checkpoint or sft(args, task, work)
    rows = []
    for i, seed in enumerate(args.seeds):  # ABBA: the mode order is reversed every other seed
        for mode in (args.modes if i % 2 == 0 else list(reversed(args.modes))):
            out = work / f"{mode}_seed{seed}"
            proc = rl(args, task, ckpt, mode, seed, out, work / f"{mode}_seed{seed}.log")
            res = {**read_run(out), **proc}
            rows.append(measured_row(mode, seed, res))
            ph = res["phases"]
            print(f"  {mode:15s} seed {seed}: {res['samples'] / res['rl_s']:.1f} samples/s (steps {res['rl_s']:.0f}s, "
                  f"wall incl. validation {res['wall_incl_eval_s']:.0f}s, process {proc['process_s']:.0f}s, load "
                  f"{proc['load1_before']:.1f}->{proc['load1_after']:.1f}); val {res['step0_accuracy']:.3f} -> "
                  f"{res['final_accuracy']:.3f}; staleness max {res['max_staleness']}; rollout/train per step "
                  f"{ph['rollout_s']:.2f}/{ph['train_s']:.2f}s", flush=True)
    report(args, env, ckpt, rows, time.perf_counter() - t_start)


def med(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}


def measured_row(mode: str, seed: int, r: dict) -> dict:
    """What one run measured (read_run + run_child), as its row of the results."""
    return {"mode": mode, "seed": seed, "steps": r["steps"], "samples": r["samples"],
            "samples_per_s": r["samples"] / r["rl_s"], "samples_per_s_steady": r["steady_samples"] / r["steady_s"],
            "first_step_s": r["first_step_s"], "samples_per_s_wall_incl_eval": r["samples"] / r["wall_incl_eval_s"],
            "final_accuracy": r["final_accuracy"], "step0_accuracy": r["step0_accuracy"], "curve": r["curve"],
            "reward_curve": [(x["step"], x["rollout/reward_mean"]) for x in r["records"]],
            "rl_s": r["rl_s"], "wall_incl_eval_s": r["wall_incl_eval_s"], "phases": r["phases"],
            "max_staleness": r["max_staleness"], "resumed_samples": r["resumed_samples"],
            "regenerated_groups": r["regenerated_groups"], "lengths": r["lengths"],
            "process_s": r["process_s"], "cpu_s": r["cpu_s"], "load1_before": r["load1_before"],
            "load1_after": r["load1_after"]}


def derived(row: dict, ref: dict, inflight_waves: int, cores: int) -> dict:
    """A run's ratios against sync's run of the same seed (`ref`), its bounds and the fractions reached."""
    mode = row["mode"]
    ratio = row["samples_per_s_steady"] / ref["samples_per_s_steady"]
    bound = ideal_bound(ref["phases"], mode, inflight_waves, cores)
    rank, rank_sync = row["phases"].get("rank_s"), ref["phases"].get("rank_s")
    measured = rank is not None and rank_sync is not None
    at_speed = ideal_bound(ref["phases"], mode, inflight_waves, cores,
                           extra_train_s=rank - rank_sync if measured else 0.0)["bound"]
    return {"ratio_vs_sync": row["samples_per_s"] / ref["samples_per_s"], "ratio_vs_sync_steady": ratio,
            "ratio_vs_sync_wall_incl_eval": ref["wall_incl_eval_s"] / row["wall_incl_eval_s"] * row["samples"]
            / ref["samples"],
            **bound, "fraction_of_bound": ratio / bound["bound"],
            "trainer_rank_s": rank, "trainer_slowdown": rank / rank_sync if measured else None,
            "bound_at_trainer_speed": at_speed if measured else None,
            "fraction_of_bound_at_trainer_speed": ratio / at_speed if measured else None,
            "accuracy_delta_vs_sync": row["final_accuracy"] - ref["final_accuracy"]}


def report(args, env, ckpt, rows: list[dict], total_s, ran_at: dict | None = None) -> None:
    """Each row's ratios and bounds against sync of its seed, the medians per mode: printed, written (--out)
    and plotted (--png). `ran_at`: the commit and load of runs measured earlier (--rereport)."""
    cores = env["cpu_count"]
    sync = {x["seed"]: x for x in rows if x["mode"] == "sync"}
    if not sync:
        raise SystemExit("--modes must include sync (every ratio is against it)")
    rows = [{**x, **derived(x, sync[x["seed"]], args.inflight_waves, cores)} for x in rows]
    summary = {}
    for mode in dict.fromkeys(x["mode"] for x in rows):
        mine = [x for x in rows if x["mode"] == mode]
        summary[mode] = {
            "max_staleness": max(x["max_staleness"] for x in mine), "configured_staleness": STALENESS[mode],
            "waves_in_flight": waves_in_flight(mode, args.inflight_waves),
            **{key: med([x[key] for x in mine]) for key in (
                "final_accuracy", "accuracy_delta_vs_sync", "samples_per_s", "ratio_vs_sync", "ratio_vs_sync_steady",
                "first_step_s", "ratio_vs_sync_wall_incl_eval", "bound", "fraction_of_bound", "trainer_slowdown",
                "bound_at_trainer_speed", "fraction_of_bound_at_trainer_speed") if None not in [x[key] for x in mine]}}
    phases = {k: med([r["phases"][k] for r in sync.values()]) for k in next(iter(sync.values()))["phases"]
              if None not in [r["phases"][k] for r in sync.values()]}
    print(f"\nsync's phases per step (medians over seeds): rollout {phases['rollout_s']['median']:.2f}s at "
          f"{phases['rollout_cores']['median']:.2f} cores, train + push {phases['train_s']['median']:.2f}s at "
          f"{phases['train_cores']['median']:.2f} cores; {cores} CPUs")
    print(f"final accuracy: the job's validation at step {args.steps} ({args.eval_samples} samples per problem at "
          f"temperature 1); samples/s over the steps' wall seconds (validation excluded); medians over seeds "
          f"{args.seeds} [min-max]\n")
    hdr = ("mode", "staleness max", "final acc", "vs sync (pts)", "samples/s", "x sync", "first step s",
           "x sync, steady", "bound", "of bound",
           "trainer step x sync", "bound at it", "of it", "x sync (wall incl. validation)")
    print("| " + " | ".join(hdr) + " |")
    print("|" + "---|" * len(hdr))
    for mode, m in summary.items():
        def cell(key, fmt, scale=1.0):
            d = m.get(key)
            if d is None:
                return "-"
            return f"{d['median'] * scale:{fmt}} [{d['min'] * scale:{fmt}}, {d['max'] * scale:{fmt}}]"
        print(f"| {mode} | {m['max_staleness']} | {cell('final_accuracy', '.3f')} | "
              f"{cell('accuracy_delta_vs_sync', '+.1f', 100)} | {cell('samples_per_s', '.1f')} | "
              f"{cell('ratio_vs_sync', '.2f')} | {cell('first_step_s', '.2f')} | "
              f"{cell('ratio_vs_sync_steady', '.2f')} | "
              f"{cell('bound', '.2f')} | {cell('fraction_of_bound', '.0%')} | "
              f"{cell('trainer_slowdown', '.2f')} | {cell('bound_at_trainer_speed', '.2f')} | "
              f"{cell('fraction_of_bound_at_trainer_speed', '.0%')} | {cell('ratio_vs_sync_wall_incl_eval', '.2f')} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {"benchmark": "async", "machine": env, "args": vars(args), "seeds": list(args.seeds),
              "processes": f"driver (embedded engine, RL loop) + 1 Megatron TP1 trainer rank, {args.threads} torch "
                           f"thread(s) each, on {cores} CPUs",
              "commit": git_commit(), "sft_checkpoint": ckpt, "sync_phases": phases, "modes": summary, "results": rows,
              "total_s": total_s, "loadavg_end": os.getloadavg()}
    if ran_at:
        result.update({**ran_at, "reported_at_commit": git_commit()})
    out.write_text(json.dumps(result, indent=1))
    plot(rows, args, env)
    print(f"wrote {out} and {args.png} ({total_s:.0f}s in all)")


PROC_KEYS = ("process_s", "cpu_s", "load1_before", "load1_after")  # measured around the child, not in its directory


def rereport(path: str, out: str, png: str) -> None:
    """`report` again over a results file's runs (after a change to how they are read or reported): each read
    again from its directory under the file's --work where it is still there, else its row as written."""
    data = json.loads(Path(path).read_text())
    args = argparse.Namespace(**{**data["args"], "out": out, "png": png})
    work = Path(data["args"].get("work") or f"runs/bench/{Path(data['args']['out']).stem}")
    rows = []
    for row in data["results"]:
        run_dir = work / f"{row['mode']}_seed{row['seed']}"
        if (run_dir / "metrics.jsonl").exists():
            row = {**row, **measured_row(row["mode"], row["seed"],
                                         {**read_run(run_dir), **{k: row[k] for k in PROC_KEYS}})}
        elif "samples_per_s_steady" not in row:
            raise SystemExit(f"{path}: {row['mode']} seed {row['seed']} has no steady samples/s and its run "
                             f"directory {run_dir} is gone: run the benchmark again")
        rows.append(row)
    report(args, data["machine"], data["sft_checkpoint"], rows, data["total_s"],
           ran_at={"commit": data["commit"], "loadavg_end": data["loadavg_end"]})


def plot(rows: list[dict], args, env: dict) -> None:
    """Validation accuracy vs wall seconds (median over seeds, min-max band) and the mean reward per step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(14, 4.8))
    colors = ["black", "tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple"]
    for color, mode in zip(colors, dict.fromkeys(x["mode"] for x in rows)):
        mine = [x for x in rows if x["mode"] == mode]
        n = min(len(x["curve"]) for x in mine)
        t = [statistics.median(x["curve"][i][1] for x in mine) for i in range(n)]
        accs = [[x["curve"][i][2] for x in mine] for i in range(n)]
        a1.plot(t, [statistics.median(a) for a in accs], marker="o", ms=3, color=color, label=mode)
        a1.fill_between(t, [min(a) for a in accs], [max(a) for a in accs], color=color, alpha=0.15)
        steps = [s for s, _ in mine[0]["reward_curve"]]
        rew = [statistics.median(x["reward_curve"][i][1] for x in mine) for i in range(len(steps))]
        a2.plot(steps, rew, color=color, label=mode, lw=1.0)
    a1.set(title=f"validation accuracy (median of seeds {args.seeds}, band min-max)",
           xlabel="wall seconds from RL start (validation included)", ylabel="accuracy")
    a2.set(title="mean reward of each trained batch (median of seeds)", xlabel="step", ylabel="reward")
    for a in (a1, a2):
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    wait = f", reward waits {args.reward_delay_s} s" if args.reward_delay_s else ""
    fig.suptitle(f"async RL, {args.task} task{wait}: lr {args.lr}, {args.steps} steps x {args.prompts} prompts x "
                 f"{args.samples}; 1 engine + 1 Megatron TP1 trainer, {args.threads} thread each, "
                 f"{env['cpu_count']} CPUs", fontsize=10)
    fig.tight_layout()
    Path(args.png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.png, dpi=90)
    plt.close(fig)


# --------------------------------------------------------------------------- main
def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        sys.exit(child_main(int(sys.argv[2]), sys.argv[4:]))
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--modes", nargs="+", default=DEFAULT_MODES, choices=list(STALENESS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=120, help="RL steps per run")
    p.add_argument("--prompts", type=int, default=32, help="prompts per step")
    p.add_argument("--samples", type=int, default=8, help="samples per prompt")
    p.add_argument("--eval-every", type=int, default=20)
    p.add_argument("--eval-samples", type=int, default=4, help="samples per validation problem (temperature 1)")
    p.add_argument("--lr", type=float, default=5e-5, help="RL learning rate")
    p.add_argument("--reward-delay-s", type=float, default=0.0, help="the waiting workload: seconds each rollout "
                   "sample's reward waits (arithmetic task)")
    p.add_argument("--inflight-waves", type=int, default=1, help="steps' worth of groups a fully_async producer "
                   "keeps in flight (at most staleness + 1)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the driver and of the trainer rank")
    p.add_argument("--task", choices=["arithmetic", "copy", "reverse"], default="arithmetic")
    p.add_argument("--max-new-tokens", type=int, default=128, help="(copy/reverse)")
    p.add_argument("--filler-xm", type=float, default=8.0, help="(copy/reverse) Pareto scale of the filler lengths")
    p.add_argument("--filler-alpha", type=float, default=1.2, help="(copy/reverse) Pareto shape")
    p.add_argument("--num-sft", type=int, default=600, help="(copy/reverse)")
    p.add_argument("--num-train", type=int, default=2000, help="(copy/reverse)")
    p.add_argument("--num-val", type=int, default=128, help="(copy/reverse)")
    p.add_argument("--final-val", type=int, default=400, help="(copy/reverse) a held-out set, written only")
    p.add_argument("--hidden", type=int, default=128, help="(copy/reverse)")
    p.add_argument("--layers", type=int, default=2, help="(copy/reverse)")
    p.add_argument("--sft-epochs", type=int, default=10, help="(copy/reverse)")
    p.add_argument("--sft-lr", type=float, default=1e-3, help="(copy/reverse)")
    p.add_argument("--seed", type=int, default=0, help="(copy/reverse) the data's seed")
    p.add_argument("--extra", nargs="*", action="extend", default=[],
                   help="more `slime_rl train` flags for every RL run, e.g. --extra=--algorithm.off_policy=tis")
    p.add_argument("--sft-checkpoint", default=None, help="reuse an SFT checkpoint (skip SFT)")
    p.add_argument("--work", default=None, help="wiped first (default: runs/bench/<--out's stem>)")
    p.add_argument("--child-timeout", type=int, default=3600)
    p.add_argument("--out", default=None, help="default: benchmarks/results/async.json (--rereport: its FILE)")
    p.add_argument("--rereport", metavar="FILE", default=None, help="recompute the table of a results file from "
                   "its measured rows (no runs)")
    p.add_argument("--png", default=None, help="default: --out with .png")
    args = p.parse_args()
    if args.reward_delay_s and args.task != "arithmetic":
        p.error("--reward-delay-s is for the arithmetic task")
    args.out = args.out or args.rereport or "benchmarks/results/async.json"
    args.png = args.png or str(Path(args.out).with_suffix(".png"))
    if args.rereport:
        rereport(args.rereport, args.out, args.png)
    else:
        run_bench(args)


if __name__ == "__main__":
    main()
