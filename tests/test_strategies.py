"""Generation strategies: groups, over-sampling with DAPO's dynamic filter, partial rollout."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from rollout.engine import EmbeddedEngine
from rollout.groups import new_group
from rollout.strategies import GroupRunner
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
