"""End to end on CPU: the CLI job runs, writes metrics/plot/checkpoint, and RL raises the reward."""

import json
import os
import subprocess
import sys

import pytest

from slime_rl.cli import main
from slime_rl.types import Sample


def sevens(sample: Sample) -> float:
    """An easy custom reward (loaded by dotted path): the share of '7's in the response."""
    text = sample.response_text
    return text.count("7") / max(1, len(text))


def _records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


TINY = ["--model.hidden_size", "64", "--model.intermediate_size", "128", "--data.task_max_operand", "29",
        "--data.num_train", "300", "--data.num_val", "40", "--data.num_sft", "64", "--rollout.max_new_tokens", "8",
        "--log.progress", "false"]


@pytest.mark.parametrize("backend", [["--backend", "megatron", "--tp", "2"], ["--backend", "hf"]], ids=["megatron-tp2", "hf"])
def test_rl_improves_a_custom_reward(tmp_path, capsys, monkeypatch, backend):
    import gc

    from slime_rl import job

    frozen, rl_loop = [], job.rl_loop  # the loop runs with what was built before it out of the collector's passes
    monkeypatch.setattr(job, "rl_loop", lambda *a, **kw: frozen.append(gc.get_freeze_count()) or rl_loop(*a, **kw))
    out = tmp_path / "run"
    rc = main(["train", *TINY, *backend, "--sft.enabled", "false", "--reward.name", "test_e2e:sevens",
               "--train.num_steps", "16", "--train.lr", "3e-3", "--train.warmup_steps", "0", "--rollout.prompts_per_step", "16",
               "--eval.every_n_steps", "8", "--log.output_dir", str(out)])
    assert rc == 0
    assert frozen[0] > 10_000 and gc.get_freeze_count() == 0  # and given back after
    steps = [r for r in _records(out / "metrics.jsonl") if "rollout/reward_mean" in r]
    assert len(steps) == 16
    first = sum(r["rollout/reward_mean"] for r in steps[:3]) / 3
    last = sum(r["rollout/reward_mean"] for r in steps[-3:]) / 3
    assert last > first + 0.2, (first, last)
    # step-0 invariants of the synchronous loop, measured in the run itself
    assert steps[0]["train/train_rollout_logprob_abs_diff"] < 1e-5
    assert steps[0]["train/ratio_max"] == 1.0 and steps[0]["train/ratio_min"] == 1.0
    assert all(r["sync/bytes"] > 0 and r["sync/total_s"] >= r["sync/paused_s"] >= 0 for r in steps)
    if "megatron" in backend:  # the ranks' own seconds, a share of the driver's train time; a time, not train/
        assert all(0 < r["time/rank_s"] < r["time/train_s"] and "train/rank_s" not in r for r in steps)
    versions = [r["weight_version"] for r in steps]
    assert versions == list(range(versions[0], versions[0] + 16))  # one push per step
    assert (out / "curves.png").stat().st_size > 10_000
    assert (out / "checkpoint" / "model.safetensors").exists()
    printed = capsys.readouterr().out
    assert "after RL:" in printed and "curves.png" in printed


def test_rl_against_two_running_engine_servers(tmp_path, capsys):
    """Engines are `slime_rl serve` processes started beforehand (`--rollout.engine_urls`): generation goes
    through a built-in router over both, every sync reaches both (checked bit for bit), and reward improves."""
    import time

    from server_procs import START_TIMEOUT_S, launch_server, wait_healthy
    from slime_rl.cli import build_parser, config_from_args
    from slime_rl.hf_io import save_hf_checkpoint
    from slime_rl.job import _model, _tokenizer

    common = [*TINY, "--backend", "hf", "--sft.enabled", "false", "--reward.name", "test_e2e:sevens",
              "--train.lr", "3e-3", "--train.warmup_steps", "0", "--rollout.prompts_per_step", "16",
              "--eval.every_n_steps", "8"]
    cfg = config_from_args(build_parser().parse_args(["train", *common]))
    hf_config, state = _model(cfg, _tokenizer(cfg))
    model_dir = tmp_path / "model"
    save_hf_checkpoint(model_dir, hf_config, {k: v * 0 for k, v in state.items()})  # the first sync overwrites
    servers = [launch_server(f"engine{i}", model_dir, tmp_path) for i in range(2)]
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        for server in servers:
            wait_healthy(server, deadline)
        urls = ",".join(s.url for s in servers)
        out = tmp_path / "run"
        rc = main(["train", *common, "--train.num_steps", "16", "--rollout.engine_urls", urls,
                   "--check-weight-sync", "--log.output_dir", str(out)])
        assert rc == 0
    finally:
        for server in servers:
            server.stop()
    steps = [r for r in _records(out / "metrics.jsonl") if "rollout/reward_mean" in r]
    first = sum(r["rollout/reward_mean"] for r in steps[:3]) / 3
    last = sum(r["rollout/reward_mean"] for r in steps[-3:]) / 3
    assert last > first + 0.2, (first, last)
    assert steps[0]["train/train_rollout_logprob_abs_diff"] < 1e-5  # the engines serve the trainer's weights
    assert all(r["sync/check_mismatches"] == 0 for r in steps)
    printed = capsys.readouterr().out
    assert "2 external engine(s)" in printed and "[sync] shm to 2 engine(s)" in printed


def test_torchrun_job_against_two_running_engine_servers(tmp_path):
    """`torchrun --nproc-per-node 2 ... --tp 2 --rollout.engine_urls A,B`: Megatron ranks train, rank 0 drives
    the two pre-started servers and syncs them over shared memory; reward improves."""
    import time

    from server_procs import START_TIMEOUT_S, launch_server, wait_healthy
    from slime_rl.cli import build_parser, config_from_args
    from slime_rl.dist_group import free_port
    from slime_rl.hf_io import save_hf_checkpoint
    from slime_rl.job import _model, _tokenizer

    common = [*TINY, "--tp", "2", "--sft.enabled", "false", "--reward.name", "test_e2e:sevens", "--train.lr", "3e-3",
              "--train.warmup_steps", "0", "--rollout.prompts_per_step", "16", "--eval.every_n_steps", "8"]
    cfg = config_from_args(build_parser().parse_args(["train", *common]))
    hf_config, state = _model(cfg, _tokenizer(cfg))
    save_hf_checkpoint(tmp_path / "model", hf_config, state)
    servers = [launch_server(f"engine{i}", tmp_path / "model", tmp_path) for i in range(2)]
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(__file__), env.get("PYTHONPATH", "")])  # test_e2e:sevens
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        for server in servers:
            wait_healthy(server, deadline)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
               str(free_port()), "-m", "slime_rl.cli", "train", *common, "--train.num_steps", "16",
               "--rollout.engine_urls", ",".join(s.url for s in servers), "--log.output_dir", str(out)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    finally:
        for server in servers:
            server.stop()
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    steps = [r for r in _records(out / "metrics.jsonl") if "rollout/reward_mean" in r]
    first = sum(r["rollout/reward_mean"] for r in steps[:3]) / 3
    last = sum(r["rollout/reward_mean"] for r in steps[-3:]) / 3
    assert len(steps) == 16 and last > first + 0.2, (first, last)
    assert steps[0]["train/train_rollout_logprob_abs_diff"] < 1e-5
    assert "[sync] shm to 2 engine(s)" in proc.stdout and "2 external engine(s)" in proc.stdout


def test_sft_then_eval_subcommands(tmp_path, capsys):
    out = tmp_path / "sft"
    assert main(["sft", *TINY, "--sft.epochs", "2", "--log.output_dir", str(out)]) == 0
    ckpt = out / "checkpoint"
    assert (ckpt / "config.json").exists() and (ckpt / "char_tokenizer.json").exists()
    assert main(["eval", *TINY, "--model.path", str(ckpt), "--log.output_dir", str(tmp_path / "eval")]) == 0
    assert "val/accuracy" in capsys.readouterr().out


def test_bad_reward_path_is_a_clear_error(tmp_path):
    with pytest.raises(Exception, match="no_such_module"):
        main(["train", *TINY, "--reward.name", "no_such_module:fn", "--log.output_dir", str(tmp_path)])


def test_torchrun_launch(tmp_path):
    """`torchrun --nproc-per-node 2 -m slime_rl.cli train --tp 2`: rank 0 drives, rank 1 serves its commands."""
    from slime_rl.dist_group import free_port

    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
           "-m", "slime_rl.cli", "train", *TINY, "--tp", "2", "--sft.epochs", "1", "--train.num_steps", "2",
           "--check-weight-sync", "--sync.bucket_mb", "0.05", "--log.output_dir", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    steps = [r for r in _records(out / "metrics.jsonl") if "rollout/reward_mean" in r]
    assert len(steps) == 2 and steps[0]["train/train_rollout_logprob_abs_diff"] < 1e-5
    assert "rank(s) = tp 2 x pp 1 x dp 1" in proc.stdout
    # weights reach the in-process engine over shared memory, in many buckets, and --check-weight-sync agrees
    assert "[sync] shm to 1 engine(s) in float32" in proc.stdout
    assert all(r["sync/check_mismatches"] == 0 and r["sync/buckets"] > 3 for r in steps)
    assert proc.stdout.count("equal the trainer's") >= 3 and "differs from the trainer" not in proc.stdout
    assert (out / "checkpoint" / "megatron").is_dir() and (out / "checkpoint" / "model.safetensors").exists()
