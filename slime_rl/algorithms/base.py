"""The `Algorithm` seam: what an RL algorithm needs, its advantages and its policy loss.

The loop asks the configured algorithm (`get(cfg.algorithm.name)`) and never
names one. An algorithm is a small object registered under its `--algo` name:

- `needs(cfg)`: a reference model (KL), a critic, dynamic sampling, whitening
  over the whole global batch;
- `advantages(groups, cfg)`: one advantage per sample of each scored group
  (per-token advantages, returns and values come with the critic);
- `loss(cfg)`: the `LossFn` handed to `TrainerBackend.train_step` (a picklable
  object: trainer ranks in other processes receive it).

`cfg` is the job's `AlgorithmConfig` (typed loosely here: algorithms sit below
the config module). Names the config accepts but no algorithm implements yet
raise NotImplementedError from `get`, naming the implemented ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol

from slime_rl.types import Sample


@dataclass(frozen=True)
class Needs:
    """What the loop and the launcher must provide for an algorithm."""

    reference: bool = False  # a frozen reference model's logprobs (KL to it)
    critic: bool = False  # a value model trained beside the policy
    dynamic_sampling: bool = False  # over-sample and drop groups whose rewards all agree
    global_whitening: bool = False  # advantages whitened over the whole batch (all DP ranks)


class Algorithm(Protocol):
    name: str

    def needs(self, cfg: Any) -> Needs: ...

    def advantages(self, groups: list[list[Sample]], cfg: Any) -> list[list[float]]: ...

    def loss(self, cfg: Any) -> Callable: ...


_REGISTRY: dict[str, Algorithm] = {}


def register(algorithm: Algorithm) -> Algorithm:
    """Make `algorithm` available as `--algo <its name>` (case-insensitive)."""
    _REGISTRY[algorithm.name.upper()] = algorithm
    return algorithm


def implemented() -> tuple[str, ...]:
    return tuple(sorted(_REGISTRY))


def get(name: str) -> Algorithm:
    """The algorithm registered as `name` (case-insensitive); NotImplementedError naming the implemented ones."""
    try:
        return _REGISTRY[name.upper()]
    except KeyError:
        raise NotImplementedError(f"algorithm {name!r} is not yet implemented; implemented: "
                                  f"{', '.join(implemented())}") from None
