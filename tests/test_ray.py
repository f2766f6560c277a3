"""`--launcher ray`: placement, Ray trainer ranks, engine actors, memory release for colocation, and whole jobs.

Ray starts once for the module (`ray_cluster`, 4 logical CPUs on this machine) and RayLaunch joins it.
Engine memory release / resume is tested in process first (engine, server, client), without Ray.
"""

from __future__ import annotations

import json
import os
import re
import threading
from pathlib import Path

import pytest
import torch

from rollout.client import EngineClient, EngineError
from rollout.engine import EmbeddedEngine
from rollout.server import BackgroundServer
from server_procs import post
from slime_rl.cli import build_parser, config_from_args, main
from slime_rl.config import LaunchConfig
from slime_rl.hf_io import init_tiny_model, tiny_hf_config
from training.spmd import RankError
from slime_rl.tokenizer import CharTokenizer
from slime_rl.types import GenerateRequest, SamplingParams

TOK = CharTokenizer()
TESTS = str(Path(__file__).resolve().parent)
TINY = ["--model.hidden_size", "64", "--model.intermediate_size", "128", "--data.task_max_operand", "29",
        "--data.num_train", "64", "--data.num_val", "8", "--rollout.max_new_tokens", "8", "--log.progress", "false",
        "--sft.enabled", "false", "--train.num_steps", "2", "--rollout.prompts_per_step", "4",
        "--rollout.n_samples_per_prompt", "4", "--eval.n_samples", "1", "--log.plot", "false",
        "--log.save_checkpoint", "false", "--rollout.kv_cache_mb", "8"]


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, temperature=0.0)


@pytest.fixture(scope="module")
def engine():
    cfg = tiny_hf_config(vocab_size=TOK.vocab_size, hidden_size=64, intermediate_size=128, num_layers=2,
                         max_position_embeddings=128, eos_token_id=TOK.eos_token_id)
    eng = EmbeddedEngine(cfg, init_tiny_model(cfg, seed=0), max_total_tokens=1024, tokenizer=TOK)
    yield eng
    eng.close()


# ---- engine memory release / resume (no Ray) ----------------------------------------------------


def test_release_frees_the_kv_pool_and_resume_serves_the_same_tokens(engine):
    prompt = TOK.encode("12+7=")
    before = engine.generate([GenerateRequest(prompt, greedy(6))])[0].output_ids
    kv_bytes = sum(t.untyped_storage().nbytes() for t in engine.pool.k + engine.pool.v)
    assert kv_bytes > 0
    assert engine.release_memory_occupation() is True and engine.is_memory_released()
    assert sum(t.untyped_storage().nbytes() for t in engine.pool.k + engine.pool.v) == 0
    assert engine.release_memory_occupation() is False  # already released: no second cycle
    handle = engine.submit(GenerateRequest(prompt, greedy(6)))  # waits while released
    assert not handle.done() and engine.load()["num_waiting_reqs"] == 1
    assert engine.resume_memory_occupation() is True and not engine.is_memory_released()
    assert sum(t.untyped_storage().nbytes() for t in engine.pool.k + engine.pool.v) == kv_bytes
    assert handle.result(timeout=60).output_ids == before
    assert engine.resume_memory_occupation() is False
    stats = engine.stats()
    assert (stats["memory_releases"], stats["memory_resumes"]) == (1, 1)


def test_release_retracts_a_running_request_which_resumes_after(engine):
    prompt = TOK.encode("3+4=")
    reference = engine.generate([GenerateRequest(prompt, greedy(40))])[0].output_ids
    started = threading.Event()

    def on_update(out):  # on the scheduler thread: hold the engine after the 3rd token
        if len(out.output_ids) == 3 and not started.is_set():
            engine.pause_generation("in_place")
            started.set()

    handle = engine.submit(GenerateRequest(prompt, greedy(40)), on_update)
    assert started.wait(60)
    assert engine.release_memory_occupation()
    engine.continue_generation()  # still held: released
    assert not handle.done() and engine.load()["num_running_reqs"] == 0 and engine.load()["num_waiting_reqs"] == 1
    engine.resume_memory_occupation()
    assert handle.result(timeout=60).output_ids == reference  # re-prefilled from its tokens, same greedy path


def test_memory_endpoints_and_client_fan_out(engine):
    servers = [BackgroundServer(engine, TOK).start(), BackgroundServer(engine, TOK, api_key="k").start()]
    try:
        url0, url1 = (s.url for s in servers)
        base = engine.stats()["memory_releases"]
        assert post(url0 + "/release_memory_occupation", {"tags": ["kv_cache"]}) == (200, None)
        assert engine.is_memory_released()
        # slime's tags: weights stay resident and there are no CUDA graphs, so those succeed and do nothing
        assert post(url0 + "/resume_memory_occupation", {"tags": ["weights"]}) == (200, None)
        assert engine.is_memory_released()
        assert post(url0 + "/resume_memory_occupation", {"tags": ["kv_cache", "cuda_graph"]}) == (200, None)
        assert not engine.is_memory_released()
        assert post(url0 + "/release_memory_occupation", {"tags": ["weights"]}) == (200, None)
        assert not engine.is_memory_released() and engine.stats()["memory_releases"] == base + 1
        status, body = post(url0 + "/resume_memory_occupation", {"tags": ["gpu_magic"]})
        assert status == 400 and "gpu_magic" in body["message"]
        assert post(url0 + "/resume_memory_occupation", {"tags": None}) == (200, None)  # already resumed: a no-op
        assert post(url1 + "/release_memory_occupation")[0] == 401  # protected by the api key
        with EngineClient(url0, control_urls=[url0, url1], api_key="k", max_retries=0) as client:
            client.release_memory_occupation()  # both servers front the same engine: one real release
            assert engine.is_memory_released()
            client.resume_memory_occupation()
            assert not engine.is_memory_released()
            assert client.get_server_info()["internal_states"][0]["memory_releases"] == base + 2
        with EngineClient(url1, max_retries=0) as keyless, pytest.raises(EngineError, match="401"):
            keyless.release_memory_occupation()
    finally:
        for server in servers:
            server.stop()


# ---- placement (pure) -------------------------------------------------------------------------------


def test_plan_placement_disaggregated_and_colocated():
    from slime_rl.launch.ray_launch import Slot, plan_placement

    launch = LaunchConfig(cpus_per_trainer=2.0, cpus_per_engine=1.0)
    p = plan_placement(launch, num_trainers=2, num_engines=3, gpus=True)
    assert p.bundles == [{"CPU": 2.0, "GPU": 1.0}] * 2 + [{"CPU": 1.0, "GPU": 1.0}] * 3 and not p.colocated
    assert p.trainer_slots == [Slot(0, 2.0, 1.0), Slot(1, 2.0, 1.0)]
    assert [s.bundle for s in p.engine_slots] == [2, 3, 4] and p.trainer_gpus
    launch.colocate = True
    p = plan_placement(launch, num_trainers=2, num_engines=3, gpus=True)
    assert p.bundles == [{"CPU": 2.0, "GPU": 1.0}] * 2 and p.colocated
    # bundle 0 holds trainer 0 + engines 0, 2 (thirds); bundle 1 holds trainer 1 + engine 1 (halves)
    assert p.trainer_slots == [Slot(0, 0.6666, 0.3333), Slot(1, 1.0, 0.5)]
    assert p.engine_slots == [Slot(0, 0.6666, 0.3333), Slot(1, 1.0, 0.5), Slot(0, 0.6666, 0.3333)]
    p = plan_placement(launch, num_trainers=0, num_engines=1, gpus=False)  # hf: the trainer is the driver
    assert p.bundles == [{"CPU": 1.0}] and p.engine_slots == [Slot(0, 1.0, 0.0)] and p.colocated
    with pytest.raises(ValueError, match="launch.cpus_per_engine must be > 0"):
        plan_placement(LaunchConfig(cpus_per_engine=0), 1, 1, gpus=False)


# ---- Ray ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_cluster():
    """One local Ray for the module; its workers import this test module (PYTHONPATH) for `Echo`."""
    from slime_rl.launch.ray_launch import start_ray

    saved = {key: os.environ.get(key) for key in ("PYTHONPATH", "OMP_NUM_THREADS")}
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (TESTS, saved["PYTHONPATH"]) if p)
    os.environ["OMP_NUM_THREADS"] = "1"
    assert start_ray(LaunchConfig(num_cpus=4))
    yield
    import ray

    ray.shutdown()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


class Echo:
    """A per-rank object for RayRankGroup tests (built inside each rank actor)."""

    def info(self) -> dict:
        import torch.distributed as dist

        keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "OMP_NUM_THREADS")
        return {"rank": dist.get_rank(), "world": dist.get_world_size(), "pid": os.getpid(),
                **{k: os.environ[k] for k in keys}}

    def all_reduce(self, value: float) -> float:
        import torch.distributed as dist

        t = torch.tensor([value])
        dist.all_reduce(t)
        return float(t)

    def boom(self, rank: int) -> int:
        import torch.distributed as dist

        if dist.get_rank() == rank:
            raise ValueError(f"boom on rank {rank}")
        return dist.get_rank()


def test_ray_rank_group_calls_errors_and_a_dead_rank(ray_cluster):
    import ray
    from ray.util.placement_group import remove_placement_group

    from slime_rl.launch.ray_launch import plan_placement, ray_ranks, reserve

    placement = plan_placement(LaunchConfig(cpus_per_trainer=1.0), num_trainers=2, num_engines=0, gpus=False)
    pg = reserve(placement, timeout_s=30)
    try:
        group = ray_ranks(2, "test_ray:Echo", {}, pg=pg, slots=placement.trainer_slots, env={"OMP_NUM_THREADS": "7"},
                          start_timeout=120)
        infos = group.call("info")
        assert [(i["rank"], i["world"], i["RANK"], i["LOCAL_RANK"]) for i in infos] == [(0, 2, "0", "0"),
                                                                                         (1, 2, "1", "1")]
        assert infos[0]["MASTER_ADDR"] == infos[1]["MASTER_ADDR"] == ray.util.get_node_ip_address()
        assert all(i["OMP_NUM_THREADS"] == "1" for i in infos)  # the rank's CPU share wins over the caller's env
        assert infos[0]["pid"] != infos[1]["pid"] != os.getpid()
        assert group.call("all_reduce", 1.5) == [3.0, 3.0]  # the gloo process group spans both actors
        with pytest.raises(RankError, match=r"boom failed on rank 1 of 2(.|\n)*boom on rank 1"):
            group.call("boom", 1)
        assert group.call("boom", 5) == [0, 1]  # still usable after a command raised
        ray.kill(group.actors[1])
        with pytest.raises(RankError, match="rank 1 died during info"):
            group.call("info")
        with pytest.raises(RankError, match="unusable"):
            group.call("info")
        group.close()
        with pytest.raises(RankError, match="closed"):
            group.call("info")
    finally:
        remove_placement_group(pg)


def test_placement_fails_clearly_without_resources(ray_cluster):
    from slime_rl.launch.ray_launch import plan_placement, reserve

    placement = plan_placement(LaunchConfig(cpus_per_engine=64.0), num_trainers=0, num_engines=1, gpus=False)
    with pytest.raises(RuntimeError, match=r"could not place 1 bundles(.|\n)*launch.num_cpus"):
        reserve(placement, timeout_s=1)


def test_restart_engine_gives_a_healthy_new_url(ray_cluster, tmp_path):
    """hf backend (the trainer is the driver), colocated: the engine is restarted while its memory is released."""
    from slime_rl.job import _model, _tokenizer
    from slime_rl.launch.ray_launch import RayLaunch

    cfg = config_from_args(build_parser().parse_args(["train", *TINY, "--backend", "hf", "--launcher", "ray",
                                                      "--launch.colocate", "true", "--log.output_dir", str(tmp_path)]))
    tokenizer = _tokenizer(cfg)
    hf_config, state = _model(cfg, tokenizer)
    with RayLaunch(cfg, hf_config, state, tokenizer) as launch:
        [url] = launch.engine_urls
        pid = launch.engine_pid(url)
        assert url.startswith("http://127.0.0.1:") and pid != os.getpid()
        launch.before_train()
        assert launch.memory_cycles() == {url: (1, 0)}
        new_url = launch.restart_engine(url)
        assert new_url != url and launch.engine_urls == [new_url] and launch.engine_pid(new_url) != pid
        assert launch.memory_cycles() == {new_url: (1, 0)}  # restarted mid-training: released like the others
        launch.after_train()
        assert launch.memory_cycles() == {new_url: (1, 1)}
        with EngineClient(new_url, max_retries=0) as client:
            assert client.health()
            out = client.generate([GenerateRequest(tokenizer.encode("2+2="), greedy(3))])[0]
            assert len(out.output_ids) == 3
        with EngineClient(url, max_retries=0) as old:
            assert not old.health()  # the bundle only had room for the new actor once the old one was gone
        with pytest.raises(ValueError, match="no engine at"):
            launch.restart_engine(url)


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_ray_job_one_engine_one_trainer(ray_cluster, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *TINY, "--launcher", "ray", "-i", "1", "-t", "1", "--log.output_dir", str(out)]) == 0
    steps = [r for r in _records(out / "metrics.jsonl") if "rollout/reward_mean" in r]
    assert len(steps) == 2 and steps[0]["train/train_rollout_logprob_abs_diff"] < 1e-5
    printed = capsys.readouterr().out
    assert "[ray] disaggregated: 2 bundle(s)" in printed and "1 Ray engine(s)" in printed
    assert "after RL:" in printed and "KV cache released" not in printed  # no memory cycles when disaggregated


@pytest.mark.slow
def test_ray_job_two_engines_two_trainers_tp2_checks_every_sync(ray_cluster, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *TINY, "--launcher", "ray", "-i", "2", "-t", "2", "--tp", "2", "--check-weight-sync",
                 "--log.output_dir", str(out)]) == 0
    steps = [r for r in _records(out / "metrics.jsonl") if "rollout/reward_mean" in r]
    assert len(steps) == 2 and all(r["sync/check_mismatches"] == 0 for r in steps)
    assert steps[0]["train/train_rollout_logprob_abs_diff"] < 1e-5  # both engines serve the trainer's weights
    printed = capsys.readouterr().out
    assert "[ray] disaggregated: 4 bundle(s)" in printed and "2 Ray engine(s)" in printed
    assert "[train] megatron: 2 rank(s) = tp 2 x pp 1 x dp 1" in printed


def test_ray_job_colocated_releases_engine_memory_every_step(ray_cluster, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *TINY, "--launcher", "ray", "-i", "1", "-t", "1", "--launch.colocate", "true",
                 "--log.output_dir", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "[ray] colocated: 1 bundle(s)" in printed
    [(released, resumed)] = re.findall(r"KV cache released (\d+) and resumed (\d+) time", printed)
    assert int(released) == int(resumed) >= 2  # at least once per RL step (2 steps)
