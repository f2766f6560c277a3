"""`--launcher ray`: Ray places the rollout engines and the Megatron trainer ranks as actors.

    with RayLaunch(cfg, hf_config, state_dict, tokenizer) as launch:
        launch.engine_urls        # one SGLang-protocol server per engine (EngineActor)
        launch.trainer            # MegatronBackend over a RayRankGroup (or the driver's HFTrainer)
        launch.before_train()     # colocated: engines free their KV cache while the trainer runs
        launch.after_train()

One placement group holds every actor. Disaggregated (the default): a bundle per
trainer rank ({"CPU": cpus_per_trainer}, + {"GPU": 1} on a GPU cluster) and one per
engine ({"CPU": cpus_per_engine}, + a GPU likewise, so engines run on their own
device). Colocated (`launch.colocate`): engine i joins trainer bundle i % t and the
actors of a bundle split it evenly (fractional CPUs and GPU); they time-share it,
the engines releasing their KV cache while the trainer runs (`before_train`).

The initial weights are written once as an HF checkpoint under the run's output dir
(`init_model/`): engine actors load it, and so do the trainer ranks (MegatronBackend's
one-file trick). On a multi-node cluster `log.output_dir` must be on shared storage.
Engines bind 127.0.0.1 when Ray runs on this machine (weight sync then picks shared
memory), else their node's IP (weight sync broadcasts).
"""

from __future__ import annotations

import logging
import math
import os
import pickle
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from rollout.config import RolloutConfig
from slime_rl.config import JobConfig
from slime_rl.launch.config import LaunchConfig
from training.spmd import (
    _CONSTRUCTION, _PICKLE, _SHUTDOWN, Factory, RankError, RankGroup, _Call, _check_factory, _encode, _execute,
    _failures, _init_dist, _load_factory, _raise_failures, _Reply,
)

PLACEMENT_TIMEOUT_S = {"local": 10.0, "cluster": 120.0}  # a local Ray never grows; a cluster may autoscale
ENGINE_START_TIMEOUT_S = 300.0
ENGINE_STOP_TIMEOUT_S = 10.0
INIT_MODEL_DIR = "init_model"


def start_ray(launch: LaunchConfig, cpus_needed: float = 0.0) -> bool:
    """Join `launch.ray_address`, or start Ray on this machine; True if this call did (the caller shuts it down).

    A local Ray gets `launch.num_cpus` CPUs (None: this machine's count, or `cpus_needed` when the job's
    bundles ask for more: Ray's CPUs are logical, and a laptop may run 2 engines + 2 ranks on 2 cores,
    just slower), no dashboard, quiet logs, and token authentication off (RAY_AUTH_MODE=disabled unless the
    user set it), so it writes no ~/.ray/auth_token.
    """
    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = dict(logging_level=logging.WARNING, log_to_driver=True)
    if launch.ray_address is None:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        num_cpus = launch.num_cpus
        if num_cpus is None:
            cores = os.cpu_count() or 1
            num_cpus = max(cores, math.ceil(cpus_needed))
            if num_cpus > cores:
                print(f"[ray] the job's bundles ask for {cpus_needed:g} CPUs and this machine has {cores}: "
                      f"starting Ray with {num_cpus} logical CPUs (processes will share cores)")
        kwargs |= dict(num_cpus=num_cpus, include_dashboard=False)
    ray.init(address=launch.ray_address, **kwargs)
    return True


# ---------------------------------------------------------------------------------------
# Placement: bundles and where each actor goes.


@dataclass(frozen=True)
class Slot:
    """Where one actor runs: a bundle of the placement group and its share of that bundle."""

    bundle: int
    num_cpus: float
    num_gpus: float = 0.0

    @property
    def threads(self) -> int:
        return max(1, int(self.num_cpus))


@dataclass(frozen=True)
class Placement:
    """The placement group's bundles and the slot of every trainer rank and engine."""

    bundles: list[dict[str, float]]
    trainer_slots: list[Slot]
    engine_slots: list[Slot]
    colocated: bool

    @property
    def trainer_gpus(self) -> bool:
        return any(s.num_gpus > 0 for s in self.trainer_slots)


def _share(amount: float, parts: int) -> float:
    """`amount / parts`, rounded down to Ray's resource precision (1e-4) so the parts fit the bundle."""
    return math.floor(amount / parts * 1e4) / 1e4


def plan_placement(launch: LaunchConfig, num_trainers: int, num_engines: int, gpus: bool) -> Placement:
    """Bundles for `num_trainers` Ray-placed trainer ranks (0: the trainer is not placed) and `num_engines`.

    Colocated engines share the trainer bundles (engine i in bundle i % num_trainers, every actor of a
    bundle getting an equal share); without placed trainers they get bundles of their own.
    """
    for name in ("cpus_per_trainer", "cpus_per_engine"):
        if not getattr(launch, name) > 0:
            raise ValueError(f"launch.{name} must be > 0, got {getattr(launch, name)}")
    gpu = {"GPU": 1.0} if gpus else {}
    bundles = [{"CPU": float(launch.cpus_per_trainer), **gpu} for _ in range(num_trainers)]
    if launch.colocate and num_trainers:
        sharers = [1 + len(range(j, num_engines, num_trainers)) for j in range(num_trainers)]

        def slot(j: int) -> Slot:
            return Slot(j, _share(launch.cpus_per_trainer, sharers[j]), _share(1.0, sharers[j]) if gpus else 0.0)

        return Placement(bundles, [slot(j) for j in range(num_trainers)],
                         [slot(i % num_trainers) for i in range(num_engines)], colocated=True)
    trainer_slots = [Slot(j, float(launch.cpus_per_trainer), 1.0 if gpus else 0.0) for j in range(num_trainers)]
    engine_slots = [Slot(num_trainers + i, float(launch.cpus_per_engine), 1.0 if gpus else 0.0)
                    for i in range(num_engines)]
    bundles += [{"CPU": float(launch.cpus_per_engine), **gpu} for _ in range(num_engines)]
    return Placement(bundles, trainer_slots, engine_slots, colocated=launch.colocate)


def reserve(placement: Placement, timeout_s: float) -> PlacementGroup:
    """Create the placement group and wait until Ray has placed every bundle; RuntimeError past `timeout_s`."""
    pg = placement_group(placement.bundles, strategy="PACK")
    try:
        ray.get(pg.ready(), timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        remove_placement_group(pg)
        need: dict[str, float] = {}
        for bundle in placement.bundles:
            for key, value in bundle.items():
                need[key] = need.get(key, 0.0) + value
        have = {k: v for k, v in ray.available_resources().items() if k in need}
        raise RuntimeError(
            f"Ray could not place {len(placement.bundles)} bundles {placement.bundles} (in all {need}) within "
            f"{timeout_s:.0f} s; available now: {have}. Lower -t / -i, launch.cpus_per_trainer / "
            f"launch.cpus_per_engine, or give Ray more (launch.num_cpus, more nodes)") from None
    return pg


def _strategy(pg: PlacementGroup, slot: Slot) -> dict[str, Any]:
    """Ray actor options placing an actor in `slot` of `pg`."""
    return dict(num_cpus=slot.num_cpus, num_gpus=slot.num_gpus,
                scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=slot.bundle))


# ---------------------------------------------------------------------------------------
# Trainer ranks as Ray actors.


@ray.remote
class RankActor:
    """One SPMD trainer rank: torch.distributed + the per-rank object, driven by a RayRankGroup."""

    def __init__(self, rank: int):
        self.rank = rank
        self.obj: Any = None

    def address(self) -> tuple[str, int]:
        """This node's IP, and on rank 0 the port of the rendezvous store it now serves (bound at once, so no
        other process can take the port before the ranks meet there; every rank, rank 0 too, is its client)."""
        from slime_rl.dist_group import host_store

        ip = ray.util.get_node_ip_address()
        if self.rank != 0:
            return ip, 0
        self._store = host_store(ip)
        return ip, self._store.port

    def start(self, env: dict[str, str], backend: str, factory_blob: bytes) -> bytes:
        """Apply the env, init the process group, build the object; an encoded construction reply."""
        os.environ.update(env)
        try:
            import torch

            torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
            factory, factory_kwargs = pickle.loads(factory_blob)
            _init_dist(backend)
            self.obj = _load_factory(factory)(**factory_kwargs)
        except Exception:
            return _encode(_Reply(self.rank, error=traceback.format_exc()), _CONSTRUCTION)
        return _encode(_Reply(self.rank), _CONSTRUCTION)

    def run(self, call_blob: bytes) -> bytes:
        """One command (plain pickle both ways, so tensors arrive as copies, as with spawned ranks)."""
        call: _Call = pickle.loads(call_blob)
        reply = _execute(self.obj, call, self.rank)
        if call.method == _SHUTDOWN:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
        return _encode(reply, call.method)


class RayRankGroup(RankGroup):
    """Ranks that are Ray actors (`ray_ranks`); the same semantics as SpawnedRankGroup.

    `timeout` (seconds; None waits forever) bounds every wait for replies. A rank whose actor
    dies raises RankError naming it and leaves the group unusable (close it).
    """

    def __init__(self, actors: list, timeout: float | None = None):
        super().__init__(len(actors))
        self.actors = list(actors)
        self.timeout = timeout

    def _run(self, call: _Call) -> list[_Reply]:
        return self._collect(self._send(call), call.method, self.timeout, stop_on_error=False)

    def _send(self, call: _Call) -> list:
        blob = ray.put(pickle.dumps(call, protocol=_PICKLE))  # one copy in the object store for all ranks
        return [actor.run.remote(blob) for actor in self.actors]

    def _collect(self, refs: list, method: str, timeout: float | None, stop_on_error: bool) -> list[_Reply]:
        """One reply per rank, taken as they arrive, so a dead rank is noticed while the others wait."""
        rank_of = {ref: rank for rank, ref in enumerate(refs)}
        replies: dict[int, _Reply] = {}
        pending = list(refs)
        deadline = None if timeout is None else time.monotonic() + timeout
        while pending:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, pending = ray.wait(pending, num_returns=1, timeout=remaining)
            if not ready:
                waiting = sorted(rank_of[r] for r in pending)
                self._broken = f"timed out after {timeout} s waiting for rank(s) {waiting} in {method}"
                raise RankError(self._broken + _failures(list(replies.values()), method))
            rank = rank_of[ready[0]]
            try:
                reply = pickle.loads(ray.get(ready[0]))
            except ray.exceptions.RayError as error:
                why = "died" if isinstance(error, ray.exceptions.RayActorError) else "failed outside the command"
                self._broken = f"rank {rank} {why} during {method}: {error}"
                raise RankError(self._broken + _failures(list(replies.values()), method)) from None
            replies[rank] = reply
            if stop_on_error:
                _raise_failures([reply], method, self.world_size)
        return [replies[r] for r in range(self.world_size)]

    def _shutdown(self, timeout: float) -> list[_Reply]:
        return self._collect(self._send(_Call(_SHUTDOWN)), "close", timeout, stop_on_error=False)

    def _stop(self, replies: list[_Reply], timeout: float) -> None:
        """Kill the rank actors (Ray reclaims their processes and resources)."""
        for actor in self.actors:
            ray.kill(actor)


def ray_ranks(world_size: int, factory: Factory, factory_kwargs: dict[str, Any], *, pg: PlacementGroup,
              slots: list[Slot], env: dict[str, Any] | None = None, backend: str = "gloo",
              start_timeout: float = 300, timeout: float | None = None, threads: int | None = None) -> RayRankGroup:
    """`spawn_ranks` with Ray actors: rank r runs in `slots[r]` of `pg` and builds `factory(**factory_kwargs)`.

    Each rank gets torchrun's env: RANK, WORLD_SIZE, LOCAL_RANK / LOCAL_WORLD_SIZE (among the ranks
    on its node), MASTER_ADDR / MASTER_PORT (rank 0's node IP and the store it serves there), and
    OMP_NUM_THREADS = `threads`, else its CPU share (it wins over `env`, which is applied too). Returns once every
    rank has built its object; RankError with the tracebacks if one fails, dies, or `start_timeout` passes.
    """
    if world_size < 1 or len(slots) != world_size:
        raise ValueError(f"world_size must be >= 1 with one slot per rank, got {world_size} and {len(slots)} slots")
    _check_factory(factory)
    try:
        factory_blob = ray.put(pickle.dumps((factory, factory_kwargs), protocol=_PICKLE))
    except Exception as error:
        raise ValueError(f"factory {factory!r} and factory_kwargs must pickle (use a 'pkg.mod:Name' path)") from error
    actors = [RankActor.options(**_strategy(pg, slot)).remote(rank) for rank, slot in enumerate(slots)]
    group = RayRankGroup(actors, timeout)
    try:
        addresses = ray.get([actor.address.remote() for actor in actors], timeout=start_timeout)
        ips = [ip for ip, _ in addresses]
        shared = {key: str(value) for key, value in (env or {}).items()}
        shared |= {"MASTER_ADDR": addresses[0][0], "MASTER_PORT": str(addresses[0][1]), "WORLD_SIZE": str(world_size),
                   "TORCHELASTIC_USE_AGENT_STORE": "True"}
        refs = []
        for rank, (actor, slot) in enumerate(zip(actors, slots)):
            # Ray narrows CUDA_VISIBLE_DEVICES to a GPU rank's own device, so its device index is 0.
            local_rank = 0 if slot.num_gpus else ips[:rank].count(ips[rank])
            rank_env = shared | {"RANK": str(rank), "LOCAL_RANK": str(local_rank),
                                 "LOCAL_WORLD_SIZE": str(ips.count(ips[rank])),
                                 "OMP_NUM_THREADS": str(threads or slot.threads)}
            refs.append(actor.start.remote(rank_env, backend, factory_blob))
        group._collect(refs, _CONSTRUCTION, start_timeout, stop_on_error=True)
    except BaseException as error:
        group._broken = "construction failed"
        group.close()
        if isinstance(error, ray.exceptions.GetTimeoutError):
            raise RankError(f"the {world_size} Ray rank actors did not start within {start_timeout} s") from None
        if isinstance(error, ray.exceptions.RayError):
            raise RankError(f"starting {world_size} Ray rank actors failed: {error}") from None
        raise
    return group


# ---------------------------------------------------------------------------------------
# Engines as Ray actors.


@ray.remote
class EngineActor:
    """One rollout engine: an EmbeddedEngine from `model_dir` behind its SGLang-protocol server on a free port."""

    def __init__(self, model_dir: str, rollout: RolloutConfig, seed: int, host: str | None, threads: int):
        import torch

        from rollout.engine import EmbeddedEngine
        from rollout.serve import TOKENIZER_FILES
        from rollout.server import BackgroundServer
        from slime_rl.tokenizer import load_tokenizer

        torch.set_num_threads(threads)
        has_tokenizer = any(os.path.isfile(os.path.join(model_dir, name)) for name in TOKENIZER_FILES)
        tokenizer = load_tokenizer(model_dir) if has_tokenizer else None
        ro = rollout
        self.engine = EmbeddedEngine.from_pretrained(
            model_dir, device="cuda" if ray.get_gpu_ids() else "cpu", max_batch_size=ro.max_batch_size, seed=seed,
            max_total_tokens=ro.max_total_tokens, kv_cache_mb=ro.kv_cache_mb, page_size=ro.page_size,
            enable_prefix_cache=ro.enable_prefix_cache, tokenizer=tokenizer)
        self.server = BackgroundServer(self.engine, tokenizer, host=host or ray.util.get_node_ip_address(), port=0,
                                       model_path=model_dir, api_key=ro.api_key).start()

    def address(self) -> tuple[str, int]:
        """(URL, process id)."""
        return self.server.url, os.getpid()

    def stop(self) -> None:
        self.server.stop()
        self.engine.close()


@dataclass
class _Engine:
    index: int
    actor: Any
    url: str
    pid: int


class RayLaunch:
    """Engines and trainer ranks of one job placed by Ray (see the module docstring). Close it last."""

    def __init__(self, cfg: JobConfig, hf_config: dict, state_dict: dict, tokenizer: Any = None):
        self.cfg = cfg
        self.trainer: Any = None
        self._engines: dict[str, _Engine] = {}
        self._pg: PlacementGroup | None = None
        self._control: Any = None  # EngineClient over every engine (memory release / resume)
        self._training = False  # colocated: between before_train and after_train (engine memory released)
        self._closed = False
        l, placed = cfg.launch, cfg.trainer_ranks if cfg.train.backend == "megatron" else 0
        needed = placed * l.cpus_per_trainer + (0 if l.colocate else cfg.rollout.num_inferencers * l.cpus_per_engine)
        self._owns_ray = start_ray(cfg.launch, cpus_needed=needed)
        try:
            self._start(hf_config, state_dict, tokenizer)
        except BaseException:
            self.close()
            raise

    def _start(self, hf_config: dict, state_dict: dict, tokenizer: Any) -> None:
        from slime_rl.hf_io import save_hf_checkpoint

        cfg, launch = self.cfg, self.cfg.launch
        self.model_dir = Path(cfg.log.output_dir).resolve() / INIT_MODEL_DIR
        save_hf_checkpoint(self.model_dir, hf_config, state_dict, tokenizer)
        place_trainers = cfg.train.backend == "megatron"
        gpus = ray.cluster_resources().get("GPU", 0) >= 1
        self.placement = plan_placement(launch, cfg.trainer_ranks if place_trainers else 0,
                                        cfg.rollout.num_inferencers, gpus)
        timeout = PLACEMENT_TIMEOUT_S["local" if launch.ray_address is None else "cluster"]
        self._pg = reserve(self.placement, timeout)
        mode = "colocated" if self.placement.colocated else "disaggregated"
        print(f"[ray] {mode}: {len(self.placement.bundles)} bundle(s) {self.placement.bundles}; "
              f"{len(self.placement.engine_slots)} engine(s), {len(self.placement.trainer_slots)} trainer rank(s)")
        starting = [(i, self._create_engine(i)) for i in range(cfg.rollout.num_inferencers)]
        self.trainer = self._start_trainer(hf_config, state_dict)
        for index, actor in starting:
            self._register(index, actor)
        self._reconnect()

    def _start_trainer(self, hf_config: dict, state_dict: dict) -> Any:
        from slime_rl.builders import build_trainer  # handed a launcher that places ranks here

        if self.cfg.train.backend != "megatron":
            print(f"[ray] train.backend {self.cfg.train.backend}: the trainer runs in the driver process; "
                  f"Ray places the engines only")
            return build_trainer(self.cfg, hf_config, state_dict)
        return build_trainer(self.cfg, hf_config, str(self.model_dir), launcher=self._rank_launcher)

    def _rank_launcher(self, world_size: int, factory: Factory, factory_kwargs: dict[str, Any], *,
                       env: dict[str, Any] | None = None, backend: str = "gloo",
                       start_timeout: float = 300) -> RayRankGroup:
        """MegatronBackend's `launcher`. The driver picked `backend` from its own devices; the ranks use
        nccl exactly when their bundles hold GPUs (a CPU-only driver may drive GPU ranks)."""
        del backend
        return ray_ranks(world_size, factory, factory_kwargs, pg=self._pg, slots=self.placement.trainer_slots,
                         env=env, backend="nccl" if self.placement.trainer_gpus else "gloo",
                         start_timeout=start_timeout, threads=self.cfg.train.num_threads)

    # ---- engines ----------------------------------------------------------------

    def _create_engine(self, index: int) -> Any:
        slot = self.placement.engine_slots[index]
        host = "127.0.0.1" if self.cfg.launch.ray_address is None else None
        return EngineActor.options(**_strategy(self._pg, slot)).remote(
            str(self.model_dir), self.cfg.rollout, self.cfg.rollout.seed + index, host,
            self.cfg.rollout.num_threads or slot.threads)

    def _register(self, index: int, actor: Any) -> str:
        """Wait for a new engine actor's server, check it answers /health, and record it; its URL."""
        from rollout.client import EngineClient

        try:
            url, pid = ray.get(actor.address.remote(), timeout=ENGINE_START_TIMEOUT_S)
        except (ray.exceptions.RayError, ray.exceptions.GetTimeoutError) as error:
            ray.kill(actor)
            raise RuntimeError(f"engine {index} (bundle {self.placement.engine_slots[index].bundle}) "
                               f"failed to start: {error}") from None
        with EngineClient(url, max_retries=0) as client:
            if not client.health():
                ray.kill(actor)
                raise RuntimeError(f"engine {index} at {url} (pid {pid}) started but GET /health failed")
        self._engines[url] = _Engine(index, actor, url, pid)
        print(f"[ray] engine {index}: {url} (pid {pid})")
        return url

    def _reconnect(self) -> None:
        """(Re)build the client that fans memory calls out to every engine."""
        from rollout.client import EngineClient

        if self._control is not None:
            self._control.close()
        urls = self.engine_urls
        self._control = EngineClient(urls[0], control_urls=urls, api_key=self.cfg.rollout.api_key, max_retries=0)

    def _engine(self, url: str) -> _Engine:
        engine = self._engines.get(url.rstrip("/"))
        if engine is None:
            raise ValueError(f"no engine at {url!r}; engines: {self.engine_urls}")
        return engine

    @property
    def engine_urls(self) -> list[str]:
        """Engine URLs in engine order."""
        return [e.url for e in sorted(self._engines.values(), key=lambda e: e.index)]

    def engine_pid(self, url: str) -> int:
        """The process id of the engine serving `url`."""
        return self._engine(url).pid

    def restart_engine(self, url: str) -> str:
        """Kill the engine at `url` (if alive) and start a fresh one in the same bundle; its URL once healthy.

        The new engine serves the initial weights: the caller re-syncs the current ones. Restarted
        while a colocated trainer runs, it releases its memory at once like the others.
        """
        from rollout.client import EngineClient

        old = self._engine(url)
        ray.kill(old.actor)
        del self._engines[old.url]
        new_url = self._register(old.index, self._create_engine(old.index))
        self._reconnect()
        if self._training:
            with EngineClient(new_url, api_key=self.cfg.rollout.api_key, max_retries=0) as client:
                client.release_memory_occupation()
        print(f"[ray] engine {old.index} restarted: {old.url} -> {new_url}")
        return new_url

    # ---- colocation ----------------------------------------------------------------

    def before_train(self) -> None:
        """Colocated: every engine frees its KV cache for the trainer (requests wait); no-op when disaggregated."""
        if self.placement.colocated:
            self._training = True
            self._control.release_memory_occupation()

    def after_train(self) -> None:
        """Colocated: every engine re-allocates its KV cache and goes on serving; no-op when disaggregated."""
        if self.placement.colocated:
            self._training = False
            self._control.resume_memory_occupation()

    def memory_cycles(self) -> dict[str, tuple[int, int]]:
        """Per engine URL: how often it released and resumed its KV cache (from its /server_info)."""
        from rollout.client import EngineClient

        out = {}
        for url in self.engine_urls:
            with EngineClient(url, max_retries=0) as client:
                stats = client.get_server_info()["internal_states"][0]
            out[url] = (stats["memory_releases"], stats["memory_resumes"])
        return out

    # ---- shutdown -----------------------------------------------------------------

    def close(self) -> None:
        """Stop the trainer ranks and engines, free the placement group, and shut Ray down if we started it."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._engines and self.placement.colocated:
                self._report_memory_cycles()
            if self.trainer is not None and hasattr(self.trainer, "close"):
                self.trainer.close()
        finally:
            if self._control is not None:
                self._control.close()
            self._stop_engines()
            if self._pg is not None:
                remove_placement_group(self._pg)
            if self._owns_ray:
                ray.shutdown()

    def _report_memory_cycles(self) -> None:
        """Print each colocated engine's release / resume counts (best effort: an engine may be down)."""
        from rollout.client import EngineError

        try:
            cycles = self.memory_cycles()
        except (EngineError, KeyError) as error:
            print(f"[ray] KV cache release counts unavailable: {error}")
            return
        for url, (released, resumed) in cycles.items():
            print(f"[ray] engine {url}: KV cache released {released} and resumed {resumed} time(s)")

    def _stop_engines(self) -> None:
        engines, self._engines = list(self._engines.values()), {}
        if not engines:
            return
        stops = [e.actor.stop.remote() for e in engines]
        ray.wait(stops, num_returns=len(stops), timeout=ENGINE_STOP_TIMEOUT_S)
        for engine in engines:
            ray.kill(engine.actor)

    def __enter__(self) -> RayLaunch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
