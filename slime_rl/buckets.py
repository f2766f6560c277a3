"""Flat weight buckets: many HF-named tensors packed into one byte buffer.

A bucket is what crosses a process boundary during weight sync (one
allocation, one transfer); `WeightBucket.entries` say where each tensor lives.
Offsets are aligned to `ALIGN` bytes so every view is aligned for its dtype.
"""

from __future__ import annotations

import hashlib

from typing import Iterable

import torch

from slime_rl import ops
from slime_rl.ops.buckets import BucketEntryError
from slime_rl.types import BucketEntry, WeightBucket

ALIGN = 64


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dtype


def tensor_sha256(t: torch.Tensor) -> str:
    """sha256 hex digest of a tensor's bytes (C order, as stored on CPU): how engines and trainers compare weights."""
    return hashlib.sha256(t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()).hexdigest()


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def bucket_layout(names: list[str], dtypes: list[str], shapes: list[Iterable[int]]) -> tuple[list[BucketEntry], int]:
    """Entries + total bytes of the buffer holding these tensors in order (each offset aligned to ALIGN)."""
    entries, offset = [], 0
    for name, dtype, shape in zip(names, dtypes, shapes, strict=True):
        entries.append(BucketEntry(name, dtype.removeprefix("torch."), tuple(shape), offset))
        numel = 1
        for d in shape:
            numel *= int(d)
        offset = _aligned(offset + numel * dtype_from_name(dtype).itemsize)
    return entries, offset


def pack_bucket(named_tensors: Iterable[tuple[str, torch.Tensor]], weight_version: int = 0) -> WeightBucket:
    """Copy tensors into one uint8 buffer (on the first tensor's device)."""
    items = [(name, t.detach()) for name, t in named_tensors]
    entries, offset = bucket_layout([n for n, _ in items], [dtype_name(t.dtype) for _, t in items],
                                    [t.shape for _, t in items])
    device = items[0][1].device if items else "cpu"
    buffer = torch.empty(offset, dtype=torch.uint8, device=device)
    tensors = [t for _, t in items]
    ops.pack_bucket(tensors, [e.offset for e in entries], [t.dtype for t in tensors], buffer)
    return WeightBucket(buffer, entries, weight_version)


def unpack_bucket(bucket: WeightBucket) -> list[tuple[str, torch.Tensor]]:
    """Views into the bucket's buffer (no copy), one per entry, in order."""
    entries = bucket.entries
    dtypes = [dtype_from_name(e.dtype) for e in entries]
    try:
        views = ops.bucket_views(bucket.buffer, [e.offset for e in entries], dtypes, [e.shape for e in entries])
    except BucketEntryError as exc:  # name the tensor, not just its index
        raise ValueError(f"bucket entry {entries[exc.index].name!r}: {exc}") from exc
    return [(e.name, v) for e, v in zip(entries, views)]
