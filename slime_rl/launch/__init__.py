"""Launching trainer ranks: SPMD rank groups driven from one process (spawned workers or torchrun)."""

from slime_rl.launch.spmd import (
    RankError,
    RankGroup,
    SpawnedRankGroup,
    TorchrunRankGroup,
    in_torchrun,
    spawn_ranks,
    torchrun_group,
)

__all__ = [
    "RankError",
    "RankGroup",
    "SpawnedRankGroup",
    "TorchrunRankGroup",
    "in_torchrun",
    "spawn_ranks",
    "torchrun_group",
]
