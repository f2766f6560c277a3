"""A weight-broadcast process group that lives beside (not inside) torch.distributed's default group.

The trainer (rank 0) and one or more rollout servers (ranks `rank_offset ..`)
form the group exactly as SGLang and slime do (SGLang
`python/sglang/srt/utils/common.py::init_custom_process_group`, called by
`ModelRunner.init_weights_update_group` / `weight_updater.py` with
`init_method="tcp://ADDR:PORT"`; OpenRLHF and verl carry the same copy):

1. `rendezvous("tcp://ADDR:PORT", rank, world_size, timeout=...)`: rank 0 hosts
   the TCPStore and waits there for every rank; then `store.set_timeout`;
2. `PrefixStore(group_name, store)` (the name itself, no "/");
3. `_new_process_group_helper(world_size, rank, [], backend, prefix_store,
   group_name=group_name, backend_options=None, timeout=...)`, which adds its own
   `"{group_name}/"` and `"{device}/"` prefixes (gloo: "cpu/", nccl: "cuda/") and
   syncs a sequence number through the store;
4. `_world.pg_group_ranks[pg] = {i: i for i in range(world_size)}`.

No warm-up collective: the first collective is the first weight broadcast.
With an empty rank list the helper builds a top-level group and needs no default
group (torch 2.13: it reads the default group only for sub-groups or when one is
initialized with a bound device), so a server without torch.distributed joins too.

The helper registers the group by name in torch's process-wide registry, so a
second rank of the SAME group in the same process (a trainer and an in-process
engine, as tests run them) cannot use it; that rank builds the identical backend
directly on the identical store prefixes (`_same_keys_backend`), which the peers
cannot tell apart. Groups of different names coexist (weight_sync uses one per PP
stage). `destroy()` calls `destroy_process_group(pg)` for helper-built groups.

Usage, on every rank (the trainer calls it with rank=0):

    group = init_weight_group("10.0.0.1", 29600, rank, world_size, backend="gloo")
    group.broadcast(tensor_on_the_right_device, src=0)   # in place on receivers
    group.destroy()
"""

from __future__ import annotations

import socket
import threading
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed import distributed_c10d as c10d

BACKENDS = ("gloo", "nccl")
_DEVICE_PREFIX = {"gloo": "cpu", "nccl": "cuda"}  # the first device of torch's BackendConfig map per backend

# Group names this process registered with torch through the helper, guarded by _LOCK.
_LOCK = threading.Lock()
_REGISTERED: set[str] = set()


def free_port(host: str = "127.0.0.1") -> int:
    """A port free right now on this host (another process could take it before it is bound)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


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
    _registered: bool = field(default=False, repr=False)  # built by torch's helper: destroy through torch

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
        if pg is None:
            return
        try:
            if self._registered:
                dist.destroy_process_group(pg)
            else:
                pg.shutdown()
        except (RuntimeError, ValueError):  # already torn down on the other side
            pass
        finally:
            if self._registered:
                _release_name(self.group_name)


def _claim_name(group_name: str) -> bool:
    """True if this rank may build the group through torch's helper (the name is free in this process)."""
    with _LOCK:
        if group_name in _REGISTERED or group_name in c10d._world.pg_names.values():
            return False
        _REGISTERED.add(group_name)
        return True


def _release_name(group_name: str) -> None:
    with _LOCK:
        _REGISTERED.discard(group_name)


def _tcp_url(address: str, port: int) -> str:
    host = f"[{address}]" if ":" in address and not address.startswith("[") else address
    return f"tcp://{host}:{port}"


def _same_keys_backend(prefix_store: Any, rank: int, world_size: int, backend: str, group_name: str,
                       timeout: timedelta) -> Any:
    """What `_new_process_group_helper` builds for one backend, without registering it with torch:
    the same store prefixes ("{group_name}/" then "{device}/" over `prefix_store`) and the same
    sequence-number handshake, so the other ranks see exactly the keys the helper writes."""
    store = dist.PrefixStore(f"{_DEVICE_PREFIX[backend]}/", dist.PrefixStore(f"{group_name}/", prefix_store))
    if backend == "gloo":
        pg = dist.ProcessGroupGloo(store, rank, world_size, timeout)
    else:
        opts = dist.ProcessGroupNCCL.Options()
        opts.is_high_priority_stream = False
        opts._timeout = timeout
        opts.global_ranks_in_group = []
        opts.group_name = group_name
        pg = dist.ProcessGroupNCCL(store, rank, world_size, opts)
    pg._set_sequence_number_for_group()
    return pg


def host_store(address: str) -> Any:
    """A TCPStore server on `address` and a port the OS picks (`.port`), for `init_weight_group(store=)`."""
    return dist.TCPStore(address, 0, is_master=True, wait_for_workers=False, multi_tenant=True)


def init_weight_group(
    master_address: str,
    master_port: int,
    rank: int,
    world_size: int,
    backend: str = "gloo",
    group_name: str = "weight_update_group",
    timeout_s: float = 60,
    store: Any = None,
) -> WeightGroup:
    """Join (rank > 0) or host (rank 0) the group as SGLang does; blocks until every rank reached the
    store (rank 0) and, for gloo, until the group is connected. NCCL connects on the first broadcast.
    Rank 0 may pass the `store` it already serves at master_port (`host_store`) instead of binding it here."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
    if not group_name:
        raise ValueError("group_name must be a non-empty string")
    if backend == "nccl" and (not dist.is_nccl_available() or not torch.cuda.is_available()):
        raise ValueError("backend 'nccl' needs a CUDA build of torch and a visible GPU; use 'gloo'")
    timeout = timedelta(seconds=timeout_s)
    if store is not None and rank != 0:
        raise ValueError("only rank 0 serves the store; other ranks connect to master_address:master_port")
    try:
        if store is None:
            store, rank, world_size = next(dist.rendezvous(_tcp_url(master_address, int(master_port)), rank,
                                                           world_size, timeout=timeout))
        store.set_timeout(timeout)
    except Exception as exc:  # noqa: BLE001 - re-raised with the address that failed
        raise RuntimeError(
            f"weight group {group_name!r}: rank {rank} could not reach the store at "
            f"{master_address}:{master_port} within {timeout_s} s: {exc}"
        ) from exc
    prefix_store = dist.PrefixStore(group_name, store)
    registered = _claim_name(group_name)
    try:
        if registered:
            pg, _ = c10d._new_process_group_helper(world_size, rank, [], c10d.Backend(backend), prefix_store,
                                                   group_name=group_name, backend_options=None, timeout=timeout)
            c10d._world.pg_group_ranks[pg] = {i: i for i in range(world_size)}
        else:
            pg = _same_keys_backend(prefix_store, rank, world_size, backend, group_name, timeout)
    except Exception as exc:
        if registered:
            _release_name(group_name)
        raise RuntimeError(f"weight group {group_name!r}: rank {rank} could not connect the {backend} group at "
                           f"{master_address}:{master_port} within {timeout_s} s: {exc}") from exc
    return WeightGroup(group_name, rank, world_size, backend, master_address, int(master_port), pg, store,
                       registered)
