"""Multi-turn episodes through a router over two `slime_rl serve` engines: every turn of an episode lands on
the engine its group's routing key stuck to, and each later turn finds the conversation so far in that
engine's radix cache (`meta_info.cached_tokens`).

Which engine served a turn is read from the answer itself: each server gets its own weight version
(`/update_weight_version`), which every `/generate` answer reports as `meta_info.weight_version`. The
built-in router runs `round_robin`, so the first request of each new routing key goes to the next worker:
four groups put exactly two keys on each engine whatever order their first turns arrive in.
"""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest

from rollout.builtin_router import BuiltinRouter
from rollout.client import EngineClient
from rollout.episodes import EpisodeLimits, MultiTurn, play
from rollout.groups import new_group
from rollout.router import start_router
from server_procs import START_TIMEOUT_S, ServerProc, launch_versioned
from slime_rl.hf_io import init_tiny_model, save_hf_checkpoint, tiny_hf_config
from slime_rl.tokenizer import CharTokenizer
from slime_rl.types import SampleStatus, SamplingParams

VOCAB = CharTokenizer().vocab_size
TURNS = 3
GROUPS, N = 4, 2
SAMPLING = SamplingParams(temperature=1.0, max_new_tokens=5)
LIMITS = EpisodeLimits(max_turns=TURNS, max_total_tokens=200)


class Echo:
    """Token-level environment: the reset differs per sample (so trajectories never coincide), each
    observation is [40, 41] + the model's first token; the episode ends after TURNS turns."""

    def __init__(self, sample):
        self.index, self.turns = sample.index, 0

    def reset(self, sample):
        return [30 + self.index, 31]

    def step(self, action_ids):
        self.turns += 1
        return [40, 41] + list(action_ids[:1]), 1.0, self.turns >= TURNS, {}


class Prompt:
    def __init__(self, ids):
        self.prompt_ids, self.prompt_text, self.label, self.metadata = list(ids), "", None, {}


class Recording:
    """An EngineClient that writes down every request it sends: (rid, routing key, input ids, output)."""

    def __init__(self, client: EngineClient, keyed: bool = True):
        self.client, self.calls = client, []
        if not keyed:  # no `routing_keys` parameter: agenerate_keyed sends the turns without a key
            self.agenerate = self._agenerate_unkeyed

    async def agenerate(self, requests, routing_keys=None):
        outs = await self.client.agenerate(requests, routing_keys=routing_keys)
        self.calls += [(r.rid, k, list(r.input_ids), o) for r, k, o in zip(requests, routing_keys, outs)]
        return outs

    async def _agenerate_unkeyed(self, requests):
        outs = await self.client.agenerate(requests)
        self.calls += [(r.rid, None, list(r.input_ids), o) for r, o in zip(requests, outs)]
        return outs


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Two `slime_rl serve` engines (weight versions 1 and 2) behind a round-robin built-in router."""
    config = tiny_hf_config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                            num_kv_heads=1, max_position_embeddings=512)
    model_dir = tmp_path_factory.mktemp("episodes_serve_model")
    save_hf_checkpoint(model_dir, config, init_tiny_model(config, seed=0), tokenizer=CharTokenizer())
    log_dir = tmp_path_factory.mktemp("episodes_serve_logs")
    servers: dict[str, ServerProc] = {}
    router = None
    try:
        launch_versioned(("a", "b"), model_dir, log_dir, servers)
        router = start_router([s.url for s in servers.values()], policy="round_robin", prefer="builtin",
                              start_timeout_s=START_TIMEOUT_S)
        assert isinstance(router, BuiltinRouter)
        yield router, {s.version: s.name for s in servers.values()}
    finally:
        if router is not None:
            router.stop()
        for server in servers.values():
            server.stop()


def play_through(router, groups, keyed: bool = True) -> Recording:
    engine = Recording(EngineClient(router.url, max_retries=0), keyed=keyed)

    async def run() -> None:
        async with engine.client:
            await play(engine, groups, MultiTurn(Echo, LIMITS), SAMPLING, base_seed=3)

    asyncio.run(run())
    return engine


def turns_of(sample, calls):
    """The calls that played `sample`, in turn order (each asked for a prefix of its trajectory)."""
    full = sample.prompt_ids + sample.response_ids
    mine = [c for c in calls if c[0].startswith(f"0-{sample.group_id}-{sample.index}-")]
    assert all(full[:len(ids)] == ids for _, _, ids, _ in mine), "a turn's input is not a prefix of its episode"
    return sorted(mine, key=lambda c: len(c[2]))


def test_every_turn_of_an_episode_stays_on_one_engine_and_hits_its_cache(cluster):
    router, name_of = cluster
    prompts = [Prompt([5 + g, 9, 13 + g, 17, 21 + g, 25]) for g in range(GROUPS)]
    groups = [new_group(p, g, N) for g, p in enumerate(prompts)]
    rec = play_through(router, groups)

    engine_of_group = {}
    for group in groups:
        for s in group:
            assert s.status == SampleStatus.COMPLETED and s.metadata["episode"]["turns"] == TURNS
            turns = turns_of(s, rec.calls)
            assert len(turns) == TURNS
            assert {key for _, key, _, _ in turns} == {f"group-0-{s.group_id}"}  # one key for the whole group
            served = {name_of[out.weight_version] for _, _, _, out in turns}
            assert len(served) == 1, f"group {s.group_id} sample {s.index}: turns served by {served}"
            assert engine_of_group.setdefault(s.group_id, served.pop()) == name_of[turns[0][3].weight_version]
            for (_, _, prev_ids, prev_out), (_, _, ids, out) in zip(turns, turns[1:]):
                # the previous turn's input and all but its last sampled token were computed on this engine
                # and are in its radix cache; the environment's reply is new
                assert out.prompt_tokens == len(ids)
                assert len(prev_ids) + len(prev_out.output_ids) - 1 <= out.cached_tokens < len(ids), (
                    s.group_id, s.index, len(prev_ids), len(prev_out.output_ids), out.cached_tokens, len(ids))
    # both engines played: round_robin hands each new key the next worker, two keys each
    assert Counter(engine_of_group.values()) == {"a": 2, "b": 2}, engine_of_group


def test_without_routing_keys_the_turns_scatter_and_miss_the_cache(cluster):
    """The control: one episode whose turns go out without a key alternate engines under round_robin, and
    the turn that lands on the engine that has not seen the conversation finds nothing of it cached."""
    router, name_of = cluster
    (sample,) = group = new_group(Prompt([50, 51, 52, 53, 54, 55, 56]), 0, 1)  # a prompt no engine has seen
    rec = play_through(router, [group], keyed=False)
    assert sample.status == SampleStatus.COMPLETED
    turns = turns_of(sample, rec.calls)
    assert len(turns) == TURNS and all(key is None for _, key, _, _ in turns)
    served = [name_of[out.weight_version] for _, _, _, out in turns]
    assert all(x != y for x, y in zip(served, served[1:])), served  # one episode, sequential: strictly alternating
    (_, _, first_ids, _), (_, _, _, second) = turns[:2]
    assert second.cached_tokens < len(first_ids), (second.cached_tokens, len(first_ids))
