"""Launching jobs: Ray placement (ray_launch.py) and, re-exported here, the SPMD rank groups of training/spmd.py."""

from training.spmd import (
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
