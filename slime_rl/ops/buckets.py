"""Bucket ops: typed views into a flat byte buffer, and many casting copies in one call (weight sync).

A weight bucket is one uint8 buffer holding many tensors at byte offsets
(`slime_rl.buckets`, `weight_sync.plan`). Packing is the hot path of weight
sync: each sender copies a few hundred (often strided, often dtype-casting)
views of its parameters into the buffer, possibly a shared-memory file;
receivers unpack the reverse way.

    pack:   copy_into(bucket_views(buffer_u8, offsets, dtypes, shapes), tensors)  (= pack_bucket)
    unpack: copy_into(tensors, bucket_views(...))                                  (= unpack_bucket)

copy_into is the op `slime_rl::copy_into` (kernels: csrc/cpu/buckets.cpp,
csrc/cuda/buckets.cu): dsts[i].copy_(srcs[i]) for the whole list in one call,
bit-identical to that loop (every value; NaN payloads aside, which torch's own
copy paths do not agree on). The kernels copy contiguous entries of fp32, fp64,
fp16 and bf16 themselves and leave strided ones to copy_. Entries whose two
sides are on different devices are copied by copy_ (a transfer, not a kernel),
in list order with the rest. The reference is the copy_ loop (`_copy_loop`).
Tests: tests/test_bucket_ops.py; benchmark: benchmarks/kernels/bench_buckets.py.
"""

from __future__ import annotations

from typing import Sequence

import torch

from slime_rl.ops import _backend


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
    typed: dict[torch.dtype, torch.Tensor] = {}  # the buffer viewed as each dtype, made once
    for i, (offset, dtype, shape) in enumerate(zip(offsets, dtypes, shapes)):
        shape = tuple(int(n) for n in shape)
        numel, step, strides = 1, 1, []
        for n in reversed(shape):  # contiguous strides, as .view(shape) gives them (size-0 dims count as 1)
            strides.append(step)
            numel, step = numel * n, step * max(n, 1)
        nbytes = numel * dtype.itemsize
        if offset < 0 or offset + nbytes > size:
            raise BucketEntryError(i, f"bucket_views: entry {i} ({dtype}, {shape}) at bytes "
                                      f"[{offset}, {offset + nbytes}) lies outside the {size}-byte buffer")
        if offset % dtype.itemsize:
            raise BucketEntryError(i, f"bucket_views: entry {i} offset {offset} is not a multiple of "
                                      f"{dtype}'s itemsize {dtype.itemsize}")
        if torch.compiler.is_compiling():  # traced once; storage_offset() is not traceable
            views.append(buffer_u8[offset:offset + nbytes].view(dtype).view(shape))
            continue
        # Eager: one as_strided per entry on a per-dtype view of the buffer, the same view as the
        # slice above at a fifth of the cost (it shows with thousands of small tensors).
        if dtype not in typed:
            typed[dtype] = buffer_u8[:size - size % dtype.itemsize].view(dtype)
        base = typed[dtype]
        views.append(base.as_strided(shape, strides[::-1], base.storage_offset() + offset // dtype.itemsize))
    return views


@_backend.fake("copy_into")
def _copy_into_fake(dsts: list[torch.Tensor], srcs: list[torch.Tensor]) -> None:
    # The op only writes into dsts: no outputs to describe to torch.compile.
    return None


def _copy_loop(dsts: Sequence[torch.Tensor], srcs: Sequence[torch.Tensor]) -> None:
    """The reference: one copy_ per entry, in order."""
    for dst, src in zip(dsts, srcs):
        dst.copy_(src)


def copy_into(dsts: Sequence[torch.Tensor], srcs: Sequence[torch.Tensor], impl: str | None = None) -> None:
    """dsts[i].copy_(srcs[i]) for every i: casts dtype, moves device, either side may be strided.

    Shapes must match exactly (no broadcasting); BucketEntryError names the index otherwise. Never
    records autograd history, so trainer parameters can be passed directly (on either side). One
    kernel call per run of consecutive entries on one device; entries that cross devices use copy_.
    impl forces "cuda", "cpp" or "reference" for the kernel calls (see slime_rl.ops._backend).
    """
    dsts, srcs = list(dsts), list(srcs)
    if len(dsts) != len(srcs):
        raise ValueError(f"copy_into: {len(dsts)} destinations but {len(srcs)} sources")
    devices = []  # (destination, source) device of each entry
    # Dynamo cannot trace inference-mode queries, so compiled code skips this check.
    outside_inference_mode = not torch.compiler.is_compiling() and not torch.is_inference_mode_enabled()
    for i, (dst, src) in enumerate(zip(dsts, srcs)):
        if dst.shape != src.shape:
            raise BucketEntryError(i, f"copy_into: entry {i} destination shape {tuple(dst.shape)} != "
                                      f"source shape {tuple(src.shape)}")
        if outside_inference_mode and dst.is_inference():  # copy_ refuses this; the C++ op would not notice
            raise RuntimeError(f"copy_into: entry {i} destination is an inference tensor, which cannot be "
                               "updated in place outside torch.inference_mode()")
        devices.append((dst.device, src.device))
    with torch.no_grad():
        start = 0
        while start < len(dsts):
            # The longest run from `start` on the same devices: runs go one after another, so
            # entries are still copied in list order.
            end = start + 1
            while end < len(dsts) and devices[end] == devices[start]:
                end += 1
            run_dsts, run_srcs = dsts[start:end], srcs[start:end]
            dst_device, src_device = devices[start]
            if dst_device != src_device or _backend.choose("copy_into", run_dsts[0], impl) == "reference":
                _copy_loop(run_dsts, run_srcs)
            else:
                torch.ops.slime_rl.copy_into(run_dsts, run_srcs)
                # The C++ op does not touch version counters; copy_ does (autograd's check that
                # a tensor saved for backward was not overwritten relies on it).
                torch.autograd.graph.increment_version(run_dsts)
            start = end


def pack_bucket(srcs: Sequence[torch.Tensor], offsets: Sequence[int], dtypes: Sequence[torch.dtype],
                buffer_u8: torch.Tensor, impl: str | None = None) -> None:
    """Write srcs[i], cast to dtypes[i], at byte offsets[i] of `buffer_u8` (see `bucket_views`)."""
    if len(srcs) != len(offsets):
        raise ValueError(f"pack_bucket: {len(srcs)} sources but {len(offsets)} offsets")
    copy_into(bucket_views(buffer_u8, offsets, dtypes, [s.shape for s in srcs]), srcs, impl)


def unpack_bucket(buffer_u8: torch.Tensor, offsets: Sequence[int], dsts: Sequence[torch.Tensor],
                  dtypes: Sequence[torch.dtype] | None = None, impl: str | None = None) -> None:
    """Fill dsts[i] from the `dtypes[i]` tensor of dsts[i]'s shape at byte offsets[i] of `buffer_u8`, casting.

    The inverse of `pack_bucket`; dtypes (what the buffer holds) default to the destinations' own.
    """
    if len(dsts) != len(offsets):
        raise ValueError(f"unpack_bucket: {len(dsts)} destinations but {len(offsets)} offsets")
    if dtypes is None:
        dtypes = [d.dtype for d in dsts]
    copy_into(dsts, bucket_views(buffer_u8, offsets, dtypes, [d.shape for d in dsts]), impl)
