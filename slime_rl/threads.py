"""Torch threads per process: `rollout.num_threads` (each engine's process) and `train.num_threads` (each trainer
rank's process), with defaults that never oversubscribe the cores this process may use.

Torch sizes its intra-op pool to every core by default, in every process: the embedded engine in the driver and
a Megatron rank beside it took 2 + 2 threads on 2 cores, and a parallel region whose threads are descheduled
waits for the slowest. The plan counts the processes that compute at the same time on this machine:

- `sync`: rollout and training alternate, so each phase may use every core: the engine's process gets all of
  them and the trainer ranks share them;
- the asynchronous modes: the engine generates while the ranks train, so the cores are split: one share for the
  engine's process, the rest among the ranks;
- `--backend hf`: the trainer is in the driver's process, beside the embedded engine: one pool, the larger of
  the two settings (all cores by default).

Engines elsewhere (`rollout.engine_urls`) take no core here. Under `launch.launcher ray` each actor's threads
come from its bundle's CPUs (`launch.cpus_per_engine` / `cpus_per_trainer`) unless these settings are given.
Settings that oversubscribe are honoured, with a warning naming them.

Where the driver's threads and the ranks' together fit the cores (the asynchronous modes' default, or settings
that fit), `launch.bind_cores` (on) pins each process to cores of its own: the driver to the first ones of its
affinity mask, each rank to the next. Unpinned, the scheduler moves the engine's thread onto the trainer's
core and back. On the 2-core async benchmark (`benchmarks/bench_async.py`, with the shared-memory batches)
pinned runs reach 91-99% of their ideal-overlap bound, unpinned ones 87-99%; beside another job's load,
unpinned runs fell to 70-87% while pinned ones held 94-102%.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace


def cpu_ids() -> list[int]:
    """The cores this process may run on (its affinity mask, e.g. a container's or taskset's), else all."""
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return list(range(os.cpu_count() or 1))


def available_cores() -> int:
    return len(cpu_ids())


@dataclass(frozen=True)
class ThreadPlan:
    driver: int  # torch threads of this process (the embedded engine; the hf trainer)
    rank: int  # torch threads of each trainer rank process (Megatron; the critic's too)
    cores: int
    warning: str | None = None
    driver_cores: tuple[int, ...] = ()  # the cores this process is pinned to (empty: not pinned)
    rank_cores: tuple[tuple[int, ...], ...] = ()  # each spawned rank's, in rank order

    def line(self, ranks: int) -> str:
        ranks_part = f", {ranks} trainer rank(s) x {self.rank}" if ranks else ""
        pinned = (f"; pinned: driver to cores {_ids(self.driver_cores)}, ranks to "
                  f"{', '.join(_ids(c) for c in self.rank_cores)}") if self.driver_cores else ""
        return f"[threads] {self.cores} core(s): driver {self.driver}{ranks_part}{pinned}"


def _ids(cores: tuple[int, ...]) -> str:
    return ",".join(map(str, cores))


def plan_threads(cfg, ranks: int, engine_here: bool, cores: int | None = None,
                 ids: list[int] | None = None) -> ThreadPlan:
    """Threads of the driver and of each of the `ranks` trainer rank processes spawned on this machine (0: the
    trainer is in the driver), with `engine_here` when the embedded engine runs in the driver; `ids`: the cores
    this process may use (its affinity mask when None, or range(cores) when only `cores` is given)."""
    ids = ids or (list(range(cores)) if cores else cpu_ids())
    cores = len(ids)
    rollout, train = cfg.rollout.num_threads, cfg.train.num_threads
    concurrent = cfg.async_rl.mode != "sync"
    if ranks == 0:  # the hf trainer shares the driver's pool with the engine (if any)
        driver = max(rollout or 0, train or 0) or cores
        return ThreadPlan(driver, 0, cores, _over(driver, cores, rollout or train))
    engine_share = (max(1, cores // (ranks + 1)) if concurrent else cores) if engine_here else 1
    driver = rollout or engine_share
    together = concurrent and engine_here  # the engine generates while the ranks train
    rank = train or max(1, ((cores - driver) if together else cores) // ranks)
    busy = driver + ranks * rank if together else max(driver, ranks * rank)
    plan = ThreadPlan(driver, rank, cores, _over(busy, cores, rollout or train))
    local = cfg.launch.launcher == "local"  # Ray places its actors itself
    if cfg.launch.bind_cores and local and engine_here and driver + ranks * rank <= cores \
            and hasattr(os, "sched_setaffinity"):
        starts = [driver + i * rank for i in range(ranks)]
        plan = replace(plan, driver_cores=tuple(ids[:driver]), rank_cores=tuple(tuple(ids[a:a + rank]) for a in starts))
    return plan


def job_plan(cfg) -> tuple[ThreadPlan, int]:
    """The plan of a job whose ranks the local launcher spawns, and how many it spawns (Ray and torchrun size
    their processes themselves)."""
    ranks = cfg.trainer_ranks if cfg.train.backend == "megatron" else 0
    return plan_threads(cfg, ranks, engine_here(cfg)), ranks


def engine_here(cfg) -> bool:
    """Whether the job runs the embedded engine in the driver's process."""
    return not cfg.rollout.engine_urls and not cfg.debug.load_rollouts


WAIT_POLICY = "OMP_WAIT_POLICY"


def wants_active_wait(cfg, env=os.environ) -> bool:
    """Whether this job's driver should run with OMP_WAIT_POLICY=ACTIVE: the hf trainer computes in the driver's
    process beside the embedded engine, with more than one thread each. Each of the two threads that run torch
    ops owns its own libgomp team, so the process holds more OpenMP threads than cores; libgomp then spins only
    100 times at a barrier before it sleeps on a futex (1,000 under ACTIVE), and every small op of the step pays
    the wake-up. Measured on the tiny job at 2 threads: a train step of 101-113 ms alone became 168-173 ms once
    the engine's thread had run ops, ~120 ms under ACTIVE. Never where the driver's team is alone with
    trainer ranks in other processes (Megatron): ACTIVE there would spin a core away from them. A policy the
    user set is kept."""
    if cfg.train.backend != "hf" or WAIT_POLICY in env:
        return False
    return engine_here(cfg) and job_plan(cfg)[0].driver > 1


def reexec_with_active_wait(argv: list[str]) -> None:
    """Start this command again with OMP_WAIT_POLICY=ACTIVE (libgomp reads it once, when torch loads it, which
    has happened by the time the config is known). Does not return."""
    import sys

    print(f"[threads] the hf trainer and the embedded engine share this process: restarting with "
          f"{WAIT_POLICY}=ACTIVE (set {WAIT_POLICY} yourself to keep another policy)", flush=True)
    os.execve(sys.executable, [sys.executable, "-m", "slime_rl", *argv], {**os.environ, WAIT_POLICY: "ACTIVE"})


def _over(busy: int, cores: int, explicit: bool) -> str | None:
    if busy <= cores:
        return None
    if explicit:
        return (f"rollout.num_threads / train.num_threads keep {busy} threads busy at once on {cores} core(s): "
                "the processes will wait for each other's threads (set them lower, or unset for a plan that fits)")
    return (f"{busy} processes compute at once on {cores} core(s), one thread each: they will share cores "
            "(fewer trainer ranks, or launch.launcher ray across machines, would not)")


def apply_to_this_process(threads: int) -> None:
    import torch

    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


def pin_process(cores: tuple[int, ...]) -> None:
    """Every thread of this process pinned to `cores`; threads started later inherit it from their starter."""
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), cores)
        except (ProcessLookupError, OSError):  # a thread that ended meanwhile
            pass
