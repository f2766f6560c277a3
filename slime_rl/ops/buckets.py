"""Bucket ops: typed views into a flat byte buffer, and many strided copies into them (weight sync).

A weight bucket is one uint8 buffer holding many tensors at byte offsets
(`slime_rl.buckets`, `weight_sync.plan`). Packing is the hot path of weight
sync: each sender copies a few hundred (often strided, often dtype-casting)
views of its parameters into the buffer, possibly a shared-memory file.

These are the torch references; a fused csrc kernel (one launch for the whole
list) is issue 7. They are plain functions, not registered with the
dispatcher (`_backend` dispatches to compiled op names, and there is none
yet), so `ops.describe()` does not list them.
"""

from __future__ import annotations

from typing import Sequence

import torch


class BucketEntryError(ValueError):
    """One entry of a bucket op is bad; `index` says which (callers can name the tensor)."""

    def __init__(self, index: int, message: str) -> None:
        super().__init__(message)
        self.index = index


def bucket_views(buffer_u8: torch.Tensor, offsets: Sequence[int], dtypes: Sequence[torch.dtype],
                 shapes: Sequence[Sequence[int]]) -> list[torch.Tensor]:
    """Views (no copy) of `buffer_u8` [nbytes]: entry i is `dtypes[i]` of `shapes[i]` at byte `offsets[i]`.

    Raises BucketEntryError (a ValueError) naming the index for an entry that lies outside the
    buffer or whose offset is not a multiple of its dtype's itemsize.
    """
    if buffer_u8.dtype != torch.uint8 or buffer_u8.dim() != 1 or buffer_u8.stride(0) != 1:
        raise ValueError(f"bucket_views: buffer_u8 must be a contiguous 1-D uint8 tensor, "
                         f"got {buffer_u8.dtype} of shape {tuple(buffer_u8.shape)}")
    if not len(offsets) == len(dtypes) == len(shapes):
        raise ValueError(f"bucket_views: {len(offsets)} offsets, {len(dtypes)} dtypes and {len(shapes)} shapes")
    size, views = buffer_u8.numel(), []
    for i, (offset, dtype, shape) in enumerate(zip(offsets, dtypes, shapes)):
        shape = tuple(int(n) for n in shape)
        nbytes = dtype.itemsize
        for n in shape:
            nbytes *= n
        if offset < 0 or offset + nbytes > size:
            raise BucketEntryError(i, f"bucket_views: entry {i} ({dtype}, {shape}) at bytes "
                                      f"[{offset}, {offset + nbytes}) lies outside the {size}-byte buffer")
        if offset % dtype.itemsize:
            raise BucketEntryError(i, f"bucket_views: entry {i} offset {offset} is not a multiple of "
                                      f"{dtype}'s itemsize {dtype.itemsize}")
        views.append(buffer_u8[offset:offset + nbytes].view(dtype).view(shape))
    return views


def copy_into(dsts: Sequence[torch.Tensor], srcs: Sequence[torch.Tensor]) -> None:
    """dsts[i].copy_(srcs[i]) for every i: casts dtype, moves device, either side may be strided.

    Shapes must match exactly (no broadcasting); BucketEntryError names the index otherwise. Never
    records autograd history, so trainer parameters can be passed directly.
    """
    if len(dsts) != len(srcs):
        raise ValueError(f"copy_into: {len(dsts)} destinations but {len(srcs)} sources")
    for i, (dst, src) in enumerate(zip(dsts, srcs)):
        if dst.shape != src.shape:
            raise BucketEntryError(i, f"copy_into: entry {i} destination shape {tuple(dst.shape)} != "
                                      f"source shape {tuple(src.shape)}")
    with torch.no_grad():
        for dst, src in zip(dsts, srcs):
            dst.copy_(src)


def pack_bucket(srcs: Sequence[torch.Tensor], offsets: Sequence[int], dtypes: Sequence[torch.dtype],
                buffer_u8: torch.Tensor) -> None:
    """Write srcs[i], cast to dtypes[i], at byte offsets[i] of `buffer_u8` (see `bucket_views`)."""
    if len(srcs) != len(offsets):
        raise ValueError(f"pack_bucket: {len(srcs)} sources but {len(offsets)} offsets")
    copy_into(bucket_views(buffer_u8, offsets, dtypes, [s.shape for s in srcs]), srcs)
