"""Experiment tracking and the time table, read back from what a run wrote.

- One tiny sync run with `--log.wandb true --log.tensorboard true`: the TensorBoard event files and the
  offline wandb run file hold the same metric names and values as metrics.jsonl (read back with
  TensorBoard's EventAccumulator and by parsing wandb's own record log); the wandb run's config is the
  resolved job config; no wandb process outlives the run.
- Its time table (printed, time_table.json, the last metrics record) adds up to the loop's wall time and
  agrees with the per-step times; an async run's table shows the producer's busy time apart.
- Resuming continues the same step axis: TensorBoard hides what the interrupted run logged past the
  checkpoint, wandb goes on in the same run id.
- Bad values and missing packages are config errors naming the field.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import struct
import subprocess
import time
from pathlib import Path

import pytest

from slime_rl.cli import main
from slime_rl.config import ConfigError, LogConfig
from slime_rl.metrics import open_logger, scalars
from slime_rl.timing import PhaseTimer, TimeTable

TINY = ["train", "-b", "hf", "--model.hidden_size", "64", "--model.intermediate_size", "128",
        "--data.task_max_operand", "29", "--data.num_train", "200", "--data.num_val", "16", "--data.num_sft", "16",
        "--rollout.max_new_tokens", "8", "--rollout.prompts_per_step", "4", "--rollout.n_samples_per_prompt", "4",
        "--sft.enabled", "false", "--reward.name", "test_e2e:sevens", "--eval.max_examples", "8",
        "--log.progress", "false", "--log.save_checkpoint", "false", "--log.plot", "false"]


def _run(out: Path, *flags: str) -> tuple[str, float]:
    """Train in this process; (its stdout, its wall seconds)."""
    buf = io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(buf):
        assert main([*TINY, "--log.output_dir", str(out), *flags]) == 0
    return buf.getvalue(), time.perf_counter() - t0


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    out = tmp_path_factory.mktemp("tracked")
    stdout, wall = _run(out, "--train.num_steps", "3", "--eval.every_n_steps", "2", "--log.wandb", "true",
                        "--log.tensorboard", "true", "--log.wandb_name", "tiny-sync")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return out, records, stdout, wall


def _expected(records: list[dict]) -> dict[str, dict[int, float]]:
    """tag -> step -> value: what every sink should hold (a later record at the same step wins)."""
    want: dict[str, dict[int, float]] = {}
    for r in records:
        for k, v in scalars(r).items():
            want.setdefault(k, {})[r["step"]] = v
    return want


def _same(a: float, b: float, rel: float = 0.0) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b or abs(a - b) <= rel * max(abs(a), abs(b))


# ---- TensorBoard -------------------------------------------------------------------------------------------

def _tensorboard(log_dir: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def test_tensorboard_holds_the_jsonl_metrics(tracked):
    out, records, _, _ = tracked
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    got, want = _tensorboard(out / "tensorboard"), _expected(records)
    assert set(got) == set(want)
    for tag in ("rollout/reward_mean", "val/accuracy", "time/rollout_s", "train/loss", "time/table/wall_s"):
        assert tag in got, tag
    assert sorted(got["rollout/reward_mean"]) == [1, 2, 3]
    for tag, points in want.items():
        assert got[tag].keys() == points.keys(), tag
        for step, value in points.items():  # TensorBoard stores float32
            assert _same(got[tag][step], value, rel=1e-6) or abs(got[tag][step] - value) < 1e-30, (tag, step)


# ---- wandb (offline) ---------------------------------------------------------------------------------------

def _wandb_records(path: Path) -> list:
    """The records of a wandb run file (`run-<id>.wandb`): a LevelDB-style log (32 KiB blocks; chunks with a
    7-byte header: crc32c, length, type 1 full / 2 first / 3 middle / 4 last) after a 7-byte file header,
    each record a wandb_internal_pb2.Record."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", "not a wandb run file"
    block, pos, part, out = 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            pos += block - pos % block
            continue
        part += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(part)
            out.append(record)
            part = b""
    return out


def _key(item) -> str:
    return "/".join(item.nested_key) if item.nested_key else item.key


def _history(record) -> dict:
    return {_key(i): json.loads(i.value_json) for i in record.history.item}


def _wandb_run(out: Path) -> tuple[list[dict], dict]:
    """(history rows, config) of the run's offline files."""
    (path,) = (out / "wandb").glob("offline-run-*/run-*.wandb")
    rows, config = [], {}
    for r in _wandb_records(path):
        kind = r.WhichOneof("record_type")
        if kind == "history":
            rows.append(_history(r))
        elif kind in ("run", "config"):
            updates = r.run.config.update if kind == "run" else r.config.update
            config.update({_key(u): json.loads(u.value_json) for u in updates})
    return rows, config


def test_wandb_offline_run_holds_the_jsonl_metrics_and_the_config(tracked):
    out, records, _, _ = tracked
    rows, config = _wandb_run(out)
    rows = [{k: v for k, v in row.items() if not k.startswith("_")} for row in rows]  # wandb's own _step, ...
    assert len(rows) == len(records)
    for row, record in zip(rows, records):
        want = {**scalars(record), "step": record["step"]}
        assert row.keys() == want.keys()
        for k, v in want.items():
            assert _same(float("nan") if row[k] == "NaN" else float(row[k]), float(v)), (k, row[k], v)
    assert config["log"]["wandb"] is True and config["log"]["wandb_mode"] == "offline"
    assert config["rollout"]["prompts_per_step"] == 4 and config["algorithm"]["name"] == "GRPO"
    run_id = (out / "wandb" / "run_id").read_text().strip()
    assert [p.name.split("-")[-1] for p in (out / "wandb").glob("offline-run-*")] == [run_id]


def test_no_wandb_process_outlives_the_run(tracked):
    children = subprocess.run(["pgrep", "-a", "-P", str(os.getpid())], capture_output=True, text=True).stdout
    assert "wandb" not in children, children


# ---- the time table ----------------------------------------------------------------------------------------

def test_the_run_ends_with_a_time_table_that_adds_up(tracked):
    out, records, stdout, wall = tracked
    table = json.loads((out / "time_table.json").read_text())
    rows = {r["phase"]: r for r in table["rows"]}
    assert list(rows) == ["rollout", "reward", "logprobs", "train", "sync", "eval", "ckpt", "other"]
    assert not any(r["overlapped"] for r in table["rows"])  # sync: nothing runs beside the loop
    assert 0 < table["wall_s"] < wall
    measured = sum(r["seconds"] for k, r in rows.items() if k != "other")
    assert measured <= table["wall_s"] * (1 + 1e-9), "a second counted twice"
    assert rows["other"]["seconds"] == pytest.approx(table["wall_s"] - measured, abs=1e-9)
    assert sum(r["share"] for r in rows.values()) == pytest.approx(1.0)
    for phase in ("rollout", "train", "sync", "eval"):
        assert rows[phase]["seconds"] > 0, phase
    assert rows["rollout"]["tokens_per_s"] > 0 and rows["train"]["tokens_per_s"] > 0
    steps = [r for r in records if "time/step_s" in r]
    # the table's rollout + reward is the loop's wait for rollouts, which each step also logs
    assert rows["rollout"]["seconds"] + rows["reward"]["seconds"] == pytest.approx(
        sum(r["time/rollout_s"] for r in steps), rel=0.02, abs=0.005)
    assert sum(r["time/step_s"] + r["time/eval_s"] for r in steps) <= table["wall_s"]
    assert "where the time went (sync)" in stdout and "idle/other" in stdout
    final = next(r for r in reversed(records) if "time/table/wall_s" in r)
    assert final["step"] == 3 and final["time/table/train_s"] == rows["train"]["seconds"]
    assert final["time/table/train_tokens_per_s"] == rows["train"]["tokens_per_s"]


def test_an_async_table_shows_the_producer_apart(tmp_path):
    stdout, _ = _run(tmp_path, "--train.num_steps", "3", "--eval.every_n_steps", "0", "--async", "one_step_off")
    table = json.loads((tmp_path / "time_table.json").read_text())
    loop = [r for r in table["rows"] if not r["overlapped"]]
    producer = {r["phase"]: r for r in table["rows"] if r["overlapped"]}
    assert [r["phase"] for r in loop] == ["rollout", "logprobs", "train", "sync", "eval", "ckpt", "other"]
    assert sum(r["seconds"] for r in loop) == pytest.approx(table["wall_s"])
    assert producer.keys() == {"generation", "reward"}
    assert 0 < producer["generation"]["seconds"] and producer["generation"]["tokens_per_s"] > 0
    assert "the time the loop waited for a batch" in stdout and "generation (producer busy)" in stdout


def test_phase_timer_nests_on_a_thread_and_unions_busy_time():
    now = [0.0]
    timer = PhaseTimer(clock=lambda: now[0])
    with timer.phase("rollout"):
        now[0] += 5
    with timer.phase("train"):
        now[0] += 1
        with timer.phase("logprobs"):  # pauses train
            now[0] += 2
        now[0] += 3
    a, b = timer.busy("reward"), timer.busy("reward")  # two at once count once
    a.__enter__()
    now[0] += 1
    b.__enter__()
    now[0] += 1
    a.__exit__(None, None, None)
    now[0] += 1
    b.__exit__(None, None, None)
    timer.count("trained_tokens", 40)
    snap = timer.snapshot()
    assert snap.seconds == {"rollout": 5.0, "train": 4.0, "logprobs": 2.0, "reward": 3.0}
    table = TimeTable.build(snap, wall_s=12.0, mode="sync", overlapped=False)
    rows = {r.phase: r.seconds for r in table.rows}
    assert rows == {"rollout": 2.0, "reward": 3.0, "logprobs": 2.0, "train": 4.0, "sync": 0.0, "eval": 0.0,
                    "ckpt": 0.0, "other": 1.0}  # sync: the rewards were scored while the loop waited for rollouts
    assert table.rows[3].tokens_per_s == 10.0


# ---- resume: the same step axis ----------------------------------------------------------------------------

def test_a_resumed_run_continues_the_step_axis(tmp_path):
    log = LogConfig(output_dir=str(tmp_path), wandb=True, tensorboard=True)
    first = open_logger(log, tmp_path, {"seed": 0})
    for step in range(5):  # the interrupted run: checkpoint after step 2, logged up to 4
        first.log({"step": step, "x": float(step)})
    history = [dict(r) for r in first.history[:3]]
    first.close()
    resumed = open_logger(log, tmp_path, {"seed": 0})
    resumed.restore(history)
    for step in (3, 4):
        resumed.log({"step": step, "x": 10.0 * step})
    resumed.close()
    assert _tensorboard(tmp_path / "tensorboard")["x"] == {0: 0.0, 1: 1.0, 2: 2.0, 3: 30.0, 4: 40.0}
    sessions = []  # (run id, steps logged) per wandb session
    for path in (tmp_path / "wandb").glob("offline-run-*/run-*.wandb"):
        records = _wandb_records(path)
        run_id = next(r.run.run_id for r in records if r.WhichOneof("record_type") == "run")
        sessions.append((run_id, [_history(r)["step"] for r in records if r.WhichOneof("record_type") == "history"]))
    assert len({run_id for run_id, _ in sessions}) == 1  # one run, two sessions
    assert sorted(steps for _, steps in sessions) == [[0, 1, 2, 3, 4], [3, 4]]


# ---- errors ------------------------------------------------------------------------------------------------

def test_a_bad_wandb_mode_is_a_config_error(capsys):
    assert main(["train", "--log.wandb_mode", "bogus"]) == 2
    err = capsys.readouterr().err
    assert "log.wandb_mode" in err and "offline, online, disabled" in err


def test_a_missing_package_is_a_config_error(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match=r"log.wandb true needs the `wandb` package"):
        open_logger(LogConfig(wandb=True), tmp_path, {})
