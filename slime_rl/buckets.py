"""Flat weight buckets: many HF-named tensors packed into one byte buffer.

A bucket is what crosses a process boundary during weight sync (one
allocation, one transfer); `WeightBucket.entries` say where each tensor lives.
Offsets are aligned to `ALIGN` bytes so every view is aligned for its dtype.

On the wire to and from SGLang a bucket takes SGLang's shapes: the dense flat
buffer of a distributed flattened bucket (`dense_layout` / `dense_buffer`) and
the `{"flattened_tensor", "metadata": [FlattenedTensorMetadata]}` dict of a
tensor payload (`sglang_bucket` / `sglang_named_tensors`).
"""

from __future__ import annotations

import hashlib
import sys
import threading
import types
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing.reduction import ForkingPickler
from typing import Any, Iterable

import torch
import torch.multiprocessing  # noqa: F401 - CUDA tensors pickle as IPC handles in dumps_sglang

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


def dense_layout(names: list[str], dtypes: list[str], shapes: list[Iterable[int]]) -> tuple[list[BucketEntry], int]:
    """The flat buffer SGLang broadcasts for `load_format="flattened_bucket"` (`FlattenedTensorBucket.empty`
    in sglang/srt/weight_sync/tensor_bucket.py): the tensors' bytes back to back, no padding; a tensor whose
    byte offset is not a multiple of its itemsize is refused, as SGLang refuses it."""
    entries, offset = [], 0
    for name, dtype, shape in zip(names, dtypes, shapes, strict=True):
        itemsize = dtype_from_name(dtype).itemsize
        if offset % itemsize:
            raise ValueError(f"flattened bucket tensor {name!r}: byte offset {offset} is not aligned for {dtype}")
        entries.append(BucketEntry(name, dtype.removeprefix("torch."), tuple(int(d) for d in shape), offset))
        numel = 1
        for d in shape:
            numel *= int(d)
        offset += numel * itemsize
    return entries, offset


def dense_buffer(buffer_u8: torch.Tensor, entries: list[BucketEntry]) -> torch.Tensor:
    """This bucket (`buffer_u8`, laid out by `entries`) as SGLang's dense flat buffer: a slice of it when the
    offsets already are dense, else a packed copy; viewed as the tensors' dtype when they share one."""
    dense, nbytes = dense_layout([e.name for e in entries], [e.dtype for e in entries], [e.shape for e in entries])
    if all(d.offset == e.offset for d, e in zip(dense, entries)):
        flat = buffer_u8[:nbytes]
    else:
        flat = torch.empty(nbytes, dtype=torch.uint8, device=buffer_u8.device)
        for d, e in zip(dense, entries):
            size = _nbytes(e)
            flat[d.offset:d.offset + size].copy_(buffer_u8[e.offset:e.offset + size])
    dtypes = {e.dtype for e in entries}
    return flat.view(dtype_from_name(dtypes.pop())) if len(dtypes) == 1 else flat


def _nbytes(e: BucketEntry) -> int:
    n = dtype_from_name(e.dtype).itemsize
    for d in e.shape:
        n *= int(d)
    return n


# ---- SGLang's flattened buckets -------------------------------------------------------------
# sglang/srt/weight_sync/tensor_bucket.py: `FlattenedTensorBucket(named_tensors)` concatenates the
# flattened tensors; `reconstruct_tensors` slices [start_idx:end_idx] of `flattened_tensor` in ITS
# elements. Up to 2025 the tensors were concatenated as they are (`torch.cat` promotes mixed dtypes;
# a slice is reshaped, then `.to(meta.dtype)`); current SGLang (0.5.2x, `supports_multi_dtypes`)
# concatenates their bytes (`flatten().view(torch.uint8)`, offsets in bytes, a slice is
# `.view(meta.dtype).reshape(shape)`). Both read a single-dtype bucket in that dtype with element
# offsets, which is what `sglang_bucket` writes (mixed dtypes: the current byte layout).
SGLANG_BUCKET_MODULE = "sglang.srt.weight_sync.tensor_bucket"
SGLANG_METADATA = (SGLANG_BUCKET_MODULE, "FlattenedTensorMetadata")
_FIELDS = ("name", "shape", "dtype", "start_idx", "end_idx", "numel")


@dataclass
class FlattenedTensorMetadata:
    """Stand-in for SGLang's class of that name (same fields); pickles under SGLang's module path."""

    name: str
    shape: torch.Size
    dtype: torch.dtype
    start_idx: int
    end_idx: int
    numel: int

    def __setstate__(self, state: Any) -> None:  # what unpickling may set: the six fields, nothing else
        if not isinstance(state, dict) or set(state) != set(_FIELDS):
            raise ValueError(f"{SGLANG_METADATA[1]} state must hold exactly the fields {', '.join(_FIELDS)}")
        self.__dict__.update(state)


FlattenedTensorMetadata.__module__ = SGLANG_BUCKET_MODULE
_PICKLE_LOCK = threading.Lock()


@contextmanager
def sglang_class_importable():
    """Pickling names a class by module; while SGLang is not imported, lend it ours for the dump."""
    with _PICKLE_LOCK:
        if SGLANG_BUCKET_MODULE in sys.modules:
            yield
            return
        parts = SGLANG_BUCKET_MODULE.split(".")
        lent = [name for name in (".".join(parts[:i]) for i in range(1, len(parts) + 1)) if name not in sys.modules]
        for name in lent:  # pickle imports the top package first
            sys.modules[name] = types.ModuleType(name)
        sys.modules[SGLANG_BUCKET_MODULE].FlattenedTensorMetadata = FlattenedTensorMetadata
        try:
            yield
        finally:
            for name in lent:
                del sys.modules[name]


def _metadata_class() -> type:
    """SGLang's class when SGLang is imported in this process (its pickles must then name it), else ours."""
    module = sys.modules.get(SGLANG_BUCKET_MODULE)
    return getattr(module, SGLANG_METADATA[1], FlattenedTensorMetadata) if module else FlattenedTensorMetadata


def sglang_bucket(flat: torch.Tensor, entries: list[BucketEntry]) -> dict[str, Any]:
    """SGLang's bucket dict over our byte-offset bucket buffer `flat` (uint8, no copy): one dtype ->
    the buffer in that dtype with element offsets (gaps between tensors are never read); mixed dtypes ->
    the uint8 buffer with byte offsets (current SGLang)."""
    dtypes = {e.dtype for e in entries}
    dtype = dtype_from_name(next(iter(dtypes))) if len(dtypes) == 1 else torch.uint8
    if dtype != torch.uint8 and (flat.numel() % dtype.itemsize or any(e.offset % dtype.itemsize for e in entries)):
        dtype = torch.uint8
    cls, meta = _metadata_class(), []
    for e in entries:
        numel = 1
        for d in e.shape:
            numel *= int(d)
        if dtype != torch.uint8:
            start = e.offset // dtype.itemsize
        else:
            start, numel = e.offset, numel * dtype_from_name(e.dtype).itemsize
        meta.append(cls(name=e.name, shape=torch.Size(e.shape), dtype=dtype_from_name(e.dtype), start_idx=start,
                        end_idx=start + numel, numel=numel))
    return {"flattened_tensor": flat.view(dtype), "metadata": meta}


def dumps_sglang(obj: Any) -> bytes:
    """ForkingPickler bytes of an object holding `sglang_bucket` metadata (as SGLang's sender pickles)."""
    with sglang_class_importable():
        return bytes(ForkingPickler.dumps(obj))


def sglang_named_tensors(flat: Any, metadata: list[Any]) -> list[tuple[str, torch.Tensor]]:
    """SGLang's `FlattenedTensorBucket.reconstruct_tensors`, both generations (see above), each entry
    checked first (ValueError naming it): views of `flat`, copies only for promoted (mixed-dtype) buckets."""
    if not isinstance(flat, torch.Tensor) or flat.dim() != 1:
        raise ValueError("flattened_bucket: flattened_tensor must be a 1-D tensor")
    out = []
    for i, m in enumerate(metadata):
        shape = getattr(m, "shape", None)
        shape = tuple(shape) if isinstance(shape, (tuple, list)) else None
        ints = [getattr(m, k, None) for k in ("start_idx", "end_idx", "numel")]
        if not (isinstance(m, FlattenedTensorMetadata) and isinstance(m.name, str) and isinstance(m.dtype, torch.dtype)
                and shape is not None and all(_count(d) for d in shape) and all(_count(v) for v in ints)
                and m.start_idx + m.numel == m.end_idx <= flat.numel()):
            raise ValueError(f"flattened_bucket metadata[{i}] must be a FlattenedTensorMetadata with name, shape, "
                             f"dtype and 0 <= start_idx <= end_idx = start_idx + numel <= {flat.numel()}")
        piece = flat[m.start_idx:m.end_idx]
        size = 1
        for d in shape:
            size *= d
        if flat.dtype == m.dtype or (flat.dtype != torch.uint8 and m.numel == size):
            if m.numel != size:
                raise ValueError(f"flattened_bucket metadata[{i}] ({m.name!r}): numel {m.numel} != shape {shape}")
            t = piece.reshape(shape)
            t = t if t.dtype == m.dtype else t.to(m.dtype)  # SGLang before 0.5: promoted by torch.cat
        elif flat.dtype == torch.uint8 and m.numel == size * m.dtype.itemsize and m.start_idx % m.dtype.itemsize == 0:
            t = piece.view(m.dtype).reshape(shape)
        else:
            raise ValueError(f"flattened_bucket metadata[{i}] ({m.name!r}): {m.numel} {flat.dtype} elements cannot "
                             f"hold {m.dtype} of shape {shape}")
        out.append((m.name, t))
    return out


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
