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
"""

from __future__ import annotations

import os
from dataclasses import dataclass


def available_cores() -> int:
    """The cores this process may run on (its affinity mask, e.g. a container's or taskset's), else the count."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


@dataclass(frozen=True)
class ThreadPlan:
    driver: int  # torch threads of this process (the embedded engine; the hf trainer)
    rank: int  # torch threads of each trainer rank process (Megatron; the critic's too)
    cores: int
    warning: str | None = None

    def line(self, ranks: int) -> str:
        ranks_part = f", {ranks} trainer rank(s) x {self.rank}" if ranks else ""
        return f"[threads] {self.cores} core(s): driver {self.driver}{ranks_part}"


def plan_threads(cfg, ranks: int, engine_here: bool, cores: int | None = None) -> ThreadPlan:
    """Threads of the driver and of each of the `ranks` trainer rank processes spawned on this machine (0: the
    trainer is in the driver), with `engine_here` when the embedded engine runs in the driver."""
    cores = cores or available_cores()
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
    return ThreadPlan(driver, rank, cores, _over(busy, cores, rollout or train))


def job_plan(cfg) -> tuple[ThreadPlan, int]:
    """The plan of a job whose ranks the local launcher spawns, and how many it spawns (Ray and torchrun size
    their processes themselves)."""
    ranks = cfg.trainer_ranks if cfg.train.backend == "megatron" else 0
    engine_here = not cfg.rollout.engine_urls and not cfg.debug.load_rollouts
    return plan_threads(cfg, ranks, engine_here), ranks


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
