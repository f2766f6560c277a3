"""Score samples with a reward function: in parallel, with per-sample time-outs.

A reward function that raises, returns something invalid (no "reward" key,
NaN, not a number) or runs past `timeout_s` never crashes the run: its sample
gets `{"reward": failure_reward, "reward_error": 1.0}` (plus
`"reward_timeout": 1.0` for a time-out), the failure is counted in
`RewardStats` and logged with the sample id `group_id/index`. A reward with
`score_batch(samples)` (an HTTP reward model) is called on chunks of its
`batch_size`; each entry of its answer is a value or an Exception (that
sample's failure), and `timeout_s` bounds a chunk. A reward that retries on
its own (HTTP) declares `min_timeout_s`, the longest its retries may take,
and the runner never gives up on it sooner.

Threads, not processes: reward functions are mostly cheap Python (regex,
numbers) or I/O (HTTP judges, sandboxes), and they get the `Sample` object
itself. Up to `max_workers` jobs of one call pull sample indices from a shared
counter, so thousands of cheap calls cost a lock round-trip each rather than a
future each. The jobs run on one process-wide pool of daemon threads that
outlive the call (an idle thread exits after `_IDLE_EXIT_S`): an RL run scores
dozens of groups a second, and starting `max_workers` threads per group cost
hundreds of thread starts and tens of thousands of context switches a second,
CPU taken from the trainer beside it. The calling thread sleeps until the
earliest running chunk's deadline (not on a fixed poll): a sample running past
`timeout_s` is marked failed and its job is abandoned and replaced. Python
cannot kill a thread, so the hung call keeps running in the background, its
thread lost to the pool (the pool starts another when work waits); its late
result is discarded, and because the thread is a daemon it never blocks
interpreter exit (a `ThreadPoolExecutor` would: its workers are joined at
exit). A reward that hangs often should isolate itself in a subprocess.
"""

from __future__ import annotations

import collections
import logging
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from slime_rl.protocols import RewardFn
from slime_rl.types import Sample

logger = logging.getLogger(__name__)

_MAX_LOGGED_FAILURES = 20  # per call; a summary line covers the rest
_OK, _ERROR, _TIMEOUT = "ok", "error", "timeout"
_IDLE_EXIT_S = 30.0  # a pool thread with no work for this long exits


class _DaemonPool:
    """Daemon threads that run submitted callables, started on demand and kept while work keeps coming.

    A callable that never returns keeps its thread; later work gets a new one."""

    def __init__(self, idle_exit_s: float = _IDLE_EXIT_S):
        self.idle_exit_s = idle_exit_s
        self._cond = threading.Condition()
        self._tasks: collections.deque = collections.deque()
        self._idle = 0  # threads waiting for a task
        self.started = 0  # threads started in all (for tests)

    def submit(self, fn) -> None:
        with self._cond:
            self._tasks.append(fn)
            if self._idle >= len(self._tasks):
                self._cond.notify()
                return
            self.started += 1
        threading.Thread(target=self._run, name=f"reward-{self.started}", daemon=True).start()

    def _run(self) -> None:
        while True:
            with self._cond:
                self._idle += 1
                deadline = time.monotonic() + self.idle_exit_s
                while not self._tasks:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        self._idle -= 1
                        return
                    self._cond.wait(left)
                self._idle -= 1
                fn = self._tasks.popleft()
            fn()


_POOL = _DaemonPool()


@dataclass
class RewardStats:
    num_samples: int = 0
    errors: int = 0  # raised or returned an invalid value
    timeouts: int = 0
    elapsed_s: float = 0.0
    failed_ids: list[str] = field(default_factory=list)  # "group_id/index"

    def metrics(self) -> dict[str, float]:
        return {
            "reward/errors": float(self.errors),
            "reward/timeouts": float(self.timeouts),
            "reward/elapsed_s": self.elapsed_s,
        }


class _Scoring:
    """State shared by the workers and the watcher of one `score_samples` call.

    Work comes in chunks: one sample each, or `batch_size` samples for a reward with `score_batch`."""

    def __init__(self, samples: list[Sample], reward_fn: RewardFn):
        self.samples = samples
        self.reward_fn = reward_fn
        self.batched = callable(getattr(reward_fn, "score_batch", None))
        size = max(1, int(getattr(reward_fn, "batch_size", 32))) if self.batched else 1
        self.chunks = [(a, min(a + size, len(samples))) for a in range(0, len(samples), size)]
        self.lock = threading.Lock()
        self.finished = threading.Event()
        self.next_chunk = 0
        self.num_done = 0
        self.outcomes: list[tuple[str, Any] | None] = [None] * len(samples)
        self.running: dict[int, tuple[int, float]] = {}  # worker id -> (chunk index, start time)
        self.num_workers = 0

    def start_worker(self) -> None:
        worker_id = self.num_workers
        self.num_workers += 1
        _POOL.submit(lambda: self._work(worker_id))

    def wait_s(self, timeout_s: float) -> float:
        """Seconds until the earliest running chunk's deadline (`timeout_s` while none runs yet)."""
        with self.lock:
            started = min((t for _, t in self.running.values()), default=None)
        if started is None:
            return timeout_s
        return max(0.001, started + timeout_s - time.monotonic())

    def _work(self, worker_id: int) -> None:
        while True:
            with self.lock:
                chunk = self.next_chunk
                if chunk >= len(self.chunks):
                    return
                self.next_chunk += 1
                self.running[worker_id] = (chunk, time.monotonic())
            a, b = self.chunks[chunk]
            outcomes = self._score(a, b)
            with self.lock:
                if self.outcomes[a] is not None:
                    return  # timed out meanwhile: this worker was abandoned and replaced
                del self.running[worker_id]
                for index, outcome in zip(range(a, b), outcomes):
                    self._finish(index, outcome)

    def _score(self, a: int, b: int) -> list[tuple[str, Any]]:
        if not self.batched:
            return [_outcome(lambda: self.reward_fn(self.samples[a]))]
        try:
            values = list(self.reward_fn.score_batch(self.samples[a:b]))
            if len(values) != b - a:
                raise ValueError(f"score_batch returned {len(values)} values for {b - a} samples")
        except Exception as e:  # the whole chunk failed
            return [(_ERROR, f"{type(e).__name__}: {e}")] * (b - a)
        return [_outcome(lambda v=v: _raise_or_return(v)) for v in values]

    def _finish(self, index: int, outcome: tuple[str, Any]) -> None:
        """Record an outcome; caller holds the lock."""
        self.outcomes[index] = outcome
        self.num_done += 1
        if self.num_done == len(self.samples):
            self.finished.set()

    def expire(self, timeout_s: float) -> int:
        """Mark chunks running past `timeout_s` as timed out; returns how many workers were lost."""
        now = time.monotonic()
        with self.lock:
            late = [(w, c, t) for w, (c, t) in self.running.items() if now - t > timeout_s]
            for worker_id, chunk, started in late:
                del self.running[worker_id]
                for index in range(*self.chunks[chunk]):
                    self._finish(index, (_TIMEOUT, f"timed out after {now - started:.1f}s (limit {timeout_s}s)"))
        return len(late)


def _raise_or_return(value: Any) -> Any:
    if isinstance(value, BaseException):
        raise value
    return value


def _outcome(call) -> tuple[str, Any]:
    try:
        return _OK, validate_reward(call())
    except Exception as e:  # any failure of user code is the sample's failure
        return _ERROR, f"{type(e).__name__}: {e}"


def validate_reward(value: Any) -> float | dict[str, Any]:
    """A float reward, or a dict whose "reward" is a finite number."""
    if isinstance(value, dict):
        if "reward" not in value:
            raise ValueError(f"reward dict has no 'reward' key (keys: {sorted(value)})")
        reward = _finite(value["reward"])
        return {**value, "reward": reward}
    return _finite(value)


def _finite(value: Any) -> float:
    if not isinstance(value, (int, float)) and not hasattr(value, "__float__"):
        raise TypeError(f"reward must be a number or a dict with 'reward', got {type(value).__name__}")
    reward = float(value)
    if not math.isfinite(reward):
        raise ValueError(f"reward is not finite: {reward}")
    return reward


def score_samples(
    samples: list[Sample],
    reward_fn: RewardFn,
    timeout_s: float = 10.0,
    failure_reward: float = 0.0,
    max_workers: int = 8,
) -> RewardStats:
    """Set `sample.reward` on every sample; failures get `failure_reward` and are counted."""
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
    if max_workers < 1:
        raise ValueError(f"max_workers must be >= 1, got {max_workers}")
    timeout_s = max(timeout_s, float(getattr(reward_fn, "min_timeout_s", 0.0)))
    start = time.perf_counter()
    stats = RewardStats(num_samples=len(samples))
    if not samples:
        return stats
    scoring = _Scoring(samples, reward_fn)
    for _ in range(min(max_workers, len(scoring.chunks))):
        scoring.start_worker()
    while not scoring.finished.wait(scoring.wait_s(timeout_s)):
        for _ in range(scoring.expire(timeout_s)):
            scoring.start_worker()  # replaces the abandoned one; exits at once if no work is left
    _apply(samples, scoring.outcomes, failure_reward, stats, getattr(reward_fn, "__name__", repr(reward_fn)))
    stats.elapsed_s = time.perf_counter() - start
    return stats


def _apply(
    samples: list[Sample], outcomes: list, failure_reward: float, stats: RewardStats, fn_name: str
) -> None:
    for sample, (kind, value) in zip(samples, outcomes):
        if kind == _OK:
            sample.reward = value
            continue
        sample.reward = {"reward": float(failure_reward), "reward_error": 1.0}
        if kind == _TIMEOUT:
            sample.reward["reward_timeout"] = 1.0
            stats.timeouts += 1
        else:
            stats.errors += 1
        sample_id = f"{sample.group_id}/{sample.index}"
        stats.failed_ids.append(sample_id)
        if len(stats.failed_ids) <= _MAX_LOGGED_FAILURES:
            logger.warning("reward fn %s failed on sample %s: %s", fn_name, sample_id, value)
    if len(stats.failed_ids) > _MAX_LOGGED_FAILURES:
        logger.warning(
            "reward fn %s: %d failures in total (%d errors, %d timeouts); first %d logged",
            fn_name, len(stats.failed_ids), stats.errors, stats.timeouts, _MAX_LOGGED_FAILURES,
        )
