"""slime_rl.dist_group: a weight-broadcast group beside torch.distributed's default group (gloo, CPU)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from slime_rl.dist_group import host_store, init_weight_group

REPO = Path(__file__).resolve().parents[1]

# Rank 0 plays a trainer that already owns a default process group; rank 1 plays a server.
# Two named groups between the same processes must not mix their traffic.
RANK_SCRIPT = textwrap.dedent("""
    import json, sys
    import torch, torch.distributed as dist
    from slime_rl.dist_group import init_weight_group

    rank, port_a, port_b, default_port = map(int, sys.argv[1:5])
    if rank == 0:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{default_port}", rank=0, world_size=1)
    a = init_weight_group("127.0.0.1", port_a, rank, 2, group_name="a", timeout_s=60)
    b = init_weight_group("127.0.0.1", port_b, rank, 2, group_name="b", timeout_s=60)
    x = torch.randn(3, 5, generator=torch.Generator().manual_seed(0)) if rank == 0 else torch.zeros(3, 5)
    y = torch.arange(7, dtype=torch.bfloat16) if rank == 0 else torch.zeros(7, dtype=torch.bfloat16)
    a.broadcast(x, src=0)
    b.broadcast(y, src=0)
    if rank == 0:
        t = torch.ones(1)
        dist.all_reduce(t)  # the trainer's own default group still works
        dist.destroy_process_group()
    a.destroy()
    b.destroy()
    print(json.dumps({"x": x.tolist(), "y": y.float().tolist()}))
""")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_broadcast_in_two_groups_beside_a_default_group():
    ports = [str(free_port()) for _ in range(3)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", RANK_SCRIPT, str(rank), *ports], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    try:
        outputs = [p.communicate(timeout=90) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-2000:]
    sent, received = (json.loads(out.strip().splitlines()[-1]) for out, _ in outputs)
    expected_x = torch.randn(3, 5, generator=torch.Generator().manual_seed(0))
    assert torch.tensor(received["x"]).equal(expected_x)
    assert received["y"] == list(range(7)) == sent["y"]


def test_single_rank_group_broadcast_and_destroy():
    group = init_weight_group("127.0.0.1", free_port(), 0, 1, group_name="solo", timeout_s=10)
    try:
        t = torch.arange(4.0)
        assert group.broadcast(t, src=0) is t and t.tolist() == [0.0, 1.0, 2.0, 3.0]
        assert group.device == torch.device("cpu")
        with pytest.raises(ValueError, match="contiguous"):
            group.broadcast(torch.zeros(4, 4).t())
    finally:
        group.destroy()
    group.destroy()  # idempotent
    with pytest.raises(RuntimeError, match="destroyed"):
        group.broadcast(torch.zeros(1))


def test_rank_0_can_serve_a_store_it_bound_before_the_others_were_told_its_port():
    store = host_store("127.0.0.1")  # bound on a port the OS picked: no other process can take it meanwhile
    with ThreadPoolExecutor(1) as pool:
        joining = pool.submit(init_weight_group, "127.0.0.1", store.port, 1, 2, group_name="hosted", timeout_s=20)
        host = init_weight_group("127.0.0.1", store.port, 0, 2, group_name="hosted", timeout_s=20, store=store)
        guest = joining.result()
        try:
            received = torch.zeros(3)
            receiving = pool.submit(guest.broadcast, received, 0)
            host.broadcast(torch.tensor([1.0, 2.0, 3.0]), src=0)
            receiving.result(timeout=20)
            assert received.tolist() == [1.0, 2.0, 3.0]
        finally:
            host.destroy()
            guest.destroy()
    with pytest.raises(ValueError, match="only rank 0"):
        init_weight_group("127.0.0.1", store.port, 1, 2, group_name="x", store=store)


@pytest.mark.parametrize("kwargs,needle", [
    (dict(backend="mpi"), "backend must be one of"),
    (dict(rank=2), r"rank must be in \[0, world_size=2\)"),
    (dict(group_name=""), "group_name"),
])
def test_bad_arguments_fail_before_any_connection(kwargs, needle):
    args = dict(master_address="127.0.0.1", master_port=free_port(), rank=1, world_size=2, timeout_s=1)
    with pytest.raises(ValueError, match=needle):
        init_weight_group(**{**args, **kwargs})


def test_a_missing_master_is_a_clear_timeout():
    port = free_port()
    with pytest.raises(RuntimeError, match=f"127.0.0.1:{port}"):
        init_weight_group("127.0.0.1", port, rank=1, world_size=2, group_name="lonely", timeout_s=1)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a CPU-only build")
def test_nccl_without_cuda_says_so():
    with pytest.raises(ValueError, match="nccl"):
        init_weight_group("127.0.0.1", free_port(), 0, 1, backend="nccl", timeout_s=5)
