"""The trainer side of a weight sync: turn one rank's local parameters into HF-layout buckets.

Runs inside every trainer rank (a Megatron worker, or the driver for the
single-process reference backend), handed a `WeightSource` that describes the
rank's place in the layout and how its shards map onto HF tensors. Only ranks
of data-parallel replica 0 take part; each pipeline stage sends its own layers.

Two ways to fill a bucket, both streaming one bucket at a time:

- `write_stage_buckets`: every TP rank writes its own pieces straight into a
  buffer all of them can see (a shared-memory file on one host). No collective,
  no rank ever holds more than its own shards.
- `gather_stage_buckets`: TP rank 0 of the stage collects the shards of one
  bucket's parameters (`dist.gather` on the TP group), places them into one
  reusable buffer and hands the finished bucket to a callback (broadcast, disk,
  CUDA IPC). Memory: one bucket + one parameter's shards.

Placement (shard -> region of the full HF tensor, with QKV / gate-up
de-interleaving and vocab padding dropped) comes from the source; the copy
itself (cast to the engine dtype included) is `slime_rl.ops.copy_into`.
"""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager
from typing import Any, Callable, Protocol

import torch
import torch.distributed as dist

from slime_rl import ops
from slime_rl.buckets import dtype_from_name

Placement = tuple[int, tuple, torch.Tensor]  # (index into the source's HF outputs, index into the full tensor, view)


class WeightSource(Protocol):
    """One rank's view of the trainer layout (see module docstring)."""

    stage: int  # pipeline stage of this rank
    tp_rank: int
    tp_size: int
    tp_group: Any  # torch.distributed group of this rank's TP peers (None when tp_size == 1)
    active: bool  # True on data-parallel replica 0: only those ranks send
    device: torch.device

    def local(self, source: str) -> torch.Tensor:
        """This rank's tensor for a plan source (a Megatron parameter or an HF name)."""

    def placements(self, source: str, shard: torch.Tensor, tp_rank: int) -> list[Placement]:
        """Where TP rank `tp_rank`'s `shard` of `source` lands in the full HF tensors."""

    def replicated(self, source: str) -> bool:
        """True when every TP rank holds the whole tensor (rank 0 alone places it)."""

    def export(self, source: str, shards: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """The full HF tensors of `source` from every TP rank's shard in rank order (one when replicated),
        by the trainer's own export path (independent of `placements`; used by check mode)."""


class Timer:
    """Seconds per phase, summed."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    @contextmanager
    def phase(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - t0


def _by_source(bucket) -> dict[str, dict[int, Any]]:
    """source -> {source_index: PlannedTensor}, in bucket order."""
    out: dict[str, dict[int, Any]] = {}
    for t in bucket.tensors:
        out.setdefault(t.source or t.name, {})[t.source_index] = t
    return out


def bucket_views(bucket, buffer_u8: torch.Tensor) -> dict[str, torch.Tensor]:
    """HF name -> full-tensor view inside `buffer_u8`."""
    ts = bucket.tensors
    views = ops.bucket_views(buffer_u8, [t.offset for t in ts], [dtype_from_name(t.dtype) for t in ts],
                             [tuple(t.shape) for t in ts])
    return {t.name: v for t, v in zip(ts, views)}


def _place(bucket, views: dict[str, torch.Tensor], pieces: list[tuple[str, int, torch.Tensor]], source) -> None:
    """Copy every (source, tp_rank, shard) piece to its regions of the bucket views."""
    outputs = _by_source(bucket)
    dsts, srcs = [], []
    for name, tp_rank, shard in pieces:
        for hf_index, index, view in source.placements(name, shard, tp_rank):
            dst = views[outputs[name][hf_index].name]
            dsts.append(dst[index] if index else dst)
            srcs.append(view)
    ops.copy_into(dsts, srcs)


def write_stage_buckets(source: WeightSource, plan, buffers: dict[int, torch.Tensor],
                        on_bucket: Callable[[Any], None] | None = None) -> dict[str, float]:
    """Every TP rank of an active replica writes its own pieces of its stage's buckets into `buffers`
    (bucket index -> uint8 buffer shared by the TP ranks). Returns seconds per phase."""
    timer = Timer()
    if not source.active:
        return dict(timer.seconds)
    for bucket in plan.stage_buckets(source.stage):
        with timer.phase("pack"):
            pieces = [(name, source.tp_rank, source.local(name)) for name in _by_source(bucket)
                      if source.tp_rank == 0 or not source.replicated(name)]
            _place(bucket, bucket_views(bucket, buffers[bucket.index]), pieces, source)
        if on_bucket is not None:
            on_bucket(bucket)
    if source.tp_size > 1:
        with timer.phase("gather"):  # every piece is written before anyone reports done
            dist.barrier(group=source.tp_group)
    return dict(timer.seconds)


def gather_shards(source: WeightSource, name: str, timer: Timer,
                  dtype: torch.dtype | None = None) -> list[tuple[str, int, torch.Tensor]]:
    """TP rank 0 gets every rank's shard of `name` ([] elsewhere); replicated tensors are not gathered.
    Shards travel in `dtype` when it is narrower than theirs (the engine dtype: a cast now or at packing
    rounds the same, and the gather moves half the bytes of fp32 for bf16)."""
    shard = source.local(name)
    if source.tp_size == 1 or source.replicated(name):
        return [(name, 0, shard)] if source.tp_rank == 0 else []
    with timer.phase("gather"):
        dst = dist.get_global_rank(source.tp_group, 0)
        if dtype is not None and dtype.itemsize < shard.dtype.itemsize:
            shard = shard.to(dtype)
        shard = shard.detach().contiguous()
        shards = [torch.empty_like(shard) for _ in range(source.tp_size)] if source.tp_rank == 0 else None
        dist.gather(shard, shards, dst=dst, group=source.tp_group)
    return [(name, r, s) for r, s in enumerate(shards)] if source.tp_rank == 0 else []


def gather_stage_buckets(source: WeightSource, plan, send: Callable[[Any, torch.Tensor], None],
                         buffer_for: Callable[[Any], torch.Tensor] | None = None) -> dict[str, float]:
    """Assemble this stage's buckets on TP rank 0, one at a time, and call `send(bucket, buffer_u8)` there.

    `buffer_for(bucket)` gives the buffer to fill (default: one reused buffer on the source's device, as
    large as the stage's largest bucket). `send` must be done with the buffer when it returns, unless
    `buffer_for` hands out a fresh one per bucket. Returns seconds per phase ("send" = time in `send`)."""
    timer = Timer()
    if not source.active:
        return dict(timer.seconds)
    buckets = plan.stage_buckets(source.stage)
    shared = None
    if buffer_for is None and source.tp_rank == 0 and buckets:
        shared = torch.empty(max(b.nbytes for b in buckets), dtype=torch.uint8, device=source.device)
    for bucket in buckets:
        pieces = [p for name in _by_source(bucket)
                  for p in gather_shards(source, name, timer, dtype_from_name(plan.dtype))]
        if source.tp_rank != 0:
            continue
        with timer.phase("pack"):
            buffer = buffer_for(bucket) if buffer_for is not None else shared[: bucket.nbytes]
            _place(bucket, bucket_views(bucket, buffer), pieces, source)
            del pieces
        with timer.phase("send"):
            send(bucket, buffer)
    return dict(timer.seconds)


class TensorSource:
    """A `WeightSource` over plain HF tensors in one process (the reference backend, tests, benchmarks)."""

    stage, tp_rank, tp_size, tp_group, active = 0, 0, 1, None, True

    def __init__(self, named: dict[str, torch.Tensor]):
        self.named = named
        first = next(iter(named.values()), None)
        self.device = first.device if first is not None else torch.device("cpu")

    def local(self, source: str) -> torch.Tensor:
        return self.named[source].detach()

    def placements(self, source: str, shard: torch.Tensor, tp_rank: int) -> list[Placement]:
        return [(0, (), shard)]

    def replicated(self, source: str) -> bool:
        return True

    def export(self, source: str, shards: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        return {source: shards[0]}
