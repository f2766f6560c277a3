"""A weight-broadcast process group that lives beside (not inside) torch.distributed's default group.

The trainer (rank 0) and one or more rollout servers (ranks `rank_offset ..`)
meet at `master_address:master_port`: rank 0 hosts a `TCPStore` there, the
others connect to it, and every rank builds a `ProcessGroupGloo` (CPU) or
`ProcessGroupNCCL` (CUDA) directly on a `PrefixStore(group_name, store)`.
Nothing is registered with `torch.distributed.init_process_group`, so a
trainer that already has its own default group (torchrun, Megatron) can join
as well, and one process can hold several such groups under different names.

Usage, on every rank (the trainer calls it with rank=0):

    group = init_weight_group("10.0.0.1", 29600, rank, world_size, backend="gloo")
    group.broadcast(tensor_on_the_right_device, src=0)   # in place on receivers
    group.destroy()

Note: real SGLang builds its side with torch's private `_new_process_group_helper`,
whose store-key layout differs by torch version; this module pairs with itself
(our server and our trainer), not with a real SGLang server.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

BACKENDS = ("gloo", "nccl")


def free_port(host: str = "127.0.0.1") -> int:
    """A port free right now on this host (another process could take it before it is bound)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _is_loopback(address: str) -> bool:
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


@dataclass
class WeightGroup:
    """One rank's handle on a weight-broadcast group."""

    group_name: str
    rank: int
    world_size: int
    backend: str
    master_address: str
    master_port: int
    _pg: Any = field(repr=False)
    _store: Any = field(repr=False)  # keeps the TCPStore (the server, on rank 0) alive

    @property
    def device(self) -> torch.device:
        """Where tensors passed to `broadcast` must live for this backend."""
        return torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else torch.device("cpu")

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Broadcast `tensor` from rank `src` to every rank, in place; returns it."""
        if self._pg is None:
            raise RuntimeError(f"weight group {self.group_name!r} was destroyed")
        if not tensor.is_contiguous():
            raise ValueError(f"weight group {self.group_name!r}: broadcast needs a contiguous tensor")
        if tensor.device.type != self.device.type:
            raise ValueError(
                f"weight group {self.group_name!r} ({self.backend}) broadcasts {self.device.type} tensors, "
                f"got one on {tensor.device}"
            )
        opts = dist.BroadcastOptions()
        opts.rootRank = src
        opts.rootTensor = 0
        self._pg.broadcast([tensor], opts).wait()
        return tensor

    def destroy(self) -> None:
        """Release the backend (idempotent)."""
        pg, self._pg, self._store = self._pg, None, None
        if pg is not None and hasattr(pg, "shutdown"):
            try:
                pg.shutdown()
            except RuntimeError:  # already torn down on the other side
                pass


def init_weight_group(
    master_address: str,
    master_port: int,
    rank: int,
    world_size: int,
    backend: str = "gloo",
    group_name: str = "weight_update_group",
    timeout_s: float = 60,
) -> WeightGroup:
    """Join (rank > 0) or host (rank 0) the group; blocks until all `world_size` ranks arrived."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
    if not group_name:
        raise ValueError("group_name must be a non-empty string")
    timeout = timedelta(seconds=timeout_s)
    try:
        store = dist.TCPStore(
            master_address, int(master_port), world_size, is_master=(rank == 0), timeout=timeout,
            wait_for_workers=False,
        )
    except Exception as exc:  # noqa: BLE001 - re-raised with the address that failed
        raise RuntimeError(
            f"weight group {group_name!r}: rank {rank} could not reach the store at "
            f"{master_address}:{master_port} within {timeout_s} s: {exc}"
        ) from exc
    prefix_store = dist.PrefixStore(f"{group_name}/", store)
    if backend == "gloo":
        opts = dist.ProcessGroupGloo._Options()
        opts._timeout = timeout
        # Stay on the loopback interface for a loopback master: the default device
        # resolves the hostname, which may name an interface the peer cannot reach.
        host = "127.0.0.1" if _is_loopback(master_address) else ""
        opts._devices = [dist.ProcessGroupGloo.create_device(hostname=host)]
        pg = dist.ProcessGroupGloo(prefix_store, rank, world_size, opts)
    else:
        if not hasattr(dist, "ProcessGroupNCCL") or not torch.cuda.is_available():
            raise ValueError("backend 'nccl' needs a CUDA build of torch and a visible GPU; use 'gloo'")
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = timeout
        pg = dist.ProcessGroupNCCL(prefix_store, rank, world_size, opts)
    group = WeightGroup(group_name, rank, world_size, backend, master_address, int(master_port), pg, store)
    # A first collective makes every rank wait for the others (the constructor may be lazy).
    group.broadcast(torch.zeros(1, device=group.device), src=0)
    return group
