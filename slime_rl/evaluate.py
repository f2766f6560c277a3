"""Validation: generate on held-out prompts, score, report accuracies."""

from __future__ import annotations

from typing import Callable, Sequence

from rollout.groups import generate_groups
from slime_rl.rewards.runner import score_samples
from slime_rl.tasks.base import VerifiedAnswers
from slime_rl.types import Sample, SamplingParams


def evaluate(engine, records: Sequence, reward_fn, *, greedy: bool, n_samples: int, temperature: float,
             max_new_tokens: int, stop_token_ids: list[int], decode, reward_timeout_s: float = 10.0,
             failure_reward: float = 0.0, max_examples: int = 0, seed: int = 0,
             metrics: Callable[[list[Sample], str], dict[str, float]] | None = None) -> dict[str, float]:
    """The task's metrics (`metrics`, default: answer accuracy) of the validation records; `val/accuracy` is
    the headline number."""
    if max_examples:
        records = records[:max_examples]
    sampling = SamplingParams(temperature=0.0 if greedy else temperature, max_new_tokens=max_new_tokens,
                              stop_token_ids=stop_token_ids)
    groups = generate_groups(engine, records, 1 if greedy else n_samples, sampling, base_seed=seed,
                             step=-1, decode=decode)
    samples = [s for g in groups for s in g]
    score_samples(samples, reward_fn, timeout_s=reward_timeout_s, failure_reward=failure_reward)
    return (metrics or VerifiedAnswers().eval_metrics)(samples, "val")
