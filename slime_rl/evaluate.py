"""Validation: generate on held-out prompts, score, report accuracies."""

from __future__ import annotations

import asyncio
from typing import Callable, Sequence

from rollout.episodes import Episode, play
from rollout.groups import generate_groups, new_group
from slime_rl.rewards.runner import score_samples
from slime_rl.tasks.base import VerifiedAnswers
from slime_rl.types import Sample, SamplingParams


def evaluate(engine, records: Sequence, reward_fn, *, greedy: bool, n_samples: int, temperature: float,
             max_new_tokens: int, stop_token_ids: list[int], decode, reward_timeout_s: float = 10.0,
             failure_reward: float = 0.0, max_examples: int = 0, seed: int = 0,
             metrics: Callable[[list[Sample], str], dict[str, float]] | None = None,
             episode: Episode | None = None) -> dict[str, float]:
    """The task's metrics (`metrics`, default: answer accuracy) of the validation records, played by the task's
    `episode` (default: one generation each); `val/accuracy` is the headline number."""
    if max_examples:
        records = records[:max_examples]
    sampling = SamplingParams(temperature=0.0 if greedy else temperature, max_new_tokens=max_new_tokens,
                              stop_token_ids=stop_token_ids)
    n = 1 if greedy else n_samples
    if episode is None or episode.one_call:
        groups = generate_groups(engine, records, n, sampling, base_seed=seed, step=-1, decode=decode)
    else:
        groups = asyncio.run(_play(engine, [new_group(r, g, n) for g, r in enumerate(records)], episode, sampling,
                                   seed, decode))
    samples = [s for g in groups for s in g]
    score_samples(samples, reward_fn, timeout_s=reward_timeout_s, failure_reward=failure_reward)
    return {**(metrics or VerifiedAnswers().eval_metrics)(samples, "val"), "val/num_samples": float(len(samples))}


async def _play(engine, groups, episode: Episode, sampling: SamplingParams, seed: int, decode):
    try:
        return await play(engine, groups, episode, sampling, base_seed=seed, step=-1, decode=decode)
    finally:
        if hasattr(engine, "aclose"):  # an HTTP client: its session on this (short-lived) loop
            await engine.aclose()
