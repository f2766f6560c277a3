"""Typed messages that cross component boundaries.

Token-in / token-out: a sample carries the token ids the engine produced; the
trainer never re-tokenizes model output.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any


class SampleStatus(str, enum.Enum):
    COMPLETED = "completed"  # stopped on a stop token / EOS
    TRUNCATED = "truncated"  # hit max_new_tokens
    ABORTED = "aborted"  # interrupted (abort / pause in abort mode)


@dataclass
class SamplingParams:
    """Per-request sampling settings (SGLang field names where they exist)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 = disabled
    max_new_tokens: int = 64
    stop_token_ids: list[int] = field(default_factory=list)
    seed: int | None = None  # None = draw from the engine's generator

    def validate(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k == 0 or self.top_k < -1:
            raise ValueError(f"top_k must be -1 (off) or >= 1, got {self.top_k}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")


@dataclass
class GenerateRequest:
    """One generation request: prompt token ids in."""

    input_ids: list[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    rid: str | None = None


@dataclass
class GenerateOutput:
    """One generation result: token ids + logprobs of the sampled tokens out."""

    rid: str | None
    output_ids: list[int]
    output_logprobs: list[float]
    finish_reason: SampleStatus
    weight_version: int
    prompt_tokens: int = 0


@dataclass
class Sample:
    """One trajectory: prompt, response, per-token rollout logprobs, reward."""

    prompt_ids: list[int]
    response_ids: list[int] = field(default_factory=list)
    rollout_logprobs: list[float] = field(default_factory=list)
    loss_mask: list[int] = field(default_factory=list)  # 0 = env/tool token
    reward: float | dict[str, float] | None = None
    status: SampleStatus = SampleStatus.COMPLETED
    group_id: int = 0
    index: int = 0
    weight_versions: list[int] = field(default_factory=list)  # one per response token
    prompt_text: str = ""
    response_text: str = ""
    label: Any = None
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def scalar_reward(self) -> float:
        """The reward used for advantages: the float, or the dict's 'reward' key."""
        if self.reward is None:
            raise ValueError(f"sample {self.group_id}/{self.index} has not been scored")
        if isinstance(self.reward, dict):
            return float(self.reward["reward"])
        return float(self.reward)


@dataclass
class TrainBatch:
    """Packed token tensors for one optimizer step (one data-parallel rank).

    Sequences are right-padded to a common length; `response_mask_BT` marks
    the tokens that receive loss, aligned with `input_ids_BT` (a mask value at
    position t means token t is a response token predicted from position t-1).
    """

    input_ids_BT: Any  # torch.LongTensor [B, T]
    attention_mask_BT: Any  # [B, T] 1 for real tokens
    response_mask_BT: Any  # [B, T] float, 1 for tokens that receive loss
    advantages_BT: Any  # [B, T] float (per-token advantage, 0 off-mask)
    rollout_logprobs_BT: Any  # [B, T] engine logprobs of each token (0 off-mask)
    loss_weights_BT: Any = None  # [B, T] per-token weight of the loss (see algorithms.aggregation)
    old_logprobs_BT: Any = None  # trainer logprobs before the update
    ref_logprobs_BT: Any = None  # reference-model logprobs (KL)
    temperature: float = 1.0  # logits are divided by it, as in the engine

    @property
    def num_sequences(self) -> int:
        return int(self.input_ids_BT.shape[0])

    def select(self, rows: Any) -> "TrainBatch":
        """A sub-batch of rows (index tensor or slice), e.g. one micro-batch."""
        fields = {}
        for name, value in self.__dict__.items():
            fields[name] = value[rows] if hasattr(value, "shape") else value
        return TrainBatch(**fields)
