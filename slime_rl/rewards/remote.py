"""`remote_rm`: score samples with a reward model behind an HTTP endpoint.

The protocol (served by `slime-rl serve-rm`, `slime_rl.rewards.rm_server`, or any server speaking it):

    POST {url}   {"prompts": [str], "responses": [str], "labels": [any]}
    200          {"rewards": [number]}        one per sample, in order

`url` is the full endpoint URL (`http://127.0.0.1:8000/score`). A label that JSON cannot carry is sent as
its `str()`. Samples go in requests of at most `batch_size`; the runner calls `score_batch` on chunks of
that size from several threads, and the poster (`slime_rl.rewards.http_post`) bounds the requests in flight,
times out, retries and backs off.

Failures never stop the run. A request that fails (after its retries) or an answer that is garbage (not
JSON, no "rewards" list, the wrong length) fails every sample of its batch; a reward that is not a finite
number fails its sample only. The runner gives failed samples `reward.failure_reward` and counts them.
"""

from __future__ import annotations

import json
import math
from typing import Any

from slime_rl.rewards.config import RemoteRewardConfig
from slime_rl.rewards.http_post import JsonPoster
from slime_rl.types import Sample


class RemoteRewardModel:
    """A `RewardFn` with `score_batch`: the rewards a remote reward model gives the samples."""

    __name__ = "remote_rm"

    def __init__(self, cfg: RemoteRewardConfig):
        if not cfg.url:
            raise ValueError("reward.remote.url is not set: the reward model's endpoint, e.g. "
                             "http://127.0.0.1:8000/score (slime-rl serve-rm)")
        self.cfg = cfg
        self.batch_size = cfg.batch_size
        self.poster = JsonPoster(cfg.url, where="reward.remote", timeout_s=cfg.timeout_s, retries=cfg.retries,
                                 backoff_s=cfg.backoff_s, max_concurrency=cfg.max_concurrency,
                                 api_key_env=cfg.api_key_env)

    @property
    def min_timeout_s(self) -> float:
        """The runner waits at least this long for one call (every retry may run its course)."""
        return self.poster.worst_case_s + 1.0

    def __call__(self, sample: Sample) -> float:
        value = self.score_batch([sample])[0]
        if isinstance(value, BaseException):
            raise value
        return value

    def score_batch(self, samples: list[Sample]) -> list[float | Exception]:
        """One reward or Exception per sample; requests of at most `batch_size` samples, sent in turn.
        Raises when a request fails or its answer is garbage (that batch's samples all fail)."""
        out: list[float | Exception] = []
        for start in range(0, len(samples), self.batch_size):
            out.extend(self._request(samples[start:start + self.batch_size]))
        return out

    def _request(self, samples: list[Sample]) -> list[float | Exception]:
        body = {"prompts": [s.prompt_text for s in samples], "responses": [s.response_text for s in samples],
                "labels": [json_safe(s.label) for s in samples]}
        answer = self.poster.post("", body)
        where = f"POST {self.poster.url()}"
        if not isinstance(answer, dict) or not isinstance(answer.get("rewards"), list):
            raise ValueError(f"{where}: expected a JSON object with a 'rewards' list, got {_short(answer)}")
        rewards = answer["rewards"]
        if len(rewards) != len(samples):
            raise ValueError(f"{where}: {len(rewards)} rewards for {len(samples)} samples")
        return [_reward(value, i, where) for i, value in enumerate(rewards)]


def json_safe(label: Any) -> Any:
    """`label` when JSON can carry it (finite numbers, strings, lists, dicts...), else its str()."""
    try:
        json.dumps(label, allow_nan=False)
    except (TypeError, ValueError):
        return str(label)
    return label


def _reward(value: Any, index: int, where: str) -> float | Exception:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return TypeError(f"{where}: rewards[{index}] is not a number: {_short(value)}")
    if not math.isfinite(value):
        return ValueError(f"{where}: rewards[{index}] is not finite: {value}")
    return float(value)


def _short(value: Any, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."
