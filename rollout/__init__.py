"""Inference side: the embedded engine (in-process `RolloutEngine`) and its model."""

from rollout.engine import EmbeddedEngine

__all__ = ["EmbeddedEngine"]
