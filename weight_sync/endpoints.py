"""One blocking interface over the engines a weight sync talks to.

`LocalEndpoint` drives an engine living in this process (the embedded engine
of a single-host job); `HttpEndpoint` drives an SGLang-protocol server by URL
(our server, or real SGLang). Both stage buckets under a transfer id and
apply them in one commit where the engine supports it (`staging`); real
SGLang servers do not, and apply each bucket as it arrives (the sync then
pauses them for the whole transfer).

Engines are duck-typed (this package does not import `rollout`): a local
engine needs `stage_weights / commit_weights / abort_weight_update /
weights_checksum / dtype`, an HTTP client the matching endpoints.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from slime_rl.buckets import dense_layout, dtype_from_name
from slime_rl.dist_group import WeightGroup, init_weight_group
from slime_rl import ops
from slime_rl.types import BucketEntry


class SyncError(RuntimeError):
    """A weight sync failed; `url` names the engine, `phase` the step of the protocol."""

    def __init__(self, message: str, *, url: str = "", phase: str = ""):
        super().__init__(message)
        self.url, self.phase = url, phase


def map_shared_file(path: str, nbytes: int | None = None) -> torch.Tensor:
    """A uint8 tensor over a shared-memory file (MAP_SHARED: writes are seen by every process mapping it)."""
    size = os.path.getsize(path) if nbytes is None else nbytes
    return torch.from_file(path, shared=True, size=size, dtype=torch.uint8)


def _entries_views(buffer_u8: torch.Tensor, entries: list[BucketEntry]) -> list[tuple[str, torch.Tensor]]:
    views = ops.bucket_views(buffer_u8, [e.offset for e in entries], [dtype_from_name(e.dtype) for e in entries],
                             [tuple(e.shape) for e in entries])
    return [(e.name, v) for e, v in zip(entries, views)]


class LocalEndpoint:
    """An engine object in this process."""

    staging = True

    def __init__(self, engine: Any, url: str = "in-process"):
        self.engine, self.url = engine, url
        self._maps: dict[str, torch.Tensor] = {}
        self._groups: dict[str, WeightGroup] = {}

    @property
    def dtype(self) -> str:
        return str(self.engine.dtype).removeprefix("torch.")

    def pause(self, mode: str) -> None:
        self.engine.pause_generation(mode)

    def resume(self) -> None:
        self.engine.continue_generation()

    def version(self) -> int:
        return int(self.engine.get_weight_version())

    def stage_tensors(self, named: list[tuple[str, torch.Tensor]], transfer_id: str) -> None:
        self.engine.stage_weights(named, transfer_id, copy=False)

    def stage_shared_memory(self, path: str, entries: list[BucketEntry], transfer_id: str) -> None:
        buffer = self._maps.get(path)
        if buffer is None:
            buffer = self._maps[path] = map_shared_file(path)
        self.stage_tensors(_entries_views(buffer, entries), transfer_id)

    def release_shared_memory(self) -> None:
        self._maps.clear()

    def init_group(self, master_address: str, master_port: int, rank_offset: int, world_size: int,
                   group_name: str, backend: str) -> None:
        self._groups[group_name] = init_weight_group(master_address, master_port, rank_offset, world_size,
                                                     backend=backend, group_name=group_name, timeout_s=600)

    def stage_distributed(self, entries: list[BucketEntry], nbytes: int, group_name: str, transfer_id: str) -> None:
        """Receive one bucket in SGLang's dense layout (what the sender broadcasts, whatever `nbytes` it has here)."""
        group = self._groups[group_name]
        dense, size = dense_layout([e.name for e in entries], [e.dtype for e in entries], [e.shape for e in entries])
        buffer = group.broadcast(torch.empty(size, dtype=torch.uint8, device=group.device), src=0)
        self.stage_tensors(_entries_views(buffer, dense), transfer_id)

    def destroy_group(self, group_name: str) -> None:
        group = self._groups.pop(group_name, None)
        if group is not None:
            group.destroy()

    def commit(self, transfer_id: str, version: int, expected_tensors: int, adopt: bool = False) -> dict:
        return self.engine.commit_weights(transfer_id, version, flush_cache=True, expected_tensors=expected_tensors,
                                          adopt=adopt)

    def abort(self, transfer_id: str | None) -> None:
        self.engine.abort_weight_update(transfer_id)

    def update_from_disk(self, path: str, version: int) -> None:
        self.engine.update_weights_from_disk(path, version, flush_cache=True)

    def checksums(self) -> dict[str, str]:
        return self.engine.weights_checksum()

    def close(self) -> None:
        self.release_shared_memory()
        for name in list(self._groups):
            self.destroy_group(name)


class HttpEndpoint:
    """One SGLang-protocol server, by URL. Update calls are never retried (a retry would re-receive)."""

    def __init__(self, client: Any):
        self.client = client  # rollout.client.EngineClient for this one URL, max_retries=0
        self.url = client.url
        info = client.get_server_info()
        self.staging = bool(info.get("weight_update_staging", False))
        self._dtype = str(info.get("dtype") or info.get("torch_dtype") or "bfloat16").removeprefix("torch.")
        if self._dtype == "auto":
            self._dtype = "bfloat16"

    @property
    def dtype(self) -> str:
        return self._dtype

    def pause(self, mode: str) -> None:
        self.client.pause_generation(mode)

    def resume(self) -> None:
        self.client.continue_generation()

    def version(self) -> int:
        return int(self.client.get_weight_version())

    def stage_shared_memory(self, path: str, entries: list[BucketEntry], transfer_id: str) -> None:
        self.client.update_weights_from_shared_memory(path, entries, transfer_id=transfer_id)

    def release_shared_memory(self) -> None:
        self.client.release_shared_memory(None)

    def stage_ipc(self, payload: str, transfer_id: str | None, version: int | None = None) -> None:
        self.client.update_weights_from_tensor_payload(payload, load_format="flattened_bucket", transfer_id=transfer_id,
                                                       weight_version=version)

    def init_group(self, master_address: str, master_port: int, rank_offset: int, world_size: int,
                   group_name: str, backend: str) -> None:
        self.client.init_weights_update_group(master_address, master_port, rank_offset, world_size,
                                              group_name=group_name, backend=backend)

    def stage_distributed(self, entries: list[BucketEntry], nbytes: int, group_name: str,
                          transfer_id: str | None, version: int | None = None) -> None:
        self.client.update_weights_from_distributed(
            [e.name for e in entries], [e.dtype for e in entries], [list(e.shape) for e in entries],
            weight_version=version, group_name=group_name, load_format="flattened_bucket",
            transfer_id=transfer_id)

    def destroy_group(self, group_name: str) -> None:
        self.client.destroy_weights_update_group(group_name)

    def commit(self, transfer_id: str, version: int, expected_tensors: int, adopt: bool = False) -> dict:
        if not self.staging:  # the buckets are applied already: stamp the version (the cache was flushed by each)
            self.client.update_weight_version(version, abort_all_requests=False)
            return {"num_tensors": expected_tensors}
        return self.client.commit_weight_update(transfer_id, version, flush_cache=True,
                                                expected_tensors=expected_tensors, adopt=adopt)

    def abort(self, transfer_id: str | None) -> None:
        if self.staging:  # nothing staged elsewhere; a server without staging may have applied some buckets
            self.client.abort_weight_update(transfer_id)

    def update_from_disk(self, path: str, version: int) -> None:
        self.client.update_weights_from_disk(path, version, flush_cache=True)

    def checksums(self) -> dict[str, str]:
        return self.client.weights_checksum()[self.url]

    def close(self) -> None:
        self.client.close()


def as_endpoint(engine: Any) -> LocalEndpoint | HttpEndpoint:
    """Wrap an in-process engine or an HTTP engine client (one URL, built with max_retries=0)."""
    if isinstance(engine, (LocalEndpoint, HttpEndpoint)):
        return engine
    if hasattr(engine, "stage_weights"):
        return LocalEndpoint(engine)
    if hasattr(engine, "commit_weight_update"):
        return HttpEndpoint(engine)
    raise TypeError(f"cannot sync weights to {engine!r}: pass an in-process engine or an EngineClient")
