"""Validation: generate on held-out prompts, score, report accuracies."""

from __future__ import annotations

import math
from typing import Sequence

from rollout.groups import generate_groups
from slime_rl.rewards.runner import score_samples
from slime_rl.types import Sample, SamplingParams


def reward_metrics(samples: list[Sample], prefix: str) -> dict[str, float]:
    """Reward mean, format/answer accuracy (when the reward reports them), response length."""
    n = max(1, len(samples))
    out = {
        f"{prefix}/reward_mean": sum(s.scalar_reward for s in samples) / n,
        f"{prefix}/response_length": sum(len(s.response_ids) for s in samples) / n,
        f"{prefix}/truncated_frac": sum(s.status.value == "truncated" for s in samples) / n,
    }
    for key, name in (("answer_correct", "answer_accuracy"), ("format_correct", "format_accuracy")):
        vals = [s.reward[key] for s in samples if isinstance(s.reward, dict) and key in s.reward]
        out[f"{prefix}/{name}"] = sum(vals) / len(vals) if vals else math.nan
    return out


def evaluate(engine, records: Sequence, reward_fn, *, greedy: bool, n_samples: int, temperature: float,
             max_new_tokens: int, stop_token_ids: list[int], decode, reward_timeout_s: float = 10.0,
             failure_reward: float = 0.0, max_examples: int = 0, seed: int = 0) -> dict[str, float]:
    """Accuracy on the validation records; `val/accuracy` is the headline number."""
    if max_examples:
        records = records[:max_examples]
    sampling = SamplingParams(temperature=0.0 if greedy else temperature, max_new_tokens=max_new_tokens,
                              stop_token_ids=stop_token_ids)
    groups = generate_groups(engine, records, 1 if greedy else n_samples, sampling, base_seed=seed,
                             step=-1, decode=decode)
    samples = [s for g in groups for s in g]
    score_samples(samples, reward_fn, timeout_s=reward_timeout_s, failure_reward=failure_reward)
    metrics = reward_metrics(samples, "val")
    acc = metrics["val/answer_accuracy"]
    metrics["val/accuracy"] = acc if not math.isnan(acc) else metrics["val/reward_mean"]
    return metrics
