"""training.spmd: commands on every SPMD rank, from spawned workers and under torchrun (gloo, CPU)."""

from __future__ import annotations

import json
import multiprocessing
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from slime_rl.launch import RankError, spawn_ranks

REPO = Path(__file__).resolve().parents[1]
# By dotted path, as the CLI will pass trainer classes; the module name is whatever pytest imported us as.
WORKER = f"{__name__}:Worker"
ENV = {"OMP_NUM_THREADS": "1"}


class Worker:
    """A tiny SPMD rank object: each method runs on every rank at once."""

    def __init__(self, scale: float = 1.0, fail_on_rank: int | None = None, marker_dir: str | None = None):
        self.rank = dist.get_rank()
        if self.rank == fail_on_rank:
            raise ValueError(f"factory refused on rank {self.rank}")
        self.scale = scale
        self.marker_dir = marker_dir

    def all_reduce_sum(self, x: float) -> float:
        t = torch.tensor([self.scale * x * (self.rank + 1)], dtype=torch.float64)
        dist.all_reduce(t)
        return t.item()

    def whoami(self, prefix: str = "rank", suffix: str = "") -> str:
        return f"{prefix}{self.rank}{suffix}"

    def environ(self, name: str) -> str:
        return os.environ[name]

    def ramp(self, n: int) -> torch.Tensor:
        return torch.arange(n, dtype=torch.float32) + self.rank

    def echo(self, payload: dict) -> dict:
        """The payload back, with what this rank saw of each tensor (dtype, shape, sum)."""
        seen = {k: (str(v.dtype), tuple(v.shape), float(v.detach().double().sum())) for k, v in payload.items()
                if isinstance(v, torch.Tensor)}
        return {"payload": payload, "seen": seen, "rank": self.rank}

    def fail_on(self, rank: int) -> int:
        if self.rank == rank:
            raise ValueError(f"boom on rank {rank}")
        return self.rank

    def unpicklable(self):
        return lambda: self.rank

    def block_on(self, rank: int) -> int:
        if self.rank == rank:
            dist.barrier()  # the other rank never joins: this rank is stuck in a collective
        return self.rank

    def die_on(self, rank: int) -> int:
        if self.rank == rank:
            os._exit(7)
        dist.barrier()  # the survivor waits in a collective for the dead rank, as in a real train_step
        return self.rank

    def fork_then_die_on(self, rank: int, pid_file: str) -> int:
        """Rank `rank` forks a child that keeps every descriptor it had (its pipe to the driver, its
        sentinel) and outlives it, as megatron's checkpoint writer does, then dies."""
        if self.rank == rank:
            child = os.fork()
            if child == 0:
                time.sleep(120)
                os._exit(0)
            Path(pid_file).write_text(str(child))
            os._exit(9)
        dist.barrier()
        return self.rank

    def close(self) -> None:
        if self.marker_dir is not None:
            Path(self.marker_dir, f"closed{self.rank}").write_text("ok")


def gone(group) -> bool:
    return all(not p.is_alive() and p.exitcode is not None for p in group.processes)


@pytest.fixture(scope="module")
def ranks():
    # A timeout so a broken test fails instead of hanging the suite.
    group = spawn_ranks(2, WORKER, {"scale": 3.0}, env=ENV, timeout=60)
    yield group
    group.close()


def test_every_rank_joins_the_all_reduce(ranks):
    # rank r contributes 3 * 2 * (r + 1): 6 + 12
    assert ranks.world_size == 2
    assert ranks.call("all_reduce_sum", 2.0) == [18.0, 18.0]


def test_results_come_in_rank_order_with_kwargs(ranks):
    assert ranks.call("whoami", prefix="r", suffix="!") == ["r0!", "r1!"]
    assert ranks.call_rank0("whoami", suffix="?") == "rank0?"


def test_the_ranks_meet_at_a_store_the_driver_already_holds(ranks):
    # A port only "free a moment ago" can be taken by a parallel job before rank 0 binds it (EADDRINUSE).
    ports = {int(port) for port in ranks.call("environ", "MASTER_PORT")}
    assert ports == {ranks._store.port}
    with socket.socket() as s, pytest.raises(OSError):
        s.bind(("127.0.0.1", ports.pop()))


def test_a_50mb_tensor_survives_the_pipe(ranks):
    n = 13_000_000  # 52 MB of float32 per rank
    ramps = ranks.call("ramp", n)
    for rank, ramp_N in enumerate(ramps):
        assert ramp_N.shape == (n,) and ramp_N.dtype == torch.float32
        assert torch.equal(ramp_N, torch.arange(n, dtype=torch.float32) + rank)


def mixed_payload(n: int) -> dict:
    base = torch.arange(2 * n, dtype=torch.float32).reshape(2, n)
    return {"f32": base, "bf16": torch.linspace(-3, 3, n).to(torch.bfloat16), "i64": torch.arange(n) * 7,
            "bool": torch.arange(n) % 3 == 0, "scalar": torch.tensor(2.5, dtype=torch.float64),
            "empty": torch.empty(0, 4), "column": base[:, 1::2],  # a non-contiguous view
            "param": torch.nn.Parameter(torch.ones(3)), "text": "kept", "nested": [torch.full((2,), 9)]}


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k, v in a.items():
        if isinstance(v, torch.Tensor):
            assert type(b[k]) is type(v) and b[k].dtype == v.dtype and torch.equal(b[k], v), k
        elif k == "nested":
            assert torch.equal(b[k][0], v[0])
        else:
            assert b[k] == v


def test_tensors_go_both_ways_through_shared_memory(ranks):
    for n in (5, 300_000, 40):  # the second outgrows the 1 MiB arena on both sides, the third reuses it
        payload = mixed_payload(n)
        replies = ranks.call("echo", payload)
        for rank, reply in enumerate(replies):
            assert reply["rank"] == rank
            assert_same(payload, reply["payload"])
            assert reply["seen"]["column"] == ("torch.float32", (2, n // 2), float(payload["column"].double().sum()))


def test_a_message_carries_tensor_bytes_in_its_arena_and_only_metadata_in_the_pipe():
    from training.shm_channel import Arena, Link, encode

    big = torch.randn(1_000_000)  # 4 MB
    original = big.clone()
    arena = Arena()
    message = encode({"x": big, "y": [big[:10]]}, arena)
    assert len(message.body) < 1000 and message.mapping is not None and message.mapping.size >= 4_000_040
    assert len(encode({"x": big}, None).body) > 4_000_000  # a plain pickle without an arena
    sender_end, receiver_end = multiprocessing.Pipe()
    sender, receiver = Link(sender_end, arena), Link(receiver_end)
    try:
        sender.send_encoded(message)
        got = receiver.recv()
        assert torch.equal(got["x"], big) and torch.equal(got["y"][0], big[:10])
        big.add_(1.0)  # the sender reuses its tensor (and, next message, its arena): the received copy holds
        sender.send({"z": torch.zeros(3)})
        assert torch.equal(receiver.recv()["z"], torch.zeros(3))
        assert torch.equal(got["x"], original)
        generation = arena.generation
        sender.send({"w": torch.ones(3_000_000)})  # 12 MB: a new arena, whose descriptor follows the message
        assert arena.generation == generation + 1 and torch.equal(receiver.recv()["w"], torch.ones(3_000_000))
    finally:
        sender_end.close(), receiver_end.close(), receiver.close(), arena.close()


def test_an_exception_names_the_rank_and_carries_its_traceback(ranks):
    with pytest.raises(RankError) as caught:
        ranks.call("fail_on", 1)
    message = str(caught.value)
    assert "fail_on failed on rank 1 of 2" in message
    assert "Traceback (most recent call last)" in message
    assert "ValueError: boom on rank 1" in message
    assert "rank 0 raised" not in message
    assert ranks.call("whoami") == ["rank0", "rank1"]  # a non-collective failure leaves the group usable


def test_an_unpicklable_result_is_an_error_not_a_lost_rank(ranks):
    with pytest.raises(RankError, match="could not be pickled"):
        ranks.call("unpicklable")
    assert ranks.call("all_reduce_sum", 1.0) == [9.0, 9.0]


def test_close_runs_close_on_every_rank_and_reaps_them(tmp_path):
    with spawn_ranks(2, Worker, {"marker_dir": str(tmp_path)}, env=ENV, timeout=60) as group:
        assert group.call("all_reduce_sum", 1.0) == [3.0, 3.0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["closed0", "closed1"]
    assert [p.exitcode for p in group.processes] == [0, 0]
    with pytest.raises(RankError, match="closed"):
        group.call("whoami")


def test_a_dead_rank_raises_at_once_instead_of_hanging():
    group = spawn_ranks(2, WORKER, {}, env=ENV)  # no timeout: the death must be noticed by itself
    try:
        start = time.monotonic()
        with pytest.raises(RankError, match=r"rank 1 died \(exit code 7\) during die_on"):
            group.call("die_on", 1)
        assert time.monotonic() - start < 10
        with pytest.raises(RankError, match="unusable"):
            group.call("whoami")
    finally:
        group.close()
    assert gone(group)


def test_a_rank_that_dies_behind_a_forked_child_is_noticed_and_the_child_reaped(tmp_path):
    group = spawn_ranks(2, WORKER, {}, env=ENV)  # no timeout: liveness alone must notice
    pid_file = tmp_path / "child.pid"
    try:
        start = time.monotonic()
        with pytest.raises(RankError, match=r"rank 1 died \(exit code 9\) during fork_then_die_on"):
            group.call("fork_then_die_on", 1, str(pid_file))
        assert time.monotonic() - start < 15
    finally:
        group.close()
    assert gone(group)
    child = int(pid_file.read_text())
    deadline = time.monotonic() + 10
    while Path(f"/proc/{child}").exists() and "Z" not in Path(f"/proc/{child}/stat").read_text().split()[2]:
        assert time.monotonic() < deadline, "the rank's forked child outlived the group"
        time.sleep(0.1)


def test_a_timeout_bounds_a_rank_stuck_in_a_collective():
    group = spawn_ranks(2, WORKER, {}, env=ENV, timeout=3.0)  # ample for rank 1 to reply on a busy machine
    try:
        with pytest.raises(RankError, match=r"timed out after 3.0 s waiting for rank\(s\) \[0\] in block_on"):
            group.call("block_on", 0)
    finally:
        start = time.monotonic()
        group.close()
    assert gone(group)
    assert time.monotonic() - start < 10


def test_a_factory_error_surfaces_from_spawn_ranks():
    before = set(multiprocessing.active_children())
    with pytest.raises(RankError) as caught:
        spawn_ranks(2, WORKER, {"fail_on_rank": 1}, env=ENV, start_timeout=60)
    message = str(caught.value)
    assert "construction failed on rank 1 of 2" in message
    assert "ValueError: factory refused on rank 1" in message
    assert "Traceback (most recent call last)" in message
    assert set(multiprocessing.active_children()) <= before  # rank 0, which built fine, was reaped too


def test_a_malformed_factory_path_fails_before_spawning():
    with pytest.raises(ValueError, match="must be a callable or a dotted path"):
        spawn_ranks(1, "no_colon_here", {}, env=ENV)


TORCHRUN_SCRIPT = textwrap.dedent("""
    import json, os, sys
    from pathlib import Path
    import torch, torch.distributed as dist
    from slime_rl.launch import RankError, in_torchrun, torchrun_group

    class Worker:
        def __init__(self, scale):
            self.rank, self.scale = dist.get_rank(), scale
        def all_reduce_sum(self, x):
            t = torch.tensor([self.scale * x * (self.rank + 1)], dtype=torch.float64)
            dist.all_reduce(t)
            return t.item()
        def ramp(self, n, suffix=""):
            return (torch.arange(n) + self.rank).tolist(), f"rank{self.rank}{suffix}"
        def fail_on(self, rank):
            if self.rank == rank:
                raise ValueError(f"boom on rank {rank}")
        def close(self):
            Path(out_dir, f"closed{self.rank}").touch()

    out_dir = sys.argv[1]  # files, not stdout: the ranks' prints could interleave on one line
    assert in_torchrun()
    group = torchrun_group(Worker, {"scale": 3.0})
    if group is None:
        Path(out_dir, f"served{os.environ['RANK']}").touch()
        sys.exit(0)
    with group:
        out = {"sum": group.call("all_reduce_sum", 2.0), "ramp": group.call("ramp", 3, suffix="!")}
        try:
            group.call("fail_on", 1)
        except RankError as error:
            out["error"] = str(error)
        out["after"] = group.call_rank0("all_reduce_sum", 1.0)
    Path(out_dir, "result.json").write_text(json.dumps(out))
""")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_rank0_drives_the_others(tmp_path):
    script = tmp_path / "drive.py"
    script.write_text(TORCHRUN_SCRIPT)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
               "--master-port", str(free_port()), str(script), str(tmp_path)]  # fmt: skip
    env = os.environ | {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    out = json.loads((tmp_path / "result.json").read_text())
    assert out["sum"] == [18.0, 18.0]
    assert out["ramp"] == [[[0, 1, 2], "rank0!"], [[1, 2, 3], "rank1!"]]
    assert "fail_on failed on rank 1 of 2" in out["error"] and "ValueError: boom on rank 1" in out["error"]
    assert out["after"] == 9.0
    assert {"closed0", "closed1", "served1"} <= {p.name for p in tmp_path.iterdir()}
