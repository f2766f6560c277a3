"""The weight-update calls of `rollout.client.EngineClient`: full updates (disk, tensors, buckets,
shared memory, NCCL/gloo broadcast groups), staged transfers (`transfer_id`, commit, abort), version
stamps and checksums, each as an async `a*` method and its blocking twin.

`WeightCalls` is a mixin of EngineClient. It needs from its host: `control_urls`, `_update(endpoint,
payloads)` (one POST per control URL, the bodies in URL order), `_same_for_all(payload)` and
`_run(coro)` (the sync wrapper's private loop). Field names follow SGLang's native HTTP
API; staging, shared memory and checksums are our server's
extensions (see the EngineClient module docstring).
"""

from __future__ import annotations

from typing import Any, Iterable

import torch

from rollout.wire import encode_tensor_payload
from slime_rl.buckets import dtype_name
from slime_rl.types import BucketEntry, WeightBucket


class WeightCalls:
    """Weight updates, fanned out to every control URL (mixin of EngineClient)."""

    @staticmethod
    def _versioned(payload: dict[str, Any], weight_version: int | None, flush_cache: bool,
                   transfer_id: str | None) -> dict[str, Any]:
        """`payload` + the update fields; with a transfer_id the server stages and ignores the version."""
        payload = {**payload, "flush_cache": flush_cache}
        if weight_version is not None:
            payload["weight_version"] = str(weight_version)
        if transfer_id is not None:
            payload["transfer_id"] = transfer_id
        return payload

    async def aupdate_weights_from_disk(self, path: str, weight_version: int, flush_cache: bool = True) -> None:
        payload = {"model_path": str(path), "weight_version": str(weight_version), "flush_cache": flush_cache}
        await self._update("/update_weights_from_disk", self._same_for_all(payload))

    async def aupdate_weights_from_tensors(self, named_tensors: Iterable[tuple[str, torch.Tensor]],
                                           weight_version: int | None, flush_cache: bool = True,
                                           transfer_id: str | None = None) -> None:
        """Send (name, tensor) pairs (copied to CPU) as one torch.save blob (one TP rank);
        with `transfer_id` the server stages them for `acommit_weight_update`."""
        blob, load_format = encode_tensor_payload(list(named_tensors))
        await self.aupdate_weights_from_tensor_payload(blob, load_format, weight_version, flush_cache, transfer_id)

    async def aupdate_weights_from_bucket(self, bucket: WeightBucket, weight_version: int | None,
                                          flush_cache: bool = True, transfer_id: str | None = None) -> None:
        """Send a flat bucket (`load_format="flattened_bucket"`): buffer + per-tensor metadata."""
        blob, load_format = encode_tensor_payload(bucket)
        await self.aupdate_weights_from_tensor_payload(blob, load_format, weight_version, flush_cache, transfer_id)

    async def aupdate_weights_from_tensor_payload(self, payload: str, load_format: str | None = None,
                                                  weight_version: int | None = None, flush_cache: bool = True,
                                                  transfer_id: str | None = None) -> None:
        """Send an encoded blob (`rollout.wire.encode_tensor_payload` / `encode_cuda_ipc_payload`;
        `load_format="flattened_bucket"` for a bucket) to `/update_weights_from_tensor`."""
        body: dict[str, Any] = {"serialized_named_tensors": [payload]}
        if load_format is not None:
            body["load_format"] = load_format
        body = self._versioned(body, weight_version, flush_cache, transfer_id)
        await self._update("/update_weights_from_tensor", self._same_for_all(body))

    async def aupdate_weights_from_shared_memory(self, path: str, entries: list[BucketEntry],
                                                 transfer_id: str | None = None, weight_version: int | None = None,
                                                 flush_cache: bool = True) -> None:
        """Update from a bucket the trainer wrote into `path` (a `slime_rl_wsync_*` file on the
        servers' host, `pack_bucket` layout); with `transfer_id` the servers stage views of it."""
        body = {"path": str(path), "metadata": [{"name": e.name, "dtype": e.dtype, "shape": list(e.shape),
                                                 "offset": e.offset} for e in entries]}
        body = self._versioned(body, weight_version, flush_cache, transfer_id)
        await self._update("/update_weights_from_shared_memory", self._same_for_all(body))

    async def arelease_shared_memory(self, path: str | None = None) -> None:
        """Make the servers drop their mapping of `path` (all mappings when None)."""
        await self._update("/release_shared_memory", self._same_for_all({"path": path}))

    async def acommit_weight_update(self, transfer_id: str, weight_version: int, flush_cache: bool = True,
                                    expected_tensors: int | None = None, adopt: bool = False) -> dict[str, Any]:
        """Apply the staged transfer on every server (`adopt`: staged buffers become the parameters where
        they can, no copy). Returns the first control URL's response (`num_tensors`, `bytes`,
        `adopted_bytes`, `seconds`, `weight_version`); every server must succeed."""
        body: dict[str, Any] = {"transfer_id": transfer_id, "weight_version": str(weight_version),
                                "flush_cache": flush_cache, "adopt": adopt}
        if expected_tensors is not None:
            body["expected_tensors"] = expected_tensors
        return (await self._update("/commit_weight_update", self._same_for_all(body)))[0]

    async def aupdate_weight_version(self, weight_version: int, abort_all_requests: bool = False) -> None:
        """Stamp a version without touching the weights (`/update_weight_version`, every server)."""
        await self._update("/update_weight_version", self._same_for_all(
            {"new_version": str(weight_version), "abort_all_requests": abort_all_requests}))

    async def aabort_weight_update(self, transfer_id: str | None = None) -> bool:
        """Drop the staged transfer (only `transfer_id`, when given); True if any server dropped one."""
        bodies = await self._update("/abort_weight_update", self._same_for_all({"transfer_id": transfer_id}))
        return any(bool(b.get("dropped")) for b in bodies)

    async def aweights_checksum(self, names: list[str] | None = None) -> dict[str, dict[str, str]]:
        """{control URL: {parameter name: sha256 hex}} (all parameters when `names` is None)."""
        bodies = await self._update("/weights_checksum", self._same_for_all({"names": names}))
        return {u: b["checksums"] for u, b in zip(self.control_urls, bodies)}

    async def ainit_weights_update_group(self, master_address: str, master_port: int, rank_offset: int,
                                         world_size: int, group_name: str = "weight_update_group",
                                         backend: str = "gloo") -> None:
        """Make every worker join the trainer's broadcast group (the trainer is rank 0).

        With several control URLs, worker i gets ranks from
        `rank_offset + i * ranks_per_worker`, where ranks_per_worker =
        (world_size - rank_offset) / number of workers. Returns once all ranks
        joined, so callers start it as a task and join the group themselves.
        """
        n = len(self.control_urls)
        if world_size <= rank_offset or (world_size - rank_offset) % n:
            raise ValueError(f"world_size {world_size} - rank_offset {rank_offset} must be a positive multiple "
                             f"of the {n} control URLs")
        per_worker = (world_size - rank_offset) // n
        payloads = [{"master_address": master_address, "master_port": master_port,
                     "rank_offset": rank_offset + i * per_worker, "world_size": world_size,
                     "group_name": group_name, "backend": backend} for i in range(n)]
        await self._update("/init_weights_update_group", payloads)

    async def aupdate_weights_from_distributed(self, names: list[str], dtypes: list[str | torch.dtype],
                                               shapes: list[Iterable[int]], weight_version: int | None = None,
                                               group_name: str = "weight_update_group",
                                               load_format: str | None = None, flush_cache: bool = True,
                                               transfer_id: str | None = None) -> None:
        """Announce tensors the trainer is about to broadcast; returns after the broadcast is received.
        With `transfer_id` the servers stage them for `acommit_weight_update`."""
        if not len(names) == len(dtypes) == len(shapes):
            raise ValueError(f"names ({len(names)}), dtypes ({len(dtypes)}) and shapes ({len(shapes)}) must align")
        payload: dict[str, Any] = {
            "names": list(names),
            "dtypes": [dtype_name(d) if isinstance(d, torch.dtype) else str(d).removeprefix("torch.") for d in dtypes],
            "shapes": [list(s) for s in shapes], "group_name": group_name,
        }
        if load_format is not None:
            payload["load_format"] = load_format
        payload = self._versioned(payload, weight_version, flush_cache, transfer_id)
        await self._update("/update_weights_from_distributed", self._same_for_all(payload))

    async def adestroy_weights_update_group(self, group_name: str = "weight_update_group") -> None:
        await self._update("/destroy_weights_update_group", self._same_for_all({"group_name": group_name}))

    # ---- sync wrappers ----

    def update_weights_from_tensors(self, named_tensors: Iterable[tuple[str, torch.Tensor]],
                                    weight_version: int | None, flush_cache: bool = True,
                                    transfer_id: str | None = None) -> None:
        self._run(self.aupdate_weights_from_tensors(named_tensors, weight_version, flush_cache, transfer_id))

    def update_weights_from_bucket(self, bucket: WeightBucket, weight_version: int | None, flush_cache: bool = True,
                                   transfer_id: str | None = None) -> None:
        self._run(self.aupdate_weights_from_bucket(bucket, weight_version, flush_cache, transfer_id))

    def update_weights_from_tensor_payload(self, payload: str, load_format: str | None = None,
                                           weight_version: int | None = None, flush_cache: bool = True,
                                           transfer_id: str | None = None) -> None:
        self._run(self.aupdate_weights_from_tensor_payload(payload, load_format, weight_version, flush_cache,
                                                           transfer_id))

    def update_weights_from_shared_memory(self, path: str, entries: list[BucketEntry], transfer_id: str | None = None,
                                          weight_version: int | None = None, flush_cache: bool = True) -> None:
        self._run(self.aupdate_weights_from_shared_memory(path, entries, transfer_id, weight_version, flush_cache))

    def release_shared_memory(self, path: str | None = None) -> None:
        self._run(self.arelease_shared_memory(path))

    def init_weights_update_group(self, master_address: str, master_port: int, rank_offset: int, world_size: int,
                                  group_name: str = "weight_update_group", backend: str = "gloo") -> None:
        """Blocks until every rank joined: the trainer must join from another thread meanwhile."""
        self._run(self.ainit_weights_update_group(master_address, master_port, rank_offset, world_size,
                                                  group_name, backend))

    def update_weights_from_distributed(self, names: list[str], dtypes: list[str | torch.dtype],
                                        shapes: list[Iterable[int]], weight_version: int | None = None,
                                        group_name: str = "weight_update_group", load_format: str | None = None,
                                        flush_cache: bool = True, transfer_id: str | None = None) -> None:
        """Blocks until the broadcast is received: the trainer must broadcast from another thread meanwhile."""
        self._run(self.aupdate_weights_from_distributed(names, dtypes, shapes, weight_version, group_name,
                                                        load_format, flush_cache, transfer_id))

    def destroy_weights_update_group(self, group_name: str = "weight_update_group") -> None:
        self._run(self.adestroy_weights_update_group(group_name))

    def commit_weight_update(self, transfer_id: str, weight_version: int, flush_cache: bool = True,
                             expected_tensors: int | None = None, adopt: bool = False) -> dict[str, Any]:
        return self._run(self.acommit_weight_update(transfer_id, weight_version, flush_cache, expected_tensors,
                                                    adopt))

    def update_weight_version(self, weight_version: int, abort_all_requests: bool = False) -> None:
        self._run(self.aupdate_weight_version(weight_version, abort_all_requests))

    def abort_weight_update(self, transfer_id: str | None = None) -> bool:
        return self._run(self.aabort_weight_update(transfer_id))

    def weights_checksum(self, names: list[str] | None = None) -> dict[str, dict[str, str]]:
        return self._run(self.aweights_checksum(names))

    def update_weights_from_disk(self, model_path: str, weight_version: int, flush_cache: bool = True) -> None:
        self._run(self.aupdate_weights_from_disk(model_path, weight_version, flush_cache))
