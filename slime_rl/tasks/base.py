"""The `Task` seam: a workload owns its prompts, its reward and its validation metrics.

`--task NAME` picks a registered task (`register_task`), or `pkg.module:factory` a user's own (the
factory takes no arguments and returns a Task). The loop and the job ask the task; they never name one.

- `data(cfg, out_dir)`: the train / val / sft prompt files (jsonl or parquet; None where there are none),
  generated or taken from `data.*_path`;
- `reward_fn(cfg)`: the RewardFn that scores a sample (`reward.name`, when set, overrides it);
- `eval_metrics(samples, prefix)`: the validation metrics of scored samples, `<prefix>/accuracy` the
  headline;
- `episode(cfg, tokenizer)` (optional): how a sample is played (`rollout.episodes`): `SingleTurn` (the default:
  one generation) or `MultiTurn` over an environment (tools, a simulated user);
- `preset(cfg)` (optional): the defaults the task moves (contexts, warm-up budget), under the file and flags;
- `tokenizer(cfg)` (optional): the tokenizer spec ("char" or a directory) of a tiny model built for the task
  (neither `model.path` nor `model.tokenizer` set); "char" when the task defines none.
"""

from __future__ import annotations

import importlib
import math
from pathlib import Path
from typing import Any, Callable, Protocol

from rollout.episodes import Episode, SingleTurn
from slime_rl.protocols import RewardFn
from slime_rl.types import Sample


class Task(Protocol):
    name: str

    def data(self, cfg: Any, out_dir: Path) -> dict[str, str | None]: ...

    def reward_fn(self, cfg: Any) -> RewardFn: ...

    def eval_metrics(self, samples: list[Sample], prefix: str) -> dict[str, float]: ...


def task_episode(task: Any, cfg: Any, tokenizer) -> Episode:
    """The task's episode, `SingleTurn` when it defines none."""
    make = getattr(task, "episode", None)
    return make(cfg, tokenizer) if callable(make) else SingleTurn()


def task_tokenizer(task: Any, cfg: Any) -> str:
    """The tokenizer spec a freshly built tiny model uses for `task`."""
    make = getattr(task, "tokenizer", None)
    return str(make(cfg)) if callable(make) else "char"


def user_files(cfg: Any) -> dict[str, str | None] | None:
    """The user's prompt files (`data.train_path`, `val_path`, `sft_path`) when `data.train_path` is set: what a
    generating task trains on instead of its own data; None otherwise."""
    d = cfg.data
    return None if d.train_path is None else {"train": d.train_path, "val": d.val_path, "sft": d.sft_path}


def reward_metrics(samples: list[Sample], prefix: str) -> dict[str, float]:
    """Reward mean, format/answer accuracy (when the reward reports them), response length, truncations."""
    n = max(1, len(samples))
    out = {
        f"{prefix}/reward_mean": sum(s.scalar_reward for s in samples) / n,
        f"{prefix}/response_length": sum(len(s.response_ids) for s in samples) / n,
        f"{prefix}/truncated_frac": sum(s.status.value == "truncated" for s in samples) / n,
    }
    for key, name in (("answer_correct", "answer_accuracy"), ("format_correct", "format_accuracy")):
        vals = [s.reward[key] for s in samples if isinstance(s.reward, dict) and key in s.reward]
        out[f"{prefix}/{name}"] = sum(vals) / len(vals) if vals else math.nan
    components = sorted({k for s in samples if isinstance(s.reward, dict) for k in s.reward if k.startswith("reward/")})
    for key in components:  # the named parts of a weighted reward (slime_rl.rewards.compose)
        vals = [float(s.reward[key]) for s in samples if isinstance(s.reward, dict) and key in s.reward]
        out[f"{prefix}/{key}"] = sum(vals) / len(vals)
    return out


class VerifiedAnswers:
    """Shared by tasks whose reward checks a final answer: accuracy = answer accuracy (else the mean reward)."""

    name = ""
    reward = "math"

    def reward_fn(self, cfg: Any) -> RewardFn:
        from slime_rl.rewards import get_reward_fn

        return get_reward_fn(self.reward)

    def eval_metrics(self, samples: list[Sample], prefix: str) -> dict[str, float]:
        metrics = reward_metrics(samples, prefix)
        acc = metrics[f"{prefix}/answer_accuracy"]
        metrics[f"{prefix}/accuracy"] = acc if not math.isnan(acc) else metrics[f"{prefix}/reward_mean"]
        return metrics


_REGISTRY: dict[str, Callable[[], Task]] = {}


def register_task(name: str) -> Callable:
    """Class or factory decorator: `--task name` builds it with no arguments."""

    def decorator(factory: Callable[[], Task]) -> Callable[[], Task]:
        _REGISTRY[name] = factory
        return factory

    return decorator


def registered_tasks() -> list[str]:
    _load_builtins()
    return sorted(_REGISTRY)


def get_task(name_or_path: str) -> Task:
    """The task registered as `name_or_path`, or built by the factory at "pkg.module:factory"; ValueError
    naming the registered tasks otherwise."""
    _load_builtins()
    if name_or_path in _REGISTRY:
        return _REGISTRY[name_or_path]()
    module_name, sep, attr = name_or_path.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"unknown task {name_or_path!r}; registered: {', '.join(sorted(_REGISTRY))}, "
                         "or a factory 'package.module:factory'")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"task {name_or_path!r}: cannot load {attr!r} from {module_name!r} ({exc})") from None
    try:
        task = factory()
    except Exception as exc:  # noqa: BLE001 - a user's factory: any failure is a config problem
        raise ValueError(f"task {name_or_path!r}: the factory raised {type(exc).__name__}: {exc}") from None
    missing = [m for m in ("data", "reward_fn", "eval_metrics") if not callable(getattr(task, m, None))]
    if missing:
        raise ValueError(f"task {name_or_path!r}: the factory's object lacks {', '.join(missing)} (see slime_rl.tasks)")
    return task


def _load_builtins() -> None:
    importlib.import_module("slime_rl.tasks.arithmetic")
    importlib.import_module("slime_rl.tasks.math")
    importlib.import_module("slime_rl.tasks.customer_support.task")
    importlib.import_module("slime_rl.tasks.code")
    importlib.import_module("slime_rl.tasks.ranked_list")
    importlib.import_module("slime_rl.tasks.word_problems")
