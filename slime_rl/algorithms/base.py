"""The `Algorithm` seam: what an RL algorithm needs, its preset, its advantages and its policy loss.

The loop asks the configured algorithm (`get(cfg.algorithm.name)`) and never
names one. An algorithm is a small object registered under its `--algo` name:

- `preset(job_cfg)`: the config fields it sets (dotted names -> values), applied over the defaults and
  under the config file and the flags, so every field stays overridable;
- `needs(cfg)`: a reference model (KL), a critic, dynamic sampling, whitening over the whole batch;
- `advantages(batch, cfg)`: per-token advantages [B, T] and, for a critic, returns [B, T] (else None) from
  the batch's rewards, groups, old/ref logprobs and values;
- `loss(cfg)`: the `LossFn` handed to `TrainerBackend.train_step` (a picklable object: trainer ranks in
  other processes receive it).

`cfg` is the job's `AlgorithmConfig` (algorithms/config.py). Names are case-insensitive.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol

import torch

from slime_rl.types import TrainBatch


@dataclass(frozen=True)
class Needs:
    """What the loop and the launcher must provide for an algorithm."""

    reference: bool = False  # a frozen reference model's logprobs (KL to it)
    critic: bool = False  # a value model trained beside the policy
    dynamic_sampling: bool = False  # over-sample and drop groups whose rewards all agree
    global_whitening: bool = False  # advantages whitened over the whole batch (all DP ranks)
    # the trainer's logprobs before the update as an input of `advantages` (a KL penalty in the reward); an
    # algorithm that does not say otherwise gets them
    old_logprobs: bool = True


class Algorithm(Protocol):
    name: str
    summary: str  # one line for the README and --help
    paper: str

    def preset(self, job_cfg: Any) -> dict[str, Any]: ...

    def needs(self, cfg: Any) -> Needs: ...

    def advantages(self, batch: TrainBatch, cfg: Any) -> tuple[torch.Tensor, torch.Tensor | None]: ...

    def loss(self, cfg: Any) -> Callable: ...


_REGISTRY: dict[str, Algorithm] = {}


def register(algorithm: Algorithm) -> Algorithm:
    """Make `algorithm` available as `--algo <its name>` (case-insensitive)."""
    _REGISTRY[algorithm.name.upper()] = algorithm
    return algorithm


def implemented() -> tuple[str, ...]:
    return tuple(sorted(_REGISTRY))


def needs(cfg: Any) -> Needs:
    """What the configured algorithm (an AlgorithmConfig) needs from the loop and the launcher."""
    return get(cfg.name).needs(cfg)


def get(name: str) -> Algorithm:
    """The algorithm registered as `name` (case-insensitive); NotImplementedError naming the implemented ones."""
    try:
        return _REGISTRY[name.upper()]
    except KeyError:
        raise NotImplementedError(f"algorithm {name!r} is not implemented; implemented: "
                                  f"{', '.join(implemented())}") from None
