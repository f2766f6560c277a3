"""Drive a group of SPMD trainer ranks from one driver: every command runs on all ranks at once.

Trainer backends (megatron-core with TP/PP/DP) do collectives inside every command
(`logprobs`, `train_step`, weight export, save/load), so each command must reach
every rank, and the driver needs the results back. Ranks come into being in one of
two ways, and the same per-rank object, built by `factory(**factory_kwargs)`, serves both:

1. `spawn_ranks(...)`: the driver (not itself a rank) starts N worker processes with
   the spawn start method and torchrun-style env (RANK, WORLD_SIZE, LOCAL_RANK,
   MASTER_ADDR, MASTER_PORT); the rendezvous store is served by the driver, every rank is
   its client. Commands and results travel over one pipe per rank.
2. `torchrun_group(...)`, called by every process under torchrun: rank 0 is the driver
   and trainer rank 0; ranks > 0 serve commands broadcast from rank 0 on a dedicated
   gloo group and send their results back with `gather_object`.

    with spawn_ranks(2, "my_pkg.trainer:Trainer", {"tp": 2}) as ranks:
        losses = ranks.call("train_step", batch)       # one result per rank, rank order
        logprobs = ranks.call_rank0("logprobs", batch)

A command that raises on some ranks raises `RankError` carrying each failing rank's
traceback; the group stays usable when every rank replied. A rank that dies, or a
spawned group that waits past its `timeout`, raises `RankError` and leaves the group
unusable (close it). Under torchrun rank 0 takes part in every command itself, so no
timeout can be enforced there: torch.distributed's own timeouts and torchrun's
stop-all-on-failure apply.

Spawned ranks: commands and replies are pickled, and their plain CPU tensors travel
through shared memory (`training.shm_channel`: each sender's arena is an anonymous
memfd whose descriptor goes over the pipe) instead of through the pipe; they arrive as
copies and never alias a worker's live parameters. Return CPU tensors. Under torchrun
payloads are pickled through the control group, and rank 0's own result is returned as
is, uncopied.
"""

from __future__ import annotations

import importlib
import multiprocessing
import multiprocessing.connection
import multiprocessing.util
import os
import pickle
import signal
import sys
import time
import traceback
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Callable

from training.shm_channel import Arena, Link, encode, supported as shm_supported

# torch is imported inside functions: a spawned worker must apply the caller's env
# (OMP_NUM_THREADS, CUDA_VISIBLE_DEVICES, ...) before torch loads.

Factory = str | Callable[..., Any]

_SHUTDOWN = "__shutdown__"
_CONSTRUCTION = "construction"
# Ranks > 0 under torchrun wait on the control group between commands, possibly through
# hours of rollouts, so its timeout must not be the 30-minute default.
_CONTROL_GROUP_TIMEOUT = timedelta(days=7)
_KILL_GRACE_S = 5.0
_LIVENESS_S = 1.0  # how often a driver waiting for replies checks that the ranks it waits for still live
_PICKLE = pickle.HIGHEST_PROTOCOL


class RankError(RuntimeError):
    """A command or a rank's construction failed, a rank died, or a wait timed out."""


@dataclass(frozen=True)
class _Call:
    """Driver -> rank: run `getattr(obj, method)(*args, **kwargs)`."""

    method: str
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)


@dataclass(frozen=True)
class _Reply:
    """Rank -> driver: the command's value, or the formatted traceback if it raised."""

    rank: int
    value: Any = None
    error: str | None = None


# ---------------------------------------------------------------------------------------
# Per-rank side, shared by both modes.


def _check_factory(factory: Factory) -> None:
    if not callable(factory) and not (isinstance(factory, str) and all(factory.partition(":")[::2])):
        raise ValueError(f"factory {factory!r} must be a callable or a dotted path 'pkg.mod:Name'")


def _load_factory(factory: Factory) -> Callable[..., Any]:
    """A callable as is, or "pkg.mod:Name.attr" imported and looked up."""
    _check_factory(factory)
    if callable(factory):
        return factory
    module_name, _, attr_path = factory.partition(":")
    target: Any = importlib.import_module(module_name)
    for attr in attr_path.split("."):
        target = getattr(target, attr)
    return target


def _execute(obj: Any, call: _Call, rank: int) -> _Reply:
    """Run one command on this rank's object; the shutdown command runs `obj.close()` if it exists."""
    if call.method == _SHUTDOWN and not hasattr(obj, "close"):
        return _Reply(rank)
    method = "close" if call.method == _SHUTDOWN else call.method
    try:
        return _Reply(rank, value=getattr(obj, method)(*call.args, **call.kwargs))
    except Exception:
        return _Reply(rank, error=traceback.format_exc())


def _unpicklable(reply: _Reply, method: str) -> _Reply:
    return _Reply(reply.rank, error=f"the result of {method} could not be pickled:\n{traceback.format_exc()}")


def _encode(reply: _Reply, method: str) -> bytes:
    """Pickle a reply; an unpicklable value becomes an error reply instead of a lost rank."""
    try:
        return pickle.dumps(reply, protocol=_PICKLE)
    except Exception:
        return pickle.dumps(_unpicklable(reply, method), protocol=_PICKLE)


def _send_reply(link: Link, reply: _Reply, method: str) -> None:
    """`_encode` over a rank's link (pickling fails before anything is sent)."""
    try:
        message = encode(reply, link.arena)
    except Exception:
        message = encode(_unpicklable(reply, method), None)
    link.send_encoded(message)


def _init_dist(backend: str) -> bool:
    """`init_process_group` from the env unless already done; True if this call created it."""
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return False
    if "nccl" in backend and torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, init_method="env://")
    return True


def _failures(replies: list[_Reply], method: str) -> str:
    return "".join(f"\n--- rank {r.rank} raised in {method}:\n{r.error}" for r in replies if r.error is not None)


def _raise_failures(replies: list[_Reply], method: str, world_size: int) -> None:
    failed = [str(r.rank) for r in replies if r.error is not None]
    if failed:
        raise RankError(f"{method} failed on rank {', '.join(failed)} of {world_size}:{_failures(replies, method)}")


# ---------------------------------------------------------------------------------------
# Driver side.


class RankGroup:
    """The driver's handle on N SPMD ranks. `call` runs a method on every rank at once."""

    def __init__(self, world_size: int):
        self.world_size = world_size
        self._closed = False
        self._broken: str | None = None  # why the group can no longer run commands

    def call(self, method: str, *args: Any, **kwargs: Any) -> list[Any]:
        """Run `obj.method(*args, **kwargs)` on every rank; the results in rank order."""
        if self._closed:
            raise RankError(f"cannot call {method}: the rank group is closed")
        if self._broken is not None:
            raise RankError(f"cannot call {method}: the rank group is unusable ({self._broken}); close() it")
        if method == _SHUTDOWN:
            raise ValueError(f"{_SHUTDOWN!r} is reserved; use close()")
        replies = self._run(_Call(method, args, kwargs))
        _raise_failures(replies, method, self.world_size)
        return [r.value for r in replies]

    def call_rank0(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """`call` on every rank (all must take part), returning rank 0's result."""
        return self.call(method, *args, **kwargs)[0]

    def _run(self, call: _Call) -> list[_Reply]:
        raise NotImplementedError

    def close(self, timeout: float = 60.0) -> None:
        """Ask every rank to shut down (`obj.close()`, destroy its process group, exit), then make sure the
        ranks are gone (`_stop`). A group that timed out or lost a rank is stopped at once, since its ranks
        may sit in a collective. Raises RankError, after cleaning up, if some rank's `close()` raised."""
        if self._closed:
            return
        self._closed = True
        replies: list[_Reply] = []
        if self._broken is None:
            try:
                replies = self._shutdown(timeout)
            except RankError as error:
                print(f"{type(self).__name__}: shutdown incomplete, stopping the ranks: {error}", file=sys.stderr)
        self._stop(replies, timeout)
        _raise_failures(replies, "close", self.world_size)

    def _shutdown(self, timeout: float) -> list[_Reply]:
        """Send the shutdown command; every rank's reply within `timeout`."""
        raise NotImplementedError

    def _stop(self, replies: list[_Reply], timeout: float) -> None:
        """After the shutdown command (acknowledged by `replies`): end the rank processes for sure."""

    def __enter__(self) -> RankGroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SpawnedRankGroup(RankGroup):
    """Ranks that `spawn_ranks` started as child processes, one pipe each.

    `timeout` (seconds; None waits forever) bounds every wait for replies and may be
    changed between calls. A rank that dies is noticed at once through its process sentinel, or within
    `_LIVENESS_S` when a process it forked holds that sentinel open.
    """

    def __init__(self, processes: list, conns: list, timeout: float | None, shared_memory: bool = True):
        super().__init__(len(processes))
        self.processes = tuple(processes)
        self.timeout = timeout
        self._conns = conns
        self._arena = Arena() if shared_memory and shm_supported() else None  # the commands to every rank
        self._links = [Link(conn) for conn in conns]
        # Runs before multiprocessing joins its children at interpreter exit (exitpriority >= 0),
        # so a driver that never calls close() does not hang on idle workers.
        self._finalizer = multiprocessing.util.Finalize(
            self, _stop_workers, args=(self.processes, conns, _KILL_GRACE_S), exitpriority=10
        )

    def _run(self, call: _Call) -> list[_Reply]:
        self._send(call)
        return self._collect(call.method, self.timeout, stop_on_error=False)

    def _send(self, call: _Call) -> None:
        message = encode(call, self._arena)
        for rank, link in enumerate(self._links):
            try:
                link.send_encoded(message)
            except OSError:
                self._broken = self._death(rank, call.method)
                raise RankError(self._broken) from None

    def _collect(self, method: str, timeout: float | None, stop_on_error: bool) -> list[_Reply]:
        """One reply per rank, waiting on pipes and process sentinels together. A rank's death can hide from
        both: a process it forked (megatron's checkpoint writer) inherits its end of the pipe and its
        sentinel, and outlives it. So every `_LIVENESS_S` the pending ranks are also asked whether they live."""
        replies: dict[int, _Reply] = {}
        deadline = None if timeout is None else time.monotonic() + timeout
        while len(replies) < self.world_size:
            pending = [r for r in range(self.world_size) if r not in replies]
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            handles = {self._conns[r]: r for r in pending} | {self.processes[r].sentinel: r for r in pending}
            ready = multiprocessing.connection.wait(
                list(handles), _LIVENESS_S if remaining is None else min(_LIVENESS_S, remaining))
            if not ready:
                ready = [self._conns[r] for r in pending if not self.processes[r].is_alive()]
            if not ready:
                if deadline is not None and time.monotonic() >= deadline:
                    self._broken = f"timed out after {timeout} s waiting for rank(s) {pending} in {method}"
                    raise RankError(self._broken + _failures(list(replies.values()), method))
                continue
            for rank in sorted({handles[h] for h in ready}):
                reply = self._receive(rank)
                if reply is None:
                    self._broken = self._death(rank, method)
                    raise RankError(self._broken + _failures(list(replies.values()), method))
                replies[rank] = reply
                if stop_on_error:
                    _raise_failures([reply], method, self.world_size)
        return [replies[r] for r in range(self.world_size)]

    def _receive(self, rank: int) -> _Reply | None:
        """The reply waiting on this rank's pipe, or None if the rank died without sending one.

        Called when the pipe or the process sentinel is ready; a worker writes its reply
        before it exits, so an empty pipe here means a death.
        """
        link = self._links[rank]
        try:
            return link.recv() if link.conn.poll() else None
        except (EOFError, OSError):
            return None

    def _death(self, rank: int, method: str) -> str:
        process = self.processes[rank]
        process.join(_KILL_GRACE_S)  # the sentinel fires a moment before the exit code can be reaped
        return f"rank {rank} died (exit code {process.exitcode}) during {method}"

    def _shutdown(self, timeout: float) -> list[_Reply]:
        self._send(_Call(_SHUTDOWN))
        return self._collect("close", timeout, stop_on_error=False)

    def _stop(self, replies: list[_Reply], timeout: float) -> None:
        """Reap the ranks, SIGTERM then SIGKILL stragglers, and kill what they started."""
        self._finalizer.cancel()
        # Ranks that acknowledged are exiting on their own (slow on a busy machine); give them `timeout`.
        _stop_workers(self.processes, self._conns, grace_s=timeout if replies else 0.0)
        for link in self._links:
            link.close()
        if self._arena is not None:
            self._arena.close()


def _stop_workers(processes: tuple, conns: list, grace_s: float) -> None:
    """Close the pipes (idle workers see EOF and exit), wait `grace_s`, then SIGTERM, then SIGKILL."""
    for conn in conns:
        conn.close()
    _join_all(processes, grace_s)
    for stop in ("terminate", "kill"):
        alive = [p for p in processes if p.is_alive()]
        if not alive:
            break
        for process in alive:
            getattr(process, stop)()
        _join_all(alive, _KILL_GRACE_S)
    for process in processes:  # whatever the ranks started and left behind
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def _join_all(processes: tuple | list, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))


# ---------------------------------------------------------------------------------------
# Mode 1: ranks spawned by the driver.


def _worker_main(rank: int, env: dict[str, str], backend: str, factory_blob: bytes, conn: Any,
                 shared_memory: bool = True, cores: tuple[int, ...] | None = None) -> None:
    """A spawned rank: pin it to `cores` (before torch starts its threads), set env, init torch.distributed,
    build the object, serve the pipe."""
    if cores:
        os.sched_setaffinity(0, cores)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the driver, which shuts the ranks down
    os.setpgid(0, 0)  # a process group per rank: what the rank starts (e.g. megatron's checkpoint-writer
    # manager process) is killed with it, even when the rank itself was killed (see _stop_workers)
    os.environ.update(env)
    link = Link(conn, Arena() if shared_memory and shm_supported() else None)
    try:
        if "OMP_NUM_THREADS" in env:
            import torch

            torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
        factory, factory_kwargs = pickle.loads(factory_blob)
        _init_dist(backend)
        obj = _load_factory(factory)(**factory_kwargs)
    except Exception:
        _send_reply(link, _Reply(rank, error=traceback.format_exc()), _CONSTRUCTION)
        sys.exit(1)
    _send_reply(link, _Reply(rank), _CONSTRUCTION)
    sys.exit(_serve_pipe(obj, link, rank))


def _serve_pipe(obj: Any, link: Link, rank: int) -> int:
    """Run commands from the driver until shutdown (exit code 0) or the driver goes away (1)."""
    import torch.distributed as dist

    while True:
        try:
            call: _Call = link.recv()
        except (EOFError, OSError):
            return 1
        reply = _execute(obj, call, rank)
        if call.method == _SHUTDOWN:
            dist.destroy_process_group()
        try:
            _send_reply(link, reply, call.method)
        except OSError:
            return 1
        if call.method == _SHUTDOWN:
            return 0


def _start_worker(rank: int, env: dict[str, str], backend: str, factory_blob: bytes,
                  shared_memory: bool, cores: tuple[int, ...] | None) -> tuple[Any, Any]:
    ctx = multiprocessing.get_context("spawn")  # never fork: torch holds threads and locks
    parent_conn, child_conn = ctx.Pipe()
    process = ctx.Process(
        target=_worker_main, args=(rank, env, backend, factory_blob, child_conn, shared_memory, cores),
        name=f"spmd-rank{rank}",
    )
    process.start()
    child_conn.close()  # only the worker holds its end now, so the driver sees EOF when it dies
    return process, parent_conn


def spawn_ranks(
    world_size: int,
    factory: Factory,
    factory_kwargs: dict[str, Any],
    *,
    env: dict[str, Any] | None = None,
    backend: str = "gloo",
    start_timeout: float = 300,
    timeout: float | None = None,
    shared_memory: bool = True,
    rank_cores: list[tuple[int, ...]] | tuple[tuple[int, ...], ...] | None = None,
) -> SpawnedRankGroup:
    """Start `world_size` ranks that each run `factory(**factory_kwargs)` after `init_process_group`.

    `factory` is a callable (pickled by reference) or "pkg.mod:Name". `env` is applied in
    each worker before torch.distributed starts (RANK/WORLD_SIZE/LOCAL_RANK are set per rank
    and win over it). Returns once every rank has built its object; raises RankError with
    the traceback if any rank fails to, or dies, or `start_timeout` passes. `shared_memory`
    False pickles every tensor through the pipes (`training.shm_channel`). `rank_cores[r]`: the
    cores rank r is pinned to (None: unpinned).
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if rank_cores is not None and len(rank_cores) != world_size:
        raise ValueError(f"rank_cores names {len(rank_cores)} ranks' cores, not {world_size}")
    _check_factory(factory)
    try:
        factory_blob = pickle.dumps((factory, factory_kwargs), protocol=_PICKLE)
    except Exception as error:
        raise ValueError(f"factory {factory!r} and factory_kwargs must pickle (use a 'pkg.mod:Name' path)") from error
    from slime_rl.dist_group import host_store  # imports torch: only in the driver, which has it loaded anyway

    store = host_store("127.0.0.1")
    # Every rank is a client of the driver's store (torchrun's agent-store mode), so no rank has to bind a
    # port that was merely free a moment before: under parallel jobs another process can take it first.
    shared_env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(store.port), "TORCHELASTIC_USE_AGENT_STORE": "True"}
    shared_env |= {key: str(value) for key, value in (env or {}).items()}
    processes, conns = [], []
    try:
        for rank in range(world_size):
            rank_env = shared_env | {
                "RANK": str(rank), "WORLD_SIZE": str(world_size),
                "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(world_size),
            }  # fmt: skip
            cores = tuple(rank_cores[rank]) if rank_cores else None
            process, conn = _start_worker(rank, rank_env, backend, factory_blob, shared_memory, cores)
            processes.append(process)
            conns.append(conn)
    except BaseException:
        _stop_workers(tuple(processes), conns, grace_s=0.0)
        raise
    group = SpawnedRankGroup(processes, conns, timeout, shared_memory)
    group._store = store  # the ranks' rendezvous store lives as long as the group
    try:
        group._collect(_CONSTRUCTION, start_timeout, stop_on_error=True)
    except BaseException:
        group._broken = "construction failed"
        group.close()
        raise
    return group


# ---------------------------------------------------------------------------------------
# Mode 2: torchrun started every rank; rank 0 drives.


def in_torchrun() -> bool:
    """True when this process is one rank of a torchrun (or torchrun-style env) launch.

    Also true inside ranks started by `spawn_ranks`, which get the same env; ask it in the driver.
    """
    if "TORCHELASTIC_RUN_ID" in os.environ:
        return True
    return all(key in os.environ for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR"))


class TorchrunRankGroup(RankGroup):
    """Rank 0's handle under torchrun: broadcast a command, run it locally, gather every rank's reply."""

    def __init__(self, obj: Any, control: Any, world_size: int, owns_process_group: bool):
        super().__init__(world_size)
        self.obj = obj
        self._control = control
        self._owns_process_group = owns_process_group

    def _run(self, call: _Call) -> list[_Reply]:
        import torch.distributed as dist

        try:
            dist.broadcast_object_list([call], src=0, group=self._control)
        except Exception as error:
            self._broken = f"broadcasting {call.method} to the ranks failed: {error}"
            raise RankError(self._broken) from error
        local = _execute(self.obj, call, 0)
        gathered: list[Any] = [None] * self.world_size
        try:
            dist.gather_object(b"", gathered, dst=0, group=self._control)
        except Exception as error:
            self._broken = f"gathering the results of {call.method} failed: {error}"
            raise RankError(self._broken + _failures([local], call.method)) from error
        return [local] + [pickle.loads(blob) for blob in gathered[1:]]

    def close(self) -> None:
        """Shut every rank down (each runs `obj.close()`), then tear down the groups this module made."""
        if self._closed:
            return
        self._closed = True
        try:
            replies = [] if self._broken is not None else self._run(_Call(_SHUTDOWN))
        finally:
            _destroy_groups(self._control, self._owns_process_group)
        _raise_failures(replies, "close", self.world_size)


def _serve_collective(obj: Any, control: Any, rank: int) -> None:
    """A rank > 0 under torchrun: run commands broadcast by rank 0 until shutdown."""
    import torch.distributed as dist

    while True:
        box: list[Any] = [None]
        try:
            dist.broadcast_object_list(box, src=0, group=control)
        except Exception as error:
            raise RankError(f"rank {rank}: lost the driver (rank 0) while waiting for a command: {error}") from error
        call: _Call = box[0]
        reply = _execute(obj, call, rank)
        dist.gather_object(_encode(reply, call.method), None, dst=0, group=control)
        if call.method == _SHUTDOWN:
            return


def _destroy_groups(control: Any, owns_process_group: bool) -> None:
    import torch.distributed as dist

    if owns_process_group:
        dist.destroy_process_group()
    else:
        dist.destroy_process_group(control)


def torchrun_group(factory: Factory, factory_kwargs: dict[str, Any], *, backend: str = "gloo") -> RankGroup | None:
    """Call on every rank under torchrun. Rank 0 gets the RankGroup; ranks > 0 serve and get None.

    Inits the default process group from torchrun's env unless the caller already did,
    creates the gloo control group (collective, so before the possibly failing factory),
    then builds this rank's object. A construction error raises on the failing rank;
    torchrun then stops the others. Ranks > 0 return None after rank 0 closes the group.
    """
    if not in_torchrun():
        raise RankError("torchrun_group needs torchrun's env (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR); "
                        "use spawn_ranks to start ranks from this process")  # fmt: skip
    import torch.distributed as dist

    owns_process_group = _init_dist(backend)
    control = dist.new_group(backend="gloo", timeout=_CONTROL_GROUP_TIMEOUT)
    rank = dist.get_rank()
    try:
        obj = _load_factory(factory)(**factory_kwargs)
    except Exception as error:
        raise RankError(f"rank {rank}: constructing {factory!r} failed") from error
    if rank == 0:
        return TorchrunRankGroup(obj, control, dist.get_world_size(), owns_process_group)
    _serve_collective(obj, control, rank)
    _destroy_groups(control, owns_process_group)
    return None
