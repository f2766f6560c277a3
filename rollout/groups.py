"""Group generation: n samples per prompt, as GRPO/RLOO/DAPO need them together.

Seeds are derived from (base seed, step, prompt, sample index), so a rollout is
reproducible whatever the batch composition or engine count.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Protocol, Sequence

from slime_rl.protocols import RolloutEngine
from slime_rl.types import GenerateRequest, Sample, SamplingParams


class PromptLike(Protocol):
    prompt_ids: list[int]
    prompt_text: str
    label: Any
    metadata: dict


def request_seed(base_seed: int, step: int, group: int, index: int) -> int:
    """A deterministic 31-bit seed per sample."""
    h = (base_seed * 1_000_003 + step) * 1_000_033 + group
    return (h * 1_000_037 + index) % (2**31 - 1)


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
    requests = []
    for g, p in enumerate(prompts):
        for i in range(n):
            seed = request_seed(base_seed, step, g, i) if sampling.temperature > 0 else None
            requests.append(GenerateRequest(list(p.prompt_ids), replace(sampling, seed=seed), rid=f"{step}-{g}-{i}"))
    outputs = engine.generate(requests)
    groups: list[list[Sample]] = []
    for g, p in enumerate(prompts):
        group = []
        for i in range(n):
            out = outputs[g * n + i]
            group.append(Sample(
                prompt_ids=list(p.prompt_ids),
                response_ids=list(out.output_ids),
                rollout_logprobs=list(out.output_logprobs),
                loss_mask=[1] * len(out.output_ids),
                status=out.finish_reason,
                group_id=g,
                index=i,
                weight_versions=[out.weight_version] * len(out.output_ids),
                prompt_text=p.prompt_text,
                response_text=decode(out.output_ids) if decode else "",
                label=p.label,
                metadata=dict(p.metadata),
            ))
        groups.append(group)
    return groups
