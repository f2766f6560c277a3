"""Run a function on `world` spawned processes joined in one gloo group, and collect what each returned.

For tests of tensor-parallel ops on CPU (tests/test_vocab_parallel.py, tests/test_fused_logprob.py): one spawn
per world size, every case inside it, since starting ranks costs seconds. `fn(rank, world, payload)` must be a
module-level function (spawned processes import it); it runs with the default group initialized.
"""

from __future__ import annotations

import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from slime_rl.dist_group import free_port


def _rank_main(fn: Callable, rank: int, world: int, port: int, payload: Any, out_dir: str) -> None:
    try:
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=timedelta(seconds=60))
        result = fn(rank, world, payload)
        dist.destroy_process_group()
        torch.save(result, f"{out_dir}/rank{rank}.pt")
    except BaseException:
        Path(f"{out_dir}/rank{rank}.err").write_text(traceback.format_exc())
        raise


def run_on_ranks(fn: Callable, world: int, payload: Any, tmp_path: Path, timeout_s: float = 120) -> list:
    """[fn's result on rank r for r in range(world)]; a rank's traceback fails the calling test."""
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=_rank_main, args=(fn, rank, world, port, payload, str(tmp_path)))
             for rank in range(world)]
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join(timeout=timeout_s)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    errors = [f.read_text() for f in sorted(tmp_path.glob("rank*.err"))]
    assert not errors and all(p.exitcode == 0 for p in procs), f"exit codes {[p.exitcode for p in procs]}: {errors}"
    return [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(world)]
