"""Multi-turn episodes token-in / token-out on the embedded engine: the trajectory is exactly what the engine
saw and produced, environment tokens carry no loss, and the trainer reproduces the engine's logprobs."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest

from rollout.engine import EmbeddedEngine
from rollout.episodes import EpisodeLimits, MultiTurn, episode_reward, play
from rollout.groups import new_group
from slime_rl import algorithms
from slime_rl.hf_io import init_tiny_model, tiny_hf_config
from slime_rl.types import Sample, SampleStatus, SamplingParams
from training.hf import HFTrainer, OptimSettings

CFG = tiny_hf_config("qwen2", vocab_size=48, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                     intermediate_size=64)


class Echo:
    """A token-level environment: replies [40, 41] + the model's first token, ends after `turns` turns."""

    def __init__(self, turns: int = 3):
        self.turns, self.seen = turns, []

    def reset(self, sample):
        return [30, 31]

    def step(self, action_ids):
        self.seen.append(list(action_ids))
        done = len(self.seen) >= self.turns
        return [40, 41] + action_ids[:1], 1.0, done, {"turn": len(self.seen)}


class Recording:
    """The engine, with every request's input ids and every output's ids written down."""

    def __init__(self, engine):
        self.engine, self.calls = engine, []

    async def agenerate(self, requests):
        outs = await self.engine.agenerate(requests)
        self.calls += [(list(r.input_ids), list(o.output_ids)) for r, o in zip(requests, outs)]
        return outs


class Interrupting(Recording):
    """Cuts the `at`-th request short after 2 tokens and reports it aborted, as a weight push would."""

    def __init__(self, engine, at: int):
        super().__init__(engine)
        self.at, self.n = at, 0

    async def agenerate(self, requests):
        self.n += 1
        outs = await super().agenerate(requests)
        if self.n == self.at:
            outs = [replace(o, output_ids=o.output_ids[:2], output_logprobs=o.output_logprobs[:2],
                            output_versions=(o.output_versions or [])[:2], finish_reason=SampleStatus.ABORTED)
                    for o in outs]
            self.calls[-1] = (self.calls[-1][0], outs[0].output_ids)
        return outs


class Prompt:
    def __init__(self, ids, label=None):
        self.prompt_ids, self.prompt_text, self.label, self.metadata = ids, "", label, {}


def play_one(engine, env, sampling, limits, prompt=(1, 2, 3, 4), n=1):
    """One group of `n` episodes of `env` (the same environment object for each: n=1 unless it is stateless)."""
    episode = MultiTurn(lambda s: env, limits)
    (group,) = asyncio.run(play(engine, [new_group(Prompt(list(prompt)), 0, n)], episode, sampling, base_seed=7))
    return group, episode


@pytest.fixture(scope="module")
def engine():
    weights = init_tiny_model(CFG, seed=1)
    eng = EmbeddedEngine(CFG, weights, max_batch_size=8)
    yield eng, weights
    eng.close()


def test_an_episode_is_exactly_the_engines_tokens_with_environment_tokens_masked(engine):
    eng, weights = engine
    rec, env = Recording(eng), Echo(turns=3)
    (sample,), _ = play_one(rec, env, SamplingParams(temperature=1.0, max_new_tokens=5),
                            EpisodeLimits(max_turns=6, max_total_tokens=200))
    assert sample.status == SampleStatus.COMPLETED and sample.metadata["episode"]["turns"] == 3
    assert episode_reward(sample)["reward"] == 3.0 and sample.prompt_ids == [1, 2, 3, 4, 30, 31]
    full = sample.prompt_ids + sample.response_ids
    for input_ids, output_ids in rec.calls:  # each turn saw a prefix of the trajectory and grew it by its output
        assert full[: len(input_ids) + len(output_ids)] == input_ids + output_ids
    assert rec.calls[-1][0] + rec.calls[-1][1] == full  # the episode ends with the last model turn
    model = [t for _, out in rec.calls for t in out]
    assert [t for t, m in zip(sample.response_ids, sample.loss_mask) if m] == model
    assert env.seen == [out for _, out in rec.calls]
    env_positions = [i for i, m in enumerate(sample.loss_mask) if m == 0]
    assert len(env_positions) == 2 * 3 and all(sample.rollout_logprobs[i] == 0.0 for i in env_positions)

    # the trainer reproduces the engine's logprobs on model tokens; environment tokens weigh nothing in the loss
    batch = algorithms.build_train_batch([sample], [1.0], pad_id=0)
    trainer = HFTrainer(CFG, weights, OptimSettings())
    lp = trainer.logprobs(batch)
    mask = batch.response_mask_BT > 0
    assert (lp[mask] - batch.rollout_logprobs_BT[mask]).abs().max() < 1e-4
    P = len(sample.prompt_ids)
    for i in env_positions:
        assert batch.response_mask_BT[0, P + i] == 0 and batch.loss_weights_BT[0, P + i] == 0


def test_limits_end_an_episode_and_cut_observations(engine):
    eng, _ = engine
    sampling = SamplingParams(temperature=1.0, max_new_tokens=4)
    (sample,), _ = play_one(eng, Echo(turns=99), sampling, EpisodeLimits(max_turns=2, max_total_tokens=100))
    assert sample.metadata["episode"]["turns"] == 2 and sample.status == SampleStatus.TRUNCATED
    (small,), _ = play_one(eng, Echo(turns=99), sampling, EpisodeLimits(max_turns=50, max_total_tokens=14),
                           prompt=(1, 2, 3))
    assert len(small.prompt_ids) + len(small.response_ids) <= 14
    assert len(small.response_ids) == len(small.loss_mask) == len(small.rollout_logprobs) == len(small.weight_versions)


def test_an_interrupted_turn_resumes_from_its_tokens_and_is_one_action(engine):
    eng, _ = engine
    sampling = SamplingParams(temperature=1.0, max_new_tokens=5, stop_token_ids=[])
    limits = EpisodeLimits(max_turns=6, max_total_tokens=200)
    whole_env, cut_env = Echo(turns=3), Echo(turns=3)
    (whole,), _ = play_one(Recording(eng), whole_env, sampling, limits)
    cut_engine = Interrupting(eng, at=2)  # the second turn is cut after 2 tokens, then continued
    (cut,), _ = play_one(cut_engine, cut_env, sampling, limits)
    assert cut.status == SampleStatus.COMPLETED and len(cut_engine.calls) == 4
    assert [len(a) for a in cut_env.seen] == [5, 5, 5]  # the continued turn reached the env as one action
    assert cut_engine.calls[2][0] == cut.prompt_ids + cut.response_ids[:len(cut_engine.calls[2][0]) - len(cut.prompt_ids)]
    assert len(cut.response_ids) == len(whole.response_ids) and cut.loss_mask == whole.loss_mask


class Exploding(Echo):
    def step(self, action_ids):
        raise RuntimeError("simulator bug")


def test_an_environment_that_raises_ends_its_episode_with_an_error_not_the_run(engine):
    eng, _ = engine
    logs = []
    episode = MultiTurn(lambda s: Exploding(), EpisodeLimits(), log=logs.append)
    (group,) = asyncio.run(play(eng, [new_group(Prompt([1, 2]), 0, 2)], episode,
                                SamplingParams(temperature=1.0, max_new_tokens=3)))
    assert all(s.status == SampleStatus.COMPLETED and s.metadata["episode"]["env_error"] == 1 for s in group)
    assert episode.env_errors == 2 and "simulator bug" in logs[0]
    with pytest.raises(RuntimeError, match="environment failed"):
        episode_reward(group[0])


def test_groups_play_n_episodes_each_with_its_own_environment(engine):
    eng, _ = engine
    envs = []

    def make(sample):
        envs.append(Echo(turns=2))
        return envs[-1]

    episode = MultiTurn(make, EpisodeLimits())
    groups = [new_group(Prompt([1, 2, g + 3]), g, 3) for g in range(2)]
    asyncio.run(play(eng, groups, episode, SamplingParams(temperature=1.0, max_new_tokens=3), base_seed=1))
    assert len(envs) == 6 and all(len(e.seen) == 2 for e in envs)
    assert all(s.status == SampleStatus.COMPLETED for g in groups for s in g)
    assert not episode._live  # nothing kept once every episode ended
