"""In-process weight transport: hand HF-named tensors to engines directly."""

from __future__ import annotations

import time
from typing import Iterable

import torch

from slime_rl.protocols import RolloutEngine


class InProcessTransport:
    """WeightTransport for engines living in the trainer's process."""

    def __init__(self, engines: list[RolloutEngine]):
        self.engines = engines

    def send(self, named_tensors: Iterable[tuple[str, torch.Tensor]], weight_version: int) -> None:
        tensors = [(name, t.detach().clone()) for name, t in named_tensors]  # engines must not alias trainer memory
        for engine in self.engines:
            engine.update_weights_from_tensors(tensors, weight_version)


def push_weights(trainer, transport: InProcessTransport, weight_version: int) -> dict[str, float]:
    """Send the trainer's current weights, stamped `weight_version`; returns sync metrics."""
    start = time.perf_counter()
    named = list(trainer.named_hf_weights())
    transport.send(named, weight_version)
    nbytes = sum(t.numel() * t.element_size() for _, t in named)
    return {"sync/seconds": time.perf_counter() - start, "sync/bytes": float(nbytes), "sync/version": weight_version}
