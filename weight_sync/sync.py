"""The weight-sync protocol: plan once, then per update stage -> pause -> commit -> verify -> continue.

    sync = WeightSync(trainer, engines, SyncConfig(transport="shm"))
    metrics = sync.push(version)          # every engine now serves `version`
    sync.check()                          # every engine tensor == the trainer's HF export
    sync.close()

Order of one push (version v):

1. stage: every bucket goes to every engine under a fresh transfer id. Engines
   that stage (ours) keep generating with the old weights meanwhile; engines
   that cannot (real SGLang) are paused first and apply buckets as they come.
2. pause (mode "abort": in-flight requests finish now with what they have;
   "in_place": they wait and go on under the new weights; "retract": they are
   re-prefilled under the new weights);
3. commit: each engine applies the whole staged set at once, stamps v and
   flushes its prefix cache;
4. verify: every engine reports version v and the plan's tensor count;
5. continue generation.

A failure at any point aborts the staged transfer on every engine, resumes
generation on the old weights and version, and raises `SyncError` naming the
engine URL and the phase. Every generated token carries the version that
produced it (the engines stamp them), so no token comes from a mix.
"""

from __future__ import annotations

import time
import uuid
import torch

from slime_rl.types import PAUSE_MODES
from weight_sync.config import SyncConfig
from weight_sync.endpoints import LocalEndpoint, SyncError, as_endpoint
from weight_sync.plan import plan_from_layout
from weight_sync.sender import TensorSource
from weight_sync.transports import KINDS, TRANSPORTS, RankSpec, _each, run_on_rank



def validate(settings: SyncConfig) -> None:
    if settings.transport != "auto" and settings.transport not in TRANSPORTS:
        raise ValueError(f"sync.transport must be auto or one of {', '.join(TRANSPORTS)}, got {settings.transport!r}")
    if settings.pause_mode not in PAUSE_MODES:
        raise ValueError(f"sync.pause_mode must be one of {', '.join(PAUSE_MODES)}, got {settings.pause_mode!r}")


def choose_transport(settings: SyncConfig, trainer, endpoints: list) -> str:
    """auto: in-process trainer and engine -> local; engines on this host -> shm; else broadcast."""
    if settings.transport != "auto":
        return settings.transport
    if not all(ep.staging for ep in endpoints):  # e.g. real SGLang: only its own update endpoints
        return "broadcast"
    in_process_trainer = not hasattr(trainer, "send_weights")
    if in_process_trainer and all(isinstance(ep, LocalEndpoint) for ep in endpoints):
        return "local"
    local_hosts = ("in-process", "127.", "localhost", "[::1]")
    if all(ep.url.split("://")[-1].startswith(local_hosts) for ep in endpoints):
        return "shm"
    return "broadcast"


class InProcessRanks:
    """A single-process trainer seen as one rank: this process runs the rank half of the transport."""

    def __init__(self, trainer):
        self.trainer = trainer

    def send_weights(self, fn, spec) -> list:
        return [fn(TensorSource(self.trainer.hf_state_dict()), spec)]

    def __getattr__(self, name):
        return getattr(self.trainer, name)


class WeightSync:
    """Pushes a trainer's weights to engines (in-process engine objects or EngineClients, one URL each)."""

    def __init__(self, trainer, engines: list, settings: SyncConfig | None = None, log=print):
        self.settings = settings or SyncConfig()
        validate(self.settings)
        if not engines:
            raise ValueError("weight sync needs at least one engine")
        self.trainer, self.log = trainer, log
        self.endpoints = [as_endpoint(e) for e in engines]
        dtypes = {ep.dtype for ep in self.endpoints}
        if len(dtypes) != 1:
            raise ValueError(f"engines serve different dtypes {sorted(dtypes)}: one sync plan cannot feed them")
        self.dtype = dtypes.pop()
        self.plan = plan_from_layout(trainer.weight_layout(), dtype=self.dtype,
                                     bucket_bytes=int(self.settings.bucket_mb * 2**20))
        self.kind = choose_transport(self.settings, trainer, self.endpoints)
        if self.kind == "local" and hasattr(trainer, "send_weights"):
            raise ValueError("sync.transport 'local' needs a trainer in this process (train.backend=hf)")
        if self.kind == "local" and not all(isinstance(ep, LocalEndpoint) for ep in self.endpoints):
            raise ValueError("sync.transport 'local' needs in-process engines; use shm, broadcast or disk for servers")
        if self.kind in ("shm", "local") and not all(ep.staging for ep in self.endpoints):
            raise ValueError(f"sync.transport {self.kind!r} needs engines that stage weight updates (ours); "
                             f"use broadcast, disk or cuda_ipc for servers without staging (real SGLang)")
        if not hasattr(trainer, "send_weights"):
            trainer = self.trainer = InProcessRanks(trainer)
        backend = self.settings.backend
        if backend == "auto":
            backend = "nccl" if torch.cuda.is_available() and self.kind == "broadcast" else "gloo"
        options = {"directory": self.settings.directory, "backend": backend,
                   "master_address": self.settings.master_address}
        self.transport = KINDS[self.kind](trainer, self.endpoints, self.plan, options)
        self.log(f"[sync] {self.kind} to {len(self.endpoints)} engine(s) in {self.dtype}: {self.plan.summary()}")

    def push(self, version: int) -> dict[str, float]:
        """Make every engine serve the trainer's current weights as `version`; returns metrics."""
        t0 = time.perf_counter()
        transfer_id = f"{version}-{uuid.uuid4().hex[:12]}"
        staging = all(ep.staging for ep in self.endpoints)
        paused_at = None
        try:
            if not staging:  # buckets apply as they arrive: nothing may generate meanwhile
                paused_at = self._pause()
            t_stage = time.perf_counter()
            seconds = self.transport.stage(transfer_id, version)
            seconds["stage"] = time.perf_counter() - t_stage
            if paused_at is None:
                paused_at = self._pause()
            t_load = time.perf_counter()
            results = self.transport.commit(transfer_id, version)
            seconds["load"] = time.perf_counter() - t_load
            t_verify = time.perf_counter()
            self._verify(version, results)
            seconds["verify"] = time.perf_counter() - t_verify
        except BaseException as exc:
            self._abort(transfer_id)
            self.transport.cleanup(success=False)
            if isinstance(exc, SyncError):
                raise
            raise SyncError(f"weight sync to version {version} failed: {exc}", phase="transfer") from exc
        finally:
            self._resume(paused_at)
        paused_s = time.perf_counter() - paused_at
        self.transport.cleanup(success=True)
        total = time.perf_counter() - t0
        metrics = {f"sync/{k}_s": v for k, v in seconds.items() if k != "send"}
        first = results[0] if results else {}
        metrics.update({"sync/copied_bytes": float(first.get("bytes", self.plan.nbytes)),
                        "sync/adopted_bytes": float(first.get("adopted_bytes", 0))})
        metrics.update({"sync/total_s": total, "sync/paused_s": paused_s, "sync/bytes": float(self.plan.nbytes),
                        "sync/buckets": float(len(self.plan.buckets)), "sync/gbps": self.plan.nbytes / total / 1e9,
                        "sync/version": float(version)})
        if self.settings.check:
            metrics["sync/check_mismatches"] = float(len(self.check()))
        return metrics

    def _pause(self) -> float:
        mode = self.settings.pause_mode
        try:
            _each(self.endpoints, lambda ep: ep.pause(mode), "pause")
        except SyncError:
            self._resume(0.0)  # the engines that did pause must not stay paused
            raise
        return time.perf_counter()

    def _resume(self, paused_at: float | None) -> None:
        """Continue generation on every engine (all of them are tried; the first failure is logged)."""
        if paused_at is None:
            return
        for ep in self.endpoints:
            try:
                ep.resume()
            except Exception as exc:  # noqa: BLE001 - a dead engine is the caller's problem, not the others'
                self.log(f"[sync] could not continue generation on {ep.url}: {exc}")

    def _verify(self, version: int, results: list[dict]) -> None:
        expected = len(self.plan.tensors)
        for ep, result in zip(self.endpoints, results):
            reported = (result or {}).get("weight_version")  # an HTTP commit answers with it: no extra request
            got = int(reported) if reported is not None else ep.version()
            if got != version:
                raise SyncError(f"{ep.url} serves weight version {got} after the sync, expected {version}",
                                url=ep.url, phase="verify")
            n = int((result or {}).get("num_tensors", expected))
            if n != expected:
                raise SyncError(f"{ep.url} committed {n} tensors, the plan has {expected}", url=ep.url,
                                phase="verify")

    def _abort(self, transfer_id: str) -> None:
        for ep in self.endpoints:
            try:
                ep.abort(transfer_id)
            except Exception as exc:  # noqa: BLE001 - best effort; the engine keeps its old weights anyway
                self.log(f"[sync] could not drop the staged transfer on {ep.url}: {exc}")

    def check(self) -> dict[str, list[str]]:
        """Compare the sha256 of every engine tensor with the trainer's weights as the plan sends them (cast
        to the engine dtype; hashed on the sending ranks, bucket by bucket, never gathered in one place).
        Returns {url: [mismatching or missing names]} for engines that differ (empty when all agree)."""
        results = self.trainer.send_weights(run_on_rank, RankSpec("checksum", "send", self.plan))
        expected = {name: h for r in results for name, h in (r or {}).get("checksums", {}).items()}
        if set(expected) != set(self.plan.names):
            raise SyncError(f"the trainer hashed {len(expected)} tensors, the plan has {len(self.plan.names)}",
                            phase="check")
        bad = {}
        for ep in self.endpoints:
            got = ep.checksums()
            diff = sorted(n for n in expected if n in got and got[n] != expected[n])
            diff += sorted(f"{n} (missing on engine)" for n in expected.keys() - got.keys())
            if diff:
                bad[ep.url] = diff
                self.log(f"[sync] check: {ep.url} differs from the trainer in {len(diff)} tensors, e.g. {diff[:3]}")
        if not bad:
            self.log(f"[sync] check: {len(self.endpoints)} engine(s) equal the trainer's {len(expected)} tensors")
        return bad

    def close(self) -> None:
        """Tear down the transport (files, groups) and the endpoints (HTTP clients, mappings); not the engines."""
        self.transport.close()
        for ep in self.endpoints:
            ep.close()
