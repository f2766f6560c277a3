"""The seams between components, as `typing.Protocol`s.

Engines, trainer backends, weight transports, reward functions and
environments meet only through these; each has a contract test under tests/.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator, Protocol, runtime_checkable

import torch

from slime_rl.types import GenerateOutput, GenerateRequest, Sample, TrainBatch


@runtime_checkable
class RolloutEngine(Protocol):
    """Produces token ids + per-token logprobs; serves a versioned policy."""

    def generate(self, requests: list[GenerateRequest]) -> list[GenerateOutput]:
        """Generate for a batch of requests; outputs in request order."""

    def abort(self, rid: str | None = None) -> None:
        """Abort one request (by rid) or all in-flight requests (None)."""

    def pause_generation(self, mode: str = "abort") -> None:
        """Stop scheduling new decode steps ("abort" or "in_place")."""

    def continue_generation(self) -> None:
        """Resume after pause_generation."""

    def update_weights_from_tensors(
        self, named_tensors: Iterable[tuple[str, torch.Tensor]], weight_version: int
    ) -> None:
        """Load HF-named tensors; all-or-nothing; stamp the new version."""

    def update_weights_from_disk(self, model_path: str, weight_version: int) -> None:
        """Load an HF safetensors directory; all-or-nothing."""

    def flush_cache(self) -> None:
        """Drop any cached KV / prefix state."""

    def health(self) -> bool:
        """True when the engine can serve."""

    def get_weight_version(self) -> int:
        """The version of the weights now served."""


@runtime_checkable
class TrainerBackend(Protocol):
    """Owns the policy weights (the source of truth) and the optimizer; every method the loop and the job call."""

    hf_config: dict  # the policy's config.json

    def logprobs(self, batch: TrainBatch) -> torch.Tensor:
        """Per-token logprobs [B, T] of `batch.input_ids_BT` (position t = log p(x_t | x_<t))."""

    def ref_logprobs(self, batch: TrainBatch) -> torch.Tensor:
        """The same under the reference model (built with a reference: the algorithm's KL)."""

    def update_reference(self) -> None:
        """The reference model becomes a copy of the policy as it is now."""

    def load_reference(self, path: str) -> None:
        """The reference model from an HF checkpoint directory."""

    def train_step(self, batch: TrainBatch, loss_fn: "LossFn") -> dict[str, float]:
        """One optimizer step over the batch (micro-batched); returns metrics."""

    def reset_optimizer(self, opt: Any) -> None:
        """Fresh optimizer state and schedule (training.hf.OptimSettings), e.g. between SFT and RL."""

    def named_hf_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """The policy weights in HF naming, for weight sync."""

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole policy in HF naming."""

    def save(self, path: str) -> None:
        """Save an HF-format checkpoint (+ optimizer state) to a directory."""

    def load(self, path: str) -> None:
        """Restore from `save`."""


@runtime_checkable
class CriticBackend(Protocol):
    """A value model (the policy's architecture with a scalar head) and its own optimizer.

    `values` is aligned with `TrainerBackend.logprobs`: position t holds V(x_<t), the value of the
    state in which token t is sampled (computed from the hidden state at t - 1); 0 at t = 0 and on
    padding.
    """

    def values(self, batch: TrainBatch) -> torch.Tensor:
        """Values [B, T] of `batch.input_ids_BT` (no gradient)."""

    def train_step(self, batch: TrainBatch, loss_fn: "ValueLossFn") -> dict[str, float]:
        """One optimizer step of the critic over the batch (micro-batched); returns metrics."""

    def reset_optimizer(self, opt: Any) -> None:
        """Fresh optimizer state and schedule (training.hf.OptimSettings)."""

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        """The critic in HF naming: a *ForTokenClassification model with num_labels 1 (`score.weight`)."""

    def save(self, path: str) -> None:
        """HF-format critic (+ optimizer state) in a directory."""

    def load(self, path: str) -> None:
        """Restore from `save`."""


class ValueLossFn(Protocol):
    """Per-micro-batch critic loss: (values_BT, micro TrainBatch) -> (loss, metrics)."""

    def __call__(self, values_BT: torch.Tensor, batch: TrainBatch) -> tuple[torch.Tensor, dict[str, float]]: ...


class LossFn(Protocol):
    """Per-micro-batch loss: (logprobs_BT, entropy_BT, micro TrainBatch) -> (loss, metrics)."""

    def __call__(
        self, logprobs_BT: torch.Tensor, entropy_BT: torch.Tensor, batch: TrainBatch
    ) -> tuple[torch.Tensor, dict[str, float]]: ...


@runtime_checkable
class WeightTransport(Protocol):
    """Moves HF-named weights from a trainer to engines."""

    def send(self, named_tensors: Iterable[tuple[str, torch.Tensor]], weight_version: int) -> None: ...


RewardFn = Callable[[Sample], "float | dict[str, float]"]
"""A reward function scores one sample; a dict must hold a 'reward' key."""


@runtime_checkable
class Environment(Protocol):
    """Multi-turn environment (tool use, dialogue)."""

    def reset(self, sample: Sample) -> list[int]:
        """Start an episode; return the initial observation tokens."""

    def step(self, action_ids: list[int]) -> tuple[list[int], float, bool, dict[str, Any]]:
        """Apply the model's tokens; return (observation ids, reward, done, info)."""
