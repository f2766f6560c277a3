"""The rollout buffer: producers (rollout workers) push scored groups, the trainer pulls batches of them.

A group is the `n` samples of one prompt, scored; every generated token
carries the weight version that sampled it (`Sample.weight_versions`). The
buffer is bounded: `put` blocks while `capacity` groups wait (back-pressure on
generation when training falls behind). `get(n, trainer_version)` returns the
oldest `n` groups whose staleness is at most `max_staleness`, where

    staleness(group) = trainer_version - (oldest token version in the group)

(a group without generated tokens counts as fresh). `max_staleness` 0 is
synchronous RL, 1 one-step-off, k fully asynchronous with at most k versions
of lag. Staler groups are not trained on: they are set aside, counted, and
handed back by `take_stale()` so the producer can generate them again.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass

from slime_rl.types import Sample

Group = list[Sample]


class BufferClosed(RuntimeError):
    """The buffer was closed while a producer or the consumer waited on it."""


def group_version(group: Group, default: int) -> int:
    """The oldest weight version of any token in the group (`default` when it has none)."""
    versions = [v for s in group for v in s.weight_versions]
    return min(versions) if versions else default


@dataclass
class BufferStats:
    put: int = 0  # groups pushed by producers
    got: int = 0  # groups handed to the trainer
    stale: int = 0  # groups set aside as too old
    max_trained_staleness: int = 0  # the largest staleness of a group handed to the trainer

    def as_metrics(self, waiting: int) -> dict[str, float]:
        return {"buffer/put": float(self.put), "buffer/got": float(self.got), "buffer/stale": float(self.stale),
                "buffer/max_trained_staleness": float(self.max_trained_staleness), "buffer/waiting": float(waiting)}


class RolloutBuffer:
    """Bounded FIFO of scored groups with a staleness limit (see the module docstring). Thread-safe."""

    def __init__(self, capacity: int, max_staleness: int = 0):
        if capacity < 1:
            raise ValueError(f"buffer capacity must be >= 1, got {capacity}")
        if max_staleness < 0:
            raise ValueError(f"max_staleness must be >= 0, got {max_staleness}")
        self.capacity, self.max_staleness = capacity, max_staleness
        self.stats = BufferStats()
        self._groups: deque[Group] = deque()
        self._stale: list[Group] = []
        self._closed = False
        self._cv = threading.Condition()

    def __len__(self) -> int:
        with self._cv:
            return len(self._groups)

    def put(self, group: Group, timeout: float | None = None) -> None:
        """Add a scored group; blocks while the buffer is full (TimeoutError after `timeout` seconds)."""
        if not group:
            raise ValueError("cannot put an empty group")
        with self._cv:
            if not self._wait(lambda: len(self._groups) < self.capacity, timeout):
                raise TimeoutError(f"rollout buffer full ({self.capacity} groups) for {timeout} s")
            self._groups.append(group)
            self.stats.put += 1
            self._cv.notify_all()

    def get(self, n_groups: int, trainer_version: int, timeout: float | None = None) -> list[Group]:
        """The oldest `n_groups` fresh-enough groups, in arrival order; stale ones met on the way are set aside.
        Blocks until there are enough (TimeoutError after `timeout` seconds)."""
        if n_groups < 1:
            raise ValueError(f"n_groups must be >= 1, got {n_groups}")
        out: list[Group] = []
        with self._cv:
            def ready() -> bool:
                while self._groups and len(out) < n_groups:
                    group = self._groups.popleft()
                    staleness = trainer_version - group_version(group, trainer_version)
                    if staleness > self.max_staleness:
                        self._stale.append(group)
                        self.stats.stale += 1
                    else:
                        out.append(group)
                        self.stats.max_trained_staleness = max(self.stats.max_trained_staleness, staleness)
                self._cv.notify_all()  # room for producers
                return len(out) == n_groups

            if not self._wait(ready, timeout):
                self._groups.extendleft(reversed(out))  # nothing is lost on a timeout
                raise TimeoutError(f"rollout buffer: {len(out)} of {n_groups} groups after {timeout} s")
            self.stats.got += len(out)
        return out

    def take_stale(self) -> list[Group]:
        """The groups set aside as too old since the last call (to generate again)."""
        with self._cv:
            stale, self._stale = self._stale, []
            return stale

    def close(self) -> None:
        """Wake every waiter with BufferClosed."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()

    def metrics(self) -> dict[str, float]:
        with self._cv:
            return self.stats.as_metrics(len(self._groups))

    def state_dict(self) -> dict:
        """Waiting and stale groups + counters, for an exact resume."""
        with self._cv:
            return {"groups": list(self._groups), "stale": list(self._stale), "stats": vars(self.stats).copy()}

    def load_state_dict(self, state: dict) -> None:
        with self._cv:
            self._groups = deque(state["groups"])
            self._stale = list(state["stale"])
            self.stats = BufferStats(**state["stats"])
            self._cv.notify_all()

    def _wait(self, condition, timeout: float | None) -> bool:
        """Wait (lock held) until condition() is true; False on timeout; BufferClosed when closed."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not condition():
            if self._closed:
                raise BufferClosed("rollout buffer closed")
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return False
            self._cv.wait(remaining)
        return True
