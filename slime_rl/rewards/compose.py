"""The job's reward: one named reward, the task's, or a weighted sum of named rewards.

`reward.weights: {code: 1.0, judge: 0.2}` scores every sample with each component and returns
`{"reward": sum_i w_i r_i, "reward/code": r_code, "reward/judge": r_judge, ...}`; the task's metrics log
each `reward/<name>` as its own curve. A component's extra keys (e.g. `answer_correct`) are kept when no
other component set them first. A component that fails fails the sample (it gets `reward.failure_reward`
and is counted), like a single reward would. Components run one after another for a sample, so the sum
waits as long as all their `min_timeout_s` together; when a batched component makes the sum batched, the
per-sample components score the batch's samples in parallel.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

from slime_rl.protocols import RewardFn
from slime_rl.rewards.registry import get_reward_fn
from slime_rl.rewards.runner import validate_reward
from slime_rl.types import Sample

TASK_REWARD = "task"
_PARALLEL_IN_BATCH = 8  # per-sample components scored at once inside a batch  # the name under which reward.weights refers to the task's own reward


class WeightedReward:
    """sum_i w_i r_i over named components; batched when a component is (its batch size)."""

    def __init__(self, components: dict[str, tuple[float, RewardFn]]):
        if not components:
            raise ValueError("a weighted reward needs at least one component")
        self.components = components
        self.__name__ = "+".join(f"{w:g}*{name}" for name, (w, _) in components.items())
        self.min_timeout_s = sum(float(getattr(fn, "min_timeout_s", 0.0)) for _, fn in components.values())
        sizes = [int(getattr(fn, "batch_size", 32)) for _, fn in components.values() if _batched(fn)]
        if sizes:  # otherwise the runner calls it per sample, in parallel
            self.batch_size = min(sizes)
            self.score_batch = self._score_batch

    def __call__(self, sample: Sample) -> dict[str, float]:
        result = self._score_batch([sample])[0]
        if isinstance(result, BaseException):
            raise result
        return result

    def _score_batch(self, samples: list[Sample]) -> list[dict[str, float] | Exception]:
        scores = {name: _score_all(fn, samples) for name, (_, fn) in self.components.items()}
        out: list[dict[str, float] | Exception] = []
        for i in range(len(samples)):
            out.append(self._combine({name: values[i] for name, values in scores.items()}))
        return out

    def _combine(self, values: dict[str, Any]) -> dict[str, float] | Exception:
        entry: dict[str, float] = {}
        total = 0.0
        for name, value in values.items():
            try:
                value = validate_reward(_raise_or_return(value))
            except Exception as e:  # noqa: BLE001 - the component's failure is this sample's
                return type(e)(f"reward component {name!r}: {e}")
            scalar = float(value["reward"]) if isinstance(value, dict) else float(value)
            if isinstance(value, dict):
                for key, extra in value.items():
                    if key != "reward":
                        entry.setdefault(key, extra)
            entry[f"reward/{name}"] = scalar
            total += self.components[name][0] * scalar
        entry["reward"] = total
        return entry


def _batched(fn: Any) -> bool:
    return callable(getattr(fn, "score_batch", None))


def _raise_or_return(value: Any) -> Any:
    if isinstance(value, BaseException):
        raise value
    return value


def _score_all(fn: RewardFn, samples: list[Sample]) -> list[Any]:
    if _batched(fn):
        try:
            values = list(fn.score_batch(samples))
        except Exception as e:  # noqa: BLE001 - the whole batch failed
            return [e] * len(samples)
        if len(values) != len(samples):
            return [ValueError(f"score_batch returned {len(values)} values for {len(samples)} samples")] * len(samples)
        return values
    def one(sample: Sample) -> Any:
        try:
            return fn(sample)
        except Exception as e:  # noqa: BLE001 - user code: the sample's failure
            return e

    if len(samples) == 1:
        return [one(samples[0])]
    with ThreadPoolExecutor(min(len(samples), _PARALLEL_IN_BATCH)) as pool:  # a judge beside a batched RM
        return list(pool.map(one, samples))


def build_reward_fn(reward_cfg: Any, task_reward: Callable[[], RewardFn]) -> RewardFn:
    """The reward a job scores with: `reward.weights` composed, else `reward.name`, else the task's
    (`task_reward()` is called only when it is needed)."""
    if reward_cfg.weights:
        components = {}
        for name, weight in reward_cfg.weights.items():
            fn = task_reward() if name == TASK_REWARD else get_reward_fn(name, reward_cfg)
            components[name] = (float(weight), fn)
        return WeightedReward(components)
    if reward_cfg.name:
        return get_reward_fn(reward_cfg.name, reward_cfg)
    return task_reward()
