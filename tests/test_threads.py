"""Torch thread counts: `rollout.num_threads` / `train.num_threads`, defaults that fit the cores, and a job whose
processes run with exactly the threads configured."""

from __future__ import annotations

import pytest

from slime_rl.cli import main
from slime_rl.config import ConfigError, build_config
from slime_rl.threads import available_cores, cpu_ids, plan_threads


def _cfg(mode="sync", rollout=None, train=None, bind=True):
    overrides = [("async_rl.mode", mode), ("launch.bind_cores", bind)]
    overrides += [("rollout.num_threads", rollout)] if rollout else []
    overrides += [("train.num_threads", train)] if train else []
    return build_config(overrides=overrides)


@pytest.mark.parametrize("mode,ranks,cores,driver,rank", [
    ("sync", 1, 2, 2, 2),  # rollout and training alternate: each phase gets every core
    ("sync", 2, 8, 8, 4),
    ("one_step_off", 1, 2, 1, 1),  # the engine generates while the rank trains: the cores are split
    ("fully_async", 1, 8, 4, 4),
    ("fully_async", 3, 8, 2, 2),
    ("fully_async", 0, 4, 4, 0),  # --backend hf: one process, one pool
])
def test_the_default_plan_never_keeps_more_threads_busy_than_cores(mode, ranks, cores, driver, rank):
    plan = plan_threads(_cfg(mode), ranks=ranks, engine_here=True, cores=cores)
    assert (plan.driver, plan.rank, plan.warning) == (driver, rank, None)
    busy = plan.driver + ranks * plan.rank if mode != "sync" else max(plan.driver, ranks * plan.rank)
    assert busy <= cores


def test_engines_elsewhere_leave_the_cores_to_the_ranks():
    plan = plan_threads(_cfg("fully_async"), ranks=2, engine_here=False, cores=8)
    assert (plan.driver, plan.rank) == (1, 4)


def test_settings_win_and_oversubscription_is_named():
    plan = plan_threads(_cfg("fully_async", rollout=1, train=3), ranks=1, engine_here=True, cores=2)
    assert (plan.driver, plan.rank) == (1, 3)
    assert "rollout.num_threads / train.num_threads keep 4 threads busy at once on 2 core(s)" in plan.warning
    crowded = plan_threads(_cfg("fully_async"), ranks=4, engine_here=True, cores=2)
    assert (crowded.driver, crowded.rank) == (1, 1) and "5 processes compute at once on 2 core(s)" in crowded.warning


@pytest.mark.parametrize("mode,ranks,ids,driver_cores,rank_cores", [
    ("one_step_off", 1, [0, 1], (0,), ((1,),)),  # each process gets a core of its own
    ("fully_async", 1, [0, 1, 2, 3], (0, 1), ((2, 3),)),
    ("fully_async", 3, [4, 5, 9, 11], (4,), ((5,), (9,), (11,))),  # the affinity mask's cores, in order
    ("fully_async", 1, [3], (), ()),  # 2 processes on 1 core: nothing to pin them apart
    ("sync", 1, [0, 1], (), ()),  # the phases alternate and each takes every core
])
def test_processes_are_pinned_to_cores_of_their_own_where_the_plan_fits(mode, ranks, ids, driver_cores, rank_cores):
    plan = plan_threads(_cfg(mode), ranks=ranks, engine_here=True, ids=ids)
    assert (plan.driver_cores, plan.rank_cores) == (driver_cores, rank_cores)
    assert plan_threads(_cfg(mode, bind=False), ranks=ranks, engine_here=True, ids=ids).driver_cores == ()
    if driver_cores:
        assert "pinned: driver to cores" in plan.line(ranks)


def test_settings_that_fit_are_pinned_in_sync_mode_too():
    plan = plan_threads(_cfg("sync", rollout=1, train=1), ranks=1, engine_here=True, ids=[0, 1])
    assert (plan.driver_cores, plan.rank_cores) == ((0,), ((1,),))


def test_a_thread_count_below_one_is_a_config_error():
    with pytest.raises(ConfigError, match="train.num_threads"):
        build_config(overrides=[("train.num_threads", 0)])


def test_every_process_of_a_job_runs_with_the_threads_configured(tmp_path, capsys):
    """A Megatron job (driver with the embedded engine + a rank): each process reports torch's thread
    count once built, and it is the configured one (unset, torch would take every core in both)."""
    before = cpu_ids()
    assert main(["train", "-b", "megatron", "--tp", "1", "--async", "one_step_off", "--rollout.num_threads", "1",
                 "--train.num_threads", "1", "--train.num_steps", "1", "--model.hidden_size", "64",
                 "--model.intermediate_size", "128", "--data.num_train", "40", "--data.num_val", "8",
                 "--data.num_sft", "8", "--rollout.max_new_tokens", "4", "--rollout.prompts_per_step", "2",
                 "--rollout.n_samples_per_prompt", "2", "--sft.enabled", "false", "--eval.every_n_steps", "0",
                 "--eval.max_examples", "4", "--log.progress", "false", "--log.output_dir", str(tmp_path / "run"),
                 "--log.save_checkpoint", "false", "--log.plot", "false"]) == 0
    out = capsys.readouterr().out
    assert "[threads] running: driver 1, trainer ranks [1]" in out, out
    if available_cores() >= 2:  # the driver and the rank pinned to cores of their own, the driver's given back
        first, second = cpu_ids()[:2]
        assert f"cores: driver [{first}], trainer ranks [[{second}]]" in out, out
    assert cpu_ids() == before


@pytest.mark.parametrize("flags,env,wanted", [
    (["--backend", "hf", "--rollout.num_threads", "2"], {}, True),  # two teams in one process: ACTIVE
    (["--backend", "hf", "--rollout.num_threads", "1", "--train.num_threads", "1"], {}, False),  # no team
    (["--backend", "hf", "--rollout.num_threads", "2"], {"OMP_WAIT_POLICY": "PASSIVE"}, False),  # the user's
    (["--backend", "hf", "--rollout.num_threads", "2", "--rollout.engine_urls", "http://127.0.0.1:1"], {}, False),
    (["--rollout.num_threads", "2"], {}, False),  # Megatron: ACTIVE would spin a core away from the rank
])
def test_active_wait_only_where_the_hf_trainer_shares_the_engines_process(flags, env, wanted):
    from slime_rl.cli import build_parser, config_from_args
    from slime_rl.threads import wants_active_wait

    cfg = config_from_args(build_parser().parse_args(["train", *flags]))
    assert wants_active_wait(cfg, env=env) is wanted


def test_train_from_the_command_line_restarts_itself_with_the_wait_policy(monkeypatch):
    import os
    import sys

    started = []

    def execve(exe, args, env):
        started.append((exe, args, env.get("OMP_WAIT_POLICY")))
        raise SystemExit(0)

    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.setattr(os, "execve", execve)
    argv = ["train", "--backend", "hf", "--rollout.num_threads", "2", "--train.num_steps", "0"]
    monkeypatch.setattr(sys, "argv", ["slime-rl", *argv])
    with pytest.raises(SystemExit):
        main()
    assert started == [(sys.executable, [sys.executable, "-m", "slime_rl", *argv], "ACTIVE")]
