"""The ideal-overlap bound of benchmarks/bench_async.py: each limit a mode's schedule imposes, checked against
the step time the producer's rule allows (slime_rl/producer.py: wave w starts once step w - K's weights are
pushed)."""

import importlib.util
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location(
    "bench_async", Path(__file__).resolve().parents[1] / "benchmarks" / "bench_async.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def phases(R, T, cR=0.2, cT=1.0):
    return {"rollout_s": R, "train_s": T, "rollout_cores": cR, "train_cores": cT}


def simulated_step(R, T, K, waves, steps=400):
    """Steady-state step time of a trainer that trains wave w from the moment it is ready, where wave w
    starts once step w - K's weights are pushed (and at most `waves` waves are in flight), takes R, and a
    step takes T; rollouts that only wait (no core)."""
    ready, end = [], []  # wave w ready at ready[w]; step w ends (weights pushed) at end[w]
    for w in range(steps):
        start = end[w - K - 1] if w - K - 1 >= 0 else 0.0
        if w - waves >= 0:
            start = max(start, ready[w - waves])  # the concurrency cap: a slot frees when a wave completes
        ready.append(start + R)
        end.append(max(ready[w], end[w - 1] if w else 0.0) + T)
    span = 60  # a whole number of the schedule's periods (1 to 5 steps)
    return (end[-1] - end[-1 - span]) / span


@pytest.mark.parametrize("R,T,K,waves", [(1.26, 0.43, 2, 3), (1.26, 0.43, 4, 4), (0.30, 0.50, 1, 2),
                                         (3.0, 0.5, 2, 3), (1.26, 0.43, 1, 2)])
def test_fully_async_bound_is_the_schedules_best_step(R, T, K, waves):
    mode = {1: "fully_async_s1", 2: "fully_async_s2", 4: "fully_async_s4"}[K]
    b = bench.ideal_bound(phases(R, T), mode, inflight_waves=waves, cores=64)
    step = simulated_step(R, T, K, min(waves, K + 1))
    assert b["bound"] == pytest.approx((R + T) / step, rel=1e-6)


def test_waiting_staleness_2_is_limited_by_its_window_not_by_the_waves():
    b = bench.ideal_bound(phases(1.26, 0.43), "fully_async_s2", inflight_waves=4, cores=2)
    assert b["limit"] == "staleness window" and b["bound"] == pytest.approx(3.0)
    assert bench.ideal_bound(phases(1.26, 0.43), "fully_async_s4", inflight_waves=4, cores=2)["limit"] == "train"


def test_compute_bound_workload_is_limited_by_the_trainer_or_the_cores():
    b = bench.ideal_bound(phases(0.30, 0.50, cR=1.05, cT=1.05), "fully_async_s2", inflight_waves=3, cores=2)
    assert b["limit"] == "train" and b["bound"] == pytest.approx(1.6)
    b = bench.ideal_bound(phases(0.50, 0.50, cR=1.5, cT=1.5), "one_step_off", inflight_waves=1, cores=2)
    assert b["limit"] == "CPU work / 2 cores" and b["bound"] == pytest.approx(1.0 / 0.75)


def test_bound_at_the_trainers_measured_speed_lengthens_only_the_train_phase():
    ph = phases(0.18, 0.24, cR=1.0, cT=1.0)  # sync's step: 0.42 s
    strict = bench.ideal_bound(ph, "fully_async_s2", inflight_waves=1, cores=2)
    assert strict["limit"] == "train" and strict["bound"] == pytest.approx(0.42 / 0.24)
    slow = bench.ideal_bound(ph, "fully_async_s2", inflight_waves=1, cores=2, extra_train_s=0.08)
    assert slow["limit"] == "train" and slow["bound"] == pytest.approx(0.42 / 0.32)  # sync's step over the slower T
    assert slow["step_s_limits"]["rollout latency / waves in flight"] == pytest.approx(0.18)
    assert slow["step_s_limits"]["CPU work / 2 cores"] == pytest.approx((0.18 + 0.32) / 2)
    fast = bench.ideal_bound(ph, "fully_async_s2", inflight_waves=1, cores=2, extra_train_s=-0.04)
    assert fast["bound"] == pytest.approx(0.42 / 0.20)  # a trainer faster than in sync raises it


def test_rows_are_reported_against_sync_of_their_seed(tmp_path):
    def row(mode, seed, samples_per_s, rank_s):
        return {"mode": mode, "seed": seed, "samples": 1000, "samples_per_s": samples_per_s * 0.9,
                "samples_per_s_steady": samples_per_s, "first_step_s": 1.0, "rl_s": 1000 / samples_per_s,
                "wall_incl_eval_s": 1200 / samples_per_s, "final_accuracy": 0.3, "step0_accuracy": 0.3,
                "curve": [(0, 0.0, 0.3), (2, 1.0, 0.3)], "reward_curve": [(1, 0.1), (2, 0.2)], "max_staleness": 0,
                "phases": {**phases(0.18, 0.24, cR=1.0, cT=1.0), "rank_s": rank_s}}

    rows = [row("sync", 0, 100.0, 0.20), row("fully_async_s2", 0, 150.0, 0.28), row("sync", 1, 50.0, 0.20),
            row("fully_async_s2", 1, 80.0, 0.20)]
    args = bench.argparse.Namespace(inflight_waves=1, steps=2, eval_samples=1, seeds=[0, 1], threads=1, lr=1e-4,
                                    task="arithmetic", prompts=1, samples=1, reward_delay_s=0.0,
                                    out=str(tmp_path / "r.json"), png=str(tmp_path / "r.png"))
    bench.report(args, {"cpu_count": 2}, "ckpt", rows, 1.0)
    got = {(x["mode"], x["seed"]): x for x in bench.json.loads((tmp_path / "r.json").read_text())["results"]}
    assert got["fully_async_s2", 0]["ratio_vs_sync_steady"] == pytest.approx(1.5)  # the fraction's ratio
    assert got["fully_async_s2", 1]["ratio_vs_sync_steady"] == pytest.approx(1.6)
    assert got["fully_async_s2", 0]["trainer_slowdown"] == pytest.approx(1.4)
    assert got["fully_async_s2", 0]["bound_at_trainer_speed"] == pytest.approx(0.42 / 0.32)
    assert got["fully_async_s2", 1]["fraction_of_bound_at_trainer_speed"] == pytest.approx(1.6 / (0.42 / 0.24))
