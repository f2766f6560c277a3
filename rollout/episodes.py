"""Episodes: how one sample of a group is played. A task's `episode` (slime_rl.tasks) picks one.

- `SingleTurn`: one generation per sample (today's tasks); a wave of groups can go out as one engine call.
- `MultiTurn`: the model's turns and an environment's observations as one trajectory of token ids,
  token-in / token-out. Each turn sends the episode's ids so far (prompt + every earlier turn) to the engine
  and appends exactly the ids it returns, with their logprobs and weight versions (`loss_mask` 1); the
  environment's reply is appended as ids with `loss_mask` 0 and logprob 0. So the trainer sees the very tokens
  the engine saw and produced, never a re-tokenisation of decoded text. Every turn carries the group's
  routing key, so a router keeps the growing conversations on one engine, where the radix cache holds them.

The environment is `slime_rl.protocols.Environment` (token level; `slime_rl.tasks.chat.ChatEnvironment`
makes one from a text-level environment and a chat template): `reset(sample)` gives ids appended to the
prompt, `step(action_ids)` the observation ids, a reward, done and info. Limits: `max_turns` model turns,
`max_total_tokens` ids in all (prompt included; an observation that would overflow is cut) and the sampling's
`max_new_tokens` per turn.

Interruptions (a weight push in fully-async mode aborts the engine's requests): the sample keeps every token
so far with its version and stays `ABORTED`; the episode keeps its environment, and the next `run` continues
the interrupted turn from its tokens, under the new weights. A sample restarted from its prompt (partial
rollouts off, or a state that was lost) starts a fresh environment. When the episode ends,
`sample.metadata["episode"]` holds its reward (`reward`: the sum over turns), `turns`, `env_error` (1 when
the environment raised: the episode ends there) and the numeric entries of the environment's last info;
`metadata["episode_info"]` the whole last info. `episode_reward` is the reward function that reads it.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Callable, Protocol

from rollout.groups import merge_output
from slime_rl.protocols import Environment
from slime_rl.types import Sample, SampleStatus


class Episode(Protocol):
    one_call: bool  # a wave of groups may go out as one engine call (`GroupRunner.requests`)

    async def run(self, runner, group: list[Sample]) -> None:
        """Play every unfinished (`ABORTED`) sample of `group` in place, with `runner` (a GroupRunner)."""

    def length(self, sample: Sample, cfg) -> tuple[int, int]:
        """(how long `sample` is, the budget it had), for DAPO's overlong penalty."""


class SingleTurn:
    """One generation per sample, continued from its tokens after an interruption."""

    one_call = True

    async def run(self, runner, group: list[Sample]) -> None:
        await runner.run(group)

    def length(self, sample: Sample, cfg) -> tuple[int, int]:
        return len(sample.response_ids), cfg.rollout.max_new_tokens


@dataclass(frozen=True)
class EpisodeLimits:
    max_turns: int = 8
    max_total_tokens: int = 1024

    def __post_init__(self) -> None:
        if self.max_turns < 1 or self.max_total_tokens < 2:
            raise ValueError(f"EpisodeLimits: max_turns >= 1 and max_total_tokens >= 2 needed, got {self}")


@dataclass
class _Live:
    """An episode between `run` calls: its environment and where its current model turn began."""

    env: Environment
    turn_start: int | None = None  # index in response_ids of the turn being generated (None: between turns)
    turns: int = 0
    reward: float = 0.0
    info: dict = field(default_factory=dict)


class MultiTurn:
    """Episodes against `make_env(sample)` (a fresh token-level Environment per episode)."""

    one_call = False

    def __init__(self, make_env: Callable[[Sample], Environment], limits: EpisodeLimits = EpisodeLimits(),
                 log: Callable[[str], None] = print):
        self.make_env, self.limits, self.log = make_env, limits, log
        self._live: dict[tuple, _Live] = {}
        self.env_errors = 0

    async def run(self, runner, group: list[Sample]) -> None:
        todo = [s for s in group if s.status == SampleStatus.ABORTED]
        key = f"group-{runner.step}-{group[0].group_id}"
        done = await asyncio.gather(*(self._play(runner, s, key) for s in todo), return_exceptions=True)
        errors = [e for e in done if isinstance(e, BaseException)]
        if errors:  # every episode has stopped by now; the failed ones keep their state and go out again
            raise errors[0]

    def length(self, sample: Sample, cfg) -> tuple[int, int]:
        """The whole episode (prompt, turns, observations) against its token budget."""
        return len(sample.prompt_ids) + len(sample.response_ids), self.limits.max_total_tokens

    def _start(self, s: Sample, k: tuple) -> _Live:
        s.response_ids, s.rollout_logprobs, s.loss_mask, s.weight_versions = [], [], [], []
        base = s.metadata.setdefault("prompt_len", len(s.prompt_ids))  # a restart drops the reset's ids
        env = self.make_env(s)
        s.prompt_ids = s.prompt_ids[:base] + list(env.reset(s))
        live = self._live[k] = _Live(env)
        return live

    async def _play(self, runner, s: Sample, key: str) -> None:
        k = (runner.step, s.metadata.get("uid", s.group_id), s.index)
        live = self._live.get(k)
        if live is None or not s.response_ids:
            try:
                live = self._start(s, k)
            except Exception as exc:  # noqa: BLE001 - e.g. a bad label: this episode fails, not the batch
                self._failed("reset", exc)
                return self._finish(s, k, _Live(env=None), SampleStatus.COMPLETED, env_error=True)
        lim = self.limits
        while True:
            used = len(s.prompt_ids) + len(s.response_ids)
            if live.turn_start is None:
                if live.turns >= lim.max_turns or used >= lim.max_total_tokens:
                    return self._finish(s, k, live, SampleStatus.TRUNCATED)
                live.turn_start = len(s.response_ids)
            left = min(runner.sampling.max_new_tokens - (len(s.response_ids) - live.turn_start),
                       lim.max_total_tokens - used)
            if left > 0:
                out = await runner.continue_sample(s, key, left)
                merge_output(s, out, runner.decode)
                s.status = SampleStatus.ABORTED  # until the episode ends
                if out.finish_reason == SampleStatus.ABORTED:
                    return  # resumed by the next run, from these tokens
            action = s.response_ids[live.turn_start:]
            live.turn_start = None
            live.turns += 1
            try:
                obs, reward, done, live.info = live.env.step(list(action))
            except Exception as exc:  # noqa: BLE001 - an environment bug ends this episode, never the batch
                self._failed("step", exc)
                return self._finish(s, k, live, SampleStatus.COMPLETED, env_error=True)
            live.reward += float(reward)
            if done:
                return self._finish(s, k, live, SampleStatus.COMPLETED)
            obs = list(obs)[:max(0, lim.max_total_tokens - len(s.prompt_ids) - len(s.response_ids))]
            version = s.weight_versions[-1] if s.weight_versions else -1
            s.response_ids += obs
            s.rollout_logprobs += [0.0] * len(obs)
            s.loss_mask += [0] * len(obs)
            s.weight_versions += [version] * len(obs)  # not sampled: the version of the turn before

    def _failed(self, where: str, exc: Exception) -> None:
        self.env_errors += 1
        self.log(f"[episode] the environment's {where} raised {type(exc).__name__}: {exc}; the episode ends with "
                 "the failure reward")

    def _finish(self, s: Sample, k: tuple, live: _Live, status: SampleStatus, env_error: bool = False) -> None:
        self._live.pop(k, None)
        s.status = status
        numeric = {key: float(v) for key, v in live.info.items() if isinstance(v, (int, float))}
        s.metadata["episode"] = {**numeric, "reward": live.reward, "turns": float(live.turns),
                                 "env_error": float(env_error)}
        s.metadata["episode_info"] = dict(live.info)


def episode_reward(sample: Sample) -> dict[str, float]:
    """The reward function of episode tasks: what the episode's environment paid (see the module docstring)."""
    episode = sample.metadata.get("episode")
    if episode is None:
        raise ValueError(f"sample {sample.group_id}/{sample.index} has no episode (was it played by MultiTurn?)")
    if episode.get("env_error"):
        raise RuntimeError("the environment failed during this episode")
    return dict(episode)


async def play(engine, groups: list[list[Sample]], episode: Episode, sampling, base_seed: int = 0, step: int = 0,
               decode=None) -> list[list[Sample]]:
    """Play every group to the end with `episode` (evaluation, tests); an interrupted turn is continued."""
    from rollout.strategies import GroupRunner

    runner = GroupRunner(engine, sampling, base_seed=base_seed, step=step, decode=decode)

    async def one(group: list[Sample]) -> None:
        while any(s.status == SampleStatus.ABORTED for s in group):
            await episode.run(runner, group)

    await asyncio.gather(*(one(g) for g in groups))
    return groups

