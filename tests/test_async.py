"""Async RL, checkpoints and debug modes, end to end on CPU through the CLI.

- staleness: in every mode no trained token is older than max_staleness versions
  (asserted from the version stamps recorded per trained group), and every step
  trains exactly prompts_per_step distinct groups of n samples, none twice;
- exact resume: a run killed after a checkpoint and resumed with --resume auto
  logs the same metrics for the later steps as an uninterrupted run, bit for bit;
- a trainer rank that dies stops the job with a clear error naming the checkpoint;
- replay of saved rollouts trains exactly as the run that recorded them;
- rollout-only generates without a trainer;
- off-policy weights (tis / decoupled PPO).
"""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from slime_rl.algorithms import off_policy, policy_loss
from slime_rl.cli import main

TESTS = Path(__file__).parent
TINY = ["--model.hidden_size", "64", "--model.intermediate_size", "128", "--data.task_max_operand", "29",
        "--data.num_train", "300", "--data.num_val", "40", "--data.num_sft", "64", "--rollout.max_new_tokens", "8",
        "--log.progress", "false", "--sft.enabled", "false", "--reward.name", "test_e2e:sevens",
        "--train.lr", "3e-3", "--train.warmup_steps", "0", "--rollout.prompts_per_step", "8",
        "--rollout.n_samples_per_prompt", "4", "--eval.every_n_steps", "0", "--eval.max_examples", "8"]
# Keys that measure time (differ between any two runs) or say how the run was resumed.
VOLATILE = ("time/", "sync/total_s", "sync/paused_s", "sync/gbps", "sync/gather_s", "sync/pack_s", "sync/ranks_s",
            "sync/transfer_s", "sync/stage_s", "sync/load_s", "sync/verify_s")


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _stable(record: dict) -> dict:
    return {k: v for k, v in record.items() if not k.startswith(VOLATILE)}


def _same(a: dict, b: dict) -> bool:
    """Equal, with NaN == NaN (metrics a reward does not report are NaN in both runs)."""
    if a.keys() != b.keys():
        return False
    return all(x == y or (isinstance(x, float) and isinstance(y, float) and math.isnan(x) and math.isnan(y))
               for x, y in ((a[k], b[k]) for k in a))


@pytest.mark.parametrize("mode,staleness", [("sync", 0), ("one_step_off", 1), ("fully_async", 1), ("fully_async", 2)])
def test_trained_tokens_are_never_staler_than_the_limit(tmp_path, mode, staleness):
    out = tmp_path / "run"
    steps, per_step, n = 6, 8, 4
    flags = ["--async", mode] + (["--async_rl.max_staleness", str(staleness)] if mode != "sync" else [])
    if mode == "fully_async":  # generation long enough that weight pushes land in it (8 tokens end before them)
        flags += ["--rollout.max_new_tokens", "64"]
    assert main(["train", *TINY, "-b", "hf", "--train.num_steps", str(steps), *flags,
                 "--log.output_dir", str(out), "--log.save_checkpoint", "false", "--log.plot", "false"]) == 0
    ledger = _records(out / "trained_groups.jsonl")
    assert [r["step"] for r in ledger] == list(range(1, steps + 1))
    seen = set()
    worst = 0
    for rec in ledger:
        assert len(rec["groups"]) == per_step and all(g["n"] == n for g in rec["groups"])
        uids = [g["uid"] for g in rec["groups"]]
        assert len(set(uids)) == per_step and not seen & set(uids), "a group trained twice"
        seen |= set(uids)
        for g in rec["groups"]:
            assert g["min_version"] >= 0, "a trained group without version stamps"
            assert len(g["response_lengths"]) == n and all(1 <= k <= 64 for k in g["response_lengths"])
            worst = max(worst, rec["trainer_version"] - g["min_version"])
    assert worst <= staleness
    if staleness:  # generation overlapped training: wave 1 starts before step 1's push, with step 0's weights
        assert worst >= 1, "the producer never ran ahead"
    metrics = [r for r in _records(out / "metrics.jsonl") if "train/pg_loss" in r]
    assert all(r["rollout/max_staleness"] <= staleness for r in metrics)
    if mode == "fully_async":
        assert metrics[-1]["rollout/resumed_samples"] > 0, metrics[-1]  # weight pushes interrupted generation
        assert any(g["max_version"] > g["min_version"] for rec in ledger for g in rec["groups"])
        assert all(0 <= r["train/clip_frac"] <= 1 for r in metrics)  # auto = coupled: clipped against behaviour
        assert "train/is_weight_mean" not in metrics[-1]


def _cli(out: Path, backend: list[str], steps: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "slime_rl", "train", *TINY, *backend, "--train.num_steps", str(steps),
            "--ckpt.save_every", "2", "--log.output_dir", str(out), "--log.plot", "false", *extra]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
            "OMP_NUM_THREADS": "1"}


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [int(p) for p in out]


def _kill_after_checkpoint(cmd: list[str], out: Path, victim: str) -> subprocess.CompletedProcess:
    """Run `cmd`; once checkpoint step 2 exists, SIGKILL the driver or one trainer rank process."""
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (out / "checkpoints" / "step_000002" / "state.pt").exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    if victim == "driver":
        proc.kill()
    else:
        ranks = [p for p in _children(proc.pid)
                 if "spawn_main" in Path(f"/proc/{p}/cmdline").read_bytes().decode(errors="replace")]
        assert ranks, "no trainer rank processes found"
        os.kill(ranks[0], signal.SIGKILL)
    stdout, stderr = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


@pytest.mark.slow
@pytest.mark.parametrize("backend,victim", [(["-b", "hf"], "driver"), (["-b", "megatron"], "trainer rank")],
                         ids=["hf-driver-killed", "megatron-rank-killed"])
def test_kill_and_resume_is_bit_exact(tmp_path, backend, victim):
    steps = 6
    ref, cut = tmp_path / "uninterrupted", tmp_path / "interrupted"
    done = subprocess.run(_cli(ref, backend, steps), env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    killed = _kill_after_checkpoint(_cli(cut, backend, steps), cut, victim)
    assert killed.returncode != 0, "the run finished before it could be interrupted"
    if victim == "trainer rank":  # a trainer failure: a clear error naming the checkpoint to resume from
        assert "the trainer failed" in killed.stderr and "--resume auto" in killed.stderr, killed.stderr[-3000:]
    resumed = subprocess.run(_cli(cut, backend, steps, "--resume", "auto"), env=_env(), capture_output=True,
                             text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "[ckpt] resumed from" in resumed.stdout
    a, b = _records(ref / "metrics.jsonl"), _records(cut / "metrics.jsonl")
    assert [r.get("step") for r in a] == [r.get("step") for r in b]
    for ra, rb in zip(a, b):
        assert _same(_stable(ra), _stable(rb)), (ra, rb)
    assert _records(ref / "trained_groups.jsonl") == _records(cut / "trained_groups.jsonl")


def test_fully_async_resume_restores_the_buffer_without_losing_or_repeating_groups(tmp_path):
    out = tmp_path / "run"
    flags = ["-b", "hf", "--async", "fully_async", "--ckpt.save_every", "2", "--log.output_dir", str(out),
             "--log.save_checkpoint", "false", "--log.plot", "false"]
    assert main(["train", *TINY, "--train.num_steps", "4", *flags]) == 0
    first = _records(out / "trained_groups.jsonl")
    state = torch.load(out / "checkpoints" / "step_000002" / "state.pt", weights_only=False)
    waiting = state["rollout"]["buffer"]["groups"]
    assert waiting, "the producer had nothing buffered ahead at step 2"
    import shutil

    shutil.rmtree(out / "checkpoints" / "step_000004")
    assert main(["train", *TINY, "--train.num_steps", "6", *flags, "--resume", "auto"]) == 0
    ledger = _records(out / "trained_groups.jsonl")
    assert ledger[:2] == first[:2]  # the records up to the checkpoint are kept as they were
    uids = [g["uid"] for rec in ledger for g in rec["groups"]]
    assert len(uids) == 6 * 8 and len(set(uids)) == len(uids)
    step3 = {g["uid"] for g in ledger[2]["groups"]}
    assert {g[0].metadata["uid"] for g in waiting} & step3  # buffered groups were trained after the resume
    assert all(rec["trainer_version"] - g["min_version"] <= 2 for rec in ledger for g in rec["groups"])


def test_replay_trains_like_the_recording_run_and_rollout_only_never_trains(tmp_path):
    rec, rep, gen = tmp_path / "recorded", tmp_path / "replayed", tmp_path / "rollout_only"
    common = ["-b", "hf", "--train.num_steps", "3", "--log.save_checkpoint", "false", "--log.plot", "false"]
    assert main(["train", *TINY, *common, "--log.output_dir", str(rec), "--debug.save_rollouts",
                 str(rec / "rollouts")]) == 0
    assert sorted(p.name for p in (rec / "rollouts").iterdir()) == [f"step_00000{i}.pt" for i in range(3)]
    assert main(["train", *TINY, *common, "--log.output_dir", str(rep), "--debug.load_rollouts",
                 str(rec / "rollouts")]) == 0
    train_a = [{k: v for k, v in r.items() if k.startswith(("train/", "rollout/reward"))}
               for r in _records(rec / "metrics.jsonl") if "train/pg_loss" in r]
    train_b = [{k: v for k, v in r.items() if k.startswith(("train/", "rollout/reward"))}
               for r in _records(rep / "metrics.jsonl") if "train/pg_loss" in r]
    assert len(train_a) == 3 and train_a == train_b
    assert main(["train", *TINY, *common, "--log.output_dir", str(gen), "--debug.rollout_only", "true"]) == 0
    records = [r for r in _records(gen / "metrics.jsonl") if "rollout/reward_mean" in r]
    assert len(records) == 3 and not any(k.startswith("train/") for r in records for k in r)
    assert all(r["weight_version"] == 0 for r in records)  # nothing was trained, nothing pushed


@pytest.mark.slow
def test_replayed_rollouts_train_megatron_tp2_like_the_reference(tmp_path):
    """Cross-layout parity on recorded rollouts: same batches into the reference trainer and Megatron TP2."""
    rec = tmp_path / "recorded"
    common = ["--train.num_steps", "2", "--log.save_checkpoint", "false", "--log.plot", "false"]
    assert main(["train", *TINY, *common, "-b", "hf", "--log.output_dir", str(rec), "--debug.save_rollouts",
                 str(rec / "rollouts")]) == 0
    assert main(["train", *TINY, *common, "-b", "megatron", "--tp", "2", "--log.output_dir", str(tmp_path / "tp2"),
                 "--debug.load_rollouts", str(rec / "rollouts")]) == 0
    ref = [r for r in _records(rec / "metrics.jsonl") if "train/pg_loss" in r]
    tp2 = [r for r in _records(tmp_path / "tp2" / "metrics.jsonl") if "train/pg_loss" in r]
    assert len(ref) == len(tp2) == 2
    for a, b in zip(ref, tp2):
        for key in ("train/pg_loss", "train/entropy", "train/grad_norm", "train/approx_kl"):
            assert b[key] == pytest.approx(a[key], rel=1e-3, abs=1e-5), key


def test_replay_without_recordings_names_the_missing_step(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="step 1"):
        main(["train", *TINY, "-b", "hf", "--train.num_steps", "1", "--log.output_dir", str(tmp_path / "run"),
              "--debug.load_rollouts", str(tmp_path / "empty")])


def test_importance_weights_truncate_or_mask_past_the_cap():
    old = torch.log(torch.tensor([[0.5, 0.5, 0.9, 0.2]]))
    behaviour = torch.log(torch.tensor([[0.5, 0.1, 0.3, 0.4]]))  # ratios 1, 5, 3, 0.5
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    w, stats = off_policy.importance_weights(old, behaviour, mask, "tis", cap=2.0)
    assert torch.allclose(w, torch.tensor([[1.0, 2.0, 2.0, 0.0]]))
    assert stats["is_capped_frac"] == pytest.approx(2 / 3)
    w, _ = off_policy.importance_weights(old, behaviour, mask, "decoupled", cap=4.0)
    assert torch.allclose(w, torch.tensor([[1.0, 0.0, 3.0, 0.0]]))  # 5 > cap: dropped; 3 kept as is
    assert off_policy.importance_weights(old, behaviour, mask, "none", 2.0) == (None, {})
    assert off_policy.resolve("auto", "sync") == "none" and off_policy.resolve("auto", "fully_async") == "coupled"
    with pytest.raises(ValueError, match="unknown off-policy"):
        off_policy.resolve("bogus", "sync")


def test_policy_loss_scales_each_token_by_its_importance_weight():
    lp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    adv, weights = torch.tensor([[1.0, -1.0]]), torch.tensor([[0.5, 0.5]])
    plain, _ = policy_loss(lp, lp.detach(), adv, weights, 0.2, 0.2)
    scaled, _ = policy_loss(lp, lp.detach(), adv, weights, 0.2, 0.2, torch.tensor([[2.0, 0.0]]))
    assert plain.item() == pytest.approx(0.0) and scaled.item() == pytest.approx(-1.0)
