"""Where the processes run: typed configuration (composed into `slime_rl.config.JobConfig` as `launch`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class LaunchConfig:
    """Where the processes run: spawned locally, or placed by Ray (engines + trainer ranks as actors)."""

    launcher: Literal["local", "ray"] = "local"
    # local: when the thread plan gives every process cores of its own (the asynchronous modes, or thread settings
    # that fit), pin the driver and each spawned trainer rank to them, so none is moved onto another's core
    bind_cores: bool = True
    ray_address: str | None = None  # ray: None = start Ray on this machine; "auto" or HOST:PORT = join a cluster
    colocate: bool = False  # ray: engines share the trainers' bundles and release memory while the trainer runs
    num_cpus: int | None = None  # ray started here: CPUs it may use (None = all of this machine's)
    cpus_per_engine: float = 1.0
    cpus_per_trainer: float = 1.0
