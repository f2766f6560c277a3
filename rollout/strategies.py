"""Generation strategies over any engine with `agenerate` (embedded or HTTP client).

- Groups: the `n` samples of one prompt go out together, with one routing key
  (`X-SMG-Routing-Key` through an `EngineClient`) so a router keeps them on one
  worker, where they share the prompt's KV.
- Over-sampling with a dynamic filter (DAPO): launch more groups than a batch
  needs; score each group as it completes; keep it only if `keep(group)` (by
  default: its rewards are not all equal, i.e. it carries a learning signal);
  launch more while the batch is short; once it is full, abort what is still
  running.
- Partial rollout: samples cut off by that abort (or by a weight update)
  keep their tokens, logprobs and the weight version of every token; they wait
  in a `PartialBuffer` and resume from their tokens in the next collection,
  under whatever weights the engine serves then.
"""

from __future__ import annotations

import asyncio
import inspect
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Iterator

from rollout.groups import merge_output, new_group, request_seed, resume_request
from slime_rl.types import GenerateOutput, GenerateRequest, Sample, SampleStatus, SamplingParams


def _unfinished(group: list[Sample]) -> list[Sample]:
    return [s for s in group if s.status == SampleStatus.ABORTED]


async def agenerate_keyed(engine, requests: list[GenerateRequest], routing_keys: list[str]) -> list[GenerateOutput]:
    """`engine.agenerate`, with a routing key per request where the engine takes them (a router client)."""
    if "routing_keys" in inspect.signature(engine.agenerate).parameters:
        return await engine.agenerate(requests, routing_keys=routing_keys)
    return await engine.agenerate(requests)


async def _abort(engine, rid: str) -> None:
    if hasattr(engine, "aabort"):
        await engine.aabort(rid)
    else:
        engine.abort(rid)


@dataclass
class GroupRunner:
    """Runs groups on one engine with reproducible seeds and rids."""

    engine: Any
    sampling: SamplingParams
    base_seed: int = 0
    step: int = 0
    decode: Callable[[list[int]], str] | None = None
    _inflight: dict[str, Sample] = field(default_factory=dict)

    def _seed(self, s: Sample) -> int | None:
        if self.sampling.temperature == 0:
            return None
        return request_seed(self.base_seed, self.step, s.group_id, s.index) + len(s.response_ids)

    def requests(self, group: list[Sample]) -> tuple[list[Sample], list[GenerateRequest], str]:
        """The unfinished samples of `group`, a request continuing each, and the group's routing key."""
        todo = _unfinished(group)
        rids = [f"{self.step}-{s.group_id}-{s.index}-{len(s.response_ids)}" for s in todo]
        reqs = [resume_request(s, self.sampling, self._seed(s), rid) for s, rid in zip(todo, rids)]
        return todo, reqs, f"group-{self.step}-{group[0].group_id}"

    async def run(self, group: list[Sample]) -> list[Sample]:
        """Generate every unfinished sample of `group` (in place); returns the group."""
        todo, reqs, key = self.requests(group)
        if not todo:
            return group
        self._inflight.update((r.rid, s) for r, s in zip(reqs, todo))
        try:
            outs = await agenerate_keyed(self.engine, reqs, [key] * len(reqs))
        finally:
            for r in reqs:
                self._inflight.pop(r.rid, None)
        for s, out in zip(todo, outs):
            merge_output(s, out, self.decode)
        return group

    async def abort_all(self) -> None:
        for rid in list(self._inflight):
            await _abort(self.engine, rid)


class PartialBuffer:
    """Groups interrupted mid-generation, waiting to resume (oldest first)."""

    def __init__(self):
        self._groups: list[list[Sample]] = []

    def __len__(self) -> int:
        return len(self._groups)

    def put(self, group: list[Sample]) -> None:
        self._groups.append(group)

    def take(self) -> list[Sample] | None:
        return self._groups.pop(0) if self._groups else None


def has_signal(group: list[Sample]) -> bool:
    """DAPO's dynamic-sampling filter: keep groups whose rewards are not all equal."""
    rewards = [s.scalar_reward for s in group]
    return max(rewards) > min(rewards)


@dataclass
class CollectStats:
    launched: int = 0
    kept: int = 0
    filtered: int = 0
    aborted: int = 0
    resumed: int = 0


async def collect_groups(
    runner: GroupRunner,
    prompts: Iterator[Any],
    n: int,
    target: int,
    score: Callable[[list[Sample]], Awaitable[None] | None],
    keep: Callable[[list[Sample]], bool] | None = has_signal,
    over_sampling: float = 1.0,
    max_groups: int | None = None,
    buffer: PartialBuffer | None = None,
) -> tuple[list[list[Sample]], CollectStats]:
    """Collect `target` scored groups that pass `keep` (None keeps all).

    Starts ceil(target * over_sampling) groups (resumed groups from `buffer`
    first), then one more each time a group is filtered out, up to
    `max_groups` launched in all. When `target` groups are kept, running
    groups are aborted: with a `buffer` they go into it to resume later,
    otherwise they are dropped. Groups ids must be unique across calls
    (`prompts` yields (group_id, prompt)).
    """
    stats = CollectStats()
    kept: list[list[Sample]] = []
    tasks: dict[asyncio.Task, list[Sample]] = {}
    limit = max_groups if max_groups is not None else 10 * target

    def launch() -> bool:
        group = buffer.take() if buffer is not None and len(buffer) else None
        if group is not None:
            stats.resumed += 1
        else:
            nxt = next(prompts, None)
            if nxt is None or stats.launched >= limit:
                return False
            group = new_group(nxt[1], nxt[0], n)
        stats.launched += 1
        tasks[asyncio.ensure_future(runner.run(group))] = group
        return True

    for _ in range(max(target, -(-int(target * over_sampling * 1000) // 1000))):
        if not launch():
            break
    while tasks and len(kept) < target:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            group = tasks.pop(task)
            task.result()
            if len(kept) >= target:  # finished after the batch filled up: keep for later
                (buffer.put(group) if buffer is not None else None)
                continue
            maybe = score(group)
            if inspect.isawaitable(maybe):
                await maybe
            if keep is None or keep(group):
                kept.append(group)
            else:
                stats.filtered += 1
                launch()
    if tasks:  # the batch is full: interrupt the rest
        await runner.abort_all()
        for task, group in tasks.items():
            await task
            stats.aborted += 1
            if buffer is not None:
                buffer.put(group)
    stats.kept = len(kept)
    return kept, stats
