"""Typed messages that cross component boundaries.

Token-in / token-out: a sample carries the token ids the engine produced; the
trainer never re-tokenizes model output.
"""

from __future__ import annotations

import enum
import math
import typing
from dataclasses import dataclass, field
from typing import Any, Literal


PauseMode = Literal["abort", "in_place", "retract"]  # what in-flight requests do while weights change
PAUSE_MODES: tuple[str, ...] = typing.get_args(PauseMode)


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
    min_new_tokens: int = 0  # stop tokens / strings are ignored before this many tokens
    stop_token_ids: list[int] = field(default_factory=list)
    stop: list[str] = field(default_factory=list)  # stop strings (need an engine tokenizer)
    seed: int | None = None  # None = draw from the engine's generator (SGLang: sampling_seed)
    # SGLang's logit processors (rollout/sampling.py has their order and semantics)
    min_p: float = 0.0  # [0, 1]: drop tokens below min_p * the most likely token's probability
    frequency_penalty: float = 0.0  # [-2, 2]: minus penalty * count of the token in the output
    presence_penalty: float = 0.0  # [-2, 2]: minus penalty once the token is in the output
    repetition_penalty: float = 1.0  # (0, 2]: output tokens' logits divided (> 0) / multiplied (< 0) by it
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit
    return_top_p_token_ids: bool = False  # report each position's kept set (slime's top-p replay)

    def validate(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k == 0 or self.top_k < -1:
            raise ValueError(f"top_k must be -1 (off) or >= 1, got {self.top_k}")
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ValueError(f"min_new_tokens must be in [0, max_new_tokens], got {self.min_new_tokens}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        for name in ("frequency_penalty", "presence_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if not 0 < self.repetition_penalty <= 2:
            raise ValueError(f"repetition_penalty must be in (0, 2], got {self.repetition_penalty}")
        bad = [v for v in self.logit_bias.values() if not math.isfinite(v)]
        if bad:
            raise ValueError(f"logit_bias values must be finite, got {bad[:3]}")

    @property
    def penalized(self) -> bool:
        """Any output-token penalty active (the sampler then needs the output counts)."""
        return bool(self.frequency_penalty or self.presence_penalty or self.repetition_penalty != 1.0)


@dataclass
class GenerateRequest:
    """One generation request: prompt token ids in.

    `top_logprobs_num` > 0 adds the k most likely tokens at every output
    position; `logprob_start_len` >= 0 adds prompt logprobs from that position
    on (the first prompt token has none).
    """

    input_ids: list[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    rid: str | None = None  # None = the engine assigns one
    top_logprobs_num: int = 0
    logprob_start_len: int = -1


@dataclass
class GenerateOutput:
    """One generation result (or an in-progress snapshot: finish_reason None).

    Every output token carries the weight version that sampled it
    (`output_versions`); `weight_version` is the engine's version when the
    request finished.
    """

    rid: str | None
    output_ids: list[int]
    output_logprobs: list[float]
    finish_reason: SampleStatus | None
    weight_version: int
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache
    output_versions: list[int] = field(default_factory=list)
    matched_stop: int | str | None = None  # the stop token id or stop string that ended it
    output_top_logprobs: list[list[tuple[int, float]]] | None = None  # per token: (id, logprob) best first
    input_logprobs: list[float | None] | None = None  # prompt positions logprob_start_len..n-1
    input_top_logprobs: list[list[tuple[int, float]] | None] | None = None  # same positions; None at position 0
    top_p_token_ids: list[list[int]] | None = None  # per output token: the ids it was sampled among
    e2e_latency: float = 0.0  # seconds from submit to finish
    error: str | None = None  # why the engine aborted it (None for a plain abort / a normal finish)


@dataclass
class BucketEntry:
    """Where one HF-named tensor lives inside a flat weight bucket."""

    name: str
    dtype: str  # torch dtype name without "torch.", e.g. "float32", "bfloat16"
    shape: tuple[int, ...]
    offset: int  # in bytes from the start of the bucket


@dataclass
class WeightBucket:
    """A flat byte buffer holding several tensors + their metadata (HF naming).

    Built and read by `slime_rl.buckets.pack_bucket` / `unpack_bucket`.
    """

    buffer: Any  # torch.uint8 tensor [nbytes]
    entries: list[BucketEntry]
    weight_version: int = 0


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
    advantages_BT: Any  # [B, T] float: each token's own advantage (0 off-mask)
    rollout_logprobs_BT: Any  # [B, T] engine logprobs of each token (0 off-mask)
    loss_weights_BT: Any = None  # [B, T] per-token weight of the loss (mask + aggregation: algorithms.token_loss_weights)
    old_logprobs_BT: Any = None  # the ratio's reference: trainer logprobs before the update (None: see below)
    ref_logprobs_BT: Any = None  # reference-model logprobs (KL)
    is_weights_BT: Any = None  # off-policy importance weights of the policy-gradient term (None = 1)
    rewards_B: Any = None  # [B] float: each row's scalar reward after shaping (advantage estimators read it)
    group_B: Any = None  # [B] long: the group (prompt) each row belongs to
    values_BT: Any = None  # critic: V of the state each token is sampled in, before the update (0 off-mask)
    returns_BT: Any = None  # critic: the value targets (GAE returns) (0 off-mask)
    temperature: float = 1.0  # logits are divided by it, as in the engine
    # one update and no separate forward for the old logprobs: the update's own logprobs, detached, are the
    # proximal policy (the ratio's reference where old_logprobs_BT is None), and the loss measures the
    # trainer-rollout logprob gap on them, weighted like the loss (the loss tokens' mean under token-mean)
    proximal_is_update: bool = False

    @property
    def num_sequences(self) -> int:
        return int(self.input_ids_BT.shape[0])

    def select(self, rows: Any) -> "TrainBatch":
        """A sub-batch of rows (index tensor or slice), e.g. one micro-batch."""
        fields = {}
        for name, value in self.__dict__.items():
            if hasattr(value, "shape"):  # per-row [B] fields take only the row part of a (rows, columns) index
                value = value[rows[0] if isinstance(rows, tuple) and value.dim() == 1 else rows]
            fields[name] = value
        return TrainBatch(**fields)
