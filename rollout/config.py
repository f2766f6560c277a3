"""The rollout side's typed configuration (composed into `slime_rl.config.JobConfig` as `rollout`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class RolloutConfig:
    """Generation side: engine choice and sampling."""

    num_inferencers: int = 1
    prompts_per_step: int = 32
    n_samples_per_prompt: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_new_tokens: int = 24
    max_batch_size: int = 256  # most requests decoding at once (continuous batching)
    num_threads: int | None = None  # torch threads of each engine's process; None = a plan that fits the cores
    seed: int = 0
    # embedded engine KV cache: a paged pool shared through a radix (prefix) tree
    max_total_tokens: int | None = None  # KV pool size in tokens; None = from kv_cache_mb
    kv_cache_mb: float = 256.0
    page_size: int = 1
    enable_prefix_cache: bool = True
    # SGLang servers: engine arguments passed through (`--key value`; true = a bare flag)
    sglang_args: dict[str, Any] = field(default_factory=dict)
    # external engines: SGLang-protocol servers already running (empty = the embedded engine in this process)
    engine_urls: list[str] = field(default_factory=list)  # every engine (weights are synced to each)
    router_url: str | None = None  # generate through this router; None = a built-in router over engine_urls
    api_key: str | None = None  # for the engines' control endpoints
    # fault tolerance (engines we launched: Ray actors): health probes, restart + re-sync of a dead engine
    health_check_s: float = 1.0  # seconds between /health probes of every engine (0 = off)
    health_timeout_s: float = 5.0  # a probe unanswered this long counts as a failure (a hung engine)
    max_engine_restarts: int = 3  # per engine over the job; past it the engine stays out of routing
