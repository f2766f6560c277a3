"""`judge`: an LLM grades each response against a rubric; its score, mapped to [0, 1], is the reward.

The rubric (`reward.judge.rubric`: template text holding `{response}`, or the path of a file holding such
text; None = a built-in rubric) is filled in per sample: `{prompt}`, `{response}`, `{label}` (empty when
None), `{min_score}`, `{max_score}`; other braces are left as they are. The rendered text goes to

- `api="openai"`: POST {url}/v1/chat/completions, one user message, temperature 0 (any OpenAI-compatible
  server; a `url` ending in /v1 is taken as the API root);
- `api="sglang"`: POST {url}/generate with the raw text (SGLang's native protocol, or `slime-rl serve`).

How the score is read (`score_mode`):

- "text": from the answer, the last "Score: N"; else the last "N/M" or "N out of M" with M = max_score;
  else the last number in [min_score, max_score]. A "Score: N" outside the range, or no score at all, fails
  the sample.
- "logprobs": one token is generated and the top 20 alternatives of that first token are read; every
  token whose text (spaces stripped) is an integer in the range votes for it with its probability, and the
  score is the probability-weighted mean over those tokens (renormalised over them). Even a small model
  that never writes "Score: N" yields a score this way; a score needs a single token (with a character or
  digit-by-digit tokenizer, 10 is two tokens and cannot be voted for: use a range such as 0..9 or 1..5).
  No score token among the alternatives fails the sample.

The reward is (score - min_score) / (max_score - min_score). Answers are cached per rendered prompt (an LRU
of `cache_size` entries; failures are not cached): a group whose samples say the same thing, or an
evaluation that sees a prompt again, asks once. Requests time out, retry and back off as
`slime_rl.rewards.http_post` describes; concurrency is the runner's (`reward.max_workers` threads).
"""

from __future__ import annotations

import collections
import json
import math
import os
import re
import threading
from typing import Any

from slime_rl.rewards.config import JudgeConfig
from slime_rl.rewards.http_post import JsonPoster, excerpt
from slime_rl.types import Sample

TOP_LOGPROBS = 20  # alternatives read in logprobs mode (OpenAI's maximum)

_INTRO = """You are grading an assistant's response to a task.

Task:
{prompt}

Response:
{response}

Reference answer (may be empty):
{label}

Rate how well the response accomplishes the task, from {min_score} (worst) to {max_score} (best)."""
DEFAULT_RUBRIC = _INTRO + '\nAnswer with one line of the form "Score: N" and nothing else.'
DEFAULT_LOGPROBS_RUBRIC = (_INTRO + "\nAnswer with the score alone: one integer from {min_score} to {max_score}."
                           "\n\nScore: ")

_PLACEHOLDER = re.compile(r"\{(prompt|response|label|min_score|max_score)\}")
_NUMBER = r"(-?\d+(?:\.\d+)?)"
_SCORE = re.compile(r"score\s*(?:is|[:=])?\s*\**\s*" + _NUMBER, re.IGNORECASE)
_FRACTION = re.compile(_NUMBER + r"\s*(?:/|out\s+of)\s*" + _NUMBER, re.IGNORECASE)
_ANY_NUMBER = re.compile(_NUMBER)
_INTEGER_TOKEN = re.compile(r"[0-9]+")


class LLMJudge:
    """A `RewardFn`: the judge model's score of a sample, in [0, 1] (module docstring)."""

    __name__ = "judge"

    def __init__(self, cfg: JudgeConfig):
        if not cfg.url:
            raise ValueError("reward.judge.url is not set: the judge server's base URL, e.g. http://127.0.0.1:30001")
        self.cfg = cfg
        self.template = load_rubric(cfg.rubric, cfg.score_mode)
        self.poster = JsonPoster(cfg.url, where="reward.judge", timeout_s=cfg.timeout_s, retries=cfg.retries,
                                 backoff_s=cfg.backoff_s, max_concurrency=None, api_key_env=cfg.api_key_env)
        root = "" if self.poster.base_url.endswith("/v1") else "/v1"
        self.path = root + "/chat/completions" if cfg.api == "openai" else "/generate"
        self.cache = LRUCache(cfg.cache_size)

    @property
    def min_timeout_s(self) -> float:
        """The runner waits at least this long for one call (every retry may run its course)."""
        return self.poster.worst_case_s + 1.0

    def __call__(self, sample: Sample) -> float:
        prompt = self.render(sample)
        cached = self.cache.get(prompt)
        if cached is not None:
            return cached
        score = self.judge(prompt)
        reward = (score - self.cfg.min_score) / (self.cfg.max_score - self.cfg.min_score)
        self.cache.put(prompt, reward)
        return reward

    def render(self, sample: Sample) -> str:
        """The rubric filled in for `sample` (one pass: a response holding "{label}" stays as written)."""
        values = {"prompt": sample.prompt_text, "response": sample.response_text, "label": _label_text(sample.label),
                  "min_score": _number_text(self.cfg.min_score), "max_score": _number_text(self.cfg.max_score)}
        return _PLACEHOLDER.sub(lambda m: values[m.group(1)], self.template)

    def judge(self, prompt: str) -> float:
        """The judge's score of a rendered prompt, in [min_score, max_score] (no cache)."""
        logprobs = self.cfg.score_mode == "logprobs"
        max_tokens = 1 if logprobs else self.cfg.max_new_tokens
        if self.cfg.api == "openai":
            body: dict[str, Any] = {"model": self.cfg.model, "messages": [{"role": "user", "content": prompt}],
                                    "temperature": 0, "max_tokens": max_tokens}
            if logprobs:
                body.update(logprobs=True, top_logprobs=TOP_LOGPROBS)
        else:
            body = {"text": prompt, "sampling_params": {"temperature": 0, "max_new_tokens": max_tokens}}
            if logprobs:
                body.update(return_logprob=True, top_logprobs_num=TOP_LOGPROBS, return_text_in_logprobs=True)
        answer = self.poster.post(self.path, body)
        where = f"POST {self.poster.url(self.path)}"
        lo, hi = self.cfg.min_score, self.cfg.max_score
        if logprobs:
            return expected_score(_top_tokens(answer, self.cfg.api, where), lo, hi, where)
        return parse_score(_answer_text(answer, self.cfg.api, where), lo, hi)


class LRUCache:
    """A thread-safe LRU map of `size` entries (0: nothing is kept); counts hits and misses."""

    def __init__(self, size: int):
        self.size = size
        self.hits = 0
        self.misses = 0
        self._entries: collections.OrderedDict[str, float] = collections.OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> float | None:
        with self._lock:
            value = self._entries.get(key)
            if value is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return value

    def put(self, key: str, value: float) -> None:
        if self.size <= 0:
            return
        with self._lock:
            self._entries[key] = value
            self._entries.move_to_end(key)
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)


def load_rubric(rubric: str | None, score_mode: str) -> str:
    """The rubric template: the built-in one for the mode, `rubric` itself when it holds `{response}`, else
    the text of the file `rubric` names (which must hold `{response}`)."""
    if rubric is None:
        return DEFAULT_LOGPROBS_RUBRIC if score_mode == "logprobs" else DEFAULT_RUBRIC
    if "{response}" in rubric:
        return rubric
    if not os.path.isfile(rubric):
        raise ValueError(f"reward.judge.rubric: {rubric[:80]!r} holds no {{response}} placeholder and is not a "
                         "file; give the template text (with {response}) or the path of a file holding it")
    with open(rubric, encoding="utf-8") as f:
        text = f.read()
    if "{response}" not in text:
        raise ValueError(f"reward.judge.rubric: the file {rubric} holds no {{response}} placeholder")
    return text


def parse_score(text: str, lo: float, hi: float) -> float:
    """The score a judge's answer gives (module docstring: "text" mode); ValueError when there is none."""
    explicit = _SCORE.findall(text)
    if explicit:
        score = float(explicit[-1])
        if not lo <= score <= hi:
            raise ValueError(f"judge score {score:g} is outside [{lo:g}, {hi:g}] in {excerpt(text)}")
        return score
    fractions = [float(n) for n, d in _FRACTION.findall(text) if float(d) == hi and lo <= float(n) <= hi]
    if fractions:
        return fractions[-1]
    numbers = [float(n) for n in _ANY_NUMBER.findall(text) if lo <= float(n) <= hi]
    if numbers:
        return numbers[-1]
    raise ValueError(f"no score in [{lo:g}, {hi:g}] in the judge's answer {excerpt(text)}")


def expected_score(top: list[tuple[str, float]], lo: float, hi: float, where: str = "judge") -> float:
    """The probability-weighted mean of the integer scores in [lo, hi] among the (token text, logprob)
    alternatives, renormalised over those tokens; ValueError when none is a score."""
    votes: dict[int, float] = collections.defaultdict(float)
    for text, logprob in top:
        token = text.strip()
        if _INTEGER_TOKEN.fullmatch(token) and lo <= int(token) <= hi and math.isfinite(logprob):
            votes[int(token)] += math.exp(logprob)
    total = sum(votes.values())
    if not votes or total <= 0:
        seen = ", ".join(repr(t) for t, _ in top[:10])
        raise ValueError(f"{where}: no integer score in [{lo:g}, {hi:g}] among the first token's top "
                         f"{len(top)} alternatives ({seen})")
    return sum(score * p for score, p in votes.items()) / total


def _answer_text(answer: Any, api: str, where: str) -> str:
    try:
        text = answer["choices"][0]["message"]["content"] if api == "openai" else _generate_item(answer)["text"]
    except (KeyError, IndexError, TypeError):
        text = None
    if not isinstance(text, str):
        field = "choices[0].message.content" if api == "openai" else "text"
        raise ValueError(f"{where}: the answer has no string {field}: {excerpt(answer)}")
    return text


def _top_tokens(answer: Any, api: str, where: str) -> list[tuple[str, float]]:
    """(token text, logprob) of the first generated token's alternatives."""
    try:
        if api == "openai":
            first = answer["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
            top = [(entry["token"], entry["logprob"]) for entry in first]
        else:
            first = _generate_item(answer)["meta_info"]["output_top_logprobs"][0]
            top = [(entry[2], entry[0]) for entry in first]
        if not all(isinstance(t, str) and isinstance(lp, (int, float)) for t, lp in top):
            raise TypeError
    except (KeyError, IndexError, TypeError):
        field = ("choices[0].logprobs.content[0].top_logprobs" if api == "openai"
                 else "meta_info.output_top_logprobs[0] with token texts")
        raise ValueError(f"{where}: the answer has no {field}: {excerpt(answer)}") from None
    return [(t, float(lp)) for t, lp in top]


def _generate_item(answer: Any) -> Any:
    return answer[0] if isinstance(answer, list) and len(answer) == 1 else answer


def _label_text(label: Any) -> str:
    if label is None:
        return ""
    if isinstance(label, str):
        return label
    try:
        return json.dumps(label)
    except (TypeError, ValueError):
        return str(label)


def _number_text(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"
