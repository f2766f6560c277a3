"""Group generation: n samples per prompt, as GRPO/RLOO/DAPO need them together.

A sample is built by `new_group`, asked for by `resume_request` (from its
tokens so far: none for a fresh sample) and grown by `merge_output`; the
async strategies in rollout/strategies.py use the same three.

Seeds are derived from (base seed, step, prompt, sample index), so a rollout is
reproducible whatever the batch composition or engine count.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable, Protocol, Sequence

from slime_rl.protocols import RolloutEngine
from slime_rl.types import GenerateOutput, GenerateRequest, Sample, SampleStatus, SamplingParams


class PromptLike(Protocol):
    prompt_ids: list[int]
    prompt_text: str
    label: Any
    metadata: dict


def request_seed(base_seed: int, step: int, group: int, index: int) -> int:
    """A deterministic 31-bit seed per sample."""
    h = (base_seed * 1_000_003 + step) * 1_000_033 + group
    return (h * 1_000_037 + index) % (2**31 - 1)


def new_group(prompt: Any, group_id: int, n: int) -> list[Sample]:
    """Empty samples for one prompt (`prompt` has prompt_ids, prompt_text, label, metadata)."""
    return [Sample(prompt_ids=list(prompt.prompt_ids), group_id=group_id, index=i, prompt_text=prompt.prompt_text,
                   label=prompt.label, metadata=dict(prompt.metadata), status=SampleStatus.ABORTED)
            for i in range(n)]


def settled_status(s: Sample, sampling: SamplingParams) -> SampleStatus | None:
    """The status an interrupted sample has already earned, so it must not be continued: COMPLETED when it
    ends in a stop token (an abort that raced its EOS), TRUNCATED when it holds its whole token budget;
    None when it should be resumed."""
    n = len(s.response_ids)
    if n and n >= sampling.min_new_tokens and s.response_ids[-1] in sampling.stop_token_ids:
        return SampleStatus.COMPLETED
    if n >= sampling.max_new_tokens:
        return SampleStatus.TRUNCATED
    return None


def resume_request(s: Sample, sampling: SamplingParams, seed: int | None, rid: str) -> GenerateRequest:
    """The request that continues `s` from its tokens so far (a fresh sample: no tokens yet); its budget is
    what `sampling.max_new_tokens` leaves (0 when spent: the engine then adds no token)."""
    left = sampling.max_new_tokens - len(s.response_ids)
    return GenerateRequest(s.prompt_ids + s.response_ids,
                           replace(sampling, max_new_tokens=max(left, 0), seed=seed,
                                   min_new_tokens=max(0, sampling.min_new_tokens - len(s.response_ids))), rid=rid)


def merge_output(s: Sample, out: GenerateOutput, decode: Callable[[list[int]], str] | None) -> None:
    s.response_ids += out.output_ids
    s.rollout_logprobs += out.output_logprobs
    s.loss_mask += [1] * len(out.output_ids)
    s.weight_versions += out.output_versions or [out.weight_version] * len(out.output_ids)
    s.status = out.finish_reason or SampleStatus.ABORTED
    if decode is not None:
        s.response_text = decode(s.response_ids)


def generate_groups(
    engine: RolloutEngine,
    prompts: Sequence[PromptLike],
    n: int,
    sampling: SamplingParams,
    base_seed: int = 0,
    step: int = 0,
    decode=None,
) -> list[list[Sample]]:
    """Generate `n` samples for each prompt; one engine call for the whole set.

    `decode(ids) -> str` fills `response_text` (token ids stay the source of truth).
    """
    groups = [new_group(p, g, n) for g, p in enumerate(prompts)]
    samples = [s for group in groups for s in group]
    requests = [
        resume_request(s, sampling, request_seed(base_seed, step, s.group_id, s.index)
                       if sampling.temperature > 0 else None, rid=f"{step}-{s.group_id}-{s.index}")
        for s in samples
    ]
    for s, out in zip(samples, engine.generate(requests)):
        merge_output(s, out, decode)
    return groups
