"""The weight-sync param plan: which HF tensor goes in which bucket, at which byte offset, from which stage.

Every trainer rank and every engine can compute the same plan from the HF config and the
parallel layout alone (pure functions, no torch.distributed), so the metadata need not be
sent with each sync, and `digest()` lets both sides check they agree before any bytes move.

Rules: buckets never mix PP stages; within a stage tensors follow the stage's Megatron
parameter order, and all HF outputs of one Megatron parameter share a bucket (the sender
gathers each parameter's TP shards once). A bucket closes when the next parameter would push
it past `bucket_bytes`; a parameter larger than that alone gets a bucket of its own. The
layout inside a bucket is exactly `slime_rl.buckets.pack_bucket`'s: tensors in order, each
offset rounded up to `ALIGN`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Iterable

import torch

from slime_rl.buckets import ALIGN
from slime_rl.types import BucketEntry


class PlanError(ValueError):
    """A plan that cannot be built or does not fit its input; the message names the tensor or field."""


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def _check_dtype(dtype: Any, where: str = "dtype") -> str:
    name = dtype.removeprefix("torch.") if isinstance(dtype, str) else None
    value = getattr(torch, name, None) if name else None
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise PlanError(f"{where}={dtype!r} is not a torch floating dtype name (e.g. 'bfloat16', 'float32')")
    return str(value).removeprefix("torch.")  # canonical: "float" -> "float32"


@dataclass(frozen=True)
class PlannedTensor:
    """One HF tensor of the plan: what the engine receives, and where the sender finds it."""

    name: str  # HF name
    dtype: str  # what the engine receives, torch name without "torch."
    shape: tuple[int, ...]  # full HF shape
    stage: int  # PP stage that sends it
    bucket: int  # index into WeightPlan.buckets
    offset: int  # bytes from the start of the bucket, a multiple of ALIGN
    source: str | None  # local Megatron parameter on that stage (None: a plain HF tensor)
    source_index: int  # position of `name` in that ParamRule's hf_names (0 for plain)

    @property
    def nbytes(self) -> int:
        n = getattr(torch, self.dtype).itemsize
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class PlannedBucket:
    """One flat buffer of `nbytes` bytes, sent by one PP stage."""

    index: int
    stage: int
    nbytes: int  # buffer size: end of the last tensor rounded up to ALIGN
    tensors: tuple[PlannedTensor, ...]

    def entries(self) -> list[BucketEntry]:
        return [BucketEntry(t.name, t.dtype, t.shape, t.offset) for t in self.tensors]

    def sources(self) -> list[str]:
        """The distinct Megatron parameters this bucket is made from, in order."""
        return list(dict.fromkeys(t.source for t in self.tensors if t.source is not None))


@dataclass(frozen=True)
class WeightPlan:
    buckets: tuple[PlannedBucket, ...]
    tp_size: int
    pp_size: int
    dtype: str
    bucket_bytes: int

    @property
    def tensors(self) -> list[PlannedTensor]:
        return [t for b in self.buckets for t in b.tensors]

    @property
    def nbytes(self) -> int:
        """Payload bytes (the tensors); the buckets add up to ALIGN - 1 bytes of padding per tensor."""
        return sum(t.nbytes for t in self.tensors)

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.tensors]

    def stage_buckets(self, stage: int) -> list[PlannedBucket]:
        if not 0 <= stage < self.pp_size:
            raise PlanError(f"stage={stage} out of range for pp_size={self.pp_size}")
        return [b for b in self.buckets if b.stage == stage]

    def oversized(self) -> list[PlannedBucket]:
        """Buckets past bucket_bytes: each holds a single parameter that alone is larger."""
        return [b for b in self.buckets if b.nbytes > self.bucket_bytes]

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe: lists for tuples, tensors inside their bucket."""
        tensor_fields = ("name", "dtype", "stage", "bucket", "offset", "source", "source_index")
        return {"tp_size": self.tp_size, "pp_size": self.pp_size, "dtype": self.dtype,
                "bucket_bytes": self.bucket_bytes,
                "buckets": [{"index": b.index, "stage": b.stage, "nbytes": b.nbytes,
                             "tensors": [{**{f: getattr(t, f) for f in tensor_fields}, "shape": list(t.shape)}
                                         for t in b.tensors]} for b in self.buckets]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> WeightPlan:
        """The inverse of `to_dict`; PlanError names a missing field or a broken invariant."""
        try:
            buckets = tuple(
                PlannedBucket(int(b["index"]), int(b["stage"]), int(b["nbytes"]), tuple(
                    PlannedTensor(t["name"], t["dtype"], tuple(int(n) for n in t["shape"]), int(t["stage"]),
                                  int(t["bucket"]), int(t["offset"]), t["source"], int(t["source_index"]))
                    for t in b["tensors"]))
                for b in d["buckets"])
            plan = cls(buckets, int(d["tp_size"]), int(d["pp_size"]), d["dtype"], int(d["bucket_bytes"]))
        except KeyError as e:
            raise PlanError(f"plan dict is missing field {e.args[0]!r}") from e
        except (TypeError, ValueError) as e:
            raise PlanError(f"plan dict is malformed: {e}") from e
        plan.validate()
        return plan

    def digest(self) -> str:
        """sha256 hex of the canonical JSON of `to_dict()`: equal digests, identical plans."""
        blob = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()

    def summary(self) -> str:
        mib = 1024 * 1024
        largest = max((b.nbytes for b in self.buckets), default=0)
        line = (f"weight plan: {len(self.tensors)} tensors, {len(self.buckets)} buckets, "
                f"{self.nbytes / mib:.1f} MiB {self.dtype}, largest bucket {largest / mib:.1f} MiB "
                f"(limit {self.bucket_bytes / mib:.1f} MiB), {self.pp_size} stages, TP {self.tp_size}")
        oversized = len(self.oversized())
        return line + (f", {oversized} oversized" if oversized else "")

    def validate(self) -> None:
        """Raise PlanError unless the internal invariants hold (e.g. for a plan read from JSON)."""
        _check_dtype(self.dtype, "plan.dtype")
        if self.bucket_bytes <= 0 or self.tp_size < 1 or self.pp_size < 1:
            raise PlanError(f"plan: bucket_bytes={self.bucket_bytes}, tp_size={self.tp_size}, pp_size={self.pp_size}"
                            " must all be positive")
        seen: set[str] = set()
        for i, b in enumerate(self.buckets):
            if b.index != i or not 0 <= b.stage < self.pp_size:
                raise PlanError(f"bucket {i}: index={b.index}, stage={b.stage} (pp_size={self.pp_size})")
            end = 0
            for t in b.tensors:
                if t.name in seen:
                    raise PlanError(f"{t.name}: planned twice")
                seen.add(t.name)
                _check_dtype(t.dtype, f"{t.name}: dtype")
                if (t.bucket, t.stage) != (i, b.stage) or t.offset % ALIGN or t.offset < end:
                    raise PlanError(f"{t.name}: bucket={t.bucket}, stage={t.stage}, offset={t.offset} do not fit "
                                    f"bucket {i} (stage {b.stage}, previous tensor ends at byte {end})")
                end = t.offset + t.nbytes
            if b.nbytes != _aligned(end):
                raise PlanError(f"bucket {i}: nbytes={b.nbytes}, but its tensors end at byte {end}")


Group = list[tuple[str, tuple[int, ...], str | None, int]]  # one param's outputs: (name, shape, source, index)


def _bucketize(stages: list[list[Group]], *, dtype: str, bucket_bytes: int, tp_size: int,
               pp_size: int) -> WeightPlan:
    """Pack each stage's groups in order into buckets (see the module docstring for the rule)."""
    itemsize = getattr(torch, dtype).itemsize
    buckets: list[PlannedBucket] = []

    def layout(items: Group, start: int, bucket: int, stage: int) -> tuple[list[PlannedTensor], int]:
        out, offset = [], start
        for name, shape, source, index in items:
            out.append(PlannedTensor(name, dtype, shape, stage, bucket, offset, source, index))
            numel = 1
            for d in shape:
                numel *= d
            offset = _aligned(offset + numel * itemsize)
        return out, offset

    for stage, groups in enumerate(stages):
        current: list[PlannedTensor] = []
        end = 0
        for group in groups:
            placed, new_end = layout(group, end, len(buckets), stage)
            # Past the limit: close the bucket. An oversized group thus lands in an empty bucket,
            # and the next group (new_end > limit already) closes that one behind it.
            if current and new_end > bucket_bytes:
                buckets.append(PlannedBucket(len(buckets), stage, end, tuple(current)))
                placed, new_end = layout(group, 0, len(buckets), stage)
                current = []
            current, end = current + placed, new_end
        if current:
            buckets.append(PlannedBucket(len(buckets), stage, end, tuple(current)))
    return WeightPlan(tuple(buckets), tp_size, pp_size, dtype, bucket_bytes)


def _check_args(dtype: Any, bucket_bytes: Any) -> str:
    if isinstance(bucket_bytes, bool) or not isinstance(bucket_bytes, int) or bucket_bytes <= 0:
        raise PlanError(f"bucket_bytes={bucket_bytes!r} must be a positive int")
    return _check_dtype(dtype)


def plan_from_layout(layout: dict[str, Any], *, dtype: str, bucket_bytes: int,
                     expected: dict[str, tuple[int, ...]] | None = None) -> WeightPlan:
    """The plan for a trainer layout: `{"tp_size": int, "stages": [[(source, [(hf_name, shape), ...]), ...]]}`,
    one list per PP stage of the parameters it sends, each with the HF tensors it becomes (a trainer
    backend's `weight_layout()`). `expected` (HF name -> shape): the set the plan must cover exactly."""
    dtype = _check_args(dtype, bucket_bytes)
    stages = [[[(h, tuple(shape), source, i) for i, (h, shape) in enumerate(outputs)] for source, outputs in stage]
              for stage in layout["stages"]]
    plan = _bucketize(stages, dtype=dtype, bucket_bytes=bucket_bytes, tp_size=int(layout.get("tp_size", 1)),
                      pp_size=len(stages))
    if expected is not None:
        _check_covers(plan, expected)
    else:
        _check_covers(plan, {t.name: t.shape for t in plan.tensors})  # at least: no name twice
    return plan


def _check_covers(plan: WeightPlan, expected: dict[str, tuple[int, ...]]) -> None:
    planned: dict[str, tuple[int, ...]] = {}
    for t in plan.tensors:
        if t.name in planned:
            raise PlanError(f"{t.name}: planned twice")
        planned[t.name] = t.shape
    for name in sorted(set(expected) | set(planned)):
        if planned.get(name) != expected.get(name):
            raise PlanError(f"{name}: planned shape {planned.get(name)}, the HF checkpoint has {expected.get(name)}")


def plan_for_tensors(named: Iterable[tuple[str, tuple[int, ...]]], *, dtype: str, bucket_bytes: int) -> WeightPlan:
    """A one-stage plan for plain HF tensors (e.g. a single-process trainer), in the given order."""
    dtype = _check_args(dtype, bucket_bytes)
    groups, seen = [], set()
    for name, shape in named:
        if name in seen:
            raise PlanError(f"{name}: listed twice")
        if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise PlanError(f"{name}: shape {shape!r} must be a tuple of non-negative ints")
        seen.add(name)
        groups.append([(name, tuple(shape), None, 0)])
    return _bucketize([groups], dtype=dtype, bucket_bytes=bucket_bytes, tp_size=1, pp_size=1)
