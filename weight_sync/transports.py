"""How buckets travel from trainer ranks to engines: shared memory, broadcast, disk, CUDA IPC, in process.

Each transport has two halves:

- the rank half, `run_on_rank(source, spec)`, executed by every trainer rank
  (the trainer backend calls it with its own `WeightSource`): it fills and
  sends this rank's stage's buckets;
- the driver half, a `Transport` object, which prepares what the ranks need
  (shared files, broadcast groups, a directory), has every engine stage the
  buckets under a transfer id, and commits.

Transports:

- "shm": one shared-memory file per bucket (under /dev/shm), created once and
  reused by every sync (no page faults after the first). Every TP rank writes
  its own pieces into it; engines on the same host map the file and stage
  zero-copy views; the commit is the only copy on the engine side. Holds the
  model once in shared memory.
- "broadcast": one process group per PP stage between the stage's sending
  rank (TP rank 0 of DP replica 0, group rank 0) and every engine; buckets are
  gathered on the sender and broadcast (`/update_weights_from_distributed`,
  `load_format="flattened_bucket"`) in SGLang's dense layout
  (`buckets.dense_buffer`), so real SGLang servers and ours receive the same
  bytes; the groups form as SGLang forms them (`slime_rl.dist_group`); gloo on
  CPU, NCCL on GPU. Works across hosts.
- "disk": every stage writes its buckets as safetensors files, the driver
  adds the index, engines load the directory (`/update_weights_from_disk`).
  Needs a filesystem both sides see; the always-works fallback.
- "cuda_ipc": colocated on GPUs: the sender fills a CUDA bucket and passes its
  IPC handle in SGLang's flattened-bucket dict (`/update_weights_from_tensor`,
  read by SGLang and by our server alike); the engine stages views of the
  trainer's memory, so the buffers live until the commit and are then
  released.
- "local": trainer and engine in the driver process (reference backend +
  embedded engine): buckets are packed in memory and staged directly.
"""

from __future__ import annotations

import base64
import json
import os
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from slime_rl.dist_group import WeightGroup, host_store, init_weight_group
from weight_sync.endpoints import SyncError, map_shared_file
from slime_rl.buckets import dense_buffer, dtype_from_name, dumps_sglang, sglang_bucket, tensor_sha256
from weight_sync.sender import (TensorSource, Timer, bucket_views, gather_shards, gather_stage_buckets,
                                write_stage_buckets)

TRANSPORTS = ("shm", "broadcast", "disk", "cuda_ipc", "local")
SHM_PREFIX = "slime_rl_wsync_"


@dataclass
class RankSpec:
    """What a trainer rank is asked to do (picklable; travels to every rank)."""

    kind: str
    action: str  # "send" | "host" | "join" | "leave" | "release"
    plan: Any  # weight_sync.plan.WeightPlan
    paths: dict[int, str] = field(default_factory=dict)  # shm: bucket index -> file
    directory: str = ""  # disk
    groups: dict[int, dict] = field(default_factory=dict)  # broadcast: stage -> init_weight_group kwargs


# ---------------------------------------------------------------------------------------------- rank half
# Per-process state of a trainer rank between syncs: shared-file mappings, broadcast groups, IPC buffers.
_MAPS: dict[str, torch.Tensor] = {}
_GROUPS: dict[str, WeightGroup] = {}
_HOSTED: dict[str, Any] = {}  # group name -> the TCPStore a sender bound before the engines were told its port
_HELD: list[torch.Tensor] = []


def _sender(source) -> bool:
    return source.active and source.tp_rank == 0


def run_on_rank(source, spec: RankSpec) -> dict:
    """The rank half of every transport; returns seconds per phase (and IPC payloads on senders)."""
    if spec.action == "host":  # bind the stage group's store first: its port goes to the engines
        g = spec.groups.get(source.stage)
        if g is None or not _sender(source):
            return {}
        _HOSTED[g["group_name"]] = store = host_store(g["master_address"])
        return {"ports": {source.stage: store.port}}
    if spec.action == "join":
        g = spec.groups.get(source.stage)
        if g is not None and _sender(source):
            _GROUPS[g["group_name"]] = init_weight_group(rank=0, store=_HOSTED.pop(g["group_name"], None), **g)
        return {}
    if spec.action == "leave":
        for g in spec.groups.values():
            _HOSTED.pop(g["group_name"], None)
            group = _GROUPS.pop(g["group_name"], None)
            if group is not None:
                group.destroy()
        for path in spec.paths.values():
            _MAPS.pop(path, None)
        return {}
    if spec.action == "release":
        _HELD.clear()
        return {}
    if spec.kind == "checksum":
        return {"checksums": stage_checksums(source, spec.plan)}
    if spec.kind == "shm":
        buffers = {}
        for bucket in spec.plan.stage_buckets(source.stage):
            path = spec.paths[bucket.index]
            if path not in _MAPS:
                _MAPS[path] = map_shared_file(path, bucket.nbytes)
            buffers[bucket.index] = _MAPS[path]
        return write_stage_buckets(source, spec.plan, buffers)
    if spec.kind == "broadcast":
        group = _GROUPS.get(spec.groups[source.stage]["group_name"]) if _sender(source) else None
        return gather_stage_buckets(source, spec.plan,
                                    lambda bucket, buf: group.broadcast(dense_buffer(buf, bucket.entries()), src=0))
    if spec.kind == "disk":
        return gather_stage_buckets(source, spec.plan, lambda bucket, buf: _save_bucket(bucket, buf, spec.directory))
    if spec.kind == "cuda_ipc":
        payloads: dict[int, str] = {}

        def fresh(bucket) -> torch.Tensor:
            _HELD.append(torch.empty(bucket.nbytes, dtype=torch.uint8, device=source.device))
            return _HELD[-1]

        seconds = gather_stage_buckets(source, spec.plan,
                                       lambda bucket, buf: payloads.__setitem__(bucket.index, ipc_payload(bucket, buf)),
                                       buffer_for=fresh)
        return {**seconds, "payloads": payloads}
    raise ValueError(f"unknown weight transport {spec.kind!r}; allowed: {', '.join(TRANSPORTS)}")


def stage_checksums(source, plan) -> dict[str, str]:
    """sha256 of every HF tensor of this rank's stage, in the engine dtype, for check mode (on the stage's
    TP rank 0). Built by the export path (`source.export`: the conversion table's merge), not by the
    placements a sync uses, so a bug in either shows up as a mismatch. One parameter at a time."""
    sums: dict[str, str] = {}
    if not source.active:
        return sums
    for bucket in plan.stage_buckets(source.stage):
        for name in dict.fromkeys(t.source or t.name for t in bucket.tensors):
            pieces = gather_shards(source, name, Timer())
            if source.tp_rank == 0:
                full = source.export(name, [shard for _, _, shard in pieces])
                sums.update({hf: tensor_sha256(t.to(dtype_from_name(plan.dtype))) for hf, t in full.items()})
    return sums


def bucket_file(directory: str, bucket) -> str:
    return os.path.join(directory, f"model-s{bucket.stage:02d}-b{bucket.index:05d}.safetensors")


def _save_bucket(bucket, buffer_u8: torch.Tensor, directory: str) -> None:
    from safetensors.torch import save_file

    views = bucket_views(bucket, buffer_u8)
    # safetensors refuses tensors that share storage: one copy per tensor on this slow path.
    save_file({name: v.to("cpu", copy=True) for name, v in views.items()}, bucket_file(directory, bucket))


def ipc_payload(bucket, buffer_u8: torch.Tensor) -> str:
    """The `/update_weights_from_tensor` blob of one CUDA bucket: a pickle of its IPC handle in SGLang's
    flattened-bucket dict (`buckets.sglang_bucket`: the buffer itself, no copy)."""
    return base64.b64encode(dumps_sglang(sglang_bucket(buffer_u8, bucket.entries()))).decode("ascii")


# ---------------------------------------------------------------------------------------------- driver half
def _each(endpoints: list, fn, phase: str) -> list:
    """Run fn(endpoint) for every engine at once; the first failure raises SyncError naming its URL."""
    if len(endpoints) == 1:
        try:
            return [fn(endpoints[0])]
        except SyncError:
            raise
        except Exception as exc:  # noqa: BLE001 - reported with the engine's URL
            raise SyncError(f"{phase} on {endpoints[0].url} failed: {exc}", url=endpoints[0].url, phase=phase) from exc
    with ThreadPoolExecutor(len(endpoints)) as pool:
        futures = [pool.submit(fn, ep) for ep in endpoints]
        results, first = [], None
        for ep, fut in zip(endpoints, futures):
            try:
                results.append(fut.result())
            except Exception as exc:  # noqa: BLE001
                first = first or SyncError(f"{phase} on {ep.url} failed: {exc}", url=ep.url, phase=phase)
                first.__cause__ = first.__cause__ or exc
        if first is not None:
            raise first
        return results


def _max_phases(results: list[dict]) -> dict[str, float]:
    out: dict[str, float] = {}
    for r in results:
        for k, v in (r or {}).items():
            if isinstance(v, float):
                out[k] = max(out.get(k, 0.0), v)
    return out


class Transport:
    """Driver half; subclasses fill `stage` (and `commit` when the engines do not commit staged buckets)."""

    kind = ""

    def __init__(self, trainer, endpoints: list, plan, options: dict):
        self.trainer, self.endpoints, self.plan, self.options = trainer, endpoints, plan, options

    def rank_spec(self, action: str = "send") -> RankSpec:
        return RankSpec(self.kind, action, self.plan)

    def stage(self, transfer_id: str, version: int) -> dict[str, float]:
        """Move every bucket to every engine, staged under `transfer_id`; seconds per phase."""
        raise NotImplementedError

    adopt = False  # may engines keep the staged buffers as their parameters (nobody writes them later)?

    def commit(self, transfer_id: str, version: int) -> list[dict]:
        n = len(self.plan.tensors)
        return _each(self.endpoints, lambda ep: ep.commit(transfer_id, version, n, self.adopt), "commit")

    def cleanup(self, success: bool) -> None:
        """After a push (committed or not): free what only that push needed."""

    def close(self) -> None:
        pass


def _remove_orphans(root: str) -> None:
    """Delete bucket files left by driver processes that no longer exist (killed before `close`)."""
    for path in Path(root).glob(f"{SHM_PREFIX}*_b*"):
        pid = path.name[len(SHM_PREFIX):].split("_")[0]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            path.unlink(missing_ok=True)


class SharedMemoryTransport(Transport):
    """Two sets of bucket files used in turn: engines adopt the set a sync wrote as their parameters (no copy
    at the commit), and the next sync writes the other set, which no engine reads any more. After a failed
    sync the set it wrote is replaced by fresh files (an engine might have adopted it before the failure)."""

    kind = "shm"
    adopt = True

    def __init__(self, *args):
        super().__init__(*args)
        self.root = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
        _remove_orphans(self.root)
        self.sets: list[dict[int, str]] = [self._new_set(), {}]
        self.write = 0  # the set the next sync writes

    def _new_set(self) -> dict[int, str]:
        tag = f"{os.getpid()}_{uuid.uuid4().hex[:8]}"  # the pid lets a later job remove files of a killed one
        paths = {b.index: os.path.join(self.root, f"{SHM_PREFIX}{tag}_b{b.index:05d}") for b in self.plan.buckets}
        for b in self.plan.buckets:
            with open(paths[b.index], "wb") as f:
                f.truncate(b.nbytes)
        return paths

    @property
    def paths(self) -> dict[int, str]:
        return self.sets[self.write]

    def rank_spec(self, action: str = "send") -> RankSpec:
        if action == "leave":
            every = [p for paths in self.sets for p in paths.values()]
            return RankSpec(self.kind, action, self.plan, paths=dict(enumerate(every)))
        return RankSpec(self.kind, action, self.plan, paths=self.paths)

    def stage(self, transfer_id: str, version: int) -> dict[str, float]:
        t0 = time.perf_counter()
        seconds = _max_phases(self.trainer.send_weights(run_on_rank, self.rank_spec()))
        seconds["ranks"] = time.perf_counter() - t0  # the ranks' work + the command round trip
        t0 = time.perf_counter()

        def stage_all(ep):
            for b in self.plan.buckets:
                ep.stage_shared_memory(self.paths[b.index], b.entries(), transfer_id)

        _each(self.endpoints, stage_all, "stage")
        seconds["transfer"] = time.perf_counter() - t0
        return seconds

    def cleanup(self, success: bool) -> None:
        if success:
            self.write = 1 - self.write
            if not self.sets[self.write]:
                self.sets[self.write] = self._new_set()
            return
        self.trainer.send_weights(run_on_rank, RankSpec(self.kind, "leave", self.plan, paths=self.paths))
        _unlink(self.paths.values())  # mappings that engines or ranks still hold stay valid
        self.sets[self.write] = self._new_set()

    def close(self) -> None:
        for ep in self.endpoints:
            try:
                ep.release_shared_memory()
            except Exception:  # noqa: BLE001 - an engine that is gone holds no mapping
                pass
        try:
            self.trainer.send_weights(run_on_rank, self.rank_spec("leave"))
        except Exception:  # noqa: BLE001 - ranks already closed
            pass
        _unlink(p for paths in self.sets for p in paths.values())


def _unlink(paths) -> None:
    for path in paths:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


class BroadcastTransport(Transport):
    kind = "broadcast"
    adopt = True  # engines receive into buffers of their own

    def __init__(self, *args):
        super().__init__(*args)
        self.groups: dict[int, dict] = {}

    def rank_spec(self, action: str = "send") -> RankSpec:
        return RankSpec(self.kind, action, self.plan, groups=self.groups)

    def _join(self) -> None:
        """One group per PP stage: the stage's sender is rank 0, engine i is rank 1 + i."""
        backend = self.options.get("backend", "gloo")
        address = self.options.get("master_address", "127.0.0.1")
        tag = uuid.uuid4().hex[:8]
        world = 1 + len(self.endpoints)
        self.groups = {s: {"master_address": address, "master_port": 0, "world_size": world,
                           "backend": backend, "group_name": f"slime_rl_wsync_{tag}_pp{s}", "timeout_s": 600}
                       for s in range(self.plan.pp_size)}
        # Each stage's sender binds its store on a port the OS picks, so no other process can take the port
        # between choosing it and binding it; the engines are then told where it is.
        for reply in self.trainer.send_weights(run_on_rank, self.rank_spec("host")):
            for stage, port in (reply or {}).get("ports", {}).items():
                self.groups[stage]["master_port"] = port
        with ThreadPoolExecutor(len(self.endpoints) * len(self.groups)) as pool:
            futures = [(ep, pool.submit(ep.init_group, g["master_address"], g["master_port"], 1 + i, world,
                                        g["group_name"], backend))
                       for g in self.groups.values() for i, ep in enumerate(self.endpoints)]
            self.trainer.send_weights(run_on_rank, self.rank_spec("join"))
            for ep, fut in futures:
                try:
                    fut.result()
                except Exception as exc:  # noqa: BLE001
                    raise SyncError(f"joining the broadcast group on {ep.url} failed: {exc}", url=ep.url,
                                    phase="init_group") from exc

    def stage(self, transfer_id: str, version: int) -> dict[str, float]:
        if not self.groups:
            self._join()
        staging = all(ep.staging for ep in self.endpoints)

        def receive_all(ep):
            for b in self.plan.buckets:  # stage order; a later stage's sender waits for its turn
                ep.stage_distributed(b.entries(), b.nbytes, self.groups[b.stage]["group_name"],
                                     transfer_id if staging else None)

        t0 = time.perf_counter()
        with ThreadPoolExecutor(len(self.endpoints)) as pool:
            futures = [(ep, pool.submit(receive_all, ep)) for ep in self.endpoints]
            try:
                seconds = _max_phases(self.trainer.send_weights(run_on_rank, self.rank_spec()))
            except Exception:
                self._leave()  # closing the groups fails the engines' pending receives instead of hanging them
                raise
            finally:
                errors = []
                for ep, fut in futures:
                    try:
                        fut.result()
                    except Exception as exc:  # noqa: BLE001
                        errors.append((ep, exc))
            if errors:
                self._leave()
                ep, exc = errors[0]
                raise SyncError(f"receiving buckets on {ep.url} failed: {exc}", url=ep.url, phase="stage") from exc
        seconds["transfer"] = seconds.get("send", time.perf_counter() - t0)
        return seconds

    def _leave(self) -> None:
        """Tear the groups down on both sides (the next sync builds new ones)."""
        groups, spec = self.groups, self.rank_spec("leave")
        self.groups = {}
        try:
            self.trainer.send_weights(run_on_rank, spec)
        except Exception:  # noqa: BLE001 - a dead rank has no group left to close
            pass
        for g in groups.values():
            for ep in self.endpoints:
                try:
                    ep.destroy_group(g["group_name"])
                except Exception:  # noqa: BLE001
                    pass

    def close(self) -> None:
        if self.groups:
            self._leave()


class DiskTransport(Transport):
    kind = "disk"

    def __init__(self, *args):
        super().__init__(*args)
        self.root = self.options.get("directory") or tempfile.mkdtemp(prefix="slime_rl_wsync_disk_")
        self.directory = ""

    def rank_spec(self, action: str = "send") -> RankSpec:
        return RankSpec(self.kind, action, self.plan, directory=self.directory)

    def stage(self, transfer_id: str, version: int) -> dict[str, float]:
        self.directory = os.path.join(self.root, f"v{version}-{transfer_id[-8:]}")
        os.makedirs(self.directory, exist_ok=True)
        seconds = _max_phases(self.trainer.send_weights(run_on_rank, self.rank_spec()))
        weight_map = {t.name: os.path.basename(bucket_file(self.directory, b)) for b in self.plan.buckets
                      for t in b.tensors}
        with open(os.path.join(self.directory, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": self.plan.nbytes}, "weight_map": weight_map}, f)
        seconds["transfer"] = seconds.get("send", 0.0)
        return seconds

    def commit(self, transfer_id: str, version: int) -> list[dict]:
        _each(self.endpoints, lambda ep: ep.update_from_disk(self.directory, version), "load")
        return [{"num_tensors": len(self.plan.tensors)} for _ in self.endpoints]

    def cleanup(self, success: bool) -> None:
        """Keep only the directory the engines serve: after success the new one, after a failure the old."""
        import shutil

        if not success:
            shutil.rmtree(self.directory, ignore_errors=True)
            return
        for old in Path(self.root).glob("v*"):
            if str(old) != self.directory:
                shutil.rmtree(old, ignore_errors=True)


class CudaIpcTransport(Transport):
    kind = "cuda_ipc"

    def stage(self, transfer_id: str, version: int) -> dict[str, float]:
        results = self.trainer.send_weights(run_on_rank, self.rank_spec())
        payloads = {i: p for r in results for i, p in (r or {}).get("payloads", {}).items()}
        t0 = time.perf_counter()

        def stage_all(ep):
            for b in self.plan.buckets:
                ep.stage_ipc(payloads[b.index], transfer_id)

        _each(self.endpoints, stage_all, "stage")
        return {**_max_phases(results), "transfer": time.perf_counter() - t0}

    def cleanup(self, success: bool) -> None:  # committed (copied) or dropped: the buffers are free either way
        try:
            self.trainer.send_weights(run_on_rank, self.rank_spec("release"))
        except Exception:  # noqa: BLE001 - dead ranks hold nothing
            pass


class LocalTransport(Transport):
    """Trainer weights in this process (`trainer.hf_state_dict()`), packed per bucket and staged directly."""

    kind = "local"
    adopt = True  # a fresh buffer per bucket, handed over

    def stage(self, transfer_id: str, version: int) -> dict[str, float]:
        source = TensorSource(self.trainer.hf_state_dict())
        t0 = time.perf_counter()

        def send(bucket, buffer_u8):
            views = list(bucket_views(bucket, buffer_u8).items())
            _each(self.endpoints, lambda ep: ep.stage_tensors(views, transfer_id), "stage")

        seconds = gather_stage_buckets(source, self.plan, send,
                                       buffer_for=lambda b: torch.empty(b.nbytes, dtype=torch.uint8))
        seconds["transfer"] = seconds.get("send", time.perf_counter() - t0)
        return seconds


KINDS = {t.kind: t for t in (SharedMemoryTransport, BroadcastTransport, DiskTransport, CudaIpcTransport,
                             LocalTransport)}
