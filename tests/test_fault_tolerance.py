"""An engine SIGKILLed mid-run: the job completes, and every step trains exactly its prompt groups, once.

The job runs in a subprocess under Ray with two engine actors; once it has logged
a step, one engine's process is killed while the next rollouts are being generated.
The supervisor takes it out of routing, restarts it and re-syncs it; requests and
groups that were on it go out again. The trained-groups ledger must show, for
every step s, exactly the groups s:0 ... s:B-1 with n samples each.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

TESTS = Path(__file__).parent
STEPS, PER_STEP, N = 8, 8, 4


def _engine_pids() -> set[int]:
    out = subprocess.run(["pgrep", "-f", "ray::EngineActor"], capture_output=True, text=True).stdout.split()
    return {int(p) for p in out}


def _steps_logged(path: Path) -> int:
    if not path.exists():
        return 0
    return sum(1 for line in path.read_text().splitlines() if '"rollout/reward_mean"' in line)


@pytest.mark.slow
def test_sigkill_of_an_engine_mid_rollout_loses_and_duplicates_no_group(tmp_path):
    out = tmp_path / "run"
    before = _engine_pids()
    cmd = [sys.executable, "-m", "slime_rl", "train", "--launcher", "ray", "-i", "2", "-b", "hf",
           "--model.hidden_size", "64", "--model.intermediate_size", "128", "--data.num_train", "200",
           "--data.num_val", "16", "--sft.enabled", "false", "--rollout.max_new_tokens", "24",
           "--rollout.prompts_per_step", str(PER_STEP), "--rollout.n_samples_per_prompt", str(N),
           "--train.num_steps", str(STEPS), "--eval.every_n_steps", "0", "--eval.max_examples", "8",
           "--rollout.health_check_s", "0.5", "--log.progress", "false", "--log.plot", "false",
           "--log.save_checkpoint", "false", "--log.output_dir", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(TESTS)}
    with open(tmp_path / "log.txt", "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 240
            while _steps_logged(out / "metrics.jsonl") < 2:
                assert proc.poll() is None, (tmp_path / "log.txt").read_text()[-4000:]
                assert time.monotonic() < deadline, "the job never got to step 2"
                time.sleep(0.05)
            victims = sorted(_engine_pids() - before)
            assert len(victims) == 2, victims
            os.kill(victims[0], signal.SIGKILL)
            killed_after = _steps_logged(out / "metrics.jsonl")
            rc = proc.wait(timeout=300)
        finally:
            if proc.poll() is None:
                proc.kill()
    text = (tmp_path / "log.txt").read_text()
    assert rc == 0, text[-4000:]
    assert killed_after < STEPS, "the job was over before the engine died"
    assert "died" in text and "restart" in text, text[-4000:]
    ledger = [json.loads(line) for line in (out / "trained_groups.jsonl").read_text().splitlines()]
    assert [r["step"] for r in ledger] == list(range(1, STEPS + 1))
    for r in ledger:
        uids = sorted(g["uid"] for g in r["groups"])
        assert uids == sorted(f"{r['step'] - 1}:{g}" for g in range(PER_STEP)), (r["step"], uids)
        assert all(g["n"] == N for g in r["groups"])
        assert all(g["min_version"] == g["max_version"] == r["trainer_version"] for g in r["groups"])  # sync mode
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    last = [m for m in metrics if "engines/deaths" in m][-1]
    assert last["engines/deaths"] >= 1 and last["engines/restarts"] >= 1
