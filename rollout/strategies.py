"""Generation strategies over any engine with `agenerate` (embedded or HTTP client).

- Groups: the `n` samples of one prompt go out together, with one routing key
  (`X-SMG-Routing-Key` through an `EngineClient`) so a router keeps them on one
  worker, where they share the prompt's KV.
- Dynamic sampling (DAPO) is the loop's: `slime_rl.producer.DynamicSampling`.
- Partial rollout: samples cut off by an abort (or a weight update) keep their
  tokens, logprobs and the weight version of every token, and resume from them
  (`slime_rl.producer.AsyncRollout`).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, replace
from typing import Any, Callable

from rollout.groups import merge_output, request_seed, resume_request, settled_status
from slime_rl.types import GenerateOutput, GenerateRequest, Sample, SampleStatus, SamplingParams


def _unfinished(group: list[Sample]) -> list[Sample]:
    return [s for s in group if s.status == SampleStatus.ABORTED]


async def agenerate_keyed(engine, requests: list[GenerateRequest], routing_keys: list[str]) -> list[GenerateOutput]:
    """`engine.agenerate`, with a routing key per request where the engine takes them (a router client)."""
    if "routing_keys" in inspect.signature(engine.agenerate).parameters:
        return await engine.agenerate(requests, routing_keys=routing_keys)
    return await engine.agenerate(requests)


@dataclass
class GroupRunner:
    """Runs groups on one engine with reproducible seeds and rids."""

    engine: Any
    sampling: SamplingParams
    base_seed: int = 0
    step: int = 0
    decode: Callable[[list[int]], str] | None = None

    def _rid(self, s: Sample) -> str:
        """Unique per request: the sample and how far it got (a continuation is a new request)."""
        return f"{self.step}-{s.group_id}-{s.index}-{len(s.response_ids)}"

    def _seed(self, s: Sample) -> int | None:
        if self.sampling.temperature == 0:
            return None
        seed = request_seed(self.base_seed, self.step, s.group_id, s.index)
        # a continuation draws a stream of its own: seed + n would be the next sample's seed (its uniforms)
        return request_seed(seed, len(s.response_ids), 0, 0) if s.response_ids else seed

    def requests(self, group: list[Sample]) -> tuple[list[Sample], list[GenerateRequest], str]:
        """The unfinished samples of `group`, a request continuing each, and the group's routing key. An
        interrupted sample that already ended (its stop token, its whole budget) is settled, not continued."""
        for s in _unfinished(group):
            s.status = settled_status(s, self.sampling) or s.status
        todo = _unfinished(group)
        reqs = [resume_request(s, self.sampling, self._seed(s), self._rid(s)) for s in todo]
        return todo, reqs, f"group-{self.step}-{group[0].group_id}"

    async def run(self, group: list[Sample]) -> list[Sample]:
        """Generate every unfinished sample of `group` (in place); returns the group."""
        todo, reqs, key = self.requests(group)
        if not todo:
            return group
        outs = await agenerate_keyed(self.engine, reqs, [key] * len(reqs))
        for s, out in zip(todo, outs):
            merge_output(s, out, self.decode)
        return group

    async def continue_sample(self, s: Sample, routing_key: str, max_new_tokens: int) -> GenerateOutput:
        """One more generation for `s` from its tokens so far (a turn of a multi-turn episode)."""
        sampling = replace(self.sampling, max_new_tokens=max_new_tokens, min_new_tokens=0, seed=self._seed(s))
        (out,) = await agenerate_keyed(self.engine, [GenerateRequest(s.prompt_ids + s.response_ids, sampling,
                                                                     rid=self._rid(s))], [routing_key])
        return out
