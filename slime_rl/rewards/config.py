"""The reward section of the job config, owned by the rewards package.

`reward.name` picks one reward (a registered name or "pkg.mod:fn"); `reward.weights` composes several
(`{"code": 1.0, "judge": 0.2}`, "task" naming the task's own reward), each logged as its own metric.
Rewards that need settings (a sandbox, an endpoint, a rubric) read their sub-section here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class SandboxConfig:
    """Isolation and limits of one run of model-written code (`slime_rl.sandbox`)."""

    isolation: Literal["bwrap", "rlimits"] = "bwrap"  # rlimits = no namespaces: refused unless allow_unsandboxed
    allow_unsandboxed: bool = False  # run with rlimits only when bubblewrap is missing (loudly warned)
    cpu_s: float = 2.0  # RLIMIT_CPU of the program
    wall_s: float = 5.0  # wall clock of one run, sandbox start included
    memory_mb: int = 512  # RLIMIT_AS
    max_procs: int = 16  # processes and threads the program may hold at once
    max_file_mb: int = 16  # RLIMIT_FSIZE, and the size of the writable scratch
    max_output_kb: int = 1024  # stdout + stderr kept; more kills the run
    max_parallel: int = 0  # runs at once across all samples; 0 = the CPU count


@dataclass
class CodeRewardConfig:
    """`code`: the fraction of test cases passed, or 1 only when all pass."""

    scoring: Literal["fraction", "all"] = "fraction"
    sandbox: SandboxConfig = field(default_factory=SandboxConfig)


@dataclass
class RankedListConfig:
    """`ranked_list` (ReFT): 1 for the right item first, `decay ** (rank - 1)` lower down, 0 when absent."""

    decay: float = 0.5
    max_items: int = 10  # items after these are ignored: listing everything earns nothing


@dataclass
class RemoteRewardConfig:
    """`remote_rm`: POST {"prompts", "responses", "labels"} to `url`, read {"rewards": [...]}."""

    url: str | None = None
    batch_size: int = 32
    timeout_s: float = 10.0  # per HTTP request
    retries: int = 2  # after the first attempt; backoff doubles from backoff_s
    backoff_s: float = 0.5
    max_concurrency: int = 4  # requests in flight at once
    api_key_env: str | None = None  # name of an environment variable holding a bearer token


@dataclass
class JudgeConfig:
    """`judge`: a rubric prompt sent to an OpenAI-compatible or SGLang-protocol endpoint; the score parsed."""

    url: str | None = None  # the server's base URL
    api: Literal["openai", "sglang"] = "openai"
    model: str = "default"
    rubric: str | None = None  # the template text, or a path to a file holding it; None = the built-in rubric
    score_mode: Literal["text", "logprobs"] = "text"  # parse "Score: N", or weight the digit tokens' probabilities
    min_score: float = 0.0
    max_score: float = 10.0  # scores are mapped to [0, 1]
    max_new_tokens: int = 32
    timeout_s: float = 30.0
    retries: int = 2
    backoff_s: float = 0.5
    cache_size: int = 4096  # answers kept per rendered prompt (0: no cache)
    api_key_env: str | None = None


@dataclass
class RewardConfig:
    """Reward function: a registry name or a dotted path ("pkg.mod:fn"), or a weighted sum of named rewards."""

    name: str | None = None  # None = the task's reward
    weights: dict[str, float] = field(default_factory=dict)  # name -> weight; "task" = the task's reward
    timeout_s: float = 10.0  # per sample (per batch for batched rewards)
    failure_reward: float = 0.0
    max_workers: int = 4
    code: CodeRewardConfig = field(default_factory=CodeRewardConfig)
    ranked_list: RankedListConfig = field(default_factory=RankedListConfig)
    remote: RemoteRewardConfig = field(default_factory=RemoteRewardConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)


def reward_checks(rc: RewardConfig) -> list[tuple[str, bool, str]]:
    """(field, ok, allowed) for every reward value the type cannot bound; the job's validate reports them."""
    sb, rm, j = rc.code.sandbox, rc.remote, rc.judge
    named = {rc.name, *rc.weights}
    return [
        ("reward.timeout_s", rc.timeout_s > 0, "> 0"),
        ("reward.max_workers", rc.max_workers >= 1, ">= 1"),
        ("reward.name", not (rc.name and rc.weights), "null when reward.weights is set (name them there)"),
        ("reward.weights", all(isinstance(k, str) and k.strip() for k in rc.weights), "non-empty reward names"),
        ("reward.code.sandbox.cpu_s", sb.cpu_s > 0, "> 0"),
        ("reward.code.sandbox.wall_s", sb.wall_s > 0, "> 0"),
        ("reward.code.sandbox.memory_mb", sb.memory_mb >= 16, ">= 16"),
        ("reward.code.sandbox.max_procs", sb.max_procs >= 1, ">= 1"),
        ("reward.code.sandbox.max_file_mb", sb.max_file_mb >= 1, ">= 1"),
        ("reward.code.sandbox.max_output_kb", sb.max_output_kb >= 1, ">= 1"),
        ("reward.code.sandbox.max_parallel", 0 <= sb.max_parallel <= 256, "in [0, 256] (0: the CPU count)"),
        ("reward.ranked_list.decay", 0 <= rc.ranked_list.decay <= 1, "in [0, 1]"),
        ("reward.ranked_list.max_items", rc.ranked_list.max_items >= 1, ">= 1"),
        ("reward.remote.url", "remote_rm" not in named or _is_http(rm.url), "an http(s) URL when remote_rm is used"),
        ("reward.remote.batch_size", rm.batch_size >= 1, ">= 1"),
        ("reward.remote.timeout_s", rm.timeout_s > 0, "> 0"),
        ("reward.remote.retries", rm.retries >= 0, ">= 0"),
        ("reward.remote.backoff_s", rm.backoff_s >= 0, ">= 0"),
        ("reward.remote.max_concurrency", rm.max_concurrency >= 1, ">= 1"),
        ("reward.judge.url", "judge" not in named or _is_http(j.url), "an http(s) URL when judge is used"),
        ("reward.judge.max_score", j.max_score > j.min_score, "> reward.judge.min_score"),
        ("reward.judge.max_new_tokens", j.max_new_tokens >= 1, ">= 1"),
        ("reward.judge.timeout_s", j.timeout_s > 0, "> 0"),
        ("reward.judge.retries", j.retries >= 0, ">= 0"),
        ("reward.judge.backoff_s", j.backoff_s >= 0, ">= 0"),
        ("reward.judge.cache_size", j.cache_size >= 0, ">= 0"),
    ]


def _is_http(url: str | None) -> bool:
    return bool(url) and url.startswith(("http://", "https://"))
