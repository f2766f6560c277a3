"""Multi-turn episodes token-in / token-out on the embedded engine: the trajectory is exactly what the engine
saw and produced, environment tokens carry no loss, and the trainer reproduces the engine's logprobs."""

from __future__ import annotations

import asyncio

import pytest

from rollout.engine import EmbeddedEngine
from rollout.episodes import EpisodeLimits, run_episode
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


@pytest.fixture(scope="module")
def engine():
    weights = init_tiny_model(CFG, seed=1)
    eng = EmbeddedEngine(CFG, weights, max_batch_size=8)
    yield eng, weights
    eng.close()


def test_an_episode_is_exactly_the_engines_tokens_with_environment_tokens_masked(engine):
    eng, weights = engine
    rec, env = Recording(eng), Echo(turns=3)
    sample = Sample(prompt_ids=[1, 2, 3, 4])
    stats = asyncio.run(run_episode(rec, sample, env, SamplingParams(temperature=1.0, max_new_tokens=5),
                                    EpisodeLimits(max_turns=6, max_total_tokens=200), seed=7))
    assert stats.turns == 3 and stats.done and sample.status == SampleStatus.COMPLETED
    assert sample.reward["reward"] == 3.0 and sample.prompt_ids == [1, 2, 3, 4, 30, 31]
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
    sample = Sample(prompt_ids=[1, 2, 3])
    stats = asyncio.run(run_episode(eng, sample, Echo(turns=99), SamplingParams(temperature=1.0, max_new_tokens=4),
                                    EpisodeLimits(max_turns=2, max_total_tokens=100), seed=1))
    assert stats.turns == 2 and not stats.done and sample.status == SampleStatus.TRUNCATED
    small = Sample(prompt_ids=[1, 2, 3])
    asyncio.run(run_episode(eng, small, Echo(turns=99), SamplingParams(temperature=1.0, max_new_tokens=4),
                            EpisodeLimits(max_turns=50, max_total_tokens=14), seed=1))
    assert len(small.prompt_ids) + len(small.response_ids) <= 14
    assert len(small.response_ids) == len(small.loss_mask) == len(small.rollout_logprobs) == len(small.weight_versions)
