"""Messages between the driver and its spawned SPMD ranks, with their CPU tensors in shared memory.

A command's batch (`TrainBatch`) and a rank's replies (logprobs, an exported state dict) are mostly tensors.
Pickled, each tensor goes through torch's own pickler, its bytes are pushed through the pipe in small writes,
read back and copied again. Here each sending side owns an arena: an anonymous shared-memory file (`memfd`),
grown (doubled) when a message needs more. A message is the pickled object in which every plain CPU tensor is
replaced by its index, dtype and shape, plus the offsets where its bytes were copied into the arena. When the
arena is new, its descriptor follows the message over the pipe (SCM_RIGHTS), so no name ever exists in
/dev/shm: nothing to leak when a process is killed, nothing another user could open. The receiver maps the
arena and copies each tensor out, so a received tensor never aliases the sender's memory (as with pickle).

A sender writes its arena again only after the receiver has read the previous message: a rank replies after
it has decoded the command, and the driver sends the next command after every rank's reply (`training.spmd`).

Tensors that stay pickled: not on the CPU, sparse or quantized, requiring grad, or of a subclass (e.g.
`nn.Parameter`). Without `os.memfd_create` (not Linux) every message is a plain pickle.

torch is imported inside functions: a spawned rank loads this module before it applies its environment.
"""

from __future__ import annotations

import io
import math
import mmap
import os
import pickle
import sys
from dataclasses import dataclass
from multiprocessing.reduction import recv_handle, send_handle
from typing import Any

_PICKLE = pickle.HIGHEST_PROTOCOL
_ALIGN = 64  # every tensor starts on a cache line (and on its element size)
_MIN_ARENA = 1 << 20


def supported() -> bool:
    return sys.platform.startswith("linux") and hasattr(os, "memfd_create")


def _shareable(obj: Any) -> bool:
    import torch

    return (type(obj) is torch.Tensor and obj.device.type == "cpu" and obj.layout == torch.strided
            and not obj.is_quantized and not obj.requires_grad)


class _Mapping:
    """A read-write shared mapping of a memfd, and a byte array over it. Bytes are copied in and out with numpy:
    torch's `copy_` into a tensor over an mmap took ~8 ms a call here whatever the size (numpy: microseconds),
    and its `clone` out of one ran at a fraction of numpy's speed."""

    def __init__(self, fd: int, size: int):
        import numpy as np

        self.fd, self.size = fd, size
        self.mm = mmap.mmap(fd, size)
        self.bytes = np.frombuffer(self.mm, dtype=np.uint8)

    def close(self) -> None:
        self.bytes = None
        try:
            self.mm.close()
        except BufferError:  # a tensor over it is still alive somewhere: the mapping goes when it does
            pass
        os.close(self.fd)


class Arena:
    """The sending side's shared memory; `generation` changes whenever a new file replaces it."""

    def __init__(self) -> None:
        self.mapping: _Mapping | None = None
        self.generation = 0

    def reserve(self, nbytes: int) -> _Mapping:
        if self.mapping is None or self.mapping.size < nbytes:
            size = max(nbytes, 2 * (self.mapping.size if self.mapping else 0), _MIN_ARENA)
            size = -(-size // mmap.PAGESIZE) * mmap.PAGESIZE
            fd = os.memfd_create("slime_rl_spmd", os.MFD_CLOEXEC)
            try:
                os.ftruncate(fd, size)
                mapping = _Mapping(fd, size)
            except BaseException:
                os.close(fd)
                raise
            self.close()
            self.mapping, self.generation = mapping, self.generation + 1
        return self.mapping

    def close(self) -> None:
        if self.mapping is not None:
            self.mapping.close()
            self.mapping = None


@dataclass(frozen=True)
class Encoded:
    """A message ready for any number of links: the pickle, the tensors' offsets, the arena they are in."""

    body: bytes
    offsets: tuple[int, ...] = ()
    mapping: _Mapping | None = None
    generation: int = 0


class _Pickler(pickle.Pickler):
    def __init__(self, file: io.BytesIO, share: bool):
        super().__init__(file, protocol=_PICKLE)
        self.share, self.tensors = share, []

    def persistent_id(self, obj: Any) -> Any:
        if self.share and _shareable(obj):
            self.tensors.append(obj)
            return len(self.tensors) - 1, obj.dtype, tuple(obj.shape)
        return None


def encode(obj: Any, arena: Arena | None) -> Encoded:
    """Pickle `obj`, its shareable tensors copied into `arena` (None: a plain pickle). Raises what pickling
    raises before anything is written anywhere."""
    import torch

    buffer = io.BytesIO()
    pickler = _Pickler(buffer, share=arena is not None)
    pickler.dump(obj)
    if not pickler.tensors:
        return Encoded(buffer.getvalue())
    offsets, end = [], 0
    for t in pickler.tensors:
        offsets.append(end)
        end += -(-t.numel() * t.element_size() // _ALIGN) * _ALIGN
    mapping = arena.reserve(end)
    for t, offset in zip(pickler.tensors, offsets):
        n = t.numel() * t.element_size()
        if n:
            mapping.bytes[offset:offset + n] = t.contiguous().view(-1).view(torch.uint8).numpy()
    return Encoded(buffer.getvalue(), tuple(offsets), mapping, arena.generation)


class Link:
    """One end of a pipe (a Unix socket: `multiprocessing.Pipe`): `send` / `recv` messages, keeping the
    peer's arena mapped between them."""

    def __init__(self, conn: Any, arena: Arena | None = None):
        self.conn, self.arena = conn, arena
        self._sent_generation = 0  # of `arena`, whose descriptor the peer has
        self._peer: _Mapping | None = None

    def send(self, obj: Any) -> None:
        self.send_encoded(encode(obj, self.arena))

    def send_encoded(self, message: Encoded) -> None:
        new = message.mapping is not None and message.generation != self._sent_generation
        self.conn.send_bytes(pickle.dumps((message.mapping.size if new else 0, message.offsets, message.body),
                                          protocol=_PICKLE))
        if new:
            send_handle(self.conn, message.mapping.fd, None)
            self._sent_generation = message.generation

    def recv(self) -> Any:
        """The next message (blocking); EOFError / OSError when the peer is gone."""
        new_size, offsets, body = pickle.loads(self.conn.recv_bytes())
        if new_size:
            try:
                fd = recv_handle(self.conn)
            except RuntimeError as error:  # the peer died between the message and its descriptor
                raise EOFError(str(error)) from None
            self.close()
            self._peer = _Mapping(fd, new_size)
        return _Unpickler(io.BytesIO(body), self._peer, offsets).load()

    def close(self) -> None:
        if self._peer is not None:
            self._peer.close()
            self._peer = None


class _Unpickler(pickle.Unpickler):
    def __init__(self, file: io.BytesIO, mapping: _Mapping | None, offsets: tuple[int, ...]):
        super().__init__(file)
        self.mapping, self.offsets = mapping, offsets

    def persistent_load(self, pid: Any) -> Any:
        import torch

        index, dtype, shape = pid
        if self.mapping is None or not 0 <= index < len(self.offsets):
            raise pickle.UnpicklingError(f"tensor {index} of a message has no shared memory to come from")
        n = dtype.itemsize * math.prod(shape)
        if n == 0:
            return torch.empty(shape, dtype=dtype)
        offset = self.offsets[index]
        return torch.from_numpy(self.mapping.bytes[offset:offset + n].copy()).view(dtype).view(shape)
