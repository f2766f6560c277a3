"""Weighted rewards (`reward.weights`) and the runner's batch seam (`score_batch`)."""

from __future__ import annotations

import pytest

from slime_rl.config import ConfigError, build_config
from slime_rl.rewards import score_samples
from slime_rl.rewards.compose import WeightedReward, build_reward_fn
from slime_rl.tasks.base import reward_metrics
from slime_rl.types import Sample


def _samples(n: int) -> list[Sample]:
    return [Sample(group_id=0, index=i, prompt_ids=[1], response_ids=[2] * (i + 1), response_text=f"r{i}")
            for i in range(n)]


def length(sample: Sample) -> float:
    return float(len(sample.response_ids))


def flag(sample: Sample) -> dict[str, float]:
    return {"reward": 1.0 if sample.index % 2 else 0.0, "answer_correct": 1.0}


class Batched:
    """A batched reward that records its calls; sample 3 fails alone, "boom" fails its whole batch."""

    batch_size = 2

    def __init__(self, boom: bool = False):
        self.calls: list[int] = []
        self.boom = boom

    def score_batch(self, samples):
        self.calls.append(len(samples))
        if self.boom:
            raise ConnectionError("endpoint down")
        return [ValueError("garbage") if s.index == 3 else 10.0 * s.index for s in samples]

    def __call__(self, sample):
        return self.score_batch([sample])[0]


def test_weighted_sum_logs_each_component():
    samples = _samples(4)
    fn = WeightedReward({"length": (0.5, length), "flag": (2.0, flag)})
    stats = score_samples(samples, fn)
    assert stats.errors == 0
    assert [s.reward["reward"] for s in samples] == [0.5, 3.0, 1.5, 4.0]
    assert samples[1].reward["reward/length"] == 2.0 and samples[1].reward["reward/flag"] == 1.0
    assert samples[0].reward["answer_correct"] == 1.0  # a component's extra keys are kept
    metrics = reward_metrics(samples, "rollout")
    assert metrics["rollout/reward/length"] == 2.5 and metrics["rollout/reward/flag"] == 0.5


def test_batched_reward_chunks_and_per_sample_failures():
    samples, fn = _samples(5), Batched()
    stats = score_samples(samples, fn, failure_reward=-1.0, max_workers=2)
    assert sorted(fn.calls) == [1, 2, 2]  # chunks of batch_size
    assert [s.scalar_reward for s in samples] == [0.0, 10.0, 20.0, -1.0, 40.0]
    assert stats.errors == 1 and stats.failed_ids == ["0/3"]


def test_batched_reward_that_raises_fails_its_chunk_only_and_run_goes_on():
    samples = _samples(3)
    stats = score_samples(samples, Batched(boom=True), failure_reward=-2.0)
    assert stats.errors == 3 and all(s.scalar_reward == -2.0 for s in samples)


def test_weighted_reward_is_batched_when_a_component_is():
    batched = Batched()
    fn = WeightedReward({"rm": (1.0, batched), "length": (1.0, length)})
    assert fn.batch_size == 2
    samples = _samples(4)
    stats = score_samples(samples, fn)
    assert stats.errors == 1 and samples[3].reward["reward_error"] == 1.0  # a component's failure is the sample's
    assert samples[2].reward["reward"] == 23.0 and samples[2].reward["reward/rm"] == 20.0
    assert not hasattr(WeightedReward({"length": (1.0, length)}), "score_batch")


def test_build_reward_fn_from_config():
    task_calls = []

    def task_reward():
        task_calls.append(1)
        return flag

    cfg = build_config(overrides=[("reward.weights", {"task": 1.0, "tests.test_reward_compose:length": 0.25})])
    fn = build_reward_fn(cfg.reward, task_reward)
    sample = _samples(2)[1]
    assert fn(sample)["reward"] == 1.5 and task_calls == [1]
    cfg = build_config(overrides=[("reward.name", "tests.test_reward_compose:length")])
    assert build_reward_fn(cfg.reward, task_reward)(sample) == 2.0 and task_calls == [1]  # task reward not built


@pytest.mark.parametrize("field, value, words", [
    ("reward.ranked_list.decay", 1.5, "in [0, 1]"),
    ("reward.code.sandbox.memory_mb", 1, ">= 16"),
    ("reward.remote.max_concurrency", 0, ">= 1"),
    ("reward.judge.max_score", -1.0, "reward.judge.min_score"),
])
def test_reward_settings_are_validated(field, value, words):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")) as err:
        build_config(overrides=[(field, value)])
    assert words in str(err.value)


def test_name_and_weights_together_are_refused():
    with pytest.raises(ConfigError, match="reward.name"):
        build_config(overrides=[("reward.name", "math"), ("reward.weights", {"math": 1.0})])


def test_runner_waits_for_a_rewards_own_retries():
    import threading

    release = threading.Event()

    class Slow:
        min_timeout_s = 5.0

        def __call__(self, sample):
            release.wait(0.3)  # longer than reward.timeout_s below, shorter than min_timeout_s
            return 1.0

    samples = _samples(2)
    stats = score_samples(samples, Slow(), timeout_s=0.05)
    assert stats.timeouts == 0 and [s.scalar_reward for s in samples] == [1.0, 1.0]
    assert WeightedReward({"a": (1.0, Slow()), "b": (1.0, Slow())}).min_timeout_s == 10.0
