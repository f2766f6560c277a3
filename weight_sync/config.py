"""Weight sync's typed configuration (composed into `slime_rl.config.JobConfig` as `sync`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from slime_rl.types import PauseMode


@dataclass
class SyncConfig:
    """Weight sync from the trainer to the engines (weight_sync/)."""

    transport: Literal["auto", "shm", "broadcast", "disk", "cuda_ipc", "local"] = "auto"  # auto: local/shm/broadcast
    bucket_mb: float = 512.0  # largest flat bucket (a single bigger tensor travels alone)
    pause_mode: PauseMode = "abort"  # what in-flight requests do at the commit
    check: bool = False  # compare every engine tensor with the trainer's HF export after each sync
    directory: str | None = None  # disk transport: where versions are written (None: a temp dir)
    backend: Literal["auto", "gloo", "nccl"] = "auto"  # broadcast transport: auto = nccl on GPU, else gloo
    master_address: str = "127.0.0.1"  # broadcast transport: the address engines reach the sending ranks at
