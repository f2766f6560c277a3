"""Multi-turn episodes, token-in / token-out: the model's turns and the environment's observations as one
trajectory of token ids (issue 19, in progress: not yet wired into the rollout loop).

Each turn sends the episode's ids so far (prompt + every earlier turn) to the engine and appends exactly
the ids it returns, with their logprobs and weight versions (`loss_mask` 1); the environment's reply is
appended as ids with `loss_mask` 0 and logprob 0, so the trainer sees the very tokens the engine saw and
produced, never a re-tokenisation of decoded text. Every turn of an episode carries one routing key, so a
router keeps the growing conversation on one engine, where the radix cache holds its prefix.

The environment is `slime_rl.protocols.Environment` (token level): `reset(sample)` gives ids appended to
the prompt, `step(action_ids)` the observation ids, a reward, done and info. Limits: `max_turns` model
turns and `max_total_tokens` ids in all (prompt included); an observation that would overflow is cut.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from rollout.strategies import agenerate_keyed
from slime_rl.protocols import Environment
from slime_rl.types import GenerateRequest, Sample, SampleStatus, SamplingParams


@dataclass(frozen=True)
class EpisodeLimits:
    max_turns: int = 8
    max_total_tokens: int = 1024


@dataclass
class EpisodeStats:
    turns: int = 0
    model_tokens: int = 0
    env_tokens: int = 0
    reward: float = 0.0
    done: bool = False  # the environment ended the episode (else a limit did)


async def run_episode(engine, sample: Sample, env: Environment, sampling: SamplingParams, limits: EpisodeLimits,
                      seed: int | None = None, routing_key: str | None = None) -> EpisodeStats:
    """Play one episode into `sample` (in place): returns its statistics; `sample.reward` gets the total."""
    sample.prompt_ids = list(sample.prompt_ids) + list(env.reset(sample))
    sample.response_ids, sample.rollout_logprobs, sample.loss_mask, sample.weight_versions = [], [], [], []
    stats = EpisodeStats()
    key = routing_key or f"episode-{sample.group_id}-{sample.index}"
    info: dict = {}
    while stats.turns < limits.max_turns:
        ids = sample.prompt_ids + sample.response_ids
        budget = limits.max_total_tokens - len(ids)
        if budget <= 0:
            break
        turn_seed = None if seed is None else seed + stats.turns
        req = GenerateRequest(ids, replace(sampling, max_new_tokens=min(sampling.max_new_tokens, budget),
                                           seed=turn_seed), rid=f"{key}-t{stats.turns}")
        (out,) = await agenerate_keyed(engine, [req], [key])
        stats.turns += 1
        versions = out.output_versions or [out.weight_version] * len(out.output_ids)
        sample.response_ids += out.output_ids
        sample.rollout_logprobs += out.output_logprobs
        sample.loss_mask += [1] * len(out.output_ids)
        sample.weight_versions += versions
        stats.model_tokens += len(out.output_ids)
        if out.finish_reason == SampleStatus.ABORTED:
            sample.status = SampleStatus.ABORTED
            return stats
        obs, reward, done, info = env.step(list(out.output_ids))
        stats.reward += float(reward)
        if done:
            stats.done = True
            break
        room = limits.max_total_tokens - len(sample.prompt_ids) - len(sample.response_ids)
        obs = list(obs)[:max(0, room)]
        sample.response_ids += obs
        sample.rollout_logprobs += [0.0] * len(obs)
        sample.loss_mask += [0] * len(obs)
        sample.weight_versions += [versions[-1] if versions else out.weight_version] * len(obs)  # not sampled
        stats.env_tokens += len(obs)
    sample.status = SampleStatus.COMPLETED if stats.done else SampleStatus.TRUNCATED
    numeric = {k: float(v) for k, v in info.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    sample.reward = {**numeric, "reward": stats.reward}
    return stats
