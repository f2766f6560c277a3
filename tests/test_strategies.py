"""Generation strategies: groups, over-sampling with DAPO's dynamic filter, partial rollout."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from rollout.engine import EmbeddedEngine
from rollout.strategies import GroupRunner, PartialBuffer, collect_groups, has_signal, new_group
from slime_rl.hf_io import init_tiny_model, tiny_hf_config
from slime_rl.types import SampleStatus, SamplingParams


@pytest.fixture(scope="module")
def engine():
    cfg = tiny_hf_config(vocab_size=64, max_position_embeddings=256)
    eng = EmbeddedEngine(cfg, init_tiny_model(cfg, seed=0), max_batch_size=64)
    yield eng
    eng.close()


def prompts(start: int = 0):
    for g in range(start, start + 1000):
        yield g, SimpleNamespace(prompt_ids=[1 + g % 50, 2, 3 + g % 7], prompt_text=f"p{g}", label=None, metadata={})


def parity_reward(group):
    for s in group:  # a reward that varies within some groups and not in others
        s.reward = float(s.response_ids[0] % 2) if s.response_ids else 0.0


def test_group_runner_is_reproducible(engine):
    sp = SamplingParams(max_new_tokens=6)
    a = asyncio.run(GroupRunner(engine, sp, base_seed=1, step=2).run(new_group(next(prompts())[1], 0, 4)))
    b = asyncio.run(GroupRunner(engine, sp, base_seed=1, step=2).run(new_group(next(prompts())[1], 0, 4)))
    assert [s.response_ids for s in a] == [s.response_ids for s in b]
    assert len({tuple(s.response_ids) for s in a}) > 1  # the samples of a group differ
    assert all(s.status == SampleStatus.TRUNCATED and len(s.weight_versions) == 6 for s in a)


def test_dynamic_filter_keeps_only_groups_with_signal(engine):
    runner = GroupRunner(engine, SamplingParams(max_new_tokens=4), base_seed=3)
    kept, stats = asyncio.run(collect_groups(runner, prompts(), n=4, target=6, score=parity_reward,
                                             over_sampling=1.5))
    assert len(kept) == 6 and all(has_signal(g) for g in kept)
    assert stats.filtered > 0 and stats.launched >= 6 + stats.filtered  # filtered groups were replaced
    assert stats.kept == 6


def test_full_batch_aborts_the_rest_and_partial_rollouts_resume():
    cfg = tiny_hf_config(vocab_size=64, max_position_embeddings=256)
    engine = EmbeddedEngine(cfg, init_tiny_model(cfg, seed=0), max_batch_size=4)  # 2 groups run, the rest queue
    sp = SamplingParams(max_new_tokens=60)
    buffer = PartialBuffer()
    runner = GroupRunner(engine, sp, base_seed=5, step=0)
    kept, stats = asyncio.run(collect_groups(runner, prompts(), n=2, target=2, score=parity_reward, keep=None,
                                             over_sampling=12, buffer=buffer))
    assert len(kept) == 2 and stats.aborted > 0 and len(buffer) >= stats.aborted
    partial = [s for g in buffer._groups for s in g if s.status == SampleStatus.ABORTED]
    assert partial, "some samples were cut off mid-generation"
    before = {(s.group_id, s.index): list(s.response_ids) for s in partial}

    engine.update_weights_from_tensors([], weight_version=1)  # new policy version for the resumed tokens
    runner2 = GroupRunner(engine, sp, base_seed=5, step=1)
    kept2, stats2 = asyncio.run(collect_groups(runner2, prompts(5000), n=2, target=len(buffer), score=parity_reward,
                                               keep=None, buffer=buffer))
    assert stats2.resumed > 0
    resumed = [s for g in kept2 for s in g if (s.group_id, s.index) in before]
    assert resumed
    for s in resumed:
        old = before[(s.group_id, s.index)]
        assert s.response_ids[: len(old)] == old  # continues from its own tokens
        assert len(s.response_ids) == 60 and s.status == SampleStatus.TRUNCATED
        assert s.weight_versions[: len(old)] == [0] * len(old)
        if len(old) < 60:
            assert s.weight_versions[len(old):] == [1] * (60 - len(old))
        assert len(s.rollout_logprobs) == len(s.response_ids) == len(s.loss_mask)
    engine.close()
